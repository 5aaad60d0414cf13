"""Plain HTTP on the websocket port: ``/health`` and Prometheus ``/metrics``.

Anything else continues as a websocket handshake.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.http11 import Request, Response

from caption_flow.orchestrator.web import answer_web

if TYPE_CHECKING:
    from caption_flow.orchestrator.server import Orchestrator


def answer_http(orchestrator: Orchestrator, connection: Any, request: Request) -> Response | None:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    path = request.path.split("?", 1)[0]
    response: Response
    if path == "/health":
        problem = orchestrator.metrics.store_problem()
        if problem is None:
            response = connection.respond(200, "ok\n")
        else:  # load balancers and probes read the status; people read the reason
            response = connection.respond(503, f"store failing: {problem}\n")
        return response
    if path == "/metrics" and orchestrator.book is not None:
        response = connection.respond(200, orchestrator.metrics.exposition().decode())
        del response.headers["Content-Type"]  # (Headers appends on assignment)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
    if (page := answer_web(orchestrator, request, path)) is not None:  # the dashboard
        return page
    response = connection.respond(404, "not found\n")
    return response
