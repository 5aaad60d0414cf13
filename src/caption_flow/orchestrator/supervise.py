"""Background loops that cannot die silently.

A loop that raises is logged with its traceback and restarted after a pause; one that keeps
failing (``max_failures`` within ``window`` seconds) is given up, and ``on_fatal`` is called
with the reason so the process can exit non-zero instead of serving on half-dead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def supervise(
    name: str,
    loop: Callable[[], Awaitable[None]],
    on_fatal: Callable[[str], None],
    *,
    max_failures: int = 5,
    window: float = 60.0,
    pause: float = 1.0,
) -> asyncio.Task[None]:
    """Run ``loop()`` as a task, restarting it when it fails."""

    async def guard() -> None:
        failures: list[float] = []
        while True:
            try:
                await loop()
                return  # a loop that returns has finished its job
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                now = time.monotonic()
                failures = [t for t in failures if now - t < window] + [now]
                log.exception("%s failed (%d in %.0fs); restarting", name, len(failures), window)
                if len(failures) >= max_failures:
                    on_fatal(f"{name} keeps failing: {type(exc).__name__}: {exc}")
                    return
                await asyncio.sleep(pause)

    return asyncio.create_task(guard(), name=name)
