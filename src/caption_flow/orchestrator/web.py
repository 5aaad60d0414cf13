"""The web dashboard on the orchestrator's port: the page, ``/api/snapshot`` and ``/api/live``.

Plain GETs get whole responses (websockets' ``process_request`` cannot stream), so the live
view is a websocket on ``/api/live``: the browser sends its monitor token as the first text
frame (nothing in public mode) and then receives the snapshot as a JSON text frame every
second. A browser cannot speak our msgpack protocol, hence JSON on a path of its own.

Public mode (``orchestrator.dashboard.public``) needs no token and serves
:func:`public_view`: an allow-list, so keys added to the snapshot later stay private until
someone adds them here.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from caption_flow.protocol.connection import CLOSE_BAD_TOKEN, CLOSE_TRY_AGAIN
from caption_flow.web import ASSETS, asset

if TYPE_CHECKING:
    from caption_flow.orchestrator.server import Orchestrator

log = logging.getLogger(__name__)

LIVE_PATH = "/api/live"
SNAPSHOT_PATH = "/api/snapshot"
PAGES = {"/": "index.html", "/index.html": "index.html"} | {f"/{n}": n for n in ASSETS}
LIVE_INTERVAL_S = 1.0
TOKEN_WAIT_S = 10.0
MAX_LIVE = 256  # browsers watching at once; more are told to try again later
CLOSE_DISABLED = 4404
MAX_TOKEN_CHARS = 512
# The page's own script and style only; it talks to its own origin and nothing else.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# What a public page shows: totals, rates, the graph and the leaderboard.
PUBLIC_KEYS = (
    "items_total",
    "items_done",
    "items_failed",
    "items_captioned",
    "rate",
    "rate_avg",
    "eta_s",
    "chunks",
    "workers",
    "uptime_s",
    "history",
)
PUBLIC_WORKER_KEYS = ("name", "items_per_s", "items_done")
PUBLIC_CONTRIBUTOR_KEYS = ("contributor", "items", "captions", "failed", "share")


def public_view(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a snapshot anyone may see: no tokens, no addresses, no prompts or model
    paths, no activity log, and of each worker only its name and rates. Pure."""
    view = {k: snapshot[k] for k in PUBLIC_KEYS if k in snapshot}
    view["sessions"] = [
        {k: s[k] for k in PUBLIC_WORKER_KEYS if k in s} | {"role": "worker"}
        for s in snapshot.get("sessions", [])
        if isinstance(s, Mapping) and s.get("role") == "worker"
    ]
    if "contributors" in snapshot:
        view["contributors"] = [
            {k: c[k] for k in PUBLIC_CONTRIBUTOR_KEYS if k in c}
            for c in snapshot["contributors"]
            if isinstance(c, Mapping)
        ]
    model = snapshot.get("model")
    if isinstance(model, str) and _is_hub_name(model):
        view["model"] = model
    return view


def _is_hub_name(model: str) -> bool:
    """``org/name`` on the Hub, not a folder on the orchestrator's disk."""
    parts = model.split("/")
    return (
        len(parts) == 2
        and all(p and not p.startswith(".") for p in parts)
        and ("\\" not in model and ":" not in model and "~" not in model)
    )


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, else ``""``."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Dashboard:
    """One orchestrator's dashboard state: who may look, and the snapshot as JSON text
    made at most once per interval however many browsers watch."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator
        self.live = 0
        self._cached: tuple[float, bool, str] = (float("-inf"), False, "")

    @property
    def enabled(self) -> bool:
        return self._orchestrator.config.dashboard.enabled

    @property
    def public(self) -> bool:
        return self._orchestrator.config.dashboard.public

    def allowed(self, token: str) -> bool:
        if self.public:
            return True
        if not token or len(token) > MAX_TOKEN_CHARS:
            return False
        return self._orchestrator.authenticate("monitor", token) is not None

    def view(self, public: bool) -> dict[str, Any]:
        snapshot = self._orchestrator.snapshot()
        return public_view(snapshot) if public else snapshot

    def text(self) -> str:
        """The view as JSON; a full view made before a switch to public is never served."""
        made_at, public, text = self._cached
        now = time.monotonic()
        if now - made_at >= LIVE_INTERVAL_S / 2 or public != self.public:
            public = self.public
            text = json.dumps(self.view(public), default=str, separators=(",", ":"))
            self._cached = (now, public, text)
        return text


def _response(status: int, body: bytes, content_type: str, **extra: str) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
        ]
    )
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    code = http.HTTPStatus(status)
    return Response(code.value, code.phrase, headers, body)


def answer_web(orchestrator: Orchestrator, request: Request, path: str) -> Response | None:
    """The page, its files and ``/api/snapshot``; None for any other path (or when the
    dashboard is off), so the caller answers it."""
    board = orchestrator.dashboard
    if not board.enabled:
        return None
    name = PAGES.get(path)
    if name is not None:
        return _response(200, asset(name), ASSETS[name], Content_Security_Policy=CSP)
    if path != SNAPSHOT_PATH:
        return None
    if not board.allowed(bearer_token(request.headers)):
        return _response(
            401,
            b'{"error":"send Authorization: Bearer <monitor token>"}',
            "application/json",
            WWW_Authenticate='Bearer realm="captionflow"',
        )
    if orchestrator.book is None or orchestrator.desk is None:
        return _response(503, b'{"error":"starting"}', "application/json")
    body = board.text().encode()
    view = "public" if board.public else "full"
    return _response(200, body, "application/json", X_Captionflow_View=view)


def is_live_feed(websocket: Any) -> bool:
    """Whether a websocket asked for ``/api/live`` rather than our msgpack protocol."""
    request = websocket.request
    return request is not None and request.path.split("?", 1)[0] == LIVE_PATH


async def serve_live(orchestrator: Orchestrator, websocket: Any) -> None:
    """Send the (filtered) snapshot as JSON every second until the browser leaves.

    The token is checked again before every frame, so a revoked token (or a switch from
    public to private) stops the feed. Connections still owing their token count towards
    :data:`MAX_LIVE` too."""
    board = orchestrator.dashboard
    if not board.enabled:
        await websocket.close(CLOSE_DISABLED, "the dashboard is off")
        return
    if board.live >= MAX_LIVE:
        await websocket.close(CLOSE_TRY_AGAIN, "too many dashboards open")
        return
    board.live += 1
    try:
        await _feed(board, websocket)
    except ConnectionClosed:
        pass
    finally:
        board.live -= 1


async def _feed(board: Dashboard, websocket: Any) -> None:
    token = ""
    if not board.public:
        try:
            frame = await asyncio.wait_for(websocket.recv(), TOKEN_WAIT_S)
        except TimeoutError:
            await websocket.close(CLOSE_BAD_TOKEN, "send the monitor token first")
            return
        token = frame.strip() if isinstance(frame, str) else ""
        if not board.allowed(token):
            log.warning("dashboard refused %s: bad monitor token", websocket.remote_address)
            await websocket.close(CLOSE_BAD_TOKEN, "bad monitor token")
            return
    loop = asyncio.get_running_loop()
    next_send = loop.time()
    while True:
        if loop.time() >= next_send:
            if not board.allowed(token):
                await websocket.close(CLOSE_BAD_TOKEN, "monitor token refused (revoked?)")
                return
            await websocket.send(board.text())
            next_send = loop.time() + LIVE_INTERVAL_S
        # Read (and drop) whatever the browser sends, so that its close is seen.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(websocket.recv(), max(0.0, next_send - loop.time()))
