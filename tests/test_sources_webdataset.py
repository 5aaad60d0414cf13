"""webdataset tar shards: listing from cached indexes, chunk reads by offset, awkward samples."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from caption_flow.config.models import DatasetConfig, ImageConfig
from caption_flow.errors import ImageError, SourceError
from caption_flow.images import decode_image
from caption_flow.sources import open_source
from caption_flow.sources.tar_headers import scan_headers
from caption_flow.sources.webdataset import WebDatasetSource


def jpeg(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tar(
    path: Path, members: list[tuple[str, bytes]], mode: str = "w", fmt: int = tarfile.PAX_FORMAT
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode, format=fmt) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return path


def plain_samples(prefix: str, count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    members = []
    for i in range(count):
        key = f"{prefix}{i:06d}"
        members.append((f"{key}.jpg", jpeg(seed + i)))
        members.append((f"{key}.txt", f"caption {key}\n".encode()))
        members.append((f"{key}.json", json.dumps({"index": i}).encode()))
    return members


def source(path: str, cache_dir: Path | None = None, **fields: object) -> WebDatasetSource:
    config = DatasetConfig(type="webdataset", path=path, **fields)  # type: ignore[arg-type]
    opened = open_source(config, cache_dir=cache_dir)
    assert isinstance(opened, WebDatasetSource)
    return opened


def test_lists_keys_and_reads_image_and_sidecars(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "data-000000.tar", plain_samples("s", 3))
    src = source(str(shard))
    listings = list(src.list_shards())
    assert [(x.shard, x.keys) for x in listings] == [
        (str(shard), ["s000000", "s000001", "s000002"])
    ]
    items = list(src.read(str(shard), ["s000001"]))
    assert len(items) == 1 and items[0].error is None
    assert items[0].data == jpeg(1)
    assert items[0].columns == {"txt": "caption s000001", "json": {"index": 1}}


def test_awkward_samples(tmp_path: Path) -> None:
    members = [
        ("dir/img.v2.jpg", jpeg(1)),  # dotted: key is dir/img, extension v2.jpg
        ("dir/img.v2.txt", b"dotted"),
        ("UPPER.JPG", jpeg(2)),
        ("UPPER.TXT", b"shouting"),
        ("noimage.txt", b"only text"),
        ("noimage.json", b"{}"),
        ("broken.jpg", b"\xff\xd8 this is not a jpeg"),
        ("._hidden.jpg", jpeg(3)),  # macOS resource fork: not a sample
        ("README", b"no extension: not a sample"),
        ("empty.png", b""),
    ]
    shard = write_tar(tmp_path / "awkward.tar", members)
    src = source(str(shard))
    (listing,) = src.list_shards()
    assert listing.keys == ["dir/img", "UPPER", "noimage", "broken", "empty"]
    items = {item.key: item for item in src.read(listing.shard, listing.keys)}
    assert items["dir/img"].data == jpeg(1) and items["dir/img"].columns == {"v2.txt": "dotted"}
    assert items["UPPER"].data == jpeg(2) and items["UPPER"].columns == {"txt": "shouting"}
    assert items["noimage"].data is None
    assert "no image member" in (items["noimage"].error or "")
    assert items["broken"].error is None  # bytes are read; decoding fails the item later
    with pytest.raises(ImageError):
        decode_image(items["broken"].data or b"", ImageConfig())
    assert items["empty"].data == b""


def test_keys_match_webdataset_itself(tmp_path: Path) -> None:
    import webdataset as wds

    shard = write_tar(
        tmp_path / "x.tar",
        [("a.b.jpg", jpeg(1)), ("a.b.txt", b"t"), ("dir/c.JPG", jpeg(2)), ("d.png", b"p")],
    )
    theirs = [sample["__key__"] for sample in wds.WebDataset(str(shard), shardshuffle=False)]
    (ours,) = source(str(shard)).list_shards()
    assert ours.keys == theirs


@pytest.mark.parametrize("read_ahead", [64 * 1024, 16 * 1024 * 1024])
def test_chunk_from_the_middle_reads_exactly_those_items(tmp_path: Path, read_ahead: int) -> None:
    shard = write_tar(tmp_path / "big.tar", plain_samples("k", 100))
    src = source(str(shard), read_ahead_bytes=read_ahead)
    (listing,) = src.list_shards()
    chunk = listing.keys[40:60]
    items = list(src.read(listing.shard, chunk))
    assert [i.key for i in items] == chunk
    assert [i.data for i in items] == [jpeg(i) for i in range(40, 60)]
    assert all(i.columns["json"] == {"index": n} for n, i in zip(range(40, 60), items, strict=True))
    # Out of order, repeated and unknown keys: still one item per key, in the order asked.
    asked = ["k000070", "k000003", "nope", "k000003"]
    items = list(src.read(listing.shard, asked))
    assert [i.key for i in items] == asked
    assert items[0].data == jpeg(70) and items[1].data == jpeg(3) == items[3].data
    assert items[2].error == "no such sample in shard"


def test_patterns_give_stable_shard_ids_when_shards_are_added(tmp_path: Path) -> None:
    for n in range(2):
        write_tar(tmp_path / "shards" / f"data-{n:06d}.tar", plain_samples(f"s{n}-", 2))
    brace = str(tmp_path / "shards" / "data-{000000..000001}.tar")
    glob = str(tmp_path / "shards" / "*.tar")
    folder = str(tmp_path / "shards")
    before = {
        p: [(x.shard, x.keys) for x in source(p).list_shards()] for p in (brace, glob, folder)
    }
    assert before[brace] == before[glob] == before[folder]
    assert [s for s, _ in before[brace]] == [
        str(tmp_path / "shards" / "data-000000.tar"),
        str(tmp_path / "shards" / "data-000001.tar"),
    ]
    # A new shard that sorts first must not renumber anything.
    write_tar(tmp_path / "shards" / "data-00000a.tar", plain_samples("new-", 1))
    write_tar(tmp_path / "shards" / "data-000002.tar", plain_samples("s2-", 1))
    after = [(x.shard, x.keys) for x in source(glob).list_shards()]
    for entry in before[glob]:
        assert entry in after
    grown = [(x.shard, x.keys) for x in source(brace.replace("000001}", "000002}")).list_shards()]
    assert grown[:2] == before[brace]


def test_tar_index_cache_is_reused_and_refreshed_when_a_shard_changes(tmp_path: Path) -> None:
    shards = [write_tar(tmp_path / f"d{n}.tar", plain_samples(f"{n}-", 5)) for n in range(3)]
    cache_dir = tmp_path / "cache"
    pattern = str(tmp_path / "d{0..2}.tar")

    first = source(pattern, cache_dir)
    listed = [(x.shard, x.keys) for x in first.list_shards()]
    assert first.indexes.builds == 3
    entries = sorted((cache_dir / "tar_index").glob("*.json"))
    assert len(entries) == 3
    stamps = {p: p.stat().st_mtime_ns for p in entries}

    second = source(pattern, cache_dir)
    assert [(x.shard, x.keys) for x in second.list_shards()] == listed
    assert second.indexes.builds == 0 and second.indexes.cache.hits == 3
    assert {p: p.stat().st_mtime_ns for p in entries} == stamps

    write_tar(shards[1], plain_samples("1-", 6))
    os.utime(shards[1], ns=(0, 10**18))  # a rewritten file: different size and mtime
    third = source(pattern, cache_dir)
    relisted = [(x.shard, x.keys) for x in third.list_shards()]
    assert third.indexes.builds == 1
    assert relisted[1][1] == [f"1-{i:06d}" for i in range(6)]
    # A worker given the same cache folder reads without scanning again.
    items = list(third.read(relisted[1][0], ["1-000005"]))
    assert items[0].data == jpeg(5) and third.indexes.builds == 1


def test_worker_with_its_own_path_reads_orchestrator_shard_ids(tmp_path: Path) -> None:
    write_tar(tmp_path / "orch" / "part-0.tar", plain_samples("a", 3))
    write_tar(tmp_path / "orch" / "part-1.tar", plain_samples("b", 3, seed=10))
    config = DatasetConfig(type="webdataset", path=str(tmp_path / "orch" / "part-{0..1}.tar"))
    listings = list(open_source(config).list_shards())
    shutil.move(tmp_path / "orch", tmp_path / "mounted")
    for override in (str(tmp_path / "mounted" / "part-{0..1}.tar"), str(tmp_path / "mounted")):
        worker = open_source(config, path_override=override)
        items = list(worker.read(listings[1].shard, listings[1].keys))
        assert [i.data for i in items] == [jpeg(10 + i) for i in range(3)]


def test_unreadable_shard_fails_items_not_the_worker(tmp_path: Path) -> None:
    src = source(str(tmp_path / "missing.tar"))
    items = list(src.read(str(tmp_path / "missing.tar"), ["a", "b"]))
    assert [i.key for i in items] == ["a", "b"]
    assert all(i.data is None and "unreadable" in (i.error or "") for i in items)
    assert list(src.list_shards()) == [] and src.skipped == [str(tmp_path / "missing.tar")]
    with pytest.raises(SourceError):
        list(source(str(tmp_path / "none-*.tar")).list_shards())


def test_truncated_tar_keeps_what_came_before(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "t.tar", plain_samples("t", 4))
    data = shard.read_bytes()
    last_jpeg_at = data.rindex(b"\xff\xd8")
    shard.write_bytes(data[: last_jpeg_at + 100])
    src = source(str(shard))
    (listing,) = src.list_shards()
    assert listing.keys == ["t000000", "t000001", "t000002", "t000003"]
    items = list(src.read(listing.shard, listing.keys))
    assert [i.error for i in items[:3]] == [None, None, None]
    assert items[3].error == "image member is truncated"


def test_compressed_tar_is_indexed_and_read_as_a_stream(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "c.tar.gz", plain_samples("c", 10), mode="w:gz")
    src = source(str(tmp_path / "*.tar.gz"))
    (listing,) = src.list_shards()
    assert len(listing.keys) == 10
    items = list(src.read(listing.shard, ["c000007", "c000002", "zzz"]))
    assert [i.data for i in items[:2]] == [jpeg(7), jpeg(2)]
    assert items[2].error == "no such sample in shard"
    assert str(shard) == listing.shard


def test_remote_shards_through_fsspec(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    for n in range(2):
        local = write_tar(tmp_path / f"r{n}.tar", plain_samples(f"r{n}-", 4, seed=20 * n))
        fs.pipe(f"/bucket/r{n}.tar", local.read_bytes())
    try:
        src = source("memory:///bucket/r{0..1}.tar", tmp_path / "cache")
        listings = list(src.list_shards())
        assert [x.shard for x in listings] == ["memory:///bucket/r0.tar", "memory:///bucket/r1.tar"]
        items = list(src.read(listings[1].shard, listings[1].keys[1:3]))
        assert [i.data for i in items] == [jpeg(21), jpeg(22)]
        globbed = source("memory:///bucket/r*.tar")
        assert [(x.shard, x.keys) for x in globbed.list_shards()] == [
            (x.shard, x.keys) for x in listings
        ]
    finally:
        fs.rm("/bucket", recursive=True)


def test_columns_option_limits_sidecars(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "d.tar", plain_samples("x", 1))
    src = source(str(shard), columns=["txt"])
    (item,) = src.read(str(shard), ["x000000"])
    assert item.columns == {"txt": "caption x000000"}


@pytest.mark.parametrize(
    "fmt",
    [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT],
    ids=["pax", "gnu", "ustar"],
)
def test_header_scan_matches_tarfile(tmp_path: Path, fmt: int) -> None:
    deep = "/".join(["folder"] * 12)  # > 100 characters: prefix field, long name or pax path
    long_key = "k" * (95 if fmt == tarfile.USTAR_FORMAT else 180)
    members = [
        (f"{deep}/a.jpg", jpeg(1)),
        (f"{deep}/a.txt", b"deep"),
        (f"{long_key}.jpg", jpeg(2)),
        ("ünïcode.jpg", jpeg(3)),
        ("empty.txt", b""),
    ]
    shard = write_tar(tmp_path / "f.tar", members, fmt=fmt)
    with tarfile.open(shard) as archive:
        expected = [(m.name, m.offset_data, m.size) for m in archive if m.isfile()]
    with shard.open("rb") as handle:
        found, error = scan_headers(handle)
    assert error is None and found == expected
    src = source(str(shard))
    (listing,) = src.list_shards()
    assert listing.keys == [f"{deep}/a", long_key, "ünïcode", "empty"]
    items = list(src.read(listing.shard, listing.keys))
    assert [i.data for i in items[:3]] == [jpeg(1), jpeg(2), jpeg(3)]


def test_header_scan_stops_at_garbage(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "g.tar", plain_samples("g", 3))
    data = bytearray(shard.read_bytes())
    second_header = data.index(b"g000001.jpg")
    data[second_header : second_header + 20] = b"\x07" * 20  # breaks the checksum
    shard.write_bytes(bytes(data))
    with shard.open("rb") as handle:
        found, error = scan_headers(handle)
    assert [name for name, _, _ in found] == ["g000000.jpg", "g000000.txt", "g000000.json"]
    assert error is not None and "checksum" in error
    (listing,) = source(str(shard)).list_shards()
    assert listing.keys == ["g000000"]
    assert source(str(shard)).skipped == []
    shard.write_bytes(b"this is no tar file at all" * 40)
    src = source(str(shard))
    assert list(src.list_shards()) == [] and src.skipped == [str(shard)]


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HEAD and single-range GET, like a CDN or object store."""

    requests: list[str] = []

    def send_head(self):  # type: ignore[no-untyped-def]
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return None
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        type(self).requests.append(f"{self.command} {self.headers.get('Range', '')}")
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2) or len(data) - 1), len(data) - 1)
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tar_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_http_shards_are_read_by_ranges(tmp_path: Path, tar_server: tuple[str, Path]) -> None:
    url, root = tar_server
    big = [(f"b{i:04d}.jpg", jpeg(i, (256, 256))) for i in range(40)]
    shard = write_tar(root / "web-0.tar", big)
    src = source(f"{url}/web-{{0..0}}.tar", tmp_path / "cache")
    (listing,) = src.list_shards()
    assert listing.shard == f"{url}/web-0.tar" and len(listing.keys) == 40
    _RangeHandler.requests.clear()
    items = list(src.read(listing.shard, listing.keys[10:12]))
    assert [i.data for i in items] == [jpeg(10, (256, 256)), jpeg(11, (256, 256))]
    ranged = [r for r in _RangeHandler.requests if r.startswith("GET bytes=")]
    assert len(ranged) == 1  # the two neighbouring samples in one request
    start, end = (int(x) for x in ranged[0].removeprefix("GET bytes=").split("-"))
    assert end - start + 1 < shard.stat().st_size // 10  # not the whole shard
