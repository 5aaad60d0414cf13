"""What a connection may cost, loops that cannot die silently, and safe defaults."""

from __future__ import annotations

import asyncio
import logging

import pytest
from support import TIME_UNIT

from caption_flow.config.models import AuthConfig, OrchestratorConfig, TLSConfig, TokenEntry
from caption_flow.errors import ConfigError
from caption_flow.orchestrator.auth import check_exposure
from caption_flow.orchestrator.limits import ByteBudget, TokenBucket
from caption_flow.orchestrator.supervise import supervise


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)  # one token short at 10/s
    assert bucket.take(1.0) == 0.0  # a second later the bucket has refilled (to its burst)


async def test_byte_budget_holds_readers_back_until_bytes_are_freed() -> None:
    budget = ByteBudget(limit=100)
    first = await budget.acquire(80)
    waiting = asyncio.create_task(budget.acquire(50))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "over the ceiling: the second reader waits"
    await budget.release(first)
    assert await asyncio.wait_for(waiting, 5 * TIME_UNIT) == 50
    # A frame larger than the whole budget still passes alone: nothing waits forever.
    await budget.release(50)
    assert await asyncio.wait_for(budget.acquire(10_000), 5 * TIME_UNIT) == 100


async def test_a_failing_loop_is_restarted_then_given_up_with_the_reason() -> None:
    runs: list[int] = []
    fatal: list[str] = []

    async def flaky() -> None:
        runs.append(1)
        raise RuntimeError("disk on fire")

    task = supervise("flaky", flaky, fatal.append, max_failures=3, pause=0.01)
    await asyncio.wait_for(task, 5 * TIME_UNIT)
    assert len(runs) == 3
    assert fatal == ["flaky keeps failing: RuntimeError: disk on fire"]


def _config(host: str, token: str, cert: str | None = None) -> OrchestratorConfig:
    return OrchestratorConfig(
        host=host,
        auth=AuthConfig(worker_tokens=[TokenEntry(name="w", token=token)]),
        ssl=TLSConfig(cert=cert, key=cert),
    )


def test_example_tokens_are_refused_on_a_reachable_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    check_exposure(_config("127.0.0.1", "change-me-worker"))  # loopback: fine
    check_exposure(_config("::1", "short"))
    with pytest.raises(ConfigError, match=r"worker_tokens.*'w'.*0\.0\.0\.0"):
        check_exposure(_config("0.0.0.0", "change-me-worker"))
    with pytest.raises(ConfigError, match="too short"):
        check_exposure(_config("10.1.2.3", "abc"))
    with caplog.at_level(logging.WARNING):
        check_exposure(_config("0.0.0.0", "a-long-random-secret"))
    assert "WITHOUT TLS" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_exposure(_config("0.0.0.0", "a-long-random-secret", cert="/etc/cert.pem"))
    assert "WITHOUT TLS" not in caplog.text


def test_contributor_names_cannot_hold_a_slash() -> None:
    with pytest.raises(ValueError):
        TokenEntry(name="team/alice", token="secret-token")
