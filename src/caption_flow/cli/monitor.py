"""``caption-flow monitor``: the Textual monitor, or one snapshot as plain text (``--once``).

The app lives in :mod:`caption_flow.monitor`; this module only turns flags into a
:class:`MonitorConfig` and picks the mode.
"""

from __future__ import annotations

import asyncio
import contextlib

import click

from caption_flow.cli.configs import monitor_config
from caption_flow.cli.logs import verbose_option
from caption_flow.errors import AuthError
from caption_flow.monitor import MonitorApp, as_text, fetch_snapshot
from caption_flow.monitor.model import Link


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
@click.option("--once", is_flag=True, help="print one snapshot as plain text and exit")
@verbose_option
def monitor(
    config_path: str | None,
    server: str | None,
    token: str | None,
    no_verify_ssl: bool,
    once: bool,
) -> None:
    """Watch the orchestrator live (q quits), or print one snapshot with --once."""
    config = monitor_config(
        config_path,
        {"server": server, "token": token, "verify_ssl": False if no_verify_ssl else None},
    )
    if once:
        with contextlib.suppress(KeyboardInterrupt):
            click.echo(as_text(asyncio.run(fetch_snapshot(config)), config))
        return
    app = MonitorApp(config)
    app.run()
    if app.view.link == Link.REFUSED and app.view.updates == 0:
        # Left after a refusal: say why on the terminal too, as one line.
        raise AuthError(f"orchestrator refused the monitor: {app.view.detail}")
