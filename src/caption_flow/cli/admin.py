"""``caption-flow admin ...``, ``status`` and ``contributors``: one request, one answer.

Each command connects with a token (``--token``, else the ``monitor:`` section's, found like
the monitor's config), sends one message and prints the answer. ``status`` and
``contributors`` accept a monitor or an admin token; the ``admin`` commands need an admin's.
A refusal is an error (exit 2); nothing here holds logic the orchestrator does not check.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

from caption_flow.cli.configs import monitor_config
from caption_flow.cli.logs import verbose_option
from caption_flow.config.discovery import find_config_or_section, load_file, validate
from caption_flow.config.models import AdminConfig, MonitorConfig, OrchestratorFile
from caption_flow.errors import AuthError, CaptionFlowError, ConfigError
from caption_flow.monitor.feed import fetch_snapshot
from caption_flow.orchestrator.auth import hash_token
from caption_flow.orchestrator_client import request
from caption_flow.protocol.messages import (
    AddToken,
    AdminResult,
    ErrorMsg,
    ListTokens,
    Message,
    ReloadConfig,
    RevokeToken,
    SetConfig,
    Stats,
)

ROLES = ("worker", "monitor", "admin", "dataworker")


class CommandFailed(CaptionFlowError):
    """The orchestrator answered, and refused."""


def client_config(
    config_path: str | None,
    server: str | None,
    token: str | None,
    no_verify_ssl: bool,
    prefer_admin: bool = True,
) -> MonitorConfig:
    """Where to connect and with which token: the flags (or ``CAPTIONFLOW_TOKEN``), else the
    file's ``admin:`` token (first for admin commands) or its ``monitor:`` token, found like
    the monitor's config."""
    path = find_config_or_section("monitor", "orchestrator", config_path)
    data = _read_mapping(path)
    admin_cfg = validate(AdminConfig, data.get("admin") or {}, f"{path} (admin section)")
    if token is None:
        monitor_token = (data.get("monitor") or {}).get("token") or ""
        preferred = [admin_cfg.token, monitor_token] if prefer_admin else [monitor_token]
        token = next((t for t in [*preferred, admin_cfg.token] if t), None)
    server = server or admin_cfg.server
    overrides = {"server": server, "token": token, "verify_ssl": False if no_verify_ssl else None}
    if path is None or "monitor" in data:
        return monitor_config(config_path, overrides)
    return MonitorConfig(**{k: v for k, v in overrides.items() if v is not None})


