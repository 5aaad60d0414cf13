"""``caption-flow monitor``: the orchestrator's live figures as a plain table.

A stand-in until the Textual monitor lands: it connects with a monitor token, receives the
``stats`` the orchestrator pushes every second, and redraws one table every
``refresh_rate`` seconds (``--once``: prints the first snapshot and exits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from caption_flow.cli.configs import monitor_config
from caption_flow.cli.logs import verbose_option
from caption_flow.config.models import MonitorConfig
from caption_flow.errors import AuthError, ProtocolError
from caption_flow.protocol.connection import ClientConnection
from caption_flow.protocol.messages import Hello, Stats, encode

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


def _ssl_context(config: MonitorConfig) -> ssl.SSLContext | None:
    if not config.server.startswith("wss://"):
        return None
    context = ssl.create_default_context()
    if not config.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def stats_view(snapshot: dict[str, Any], config: MonitorConfig) -> Group:
    """One snapshot as tables; the ``show_*`` keys pick the rows and the client table."""
    summary = Table(title="captionflow", show_header=False, box=None)
    done, total = snapshot.get("items_done", 0), snapshot.get("items_total", 0)
    summary.add_row("items done", f"{done} of {total}")
    if config.show_quality_metrics:
        summary.add_row("captioned", str(snapshot.get("items_captioned", 0)))
        summary.add_row("failed", str(snapshot.get("items_failed", 0)))
    if config.show_throughput_graph:
        summary.add_row("items/s", f"{snapshot.get('rate', 0.0):.2f}")
    if config.show_chunk_progress:
        chunks = snapshot.get("chunks") or {}
        summary.add_row("chunks", ", ".join(f"{k} {v}" for k, v in sorted(chunks.items())))
    summary.add_row("workers", str(snapshot.get("workers", 0)))
    summary.add_row("model", str(snapshot.get("model", "")))
    parts: list[Any] = [summary]
    sessions = snapshot.get("sessions") or []
    if config.show_contributors and sessions and config.max_activity_items:
        clients = Table(title="connected")
        for column in ("name", "role", "contributor", "items done"):
            clients.add_column(column)
        if config.show_worker_queues:
            clients.add_column("queued chunks")
            clients.add_column("unacked")
        for session in sessions[: config.max_activity_items]:
            row = [
                str(session.get("name", "")),
                str(session.get("role", "")),
                str(session.get("contributor", "")),
                str(session.get("items_done", 0)),
            ]
            if config.show_worker_queues:
                row += [_count(session.get("queued_chunks")), _count(session.get("unacked"))]
            clients.add_row(*row)
        parts.append(clients)
    return Group(*parts)


def _count(value: Any) -> str:
    return "" if value is None else str(int(value))


async def watch(config: MonitorConfig, once: bool, console: Console) -> None:
    """Connect, then show snapshots until stopped (or the first one, with ``once``)."""
    try:
        async with connect(
            config.server,
            ssl=_ssl_context(config),
            open_timeout=CONNECT_TIMEOUT_S,
            compression=None,
        ) as ws:
            protocol = ClientConnection()
            await ws.send(encode(Hello(role="monitor", token=config.token, name="monitor")))
            protocol.receive(await ws.recv())  # the welcome; a refusal closes the socket
            log.info("connected to %s as a monitor", config.server)
            if once:
                console.print(stats_view(await _next_stats(ws, protocol), config))
                return
            await _live(ws, protocol, config, console)
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else "connection lost"
        if code in (4001, 4003):
            raise AuthError(f"orchestrator refused the monitor ({code}): {reason}") from None
        raise ProtocolError(f"connection to {config.server} closed: {reason}") from None
    except InvalidURI as exc:
        raise ProtocolError(f"bad server URL: {exc}") from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise ProtocolError(f"cannot reach the orchestrator at {config.server}: {exc}") from None


async def _next_stats(ws: Any, protocol: ClientConnection) -> dict[str, Any]:
    while True:
        message = protocol.receive(await ws.recv())
        if isinstance(message, Stats):
            return message.snapshot


async def _live(
    ws: Any, protocol: ClientConnection, config: MonitorConfig, console: Console
) -> None:
    with Live(console=console, auto_refresh=False) as live:
        shown = 0.0
        while True:
            snapshot = await _next_stats(ws, protocol)
            if time.monotonic() - shown >= config.refresh_rate:
                live.update(stats_view(snapshot, config), refresh=True)
                shown = time.monotonic()


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="monitor.yaml, or an orchestrator.yaml with a monitor section (default: the first "
    "found, see the README)",
)
@click.option("--server", help="orchestrator URL, ws://host:port or wss://host:port")
@click.option("--token", help="a monitor token")
@click.option("--no-verify-ssl", is_flag=True, help="accept a self-signed certificate")
@click.option("--once", is_flag=True, help="print one snapshot and exit")
@verbose_option
def monitor(
    config_path: str | None,
    server: str | None,
    token: str | None,
    no_verify_ssl: bool,
    once: bool,
) -> None:
    """Show the orchestrator's live figures (Ctrl-C to leave)."""
    config = monitor_config(
        config_path,
        {"server": server, "token": token, "verify_ssl": False if no_verify_ssl else None},
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch(config, once, Console()))
