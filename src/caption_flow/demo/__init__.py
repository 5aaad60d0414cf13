"""Offline demo assets: a tiny random vision-language model and synthetic images."""
