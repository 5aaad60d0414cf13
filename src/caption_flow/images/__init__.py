"""Image decoding and resizing for workers: ``decode_image`` for one image, ``DecodePool`` to
run it in threads off the event loop."""

from caption_flow.images.decode import (
    decode_image,
    error_reason,
    fast_decoder_available,
    target_size,
)
from caption_flow.images.pool import DecodedImage, DecodePool, decode_safely, usable_cores

__all__ = [
    "DecodePool",
    "DecodedImage",
    "decode_image",
    "decode_safely",
    "error_reason",
    "fast_decoder_available",
    "target_size",
    "usable_cores",
]
