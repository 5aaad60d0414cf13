"""The openai engine against a stand-in OpenAI-compatible server on 127.0.0.1.

The stand-in is a real aiohttp server on its own loop and thread; a plan of misbehaviours
(429 with Retry-After, 500, a reply slower than the time-out, malformed JSON, 400) is
consumed one per request, after which it answers. It records every request it got.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image
from pydantic import ValidationError
from support import TIME_UNIT, orchestrator_config, read_rows, running, worker_config

from caption_flow.cli.configs import worker_config as load_worker_config
from caption_flow.config.models import EndpointConfig, SamplingConfig, WorkerConfig
from caption_flow.engines.base import EngineSpec, GenerationRequest
from caption_flow.engines.openai_engine import OpenAIEngine, worker_model
from caption_flow.errors import ConfigError, EngineUnavailableError
from caption_flow.worker.client import Worker

SAMPLING = SamplingConfig(temperature=0.0, max_tokens=16, repetition_penalty=1.0)
KEY = "sk-test-5ec7e7-do-not-leak"


class StandIn:
    """A chat-completions server. ``plan``: actions for the next requests ("429", "500",
    "400", "slow", "garbage"); then each request is answered with ``reply(prompt)`` after
    ``latency`` seconds. Above ``capacity`` requests in flight it answers 429."""

    def __init__(
        self,
        plan: list[str] | None = None,
        latency: float = 0.0,
        capacity: int | None = None,
        retry_after: str | None = None,
        reply: Any = None,
    ) -> None:
        self.plan = list(plan or [])
        self.latency = latency
        self.capacity = capacity
        self.retry_after = retry_after
        self.reply = reply or (lambda prompt: f"caption of {prompt}")
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.answered: Counter[str] = Counter()  # prompt -> successful answers
        self.times: list[tuple[float, str]] = []  # (arrival, action)
        self.in_flight = 0
        self.max_in_flight = 0
        self.spans: list[tuple[float, float]] = []  # (start, end) of each answered request
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        prompt = body["messages"][0]["content"][1]["text"]
        action = self.plan.pop(0) if self.plan else "ok"
        self.times.append((time.monotonic(), action))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.capacity is not None and self.in_flight > self.capacity:
                action = "429"
            if action == "429":
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                return web.Response(status=429, text="slow down", headers=headers)
            if action == "500":
                # A hostile or careless server echoing the key it got: it must be scrubbed.
                return web.Response(status=500, text=f"boom {request.headers.get('Authorization')}")
            if action == "400":
                return web.Response(status=400, text=f"bad {request.headers.get('Authorization')}")
            if action == "slow":
                await asyncio.sleep(5 * TIME_UNIT)
            began = time.monotonic()
            await asyncio.sleep(self.latency)
            self.spans.append((began, time.monotonic()))
            if action == "garbage":
                return web.Response(text="{not json", content_type="application/json")
            if action == "ok":  # a "slow" answer comes after the client gave up on it
                self.answered[prompt] += 1
            payload = {
                "choices": [{"message": {"role": "assistant", "content": self.reply(prompt)}}],
                "usage": {"completion_tokens": 3},
            }
            return web.json_response(payload)
        finally:
            self.in_flight -= 1

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._started.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> StandIn:
        self._thread.start()
        assert self._started.wait(10 * TIME_UNIT), "stand-in did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def endpoint(server: StandIn, name: str = "a", **kw: Any) -> EndpointConfig:
    options: dict[str, Any] = {"initial_concurrency": 2, "max_concurrency": 8, "max_retries": 3}
    options.update(kw)
    return EndpointConfig(name=name, base_url=server.url, model=f"model-{name}", **options)


def requests(count: int) -> list[GenerationRequest]:
    image = Image.new("RGB", (32, 24), (200, 30, 30))
    return [GenerationRequest(image, f"prompt {i}") for i in range(count)]


def engine(*endpoints: EndpointConfig) -> OpenAIEngine:
    return OpenAIEngine(EngineSpec(model="remote"), list(endpoints))


def test_captions_arrive_in_order_with_the_image_as_a_data_url() -> None:
    with StandIn(latency=0.01) as server:
        eng = engine(endpoint(server, initial_concurrency=4))
        try:
            out = eng.generate(requests(12), SAMPLING)
        finally:
            eng.close()
    assert [g.text for g in out] == [f"caption of prompt {i}" for i in range(12)]
    assert all(g.error is None and g.tokens == 3 for g in out)
    assert eng.attempts == 12 and len(server.requests) == 12
    body = server.requests[0]
    assert body["model"] == "model-a" and body["max_tokens"] == 16
    assert "repetition_penalty" not in body, "sent only when it is not the neutral 1.0"
    image_part = body["messages"][0]["content"][0]
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_429_500_timeouts_and_garbage_are_retried_once_each_and_nothing_is_sent_twice() -> None:
    plan = ["429", "500", "slow", "garbage"]
    with StandIn(plan=plan, retry_after=str(0.4 * TIME_UNIT)) as server:
        one_at_a_time = endpoint(
            server,
            initial_concurrency=1,
            max_concurrency=1,
            timeout_seconds=1.0 * TIME_UNIT,
            max_retries=len(plan),  # retries go first in line: all four hit the first request
        )
        eng = engine(one_at_a_time)
        try:
            out = eng.generate(requests(5), SAMPLING)
        finally:
            eng.close()
    assert [g.text for g in out] == [f"caption of prompt {i}" for i in range(5)]
    assert eng.attempts == 5 + len(plan), "each failure costs exactly one more attempt"
    assert all(n == 1 for n in server.answered.values()) and len(server.answered) == 5
    (t429, _), (t_next, _) = server.times[0], server.times[1]
    assert t_next - t429 >= 0.35 * TIME_UNIT, "Retry-After was not honoured"
    assert eng.endpoints[0].limit.cuts >= 1


def test_a_request_out_of_retries_fails_alone_and_a_400_is_not_retried(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("STANDIN_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with StandIn(plan=["500", "500", "400"]) as server:
        ep = endpoint(server, initial_concurrency=1, max_concurrency=1, max_retries=1)
        eng = engine(ep.model_copy(update={"api_key_env": "STANDIN_KEY"}))
        try:
            out = eng.generate(requests(3), SAMPLING)
        finally:
            eng.close()
    assert out[0].error is not None and "answered 500" in out[0].error
    assert out[1].error is not None and "answered 400" in out[1].error
    assert out[2].text == "caption of prompt 2"
    assert eng.attempts == 4, "two for the first, one for the 400, one for the last"
    assert all(h["Authorization"] == f"Bearer {KEY}" for h in server.headers)
    assert "Bearer ***" in out[0].error, "the echoed key is scrubbed"
    for text in (caplog.text, out[0].error, out[1].error):
        assert KEY not in text


def test_concurrency_rises_while_requests_succeed_and_falls_on_overload() -> None:
    with StandIn(latency=0.05, capacity=6) as server:
        eng = engine(endpoint(server, initial_concurrency=1, max_concurrency=32, max_retries=20))
        try:
            out = eng.generate(requests(120), SAMPLING)
        finally:
            eng.close()
    limit = eng.endpoints[0].limit
    assert all(g.error is None for g in out)
    assert server.max_in_flight > 3, "the limit grew from 1 while requests succeeded"
    # 429s above capacity cut it, so it never ran up to max_concurrency.
    assert limit.cuts >= 1 and limit.peak < limit.maximum, (limit.cuts, limit.peak)
    assert sum(server.answered.values()) == 120 and set(server.answered.values()) == {1}


def test_two_endpoints_share_the_load_and_their_capacity_adds_up() -> None:
    with StandIn(latency=0.1) as a, StandIn(latency=0.1) as b:
        eng = engine(
            endpoint(a, "a", initial_concurrency=4, max_concurrency=4),
            endpoint(b, "b", initial_concurrency=4, max_concurrency=4),
        )
        try:
            out = eng.generate(requests(32), SAMPLING)
        finally:
            eng.close()
    assert [g.text for g in out] == [f"caption of prompt {i}" for i in range(32)]
    assert len(a.requests) + len(b.requests) == 32
    assert len(a.requests) >= 8 and len(b.requests) >= 8
    assert a.max_in_flight == 4 and b.max_in_flight == 4
    # Capacity adds up: at some moment both endpoints were busy with more than one could hold.
    events = sorted(
        [(t0, 1) for t0, _ in a.spans + b.spans] + [(t1, -1) for _, t1 in a.spans + b.spans]
    )
    busy = peak = 0
    for _, step in events:
        busy += step
        peak = max(peak, busy)
    assert peak > 4, peak


def test_no_endpoint_answering_is_the_engine_not_the_items() -> None:
    with StandIn() as server:
        url = server.url
    dead = EndpointConfig(name="dead", base_url=url, model="m", max_retries=1)
    eng = engine(dead)
    try:
        with pytest.raises(EngineUnavailableError, match="no endpoint answered"):
            eng.generate(requests(2), SAMPLING)
    finally:
        eng.close()


def test_a_missing_key_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STANDIN_MISSING", raising=False)
    config = EndpointConfig(
        name="x", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="STANDIN_MISSING"
    )
    with pytest.raises(ConfigError, match=r"\$STANDIN_MISSING is not set"):
        engine(config)


def test_a_schema_goes_as_response_format() -> None:
    schema = {"type": "object", "properties": {"tags": {"type": "array"}}}
    with StandIn(reply=lambda prompt: '{"tags": []}') as server:
        eng = engine(endpoint(server))
        try:
            image = Image.new("RGBA", (8, 8))
            (out,) = eng.generate([GenerationRequest(image, "p", output_schema=schema)], SAMPLING)
        finally:
            eng.close()
    assert json.loads(out.text) == {"tags": []}
    sent = server.requests[0]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == schema


async def test_a_real_run_records_the_endpoint_model_and_never_the_key(
    tmp_path: Path,
    image_folder: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("STANDIN_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    images = image_folder(7)
    config = orchestrator_config(tmp_path / "data", images[0].parent, tmp_path / "no-model")
    with StandIn(plan=["500", "429"], reply=lambda prompt: "a fixed caption") as server:
        async with running(config) as orch:
            worker = Worker(
                worker_config(orch.port).model_copy(
                    update={
                        "engine": "openai",
                        "endpoints": [
                            endpoint(server, "local", api_key_env="STANDIN_KEY", max_retries=5)
                        ],
                    }
                )
            )
            await asyncio.wait_for(worker.run(), timeout=60 * TIME_UNIT)
            snapshot = orch.snapshot()
    rows = read_rows(tmp_path / "data")
    assert sorted(r["item_key"] for r in rows) == sorted(p.name for p in images)
    for row in rows:
        assert row["error"] is None and row["model"] == "model-local"
        assert row["captions"] == ["a fixed caption", "a fixed caption"]
    assert snapshot["items_done"] == 7
    assert KEY not in caplog.text
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_the_shipped_openai_example_is_valid_and_documents_every_key() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "worker.openai.yaml"
    config = load_worker_config(str(path), {})
    assert config.engine == "openai" and len(config.endpoints) == 2
    text = path.read_text()
    for key in EndpointConfig.model_fields:
        assert f" {key}:" in text, key
    for key in ("image_format", "image_quality", "endpoints"):
        assert f"  {key}:" in text, key
    assert worker_model(config) == "Qwen/Qwen2.5-VL-3B-Instruct,gpt-4o-mini"


def test_the_openai_engine_without_endpoints_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="engine openai needs at least one entry"):
        WorkerConfig(engine="openai")


async def test_rows_record_the_model_of_the_endpoint_that_answered_them(
    tmp_path: Path, image_folder: Any
) -> None:
    """Two endpoints serving different models share one worker's batches: each row names
    the model(s) that wrote its captions, not one name for the whole batch."""
    images = image_folder(12)
    config = orchestrator_config(tmp_path / "data", images[0].parent, tmp_path / "no-model")
    with (
        StandIn(latency=0.05, reply=lambda prompt: "from a") as a,
        StandIn(latency=0.05, reply=lambda prompt: "from b") as b,
    ):
        async with running(config) as orch:
            worker = Worker(
                worker_config(orch.port).model_copy(
                    update={
                        "engine": "openai",
                        "endpoints": [
                            endpoint(a, "a", initial_concurrency=2, max_concurrency=2),
                            endpoint(b, "b", initial_concurrency=2, max_concurrency=2),
                        ],
                    }
                )
            )
            await asyncio.wait_for(worker.run(), timeout=60 * TIME_UNIT)
    rows = read_rows(tmp_path / "data")
    assert sorted(r["item_key"] for r in rows) == sorted(p.name for p in images)
    for row in rows:
        answered_by = dict.fromkeys(f"model-{caption[-1]}" for caption in row["captions"])
        assert row["model"] == ",".join(answered_by), row
    models = {r["model"] for r in rows}
    assert any("model-a" in m for m in models) and any("model-b" in m for m in models)
