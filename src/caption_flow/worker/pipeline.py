"""Caption one chunk: read its items, decode them in a pool, run batches through the engine.

Reading and decoding of the next batch overlap with inference on the current one (a bounded
queue between a producer and the engine). Per-item failures (unreadable, undecodable, engine
error) become failed results with a reason; they never stop the chunk. What does stop it is
raised to the worker, which hands the chunk back: the shard cannot be read (SourceError), or
the engine cannot run even one item (EngineUnavailableError, after the batch was halved down
to one item).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from caption_flow.config.models import ModelConfig
from caption_flow.engines.base import CaptionInput
from caption_flow.engines.captioner import Captioner
from caption_flow.errors import EngineUnavailableError, SourceError
from caption_flow.images.pool import DecodedImage, DecodePool
from caption_flow.protocol.messages import ChunkLease, ItemResult
from caption_flow.sources.base import Source, SourceItem, close_reader, take_items

log = logging.getLogger(__name__)

Emit = Callable[[str, list[ItemResult], str], Awaitable[None]]


@dataclass
class Decoded:
    item_id: int
    key: str
    started: float
    caption_input: CaptionInput | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None


@dataclass
class EngineClock:
    """How much of the wall time the engine spent busy, for heartbeats."""

    busy_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    items: int = 0
    tokens: int = 0

    def busy_fraction(self) -> float:
        return self.busy_s / max(time.monotonic() - self.started, 1e-6)


@dataclass
class BatchLimit:
    """The worker's effective batch size: halved on each engine failure, for good.

    Sticky on purpose: a batch that ran out of memory once will again, so the worker keeps
    the size that worked rather than failing its way back down after every chunk.
    """

    limit: int | None = None

    def cap(self, wanted: int) -> int:
        return max(1, wanted if self.limit is None else min(wanted, self.limit))

    def shrink(self, failed_size: int) -> int:
        """The size to try after a batch of ``failed_size`` items could not run."""
        self.limit = max(1, self.cap(failed_size) // 2)
        return self.limit


@dataclass
class Backoff:
    """After a chunk stopped for a read or engine failure: how long to ask for no work.

    Exponential in failures in a row, with jitter so that a fleet that failed together does
    not come back together; ``reset`` after a chunk that finished.
    """

    first_s: float
    max_s: float
    failures: int = 0
    until: float = 0.0  # monotonic

    def begin(self) -> float:
        """One more failure: the wait starts now; returns its length in seconds."""
        self.failures += 1
        base = self.first_s * 2 ** min(self.failures - 1, 30)
        delay = min(base * (0.75 + 0.5 * random.random()), self.max_s)
        self.until = time.monotonic() + delay
        return delay

    def active(self) -> bool:
        return time.monotonic() < self.until

    def remaining(self) -> float:
        return max(0.0, self.until - time.monotonic())

    def reset(self) -> None:
        self.failures = 0
        self.until = 0.0


class ChunkPipeline:
    def __init__(
        self,
        source: Source,
        captioner: Captioner,
        decode_pool: DecodePool,
        engine_thread: Executor,
        clock: EngineClock,
        limit: BatchLimit | None = None,
        ready_items: int | None = None,
    ) -> None:
        """``ready_items``: decoded images that may wait for the engine, rounded up to
        whole batches (None: two batches)."""
        self.ready_items = ready_items
        self.source = source
        self.captioner = captioner
        self.decode_pool = decode_pool
        self.engine_thread = engine_thread
        self.clock = clock
        self.limit = limit or BatchLimit()

    async def run(
        self,
        chunk: ChunkLease,
        job: Callable[[], ModelConfig],
        batch_size: Callable[[], int],
        emit: Emit,
        abandoned: Callable[[], bool],
    ) -> None:
        """Caption every item of ``chunk``; ``job`` is read per batch so updates apply.

        Raises SourceError when the shard cannot be read to the end and
        EngineUnavailableError when the engine cannot caption even one item; results
        emitted before either stay valid.
        """

        def size() -> int:
            return self.limit.cap(batch_size())

        ready = 2 if self.ready_items is None else max(1, -(-self.ready_items // size()))
        batches: asyncio.Queue[list[Decoded] | None] = asyncio.Queue(maxsize=ready)

        producer = asyncio.create_task(self._produce(chunk, job, size, batches, abandoned))
        try:
            while (batch := await batches.get()) is not None:
                if abandoned():
                    break
                await self._caption_shrinking(chunk.chunk_id, batch, job, emit, abandoned)
            else:
                failure = await producer
                if failure is not None:
                    raise SourceError(f"reading chunk {chunk.chunk_id} failed: {failure}")
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    async def _caption_shrinking(
        self,
        chunk_id: str,
        batch: list[Decoded],
        job: Callable[[], ModelConfig],
        emit: Emit,
        abandoned: Callable[[], bool],
    ) -> None:
        """Caption ``batch`` in parts no larger than the limit, halving it on engine failure."""
        parts: deque[list[Decoded]] = deque([batch])
        while parts and not abandoned():
            part = parts.popleft()
            size = self.limit.cap(len(part))
            if len(part) > size:
                parts.extendleft(reversed([part[i : i + size] for i in range(0, len(part), size)]))
                continue
            current = job()
            try:
                results = await self._caption(part, current)
            except EngineUnavailableError as exc:
                engine_items = sum(d.caption_input is not None for d in part)
                if engine_items <= 1:
                    raise  # the worker hands the chunk back and waits
                smaller = self.limit.shrink(len(part))
                log.warning(
                    "engine failed on %d items (%s); batch size is now %d for this worker",
                    len(part),
                    exc,
                    smaller,
                )
                parts.appendleft(part)
                continue
            # One message per model: rows record the model that answered them (the openai
            # engine spreads a batch over endpoints that may serve different models).
            default = self.captioner.model_name(current)
            by_model: dict[str, list[ItemResult]] = {}
            for result, model in results:
                by_model.setdefault(model or default, []).append(result)
            for model, group in by_model.items():
                await emit(chunk_id, group, model)

    async def _produce(
        self,
        chunk: ChunkLease,
        job: Callable[[], ModelConfig],
        batch_size: Callable[[], int],
        out: asyncio.Queue[list[Decoded] | None],
        abandoned: Callable[[], bool],
    ) -> Exception | None:
        """Read and decode batches into ``out``, then None; returns why reading stopped early."""
        failure: Exception | None = None
        loop = asyncio.get_running_loop()
        ids = {ref.key: ref.item_id for ref in chunk.items}
        keys = [ref.key for ref in chunk.items]
        reader: Iterator[SourceItem] = iter(())
        try:
            reader = await loop.run_in_executor(None, self.source.read, chunk.shard, keys)
            position = 0
            while position < len(keys) and not abandoned():
                size = batch_size()
                raw = await loop.run_in_executor(None, take_items, reader, size)
                if not raw:
                    break
                position += len(raw)
                self.decode_pool.config = job().image
                started = time.monotonic()
                images = await self.decode_pool.decode_batch(
                    [item.data if item.error is None else None for item in raw]
                )
                await out.put(
                    [
                        _decoded(item, ids.get(item.key, -1), image, started)
                        for item, image in zip(raw, images, strict=True)
                    ]
                )
        except Exception as exc:  # any reader failure: the worker hands the chunk back
            log.exception("reading chunk %s failed", chunk.chunk_id)
            failure = exc
        finally:
            close_reader(reader)
        # Not in ``finally``: once cancelled, nobody reads the queue and a put would hang.
        await out.put(None)
        return failure

    async def _caption(
        self, batch: Sequence[Decoded], job: ModelConfig
    ) -> list[tuple[ItemResult, str]]:
        """Each item's result and the model that answered it ("": the job's)."""
        ready = [d for d in batch if d.caption_input is not None]
        outputs = []
        if ready:
            inputs = [d.caption_input for d in ready if d.caption_input is not None]
            t0 = time.monotonic()
            outputs = await asyncio.get_running_loop().run_in_executor(
                self.engine_thread, self.captioner.caption, inputs, job
            )
            self.clock.busy_s += time.monotonic() - t0
            self.clock.tokens += sum(o.tokens for o in outputs)
        by_id = {d.item_id: o for d, o in zip(ready, outputs, strict=True)}
        now = time.monotonic()
        results: list[tuple[ItemResult, str]] = []
        for d in batch:
            out = by_id.get(d.item_id)
            results.append(
                (
                    ItemResult(
                        item_id=d.item_id,
                        key=d.key,
                        outputs=out.outputs if out is not None else {},
                        error=d.error if out is None else out.error,
                        width=d.width,
                        height=d.height,
                        processing_ms=round((now - d.started) * 1000, 2),
                    ),
                    out.model if out is not None else "",
                )
            )
        self.clock.items += len(results)
        return results


def _decoded(item: SourceItem, item_id: int, image: DecodedImage, started: float) -> Decoded:
    """Join what the source and the decoder said about one item."""
    if item.error is not None or image.image is None:
        return Decoded(item_id, item.key, started, error=item.error or image.error)
    return Decoded(
        item_id,
        item.key,
        started,
        caption_input=CaptionInput(key=item.key, image=image.image, columns=item.columns),
        width=item.width or image.width,  # the original's, when it was shrunk on the way
        height=item.height or image.height,
    )
