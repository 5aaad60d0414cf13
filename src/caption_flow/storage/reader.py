"""Read the caption output back: counts, samples and failures, streamed with pyarrow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from caption_flow.storage.parts import PART_GLOB

# A reason is grouped on its first characters: long ones often end in item-specific detail.
REASON_CHARS = 200


def output_dataset(parts_dir: Path) -> ds.Dataset:
    """Every part as one dataset. Parts written under different jobs may have different
    output columns; the dataset has them all (null where a part lacks one)."""
    files = sorted(str(p) for p in parts_dir.glob(PART_GLOB))
    schema = pa.unify_schemas([pq.read_schema(f) for f in files]) if files else None
    return ds.dataset(files, format="parquet", schema=schema)


def sample_captions(parts_dir: Path, field: str = "captions", n: int = 3) -> list[tuple[str, str]]:
    """(item_key, first non-empty caption) for the first ``n`` rows that have one."""
    if not any(parts_dir.glob(PART_GLOB)):
        return []
    dataset = output_dataset(parts_dir)
    if field not in dataset.schema.names:
        return []
    samples: list[tuple[str, str]] = []
    for batch in dataset.to_batches(columns=["item_key", field]):
        for key, captions in zip(
            batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True
        ):
            text = next((c for c in captions or () if c), None)
            if text is not None:
                samples.append((key, text))
            if len(samples) >= n:
                return samples
    return samples


def failed_rows(path: Path) -> int:
    """Rows of one part with an error, from the footer's statistics where it has them."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    if "error" not in names:
        return 0
    column = names.index("error")
    nulls = 0
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(column).statistics
        if stats is None or not stats.has_null_count:
            errors = pq.read_table(path, columns=["error"]).column(0)
            return len(errors) - errors.null_count
        nulls += stats.null_count
    return int(meta.num_rows - nulls)


@dataclass
class FailureReason:
    reason: str
    count: int
    examples: list[str] = field(default_factory=list)


def failure_summary(parts_dir: Path, top: int = 5, examples: int = 3) -> list[FailureReason]:
    """The ``top`` most frequent errors in the output, each with up to ``examples`` keys.
    Reads only the rows with an error, batch by batch."""
    if not any(parts_dir.glob(PART_GLOB)):
        return []
    dataset = output_dataset(parts_dir)
    if "error" not in dataset.schema.names:
        return []
    reasons: dict[str, FailureReason] = {}
    scanner = dataset.scanner(columns=["item_key", "error"], filter=pc.field("error").is_valid())
    for batch in scanner.to_batches():
        for key, error in zip(
            batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True
        ):
            text = " ".join(str(error).split())
            reason = text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"
            entry = reasons.setdefault(reason, FailureReason(reason, 0))
            entry.count += 1
            if len(entry.examples) < examples:
                entry.examples.append(key)
    return sorted(reasons.values(), key=lambda r: (-r.count, r.reason))[:top]
