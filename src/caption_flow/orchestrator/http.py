"""Plain HTTP on the websocket port: ``/health`` and Prometheus ``/metrics``.

Anything else continues as a websocket handshake.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from websockets.http11 import Request, Response

if TYPE_CHECKING:
    from caption_flow.orchestrator.server import Orchestrator


def metrics_text(snapshot: dict[str, Any]) -> str:
    lines = [
        "# TYPE captionflow_items_total gauge",
        f"captionflow_items_total {snapshot['items_total']}",
        "# TYPE captionflow_items_done gauge",
        f"captionflow_items_done {snapshot['items_done']}",
        "# TYPE captionflow_items_failed gauge",
        f"captionflow_items_failed {snapshot['items_failed']}",
        "# TYPE captionflow_items_captioned gauge",
        f"captionflow_items_captioned {snapshot['items_captioned']}",
        "# TYPE captionflow_items_per_second gauge",
        f"captionflow_items_per_second {snapshot['rate']}",
        "# TYPE captionflow_workers gauge",
        f"captionflow_workers {snapshot['workers']}",
        "# TYPE captionflow_chunks gauge",
    ]
    lines += [f'captionflow_chunks{{status="{k}"}} {v}' for k, v in snapshot["chunks"].items()]
    return "\n".join(lines) + "\n"


def answer_http(orchestrator: Orchestrator, connection: Any, request: Request) -> Response | None:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    path = request.path.split("?", 1)[0]
    if path == "/health":
        response: Response = connection.respond(200, "ok\n")
        return response
    if path == "/metrics" and orchestrator.book is not None:
        response = connection.respond(200, metrics_text(orchestrator.snapshot()))
        return response
    response = connection.respond(404, "not found\n")
    return response
