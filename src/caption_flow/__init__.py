"""captionflow: caption very large image datasets with vision-language models on many GPUs."""

__version__ = "0.1.0"
