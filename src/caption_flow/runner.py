"""Everything on one box: an orchestrator and one local worker in one event loop.

Used by ``caption-flow run`` and ``caption-flow demo``. The worker talks to the orchestrator
over a real websocket on loopback, exactly as a remote worker would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caption_flow.config.models import OrchestratorConfig, TokenEntry, WorkerConfig
from caption_flow.engines.captioner import Captioner
from caption_flow.errors import SourceError
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.storage.reader import FailureReason, failure_summary
from caption_flow.worker.client import Worker

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


@dataclass
class RunSummary:
    """How a run ended, with the orchestrator's definitions (see ``Orchestrator.snapshot``):
    done = rows stored, failed = rows with an error, captioned = done and not failed."""

    items_total: int
    items_done: int
    items_failed: int
    chunks: dict[str, int]
    elapsed_s: float
    output_dir: str
    items_done_before: int = 0  # done by earlier runs in this data directory
    nothing_left: bool = False  # every item was done (or its chunk failed) before this run
    failures: list[FailureReason] = field(default_factory=list)  # top reasons in the output

    @property
    def items_captioned(self) -> int:
        return self.items_done - self.items_failed

    @property
    def items_this_run(self) -> int:
        return self.items_done - self.items_done_before

    @property
    def items_per_s(self) -> float:
        """Items stored by this run per second (earlier runs' items are not this run's)."""
        return self.items_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0


def local_configs(
    orchestrator: OrchestratorConfig, worker: WorkerConfig
) -> tuple[OrchestratorConfig, WorkerConfig]:
    """Give the local worker its own token and point it at the orchestrator's address."""
    token = secrets.token_urlsafe(24)
    auth = orchestrator.auth.model_copy(
        update={
            "worker_tokens": [
                *orchestrator.auth.worker_tokens,
                TokenEntry(name="local", token=token),
            ]
        }
    )
    orchestrator = orchestrator.model_copy(update={"auth": auth})
    worker = worker.model_copy(update={"token": token, "exit_when_done": True})
    return orchestrator, worker


async def run_local(
    orchestrator_config: OrchestratorConfig,
    worker_config: WorkerConfig,
    progress: Progress | None = None,
    captioner: Captioner | None = None,
) -> RunSummary:
    """Caption the dataset with one local worker; SourceError for a dataset without items.
    ``captioner`` stands in for the worker's own (tests pass one with a stub engine)."""
    orchestrator_config, worker_config = local_configs(orchestrator_config, worker_config)
    orchestrator = Orchestrator(orchestrator_config)
    started = time.monotonic()
    try:
        await orchestrator.start()
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            await orchestrator.stop()  # closes the store, so the data directory is unlocked
        raise
    first = orchestrator.snapshot()
    if first["items_total"] == 0:
        await orchestrator.stop()
        raise SourceError(
            f"dataset {orchestrator_config.dataset.path} has no items: nothing to caption "
            "(check --dataset, dataset.type and dataset.image_extensions)"
        )
    nothing_left = orchestrator.finished.is_set()
    if nothing_left:
        log.info(
            "nothing left to do: the %d items of this dataset were done by an earlier run in %s",
            first["items_total"],
            orchestrator_config.storage.data_dir,
        )
    scheme = "wss" if orchestrator_config.ssl.cert else "ws"
    host = "127.0.0.1" if orchestrator_config.host in ("0.0.0.0", "") else orchestrator_config.host
    worker_config = worker_config.model_copy(
        update={"server": f"{scheme}://{host}:{orchestrator.port}", "verify_ssl": False}
    )
    worker = Worker(worker_config, captioner=captioner)
    worker_task = asyncio.create_task(worker.run(), name="local-worker")
    try:
        while not worker_task.done():
            if progress is not None:
                progress(orchestrator.snapshot())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker_task), 0.5)
        await worker_task  # re-raises a worker failure (bad model, unreachable data)
    finally:
        if not worker_task.done():
            worker.stop()
            await asyncio.gather(worker_task, return_exceptions=True)
        snapshot = orchestrator.snapshot()
        if progress is not None:
            progress(snapshot)
        await orchestrator.stop()
    parts_dir = orchestrator.store.parts_dir
    return RunSummary(
        items_total=snapshot["items_total"],
        items_done=snapshot["items_done"],
        items_failed=snapshot["items_failed"],
        chunks=snapshot["chunks"],
        elapsed_s=time.monotonic() - started,
        output_dir=str(parts_dir),
        items_done_before=first["items_done"],
        nothing_left=nothing_left,
        failures=_failures(parts_dir) if snapshot["items_failed"] else [],
    )


def _failures(parts_dir: Path) -> list[FailureReason]:
    """The top failure reasons in the output (the journal was flushed on stop); a summary
    that cannot be read is logged, never a reason to fail the run."""
    try:
        return failure_summary(parts_dir)
    except Exception:
        log.exception("cannot read the failures back from %s", parts_dir)
        return []
