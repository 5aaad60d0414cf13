"""Image decoding and resizing for workers."""
