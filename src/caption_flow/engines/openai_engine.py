"""The openai engine: requests to OpenAI-compatible chat-completion servers.

Several endpoints are used at once, each with its own :class:`AdaptiveLimit`, so their
capacity adds up and none is pushed past what it answers. Requests run on the engine's own
asyncio loop in a thread of its own; :meth:`OpenAIEngine.generate` is synchronous, like the
other engines. A failed attempt (429, 5xx, time-out, unreadable reply) is retried as a new
attempt of the same request, up to the endpoint's ``max_retries``; a request that still fails
gets ``Generation.error``. API keys come from the worker's environment and are scrubbed from
every error text, so they reach neither logs, the orchestrator nor the output.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from caption_flow.config.models import EndpointConfig, SamplingConfig, WorkerConfig
from caption_flow.engines.adaptive import AdaptiveLimit, Ticket, parse_retry_after
from caption_flow.engines.base import EngineSpec, Generation, GenerationRequest
from caption_flow.errors import ConfigError, EngineError, EngineUnavailableError

logger = logging.getLogger(__name__)

_MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_MAX_ERROR_CHARS = 300


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced, so an echoed key cannot leak through an error."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def data_url(image: Image.Image, image_format: str, quality: int) -> str:
    """``image`` encoded as a base64 data URL (JPEG has no alpha, so it is dropped)."""
    if image_format == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    options: dict[str, Any] = {} if image_format == "png" else {"quality": quality}
    image.save(buffer, format=image_format.upper(), **options)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:{_MIME[image_format]};base64,{encoded}"


def request_body(
    model: str,
    url: str,
    prompt: str,
    sampling: SamplingConfig,
    extra: dict[str, Any],
    schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A chat-completion body: one user turn, image first, then the prompt; a schema goes
    as ``response_format`` (``extra`` may replace it with the server's own form)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": prompt},
                ],
            }
        ],
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
    }
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.ignore_eos:  # a vLLM extension
        body["ignore_eos"] = True
    if sampling.repetition_penalty != 1.0:  # a vLLM/SGLang extension; hosted APIs lack it
        body["repetition_penalty"] = sampling.repetition_penalty
    if schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "caption", "schema": schema, "strict": True},
        }
    body.update(extra)
    return body


class _Attempt(Exception):
    """One failed attempt; ``overloaded`` shrinks the endpoint's limit."""

    def __init__(
        self, reason: str, *, overloaded: bool, retry_after: float | None = None, final: bool
    ) -> None:
        super().__init__(reason)
        self.overloaded = overloaded
        self.retry_after = retry_after
        self.final = final  # retrying cannot help (a 400: the request itself is wrong)


@dataclass
class _Endpoint:
    config: EndpointConfig
    base_url: str
    key: str | None
    limit: AdaptiveLimit


def resolve_endpoints(configs: Sequence[EndpointConfig]) -> list[_Endpoint]:
    """Endpoints with their URL and key read from the environment; ConfigError if one is
    missing (the message names the variable, never its value)."""
    if not configs:
        raise ConfigError("the openai engine needs at least one entry in endpoints")
    endpoints = []
    for config in configs:
        base_url = config.base_url
        if config.base_url_env is not None:
            base_url = os.environ.get(config.base_url_env)
            if not base_url:
                raise ConfigError(f"endpoint {config.name}: ${config.base_url_env} is not set")
        key = None
        if config.api_key_env is not None:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ConfigError(f"endpoint {config.name}: ${config.api_key_env} is not set")
        limit = AdaptiveLimit(
            config.initial_concurrency,
            config.max_concurrency,
            requests_per_minute=config.requests_per_minute,
        )
        endpoints.append(_Endpoint(config, str(base_url).rstrip("/"), key, limit))
    return endpoints


