"""Benchmark exports: rows/s and peak memory exporting generated output to parquet and jsonl.

    .venv/bin/python benchmarks/bench_export.py [--rows 1000000] [--quick]

Generates a data directory like an orchestrator's: ``--rows`` rows in parts of 100,000
(two prompts per item, captions of 40-400 characters, 2 % failed rows) recorded in a
``state.db``. Each export then runs in a child process of its own, so its peak RSS
(``getrusage`` maxrss) is its own: captionflow's export (de-duplicated, failed rows left
out, sorted by shard and key) to parquet and to jsonl, and as the anchor DuckDB's own
``COPY`` of the same parts to the same formats (no de-duplication, no filter).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from caption_flow.storage.parts import part_name
from caption_flow.storage.rows import BASE_FIELDS
from caption_flow.storage.state import StateDB

PART_ROWS = 100_000
WORDS = (
    "a red cat sits on the green sofa near an open window with soft light and".split(" ")  # noqa: SIM905
)


def caption_pool(size: int, rng: np.random.Generator) -> pa.Array:
    texts = []
    for _ in range(size):
        n = int(rng.integers(8, 70))
        texts.append(" ".join(rng.choice(WORDS, n)))
    return pa.array(texts, pa.string())


def make_part(start: int, rows: int, pool: pa.Array, rng: np.random.Generator) -> pa.Table:
    ids = np.arange(start, start + rows)
    failed = rng.random(rows) < 0.02
    picks = pool.take(pa.array(rng.integers(0, len(pool), rows * 2)))
    offsets = pa.array(np.arange(0, rows * 2 + 1, 2, dtype=np.int32))
    captions = pa.ListArray.from_arrays(offsets, picks)
    shard = [f"shard-{i // 10_000:05d}" for i in ids]
    columns = {
        "dataset": pa.array(["bench"] * rows),
        "shard": pa.array(shard),
        "item_key": pa.array([f"{i:09d}.jpg" for i in ids]),
        "chunk_id": pa.array(
            [f"{s}:{(i % 10_000) // 1000}" for s, i in zip(shard, ids, strict=True)]
        ),
        "model": pa.array(["tiny/model"] * rows),
        "contributor_id": pa.array([f"user{i % 7}" for i in ids]),
        "worker": pa.array([f"worker-{i % 13}" for i in ids]),
        "timestamp": pa.array(1_700_000_000_000 + ids, pa.timestamp("ms", tz="UTC")),
        "processing_ms": pa.array(rng.random(rows) * 100, pa.float32()),
        "width": pa.array(np.full(rows, 512), pa.int32()),
        "height": pa.array(np.full(rows, 384), pa.int32()),
        "error": pa.array([("decode failed" if f else None) for f in failed], pa.string()),
        "quality_score": pa.nulls(rows, pa.float32()),
        "captions": captions,
    }
    schema = pa.schema([*BASE_FIELDS, pa.field("captions", pa.list_(pa.string()))])
    return pa.Table.from_pydict(columns, schema=schema)


def make_data_dir(data_dir: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    pool = caption_pool(50_000, rng)
    parts = data_dir / "captions"
    parts.mkdir(parents=True)
    db = StateDB(data_dir / "state.db")
    try:
        for seq, start in enumerate(range(0, rows, PART_ROWS)):
            table = make_part(start, min(PART_ROWS, rows - start), pool, rng)
            name = part_name(seq)
            pq.write_table(table, parts / name, compression="zstd")
            db.adopt_part(name, table.num_rows)
    finally:
        db.close()


def child(kind: str, fmt: str, data_dir: Path, out: Path) -> None:
    """One export in this process; prints rows, seconds and this process's peak RSS."""
    start = time.perf_counter()
    if kind == "captionflow":
        from caption_flow.export import Selection, WriterOptions, export

        target = out / "export.jsonl" if fmt == "jsonl" else out / "parquet"
        result = export(data_dir, fmt, Selection(), WriterOptions(output=target))
        rows = result.rows
    else:
        import duckdb

        files = sorted(str(p) for p in (data_dir / "captions").glob("part-*.parquet"))
        conn = duckdb.connect()
        conn.execute("SET TimeZone='UTC'")
        source = f"read_parquet({files!r}, union_by_name=true)"
        target = out / ("copy.jsonl" if fmt == "jsonl" else "copy.parquet")
        options = "(FORMAT JSON)" if fmt == "jsonl" else "(FORMAT PARQUET, COMPRESSION zstd)"
        conn.execute(f"COPY (SELECT * FROM {source}) TO '{target}' {options}")
        rows = int(conn.execute(f"SELECT count(*) FROM {source}").fetchone()[0])  # type: ignore[index]
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_mib": peak_kib / 1024}))


def run_child(kind: str, fmt: str, data_dir: Path, out: Path) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, fmt, str(data_dir), str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 rows")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, fmt, data_dir, out = args.child
        child(kind, fmt, Path(data_dir), Path(out))
        return
    rows = 100_000 if args.quick else args.rows
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        data_dir = Path(tmp) / "data"
        t0 = time.perf_counter()
        make_data_dir(data_dir, rows)
        size = sum(p.stat().st_size for p in (data_dir / "captions").iterdir()) / 2**20
        print(
            f"generated {rows:,} rows ({size:.0f} MiB of parts) in {time.perf_counter() - t0:.1f} s"
        )
        print("| export | format | rows | seconds | rows/s | peak RSS MiB |")
        print("|---|---|---:|---:|---:|---:|")
        for fmt in ("parquet", "jsonl"):
            for kind in ("captionflow", "duckdb-copy"):
                r = run_child(kind, fmt, data_dir, Path(tmp) / f"{kind}-{fmt}")
                rate = r["rows"] / r["seconds"]
                print(
                    f"| {kind} | {fmt} | {int(r['rows']):,} | {r['seconds']:.1f} | "
                    f"{rate:,.0f} | {r['peak_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
