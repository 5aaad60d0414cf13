"""Read the caption output back: counts and samples, streamed with pyarrow datasets."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from caption_flow.storage.parts import PART_GLOB


def output_dataset(parts_dir: Path) -> ds.Dataset:
    """Every part as one dataset. Parts written under different jobs may have different
    output columns; the dataset has them all (null where a part lacks one)."""
    files = sorted(str(p) for p in parts_dir.glob(PART_GLOB))
    schema = pa.unify_schemas([pq.read_schema(f) for f in files]) if files else None
    return ds.dataset(files, format="parquet", schema=schema)


def sample_captions(parts_dir: Path, field: str = "captions", n: int = 3) -> list[tuple[str, str]]:
    """(item_key, first caption) for the first ``n`` rows that have one."""
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
            if captions:
                samples.append((key, captions[0]))
            if len(samples) >= n:
                return samples
    return samples
