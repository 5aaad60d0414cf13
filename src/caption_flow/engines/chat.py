"""Prompt layout shared by every engine: one user turn with the image, in the model's own
chat template."""

from __future__ import annotations

from typing import Any

from caption_flow.errors import EngineError


def chat_messages(prompt: str) -> list[dict[str, Any]]:
    """One user turn, image first: the layout VLM chat templates expect, and one that lets
    several prompts about the same image share its tokens through vLLM's prefix cache."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def format_prompt(processor: Any, prompt: str) -> str:
    """``prompt`` in the model's own chat template (the processor's, else its tokenizer's)."""
    messages = chat_messages(prompt)
    if getattr(processor, "chat_template", None):
        text: str = processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return text
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text
    raise EngineError("the model has no chat template; captionflow needs one to place the image")