def _read_mapping(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def admin_call(config: MonitorConfig, message: Message) -> AdminResult | Stats:
    answer = asyncio.run(request(config, "admin", message))
    if isinstance(answer, ErrorMsg):
        raise CommandFailed(answer.message)
    if isinstance(answer, AdminResult) and not answer.ok:
        raise CommandFailed(answer.message)
    assert isinstance(answer, AdminResult | Stats)
    return answer


def snapshot_as_monitor_or_admin(config: MonitorConfig) -> dict[str, Any]:
    """One snapshot, with a monitor token or else an admin one."""
    try:
        return asyncio.run(fetch_snapshot(config))
    except AuthError:
        return asyncio.run(fetch_snapshot(config, "admin"))


def read_orchestrator_section(path: Path) -> dict[str, Any]:
    """The file's ``orchestrator`` section as written, once it validates here too."""
    load_file(OrchestratorFile, path)  # ConfigError naming the key and the file
    data = yaml.safe_load(path.read_text()) or {}
    section = data.get("orchestrator")
    if not isinstance(section, dict):
        raise ConfigError(f"{path} has no orchestrator section to reload")
    return section


@dataclass(frozen=True)
class Connection:
    """The flags every command here shares; :meth:`config` resolves them when the command
    needs to connect (after its own arguments are checked)."""

    config_path: str | None
    server: str | None
    token: str | None
    no_verify_ssl: bool

    def config(self, prefer_admin: bool = True) -> MonitorConfig:
        return client_config(
            self.config_path, self.server, self.token, self.no_verify_ssl, prefer_admin
        )


def connection_options(fn: Callable[..., None]) -> Callable[..., None]:
    """Add --config, --server, --token, --no-verify-ssl and -v; the command receives them
    as one ``connection``."""

    @functools.wraps(fn)
    def command(
        *args: Any,
        config_path: str | None,
        server: str | None,
        token: str | None,
        no_verify_ssl: bool,
        **kwargs: Any,
    ) -> None:
        fn(*args, connection=Connection(config_path, server, token, no_verify_ssl), **kwargs)

    for option in reversed(
        (
            click.option(
                "--config",
                "config_path",
                type=click.Path(dir_okay=False),
                help="monitor.yaml, or an orchestrator.yaml with a monitor section",
            ),
            click.option("--server", help="orchestrator URL, ws://host:port or wss://host:port"),
            click.option(
                "--token",
                envvar="CAPTIONFLOW_TOKEN",
                help="an admin token (status, contributors: or a monitor's); default: "
                "$CAPTIONFLOW_TOKEN, else the config's admin or monitor token",
            ),
            click.option("--no-verify-ssl", is_flag=True, help="accept a self-signed certificate"),
            verbose_option,
        )
    ):
        command = option(command)
    return command


def _echo_result(result: AdminResult | Stats) -> None:
    if isinstance(result, AdminResult):
        click.echo(result.message or "ok")


@click.group()
def admin() -> None:
    """Change a running orchestrator: config, tokens, prompts, sampling."""


@admin.command("reload-config")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@connection_options
def reload_config(file: Path, connection: Connection) -> None:
    """Apply FILE's orchestrator section: what can change live changes, the rest is listed
    as needing a restart. An invalid file changes nothing."""
    section = read_orchestrator_section(file)
    config = connection.config()
    result = admin_call(config, ReloadConfig(config=section))
    assert isinstance(result, AdminResult)
    click.echo(f"changed: {', '.join(result.changed) or 'nothing'}")
    if result.restart_needed:
        click.echo(f"needs a restart: {', '.join(result.restart_needed)}")


@admin.group()
def tokens() -> None:
    """Tokens stored in the state database (beside the config's)."""


@tokens.command("add")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--name", required=True, help="the contributor name the token stands for")
@connection_options
def tokens_add(role: str, name: str, connection: Connection) -> None:
    """Make a new random token; print it once (only its hash is stored)."""
    config = connection.config()
    new = secrets.token_urlsafe(32)
    admin_call(config, AddToken(role=role, name=name, token_hash=hash_token(new)))  # type: ignore[arg-type]
    click.echo(new)


@tokens.command("revoke")
@click.option("--name", required=True)
@click.option("--role", type=click.Choice(ROLES), help="only this role's token (default: all)")
@connection_options
def tokens_revoke(name: str, role: str | None, connection: Connection) -> None:
    """Refuse NAME's token from now on and close its connections."""
    config = connection.config()
    _echo_result(admin_call(config, RevokeToken(name=name, role=role)))  # type: ignore[arg-type]


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@connection_options
def tokens_list(as_json: bool, connection: Connection) -> None:
    """Names, roles, where each token lives and whether it is revoked (never the tokens)."""
    result = admin_call(connection.config(), ListTokens())
    assert isinstance(result, AdminResult)
    rows = result.data.get("tokens", [])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("role", "name", "source", "revoked")
    for r in rows:
        table.add_row(r["role"], r["name"], r["source"], "yes" if r["revoked"] else "")
    Console().print(table)


@admin.command("set-prompt")
@click.argument("prompts", nargs=-1, required=True)
@connection_options
def set_prompt(prompts: tuple[str, ...], connection: Connection) -> None:
    """Replace the job's prompts (one argument per prompt); workers switch at their next batch."""
    config = connection.config()
    admin_call(config, SetConfig(config={"inference_prompts": list(prompts)}))
    click.echo(f"prompts set: {len(prompts)}")


@admin.command("set-sampling")
@click.option("--temperature", type=float)
@click.option("--top-p", type=float)
@click.option("--max-tokens", type=int)
@connection_options
def set_sampling(
    temperature: float | None, top_p: float | None, max_tokens: int | None, connection: Connection
) -> None:
    """Change sampling; workers apply it at their next batch, without reloading the model."""
    sampling = {
        k: v
        for k, v in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens))
        if v is not None
    }
    if not sampling:
        raise click.UsageError("give at least one of --temperature, --top-p, --max-tokens")
    config = connection.config()
    admin_call(config, SetConfig(config={"sampling": sampling}))
    click.echo("sampling set: " + ", ".join(f"{k}={v}" for k, v in sampling.items()))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print the whole snapshot as JSON")
@connection_options
def status(as_json: bool, connection: Connection) -> None:
    """One summary of the run, for scripts and cron (monitor or admin token)."""
    snap = snapshot_as_monitor_or_admin(connection.config(prefer_admin=False))
    if as_json:
        click.echo(json.dumps(snap, indent=2))
        return
    chunks = snap.get("chunks") or {}
    click.echo(
        f"items {snap.get('items_done', 0)}/{snap.get('items_total', 0)} done, "
        f"{snap.get('items_failed', 0)} failed, {snap.get('rate', 0.0)}/s; "
        f"chunks {', '.join(f'{k} {v}' for k, v in sorted(chunks.items()))}; "
        f"{snap.get('workers', 0)} workers"
    )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@connection_options
def contributors(as_json: bool, connection: Connection) -> None:
    """The contributors leaderboard (monitor or admin token)."""
    rows = snapshot_as_monitor_or_admin(connection.config(prefer_admin=False)).get(
        "contributors", []
    )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("contributor", "items", "captions", "failed", "share", "trust")
    for r in rows:
        table.add_row(
            r["contributor"],
            str(r["items"]),
            str(r["captions"]),
            str(r["failed"]),
            f"{100 * r['share']:.1f}%",
            str(r["trust_level"]),
        )
    Console().print(table)
