"""Semantic checks of one caption: empty, refused, not JSON, or not what the schema says.

The captioner retries a caption that fails a check once (with the job's ``retry_prompt`` and
``retry_sampling``), so every engine gets the same rules. Pure functions, no engine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import jsonschema

from caption_flow.errors import ConfigError

EMPTY = "empty caption"
_MAX_DETAIL_CHARS = 200


@lru_cache(maxsize=32)
def _validator(schema_text: str) -> Any:
    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"output_schema is not a valid JSON schema: {exc.message}") from exc
    return cls(schema)


def schema_problem(text: str, schema: dict[str, Any]) -> str | None:
    """Why ``text`` is not a JSON document matching ``schema``, or None when it is.

    Raises ConfigError when the schema itself is invalid (the job is wrong, not the item).
    """
    return schema_text_problem(text, schema_text(schema))


def schema_text(schema: dict[str, Any]) -> str:
    """A schema's canonical JSON text: what validators are cached by."""
    return json.dumps(schema, sort_keys=True)


def schema_text_problem(text: str, schema: str) -> str | None:
    """:func:`schema_problem` for a schema given as its canonical text (no re-parse)."""
    validator = _validator(schema)
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"invalid JSON: {exc}"[:_MAX_DETAIL_CHARS]
    return _breaks(validator, value)


def schema_value_problem(value: Any, schema: str) -> str | None:
    """:func:`schema_text_problem` for a document already parsed (a caller checking one
    document against several schemas parses it once)."""
    return _breaks(_validator(schema), value)


def _breaks(validator: Any, value: Any) -> str | None:
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"JSON breaks the schema at {where}: {error.message}"[:_MAX_DETAIL_CHARS]


_ESCAPE = re.compile(r"\\(.)", re.S)
_JSON_ESCAPES = set('"\\/bfnrtu')


def repair_json(text: str, repairs: Iterable[str]) -> str:
    """``text`` with the named repairs applied (see ModelConfig.json_repairs); text that is
    no JSON even after them is returned as it came, for the check to name the problem."""
    repairs = set(repairs)
    if not repairs:
        return text
    fixed = text
    if "invalid_escapes" in repairs:
        try:
            json.loads(fixed)
        except ValueError:
            fixed = _ESCAPE.sub(
                lambda m: m.group(0) if m.group(1) in _JSON_ESCAPES else "\\\\" + m.group(1),
                fixed,
            )
    if "duplicate_array_items" in repairs:
        try:
            value = json.loads(fixed)
        except ValueError:
            return fixed
        deduplicated = _without_duplicates(value)
        if deduplicated != value:
            fixed = json.dumps(deduplicated, ensure_ascii=False, separators=(",", ":"))
    return fixed


def _without_duplicates(value: Any) -> Any:
    if isinstance(value, list):
        kept: list[Any] = []
        seen: set[str] = set()
        for item in value:
            item = _without_duplicates(item)
            key = json.dumps(item, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append(item)
        return kept
    if isinstance(value, dict):
        return {k: _without_duplicates(v) for k, v in value.items()}
    return value


def caption_problem(text: str, refusal_markers: Sequence[str], schema: str | None) -> str | None:
    """Why ``text`` is not a usable caption (:data:`EMPTY` for no text), or None.
    ``schema``: the output schema as :func:`schema_text` (made once per batch, not per
    caption).

    A refusal is a caption that *starts* with a marker (case-insensitive): a caption that
    merely mentions "I cannot" later on is not one.
    """
    stripped = text.strip()
    if not stripped:
        return EMPTY
    lowered = stripped.lower()
    for marker in refusal_markers:
        if marker.strip() and lowered.startswith(marker.strip().lower()):
            return f"refused ({marker.strip()!r})"
    if schema is not None:
        return schema_text_problem(stripped, schema)
    return None
