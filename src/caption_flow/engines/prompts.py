"""Prompt templates: ``{name}`` placeholders filled from dataset columns and earlier stages.

Only ``{identifier}`` is a placeholder, so prompts that contain JSON or other braces pass
through unchanged, and a name with no value stays as written instead of failing the item.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def format_value(value: Any) -> str:
    """Lists (several captions, tags) read as one comma-separated phrase."""
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value if v is not None and str(v).strip())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def render_prompt(template: str, values: Mapping[str, Any]) -> str:
    """Fill ``template``; a missing (or None) value leaves its placeholder untouched."""

    def replace(match: re.Match[str]) -> str:
        value = values.get(match.group(1))
        return match.group(0) if value is None else format_value(value)

    return _PLACEHOLDER.sub(replace, template)


def placeholders(template: str) -> list[str]:
    """The names a template refers to, in order of first use."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(template)))
