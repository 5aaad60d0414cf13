"""webdataset shards and a parquet dataset through the real orchestrator and worker (tiny
model, websockets on 127.0.0.1): the sources as the rest of the system uses them."""

from __future__ import annotations

import asyncio
import collections
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import (
    TIME_UNIT,
    caption_all,
    eventually,
    orchestrator_config,
    read_rows,
    worker_config,
)

from caption_flow.config.models import DatasetConfig
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.worker.client import Worker

pytestmark = pytest.mark.timeout(240)


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


async def caption(tmp_path: Path, tiny_model_dir: Path, dataset: DatasetConfig) -> list[dict]:
    config = orchestrator_config(tmp_path / "data", tmp_path, tiny_model_dir, chunk_size=3)
    await caption_all(config.model_copy(update={"dataset": dataset}))
    return read_rows(tmp_path / "data")


async def test_webdataset_shards_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    for n in range(2):
        members: list[tuple[str, bytes]] = []
        for i in range(4):
            members += [(f"s{n}-{i}.jpg", jpeg(10 * n + i)), (f"s{n}-{i}.txt", b"a caption")]
        write_tar(tmp_path / "shards" / f"part-{n:04d}.tar", members)
    write_tar(tmp_path / "shards" / "part-0002.tar", [("odd.txt", b"no image"), ("bad.jpg", b"x")])
    dataset = DatasetConfig(
        type="webdataset", path=str(tmp_path / "shards" / "part-{0000..0002}.tar")
    )
    rows = await caption(tmp_path, tiny_model_dir, dataset)
    by_key = collections.Counter(r["item_key"] for r in rows)
    assert len(by_key) == 10 and max(by_key.values()) == 1
    good = [r for r in rows if r["item_key"].startswith("s")]
    assert len(good) == 8 and all(r["error"] is None and r["captions"] for r in good)
    failed = {r["item_key"]: r["error"] for r in rows if r["error"]}
    assert set(failed) == {"odd", "bad"} and "no image member" in failed["odd"]
    assert (tmp_path / "data" / "tar_index").is_dir()  # the orchestrator's index cache


async def test_parquet_dataset_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for n in range(2):
        cells = [{"bytes": jpeg(n * 10 + i), "path": None} for i in range(4)]
        table = pa.table({"image": pa.array(cells, image_type), "text": ["a", "b", "c", "d"]})
        (tmp_path / "hf" / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / "hf" / "data" / f"train-{n}.parquet", row_group_size=2)
    dataset = DatasetConfig(type="huggingface", path=str(tmp_path / "hf"))
    rows = await caption(tmp_path, tiny_model_dir, dataset)
    pairs = collections.Counter((r["shard"], r["item_key"]) for r in rows)
    assert len(pairs) == 8 and max(pairs.values()) == 1
    assert {shard for shard, _ in pairs} == {"data/train-0.parquet", "data/train-1.parquet"}
    assert all(r["error"] is None and r["captions"] for r in rows)


async def test_restart_in_the_middle_of_a_shard_resumes_only_missing_items(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    members = [(f"k{i:02d}.jpg", jpeg(i)) for i in range(12)]
    write_tar(tmp_path / "shards" / "only.tar", members)
    dataset = DatasetConfig(type="webdataset", path=str(tmp_path / "shards" / "only.tar"))
    config = orchestrator_config(tmp_path / "data", tmp_path, tiny_model_dir, chunk_size=12)
    config = config.model_copy(update={"dataset": dataset})

    # First run: one chunk covers the whole shard; stop everything part-way through it.
    orch = Orchestrator(config)
    await orch.start()
    alice = Worker(worker_config(orch.port, "alice", batch_size=2))
    task = asyncio.create_task(alice.run())
    await eventually(lambda: orch.snapshot()["items_done"] >= 4, 60, "four items")
    alice.stop()
    await asyncio.wait_for(task, 60 * TIME_UNIT)
    await orch.stop()
    first = {r["item_key"] for r in read_rows(tmp_path / "data")}
    assert 4 <= len(first) < 12

    # Second run: the re-leased chunk carries only the missing items.
    (bob,), _ = await caption_all(config, ["bob"])
    rows = read_rows(tmp_path / "data")
    counts = collections.Counter(r["item_key"] for r in rows)
    assert len(counts) == 12 and max(counts.values()) == 1
    assert bob.clock.items == 12 - len(first), "bob read and captioned only what was missing"
    assert {r["item_key"] for r in rows if r["contributor_id"] == "bob"} == set(counts) - first
