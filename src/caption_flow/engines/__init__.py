"""Inference engines behind one interface (vLLM, transformers); they know nothing of the network."""
