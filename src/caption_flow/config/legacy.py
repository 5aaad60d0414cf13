"""Keys of the original caption-flow tool, translated to ours before validation.

Its users arrive with its configs, so every key it documented loads: a key that means
something here becomes the current key (so the rest of the code sees only those), a key that
does not is dropped with one log line naming what replaces it. Anything else unknown is still
an error. Each load logs each legacy key once (the models re-validate dumps, which hold no
legacy keys any more).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: Original orchestrator keys with no meaning here, and what replaces each.
ORCHESTRATOR_DROPPED = {
    "chunk_buffer_multiplier": "chunks are cut from the full dataset listing at start-up, "
    "so no chunk buffer is kept; chunks_per_request and max_chunks_per_session bound what "
    "a worker holds",
    "min_chunk_buffer": "chunks are cut from the full dataset listing at start-up, so no "
    "chunk buffer is kept; chunks_per_request and max_chunks_per_session bound what a "
    "worker holds",
}

#: Original storage keys with no meaning here, and what replaces each.
STORAGE_DROPPED = {
    "checkpoint_dir": "progress lives in storage.data_dir/state.db (SQLite), committed "
    "before each result is acknowledged",
    "checkpoint_interval": "every result is committed to storage.data_dir/state.db before "
    "it is acknowledged; storage.compact_rows and compact_seconds set how often Parquet "
    "parts are written",
    "caption_buffer_size": "storage.compact_rows and storage.compact_seconds set when "
    "journaled captions are written to a Parquet part",
}


def _is_mapping(data: Any) -> bool:
    return isinstance(data, dict)


def _drop(data: dict[str, Any], dropped: dict[str, str], section: str) -> dict[str, Any]:
    out = dict(data)
    for key, replacement in dropped.items():
        if key in out:
            del out[key]
            log.warning(
                "%s.%s (original caption-flow) has no effect: %s", section, key, replacement
            )
    return out


def orchestrator_keys(data: Any) -> Any:
    """The orchestrator section: drop the chunk-buffer keys."""
    if not _is_mapping(data):
        return data
    return _drop(data, ORCHESTRATOR_DROPPED, "orchestrator")


def storage_keys(data: Any) -> Any:
    """The storage section: drop the checkpoint and buffer keys."""
    if not _is_mapping(data):
        return data
    return _drop(data, STORAGE_DROPPED, "orchestrator.storage")


def dataset_keys(data: Any) -> Any:
    """The dataset section: ``type: local`` is ``local_folder``."""
    if not _is_mapping(data) or data.get("type") != "local":
        return data
    log.info("orchestrator.dataset.type: local (original caption-flow) is read as local_folder")
    return {**data, "type": "local_folder"}


def worker_keys(data: Any) -> Any:
    """The worker section: ``vllm`` picks the engine, the two queue sizes become ours.

    ``vllm: true`` is ``engine: vllm`` and ``vllm: false`` is ``engine: transformers``
    (the original's only other worker); ``readahead_size`` (images fetched ahead) becomes
    ``prefetch_items`` and ``inference_queue_size`` (images waiting for the engine)
    becomes ``ready_items``.
    """
    if not _is_mapping(data):
        return data
    out = dict(data)
    if "vllm" in out:
        wanted = out.pop("vllm")
        if not isinstance(wanted, bool):
            raise ValueError(f"worker.vllm must be true or false, not {wanted!r}")
        engine = "vllm" if wanted else "transformers"
        given = out.get("engine")
        if given not in (None, "auto", engine):
            raise ValueError(
                f"worker.vllm: {str(wanted).lower()} contradicts worker.engine: {given}; "
                "keep one of them"
            )
        out["engine"] = engine
        log.info(
            "worker.vllm: %s (original caption-flow) is engine: %s", str(wanted).lower(), engine
        )
    for old, new in (("readahead_size", "prefetch_items"), ("inference_queue_size", "ready_items")):
        if old in out:
            value = out.pop(old)
            if new in out and out[new] != value:
                raise ValueError(f"worker.{old} and worker.{new} disagree; keep {new}")
            out[new] = value
            log.info("worker.%s (original caption-flow) is worker.%s", old, new)
    return out