class OpenAIEngine:
    """Sends each request to whichever endpoint has room; see the module docstring."""

    def __init__(
        self,
        spec: EngineSpec,
        endpoints: Sequence[EndpointConfig],
        *,
        image_format: str = "jpeg",
        image_quality: int = 90,
    ) -> None:
        self.spec = spec
        self.endpoints = resolve_endpoints(endpoints)
        self.image_format = image_format
        self.image_quality = image_quality
        self.attempts = 0  # every request sent, retries included
        self._secrets = [e.key for e in self.endpoints if e.key]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="captionflow-openai", daemon=True
        )
        self._thread.start()
        self._client = self._call(self._make_client())

    async def _make_client(self) -> httpx.AsyncClient:
        total = sum(e.config.max_concurrency for e in self.endpoints)
        limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
        return httpx.AsyncClient(limits=limits, timeout=None)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[Generation]:
        """One Generation per request, in order. Raises EngineUnavailableError when no
        endpoint answered at all (the items are not at fault)."""
        urls = [data_url(r.image, self.image_format, self.image_quality) for r in requests]
        prompts = [r.prompt for r in requests]
        schemas = [r.output_schema for r in requests]
        results: list[Generation] = self._call(self._run(urls, prompts, schemas, sampling))
        if results and all(r.error and r.error.startswith("unreachable") for r in results):
            raise EngineUnavailableError(f"no endpoint answered: {results[0].error}")
        return results

    async def _run(
        self,
        urls: list[str],
        prompts: list[str],
        schemas: list[dict[str, Any] | None],
        sampling: SamplingConfig,
    ) -> list[Generation]:
        results: list[Generation | None] = [None] * len(urls)
        attempts = [0] * len(urls)
        pending: list[int] = list(range(len(urls)))  # request indices waiting for an endpoint
        changed = asyncio.Event()
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            changed.set()  # only now, when ``running`` no longer holds it

        async def attempt(index: int, endpoint: _Endpoint, ticket: Ticket) -> None:
            attempts[index] += 1
            self.attempts += 1
            try:
                body = request_body(
                    endpoint.config.model,
                    urls[index],
                    prompts[index],
                    sampling,
                    endpoint.config.extra_body,
                    schemas[index],
                )
                results[index] = await self._send(endpoint, body)
                endpoint.limit.succeeded(ticket, time.monotonic())
            except _Attempt as exc:
                endpoint.limit.failed(
                    ticket,
                    time.monotonic(),
                    overloaded=exc.overloaded,
                    retry_after=exc.retry_after,
                )
                reason = scrub(str(exc), self._secrets)[:_MAX_ERROR_CHARS]
                if exc.final or attempts[index] > endpoint.config.max_retries:
                    logger.warning("request failed after %d attempts: %s", attempts[index], reason)
                    results[index] = Generation("", 0, error=reason)
                else:
                    logger.info("attempt %d failed (%s); retrying", attempts[index], reason)
                    pending.insert(0, index)  # first in line: a batch ends when its last item does
            except Exception as exc:  # a bug of ours must fail the request, not hang the batch
                endpoint.limit.failed(ticket, time.monotonic(), overloaded=False)
                reason = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
                logger.error("request failed unexpectedly: %s", reason)
                results[index] = Generation("", 0, error=reason[:_MAX_ERROR_CHARS])

        while pending or running:
            now = time.monotonic()
            started = False
            while pending:
                ready = [e for e in self.endpoints if e.limit.can_start(now)]
                if not ready:
                    break
                endpoint = max(ready, key=lambda e: e.limit.slots)
                # Counted in flight now, before the task runs, so the limit holds.
                ticket = endpoint.limit.start(now)
                task = asyncio.create_task(attempt(pending.pop(0), endpoint, ticket))
                running.add(task)
                task.add_done_callback(finished)
                started = True
            if started:
                continue
            delays = [e.limit.delay(now) for e in self.endpoints if e.limit.slots > 0]
            timeout = min([d for d in delays if d > 0], default=None) if pending else None
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)
        return [r if r is not None else Generation("", 0, error="lost") for r in results]

    async def _send(self, endpoint: _Endpoint, body: dict[str, Any]) -> Generation:
        headers = {"Authorization": f"Bearer {endpoint.key}"} if endpoint.key else {}
        url = f"{endpoint.base_url}/chat/completions"
        try:
            response = await self._client.post(
                url, json=body, headers=headers, timeout=endpoint.config.timeout_seconds
            )
        except httpx.TimeoutException:
            raise _Attempt(
                f"unreachable: {endpoint.config.name} timed out after "
                f"{endpoint.config.timeout_seconds:g}s",
                overloaded=True,
                final=False,
            ) from None
        except httpx.HTTPError as exc:
            raise _Attempt(
                f"unreachable: {endpoint.config.name}: {type(exc).__name__}: {exc}",
                overloaded=True,
                final=False,
            ) from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Attempt(
                f"{endpoint.config.name} answered {status}: {response.text[:200]}",
                overloaded=True,
                retry_after=parse_retry_after(response.headers.get("retry-after")),
                final=False,
            )
        if status >= 400:
            raise _Attempt(
                f"{endpoint.config.name} answered {status}: {response.text[:200]}",
                overloaded=False,
                final=status not in (408, 409),
            )
        return self._parse(endpoint, response)

    @staticmethod
    def _parse(endpoint: _Endpoint, response: httpx.Response) -> Generation:
        try:
            payload = response.json()
            choice = payload["choices"][0]
            content = choice["message"].get("content") or ""
            usage = payload.get("usage") or {}
            tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _Attempt(
                f"{endpoint.config.name} sent an unreadable reply ({type(exc).__name__})",
                overloaded=False,
                final=False,
            ) from None
        if not isinstance(content, str):
            raise _Attempt(
                f"{endpoint.config.name} sent non-text content", overloaded=False, final=False
            )
        return Generation(content, tokens, model=endpoint.config.model)

    def close(self) -> None:
        if not self._loop.is_running():
            return
        try:
            self._call(self._client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


def worker_model(config: WorkerConfig) -> str | None:
    """The model name recorded with the results: the worker's ``model`` flag, else (openai
    engine) the endpoints' models, else None (the job's model)."""
    if config.model or config.engine != "openai":
        return config.model
    return ",".join(dict.fromkeys(e.model for e in config.endpoints)) or None


def openai_loader(config: WorkerConfig) -> Any:
    """A Captioner loader that builds an OpenAIEngine from the worker's endpoints."""

    def load(kind: Any, spec: EngineSpec) -> OpenAIEngine:
        try:
            return OpenAIEngine(
                spec,
                config.endpoints,
                image_format=config.image_format,
                image_quality=config.image_quality,
            )
        except ConfigError as exc:
            raise EngineError(str(exc)) from exc

    return load
