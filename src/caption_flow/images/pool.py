"""A decode-and-resize pool for workers: keeps pixel work off the event loop.

Threads, not processes: Pillow, simplejpeg and libjpeg-turbo release the GIL while they decode
and resize, so threads scale across cores without pickling image bytes or pixels between
processes. One thread per usable core by default (the CPU affinity mask, so a worker pinned
to a few cores does not oversubscribe them).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from caption_flow.config.models import ImageConfig
from caption_flow.errors import ImageError
from caption_flow.images.decode import decode_image
from caption_flow.ordered import bounded_in_order


def usable_cores() -> int:
    """Cores this process may use: the affinity mask, capped by a cgroup v2 CPU quota (a
    container limited to 4 CPUs on a 64-core host should start 4 threads, not 64)."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image, or why it could not be decoded (``image`` is None then)."""

    image: Image.Image | None
    width: int = 0
    height: int = 0
    error: str | None = None
    seconds: float = 0.0


def decode_safely(data: bytes | None, config: ImageConfig) -> DecodedImage:
    """``decode_image`` that returns failures instead of raising, for use in pools."""
    start = time.perf_counter()
    if data is None:
        return DecodedImage(None, error="no image data")
    try:
        image, width, height = decode_image(data, config)
    except ImageError as exc:
        return DecodedImage(None, error=str(exc), seconds=time.perf_counter() - start)
    return DecodedImage(image, width, height, seconds=time.perf_counter() - start)


class DecodePool:
    """Decode and resize in worker threads; ordered results, bounded work in flight.

    ``config`` may be replaced at any time (the orchestrator can push a new image size);
    work already submitted keeps the config it was submitted with.
    """

    def __init__(self, config: ImageConfig, threads: int = 0) -> None:
        self.config = config
        self.threads = threads if threads > 0 else usable_cores()
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")

    def submit(self, data: bytes | None) -> Future[DecodedImage]:
        return self._executor.submit(decode_safely, data, self.config)

    async def decode(self, data: bytes | None) -> DecodedImage:
        """Decode one image without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(data))

    async def decode_batch(self, datas: Sequence[bytes | None]) -> list[DecodedImage]:
        """Decode a batch in parallel; results in the order given."""
        futures = [asyncio.wrap_future(self.submit(data)) for data in datas]
        return list(await asyncio.gather(*futures))

    def imap(self, datas: Iterable[bytes | None], window: int = 0) -> Iterator[DecodedImage]:
        """Decode a stream in order with at most ``window`` images in flight (default:
        twice the threads), so a fast reader never fills memory with decoded pixels."""
        limit = window if window > 0 else 2 * self.threads
        return bounded_in_order(self.submit, datas, limit)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
