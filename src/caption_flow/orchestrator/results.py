"""Check a worker's results message against the job, and turn it into one journal batch.

The wire format already bounds every field (protocol.messages); here the limits that depend
on the job: only the job's output fields, no more entries per field than it has prompts, and
captions no longer than its ``max_tokens`` can produce. The item key comes from the
orchestrator's own record of the lease, never from the message, and the contributor from the
session's token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from caption_flow.config.models import ModelConfig
from caption_flow.engines.captioner import job_stages
from caption_flow.engines.checks import schema_text, schema_value_problem
from caption_flow.protocol.messages import ItemResult, Results
from caption_flow.storage.rows import JournalRecord, encode_record, is_failure
from caption_flow.storage.state import JournalBatch

# A generated token decodes to at most a few dozen characters; this leaves room for any
# tokenizer while still stopping a multi-megabyte "caption".
CHARS_PER_TOKEN = 32
CAPTION_SLACK_CHARS = 256


@dataclass(frozen=True)
class JobRules:
    """What a job's results may contain: entries per output field, and caption length;
    ``json_schemas``: per field whose stage has an ``output_schema``, the schemas (as JSON
    text) its non-empty entries must match, any one of them (two while workers switch
    jobs). The worker checked them already; a hostile or buggy one is checked here again."""

    fields: dict[str, int]
    max_caption_chars: int
    json_schemas: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, job: ModelConfig) -> JobRules:
        fields: dict[str, int] = {}
        json_schemas: dict[str, frozenset[str]] = {}
        max_tokens = job.sampling.max_tokens
        if job.retry_sampling is not None:
            max_tokens = max(max_tokens, job.retry_sampling.max_tokens)
        for stage in job_stages(job):
            fields[stage.output_field] = fields.get(stage.output_field, 0) + len(stage.prompts)
            for sampling in (stage.sampling, stage.retry_sampling):
                if sampling is not None:
                    max_tokens = max(max_tokens, sampling.max_tokens)
            schema = stage.output_schema or job.output_schema
            if schema is not None:
                text = schema_text(schema)
                json_schemas[stage.output_field] = json_schemas.get(
                    stage.output_field, frozenset()
                ) | {text}
        chars = max_tokens * CHARS_PER_TOKEN + CAPTION_SLACK_CHARS
        return cls(fields, chars, json_schemas)

    def merged(self, other: JobRules) -> JobRules:
        """Either job's results pass: a worker finishes its batch on the job it started."""
        fields = dict(self.fields)
        for name, count in other.fields.items():
            fields[name] = max(fields.get(name, 0), count)
        chars = max(self.max_caption_chars, other.max_caption_chars)
        schemas = {
            name: self.json_schemas[name] | other.json_schemas[name]
            for name in self.json_schemas.keys() & other.json_schemas.keys()
        }
        return JobRules(fields, chars, schemas)


def check_items(items: Iterable[ItemResult], rules: JobRules) -> str | None:
    """Why these results cannot be stored under ``rules``, or None when they can."""
    for item in items:
        for name, texts in item.outputs.items():
            allowed = rules.fields.get(name)
            if allowed is None:
                return f"item {item.item_id}: output field {name!r} is not part of the job"
            if len(texts) > allowed:
                return (
                    f"item {item.item_id}: {len(texts)} entries for {name!r}, the job has {allowed}"
                )
            for text in texts:
                if len(text) > rules.max_caption_chars:
                    return (
                        f"item {item.item_id}: a {name!r} entry of {len(text)} characters "
                        f"(the job allows {rules.max_caption_chars})"
                    )
                schemas = rules.json_schemas.get(name)
                if schemas and text:
                    problem = json_problem(text, schemas)
                    if problem is not None:
                        return f"item {item.item_id}: a {name!r} entry: {problem}"
    return None


def json_problem(text: str, schemas: Iterable[str]) -> str | None:
    """Why ``text`` matches none of ``schemas`` (JSON texts), or None when it matches one.
    Parsed once; hostile nesting depth is an answer, not a crash."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return "not valid JSON"
    problem = None
    for schema in schemas:
        try:
            problem = schema_value_problem(value, schema)
        except RecursionError:
            return "JSON nested too deeply"
        if problem is None:
            return None
    return problem


def first_per_id(items: Iterable[ItemResult]) -> dict[int, ItemResult]:
    """One result per item id: the first one wins, repeats in a message are ignored."""
    by_id: dict[int, ItemResult] = {}
    for item in items:
        by_id.setdefault(item.item_id, item)
    return by_id


def build_batch(
    results: Results,
    by_id: dict[int, ItemResult],
    fresh: list[int],
    *,
    final_failure: Callable[[int], bool],
    keys: dict[int, str],
    dataset: str,
    shard: str,
    contributor: str,
    worker: str,
) -> JournalBatch:
    """The journal batch for the ``fresh`` items of ``results``.

    A failed item whose failure is not final yet (``final_failure`` says) is not stored: its
    try is counted (``retry_ids``) and it is captioned again, by whichever worker gets it.
    """
    items: list[ItemResult] = []
    retry: list[int] = []
    for item_id in fresh:
        item = by_id[item_id]
        if item.error is not None and not final_failure(item_id):
            retry.append(item_id)
            continue
        key = keys.get(item_id, item.key)
        items.append(item if key == item.key else msgspec.structs.replace(item, key=key))
    record = JournalRecord(
        dataset=dataset,
        shard=shard,
        chunk_id=results.chunk_id,
        model=results.model,
        contributor_id=contributor,
        worker=worker,
        timestamp=time.time(),
        items=items,
    )
    # Counted as the store will write them: an item without any text is failed too (NO_TEXT).
    failed = sum(1 for item in items if is_failure(item.error, item.outputs))
    return JournalBatch(
        [i.item_id for i in items],
        encode_record(record) if items else b"",
        contributor,
        failed,
        chunk_id=results.chunk_id,
        retry_ids=retry,
        captions=sum(1 for i in items for texts in i.outputs.values() for t in texts if t.strip()),
    )
