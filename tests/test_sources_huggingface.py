"""Hugging Face datasets from local parquet/arrow files, with the hub disabled."""

from __future__ import annotations

import contextlib
import http.server
import io
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import TIME_UNIT

from caption_flow.config.models import DatasetConfig
from caption_flow.errors import ConfigError, SourceError
from caption_flow.sources import open_source
from caption_flow.sources.cache import IndexCache
from caption_flow.sources.huggingface import HuggingFaceSource, unique_keys

SHA = "0123456789abcdef0123456789abcdef01234567"


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_parquet(path: Path, seeds: range, row_group_size: int = 10, **extra: list) -> Path:
    """A file shaped like the hub's: an ``Image`` struct column plus plain columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = pa.array([{"bytes": jpeg(s), "path": f"{s}.jpg"} for s in seeds], type=IMAGE_TYPE)
    table = pa.table(
        {
            "image": images,
            "caption": [f"caption {s}" for s in seeds],
            "score": [s / 10 for s in seeds],
            "tags": [[f"t{s}", "x"] for s in seeds],
            "embedding": pa.array([b"\x00" * 8 for _ in seeds], pa.binary()),
            **extra,
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def hf_source(path: str, cache_dir: Path | None = None, **fields: object) -> HuggingFaceSource:
    config = DatasetConfig(type="huggingface", path=path, **fields)  # type: ignore[arg-type]
    opened = open_source(config, cache_dir=cache_dir)
    assert isinstance(opened, HuggingFaceSource)
    return opened


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1, also for libraries imported earlier in the
    session (they read the variables at import)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def test_split_layout_resolved_like_datasets_does(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", range(0, 25))
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", range(100, 105))
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", range(200, 203))
    listings = list(hf_source(str(tmp_path)).list_shards())
    assert [(x.shard, len(x.keys)) for x in listings] == [
        ("data/train-00000-of-00002.parquet", 25),
        ("data/train-00001-of-00002.parquet", 5),
    ]
    assert listings[0].keys[:3] == ["0", "1", "2"]
    test_split = list(hf_source(str(tmp_path), split="test").list_shards())
    assert [x.shard for x in test_split] == ["data/test-00000-of-00001.parquet"]
    with pytest.raises(ConfigError, match="validation"):
        list(hf_source(str(tmp_path), split="validation").list_shards())


def test_chunk_from_the_middle_reads_only_its_row_groups(tmp_path: Path) -> None:
    write_parquet(tmp_path / "train.parquet", range(50), row_group_size=10)
    src = hf_source(str(tmp_path))
    (listing,) = src.list_shards()
    chunk = listing.keys[23:37]
    items = list(src.read(listing.shard, chunk))
    assert [i.key for i in items] == chunk
    assert [i.data for i in items] == [jpeg(s) for s in range(23, 37)]
    assert src.blocks_read == 2  # row groups 20-29 and 30-39, nothing else
    first = items[0]
    assert first.error is None
    assert first.columns == {"caption": "caption 23", "score": 2.3, "tags": ["t23", "x"]}
    items = list(src.read(listing.shard, ["49", "50", "abc", "0"]))
    assert [i.error for i in items] == [None, "no such row in file", "no such row in file", None]
    assert items[3].data == jpeg(0)


def test_adding_files_keeps_shard_ids_and_keys(tmp_path: Path) -> None:
    write_parquet(tmp_path / "part-b.parquet", range(5))
    write_parquet(tmp_path / "part-c.parquet", range(5, 8))
    before = [(x.shard, x.keys) for x in hf_source(str(tmp_path)).list_shards()]
    write_parquet(tmp_path / "part-a.parquet", range(8, 10))  # sorts first
    after = [(x.shard, x.keys) for x in hf_source(str(tmp_path)).list_shards()]
    assert len(after) == 3
    for entry in before:
        assert entry in after


def test_id_column_keys(tmp_path: Path) -> None:
    ids = ["img-a", "img-b", None, "img-a", "img-c"]
    write_parquet(tmp_path / "f.parquet", range(5), row_group_size=2, uid=ids)
    src = hf_source(str(tmp_path), id_column="uid")
    (listing,) = src.list_shards()
    assert listing.keys == unique_keys(ids) == ["img-a", "img-b", "#row2", "img-a#1", "img-c"]
    items = list(src.read(listing.shard, ["img-c", "img-a#1", "missing"]))
    assert [i.data for i in items[:2]] == [jpeg(4), jpeg(3)]
    assert items[2].error == "no such row in file"


def test_columns_option_and_missing_image_column(tmp_path: Path) -> None:
    write_parquet(tmp_path / "f.parquet", range(3))
    src = hf_source(str(tmp_path), columns=["caption", "nonexistent"])
    (item,) = src.read(next(iter(src.list_shards())).shard, ["1"])
    assert item.columns == {"caption": "caption 1"}
    with pytest.raises(ConfigError, match="picture"):
        list(hf_source(str(tmp_path), image_column="picture").list_shards())


def test_counts_are_cached_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for n in range(3):
        write_parquet(data / f"train-{n}.parquet", range(n * 10, n * 10 + 4))
    cache_dir = tmp_path / "cache"
    first = hf_source(str(data), cache_dir)
    listed = [(x.shard, x.keys) for x in first.list_shards()]
    assert first._counts.stores == 3
    second = hf_source(str(data), cache_dir)
    assert [(x.shard, x.keys) for x in second.list_shards()] == listed
    assert second._counts.hits == 3 and second._counts.stores == 0


def test_save_to_disk_arrow_folders(tmp_path: Path) -> None:
    import datasets

    images = [Image.open(io.BytesIO(jpeg(s))) for s in range(6)]
    ds = datasets.Dataset.from_dict({"image": images, "caption": [f"c{s}" for s in range(6)]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(
        str(tmp_path / "dict")
    )
    for folder, split, count in (("single", "train", 6), ("dict", "test", 2)):
        src = hf_source(str(tmp_path / folder), split=split)
        (listing,) = src.list_shards()
        assert listing.shard.endswith(".arrow") and len(listing.keys) == count
        items = list(src.read(listing.shard, listing.keys[-2:]))
        assert all(i.error is None and i.data and i.data[:2] == b"\xff\xd8" for i in items)
        assert items[-1].columns == {"caption": f"c{count - 1}"}


def test_parquet_written_by_datasets(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    images = [{"bytes": jpeg(s), "path": None} for s in range(4)]
    ds = datasets.Dataset.from_dict({"image": images, "text": list("abcd")}, features=features)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    src = hf_source(str(tmp_path))
    (listing,) = src.list_shards()
    items = list(src.read(listing.shard, ["3"]))
    assert items[0].data == jpeg(3) and items[0].columns == {"text": "d"}


def test_image_struct_with_only_a_path(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "one.jpg").write_bytes(jpeg(1))
    cells = [{"bytes": None, "path": "pics/one.jpg"}, {"bytes": None, "path": "gone.jpg"}, None]
    pq.write_table(pa.table({"image": pa.array(cells, IMAGE_TYPE)}), tmp_path / "t.parquet")
    src = hf_source(str(tmp_path / "t.parquet"))
    (listing,) = src.list_shards()
    items = list(src.read(listing.shard, listing.keys))
    assert items[0].data == jpeg(1)
    assert items[1].error == "image file not found: gone.jpg"
    assert items[2].error == "image is null"


def test_worker_reads_a_local_mirror_of_the_orchestrator_files(tmp_path: Path) -> None:
    write_parquet(tmp_path / "orch" / "data" / "train-0.parquet", range(7))
    config = DatasetConfig(type="huggingface", path=str(tmp_path / "orch"))
    (listing,) = open_source(config).list_shards()
    shutil.copytree(tmp_path / "orch", tmp_path / "mirror")
    shutil.rmtree(tmp_path / "orch")
    worker = open_source(config, path_override=str(tmp_path / "mirror"))
    assert [i.data for i in worker.read(listing.shard, ["6"])] == [jpeg(6)]
    # A hub id with a local mirror: the worker never asks the hub.
    hub_config = DatasetConfig(type="huggingface", path="someone/dataset", revision=SHA)
    mirrored = open_source(hub_config, path_override=str(tmp_path / "mirror"))
    assert [i.data for i in mirrored.read(listing.shard, ["5"])] == [jpeg(5)]


def test_hub_ids_pin_a_commit_and_reuse_it(tmp_path: Path) -> None:
    # Offline, resolving a hub id fails with our error, not a crash deep in the hub client.
    with pytest.raises(SourceError, match="someone/dataset"):
        list(hf_source("someone/dataset", tmp_path / "cache").list_shards())
    # An earlier run's pin (as the orchestrator stores it) is reused without the hub.
    files = ["data/train-00000-of-00001.parquet"]
    IndexCache(tmp_path / "cache", "hf").store(
        "hf-split:someone/dataset::train@main", {}, {"revision": SHA, "files": files}
    )
    src = hf_source("someone/dataset", tmp_path / "cache")
    assert src._resolve().files == files
    assert src.pinned_config().revision == SHA
    assert src._location(files[0]) == f"hf://datasets/someone/dataset@{SHA}/{files[0]}"
    # A worker given the pinned config builds the same URL without asking the hub.
    worker = open_source(src.pinned_config())
    assert isinstance(worker, HuggingFaceSource)
    assert worker._location(files[0]) == src._location(files[0])


class _Handler(http.server.BaseHTTPRequestHandler):
    flaky_calls = 0

    def do_GET(self) -> None:
        if self.path.startswith("/ok/"):
            body = jpeg(int(self.path.rsplit("/", 1)[1]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/flaky":
            type(self).flaky_calls += 1
            if type(self).flaky_calls == 1:
                self.send_error(503)
                return
            body = jpeg(99)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/slow":
            time.sleep(1.5)
            with contextlib.suppress(OSError):  # the client gave up long ago, as it should
                self.send_error(500)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_column_downloads_with_retries_and_fails_dead_urls(
    tmp_path: Path, image_server: str
) -> None:
    urls = [
        f"{image_server}/ok/1",
        f"{image_server}/missing.jpg",
        f"{image_server}/slow",
        f"{image_server}/flaky",
        "",
        "ftp://example.invalid/x.jpg",
        f"{image_server}/ok/2",
    ]
    pq.write_table(
        pa.table({"url": urls, "alt": [f"alt {i}" for i in range(7)]}), tmp_path / "u.parquet"
    )
    src = hf_source(
        str(tmp_path), url_column="url", url_timeout=0.4, url_retries=1, url_concurrency=4
    )
    (listing,) = src.list_shards()
    started = time.monotonic()
    items = list(src.read(listing.shard, listing.keys))
    elapsed = time.monotonic() - started
    assert [i.key for i in items] == listing.keys
    assert items[0].data == jpeg(1) and items[0].columns == {"alt": "alt 0"}
    assert items[1].error == "HTTP 404 Not Found"
    assert items[2].error is not None and "timed out" in items[2].error
    assert items[3].data == jpeg(99) and items[3].error is None  # 503, then retried
    assert items[4].error == "url is empty"
    assert items[5].error is not None and "not an http" in items[5].error
    assert items[6].data == jpeg(2)
    assert elapsed < 5 * TIME_UNIT  # time-outs cut the slow URL short
