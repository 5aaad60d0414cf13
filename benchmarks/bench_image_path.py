"""Benchmark the worker's image path: tar shard read + decode + resize.

    .venv/bin/python benchmarks/bench_image_path.py [--quick] [--max-side 384]

Part 1, per core: one thread reads a webdataset shard of 512 px and of 2048 px JPEGs
through WebDatasetSource.read and decodes + resizes each image, with the Pillow path
(draft mode) and with the fast decoder (simplejpeg). Reported as images per CPU-second of
that thread (robust to a busy machine) and per wall-second.

Part 2, feeding an engine: a simulated engine takes batches of 16 and sleeps the time a GPU
would need at 150 images/s; a reader thread and the DecodePool (one thread per core) feed it.
Reported: the fraction of the engine's time spent waiting for images (0 % = never starved).

Everything is generated in a temporary folder; the whole run takes under two minutes.
"""

from __future__ import annotations

import argparse
import io
import itertools
import queue
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from caption_flow.config.models import DatasetConfig, ImageConfig
from caption_flow.images import DecodePool, decode_image, fast_decoder_available, usable_cores
from caption_flow.sources.base import SourceItem
from caption_flow.sources.webdataset import WebDatasetSource

ENGINE_BATCH = 16
TARGET_RATE = 150.0


def photo_like(width: int, height: int, seed: int) -> bytes:
    """Smooth shapes plus grain, JPEG quality 90: file sizes like real photos (noise alone
    compresses far worse, flat colour far better)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
    base = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 12, (height, width, 3))
    array = np.clip(np.asarray(base, np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_shard(path: Path, size: tuple[int, int], count: int) -> list[str]:
    distinct = [photo_like(*size, seed) for seed in range(min(count, 24))]
    keys = []
    with tarfile.open(path, "w") as archive:
        for i in range(count):
            key = f"{i:08d}"
            for ext, data in (("jpg", distinct[i % len(distinct)]), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            keys.append(key)
    return keys


def per_core(
    source: WebDatasetSource, shard: str, keys: list[str], config: ImageConfig, seconds: float
) -> tuple[float, float]:
    """(images per CPU-second, images per wall-second) on one thread."""
    done = 0
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    while True:
        for item in source.read(shard, keys):
            assert item.data is not None, item.error
            decode_image(item.data, config)
            done += 1
        if time.perf_counter() - wall0 >= seconds:
            break
    return done / (time.thread_time() - cpu0), done / (time.perf_counter() - wall0)


def endless_items(source: WebDatasetSource, shard: str, keys: list[str]) -> Iterator[SourceItem]:
    for _ in itertools.count():
        yield from source.read(shard, keys)


def engine_wait(
    source: WebDatasetSource, shard: str, keys: list[str], config: ImageConfig, seconds: float
) -> tuple[float, float]:
    """(fraction of time the engine waited for data, images/s it captioned)."""
    batches: queue.Queue[list[object]] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def feed(pool: DecodePool) -> None:
        datas = (item.data for item in endless_items(source, shard, keys))
        batch: list[object] = []
        for decoded in pool.imap(datas, window=4 * pool.threads):
            batch.append(decoded)
            if len(batch) == ENGINE_BATCH:
                while not stop.is_set():
                    try:
                        batches.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                batch = []
            if stop.is_set():
                return

    with DecodePool(config) as pool:
        feeder = threading.Thread(target=feed, args=(pool,), daemon=True)
        feeder.start()
        batches.get()  # warm-up: the engine starts once the first batch exists
        waited, images = 0.0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            time.sleep(ENGINE_BATCH / TARGET_RATE)  # the "GPU" works on a batch
            images += ENGINE_BATCH
            before = time.perf_counter()
            batches.get()
            waited += time.perf_counter() - before
        total = time.perf_counter() - start
        stop.set()
        feeder.join(timeout=10)
    return waited / total, images / total


def render(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n{title}")
        for row in [header, *rows]:
            print("  ".join(cell.ljust(16) for cell in row))
        return
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="right" if name != header[0] else "left")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-side", type=int, default=384, help="resize target (long side)")
    parser.add_argument("--quick", action="store_true", help="shorter runs (noisier)")
    args = parser.parse_args()
    seconds = 1.5 if args.quick else 4.0
    decoders = ["pillow", "auto"] if fast_decoder_available() else ["pillow"]
    names = {"pillow": "Pillow (draft)", "auto": "simplejpeg"}
    sizes = {"512px": ((512, 384), 240), "2048px": ((2048, 1536), 60)}

    with tempfile.TemporaryDirectory() as tmp:
        shards = {}
        for label, (size, count) in sizes.items():
            path = Path(tmp) / f"bench-{label}.tar"
            keys = write_shard(path, size, count)
            shards[label] = (str(path), keys, path.stat().st_size / count / 1024)
        config = DatasetConfig(type="webdataset", path=str(Path(tmp) / "bench-*.tar"))
        source = WebDatasetSource(config)
        list(source.list_shards())

        rows = []
        for label, (shard, keys, kib) in shards.items():
            for decoder in decoders:
                image_config = ImageConfig(max_side=args.max_side, decoder=decoder)
                per_cpu, per_wall = per_core(source, shard, keys, image_config, seconds)
                rows.append(
                    [label, f"{kib:.0f} KiB", names[decoder], f"{per_cpu:.0f}", f"{per_wall:.0f}"]
                )
        render(
            f"read + decode + resize to {args.max_side}px, one thread",
            ["source", "jpeg size", "decoder", "img / CPU-s", "img / wall-s"],
            rows,
        )

        rows = []
        for label, (shard, keys, _) in shards.items():
            for decoder in decoders:
                image_config = ImageConfig(max_side=args.max_side, decoder=decoder)
                waited, rate = engine_wait(source, shard, keys, image_config, seconds)
                rows.append([label, names[decoder], f"{waited:.0%}", f"{rate:.0f}"])
        render(
            f"engine at {TARGET_RATE:.0f} img/s, batch {ENGINE_BATCH}, "
            f"decode pool of {usable_cores()} threads",
            ["source", "decoder", "engine waiting", "img/s captioned"],
            rows,
        )


if __name__ == "__main__":
    main()
