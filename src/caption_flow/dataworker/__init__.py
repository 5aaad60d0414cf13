"""CPU clients that prepare items for GPU workers without the dataset."""
