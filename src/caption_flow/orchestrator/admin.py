"""Admin messages: live job changes, config reloads, tokens, and one-shot snapshots.

What a reload may change while the orchestrator runs is decided by :func:`plan_reload`, a
plain function of the old and new config; everything else is reported as needing a restart
and left as it is, so an answer never claims more than was applied.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from caption_flow.config.discovery import validate
from caption_flow.config.models import OrchestratorConfig
from caption_flow.errors import CaptionFlowError, ConfigError
from caption_flow.orchestrator.auth import check_exposure
from caption_flow.orchestrator.results import JobRules
from caption_flow.orchestrator.sessions import Session
from caption_flow.protocol.connection import CLOSE_BAD_TOKEN
from caption_flow.protocol.messages import (
    AddToken,
    AdminResult,
    ErrorMsg,
    GetStats,
    ListTokens,
    Message,
    ReloadConfig,
    RevokeToken,
    SetConfig,
    Stats,
)

if TYPE_CHECKING:
    from caption_flow.orchestrator.server import Orchestrator

log = logging.getLogger(__name__)

# Top-level keys applied at once: read where they are used, or pushed to workers. Not
# ``chunk_size``: chunks are only cut when the dataset is listed, at start-up.
LIVE_KEYS = frozenset({"vllm", "chunks_per_request", "heartbeat_seconds", "status_interval"})
# Read when a connection starts: they apply to connections made from now on.
LIVE_LIMITS = frozenset(
    {"messages_per_second", "message_burst", "max_outstanding_results", "max_pending_handshakes"}
)
CODE_INVALID = 4422


def plan_reload(old: OrchestratorConfig, new: OrchestratorConfig) -> tuple[list[str], list[str]]:
    """(keys changed live, keys that differ but need a restart), as dotted names."""
    live: list[str] = []
    restart: list[str] = []
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    for key in sorted(after):
        if before.get(key) == after[key]:
            continue
        if key in ("vllm", "auth", "limits"):
            for sub in sorted(after[key]):
                if before[key].get(sub) == after[key][sub]:
                    continue
                name = f"{key}.{sub}"
                (live if key != "limits" or sub in LIVE_LIMITS else restart).append(name)
        else:
            (live if key in LIVE_KEYS else restart).append(key)
    return live, restart


class AdminDesk:
    """Handles what admins (and, for snapshots, monitors) send."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._o = orchestrator

    async def dispatch(self, session: Session, message: Message) -> bool:
        """Handle ``message`` if it is an admin's; False when it is not."""
        if isinstance(message, SetConfig):
            await self._set_config(session, message)
        elif isinstance(message, GetStats):
            await session.send(Stats(snapshot=self._o.snapshot()))
        elif isinstance(message, ReloadConfig):
            await session.send(await self.reload(message.config))
        elif isinstance(message, AddToken):
            await session.send(await self.add_token(message))
        elif isinstance(message, RevokeToken):
            result = await self.revoke(message)
            await session.send(result)
            await self.close_revoked()
        elif isinstance(message, ListTokens):
            await session.send(self.list_tokens())
        else:
            return False
        return True

    async def _set_config(self, session: Session, message: SetConfig) -> None:
        try:
            await self._o.update_job(message.config)
        except ConfigError as exc:
            await session.send(ErrorMsg(code=CODE_INVALID, message=str(exc)))
            return
        await session.send(Stats(snapshot=self._o.snapshot()))

    async def reload(self, section: dict[str, Any]) -> AdminResult:
        """Validate a whole ``orchestrator`` section and apply what can change live. Nothing
        changes when it is invalid. A section without ``auth`` keeps the running tokens."""
        o = self._o
        old = o.config
        try:
            new = validate(OrchestratorConfig, dict(section), "reload-config")
            if "auth" not in section:
                new = new.model_copy(update={"auth": old.auth})
            check_exposure(old.model_copy(update={"auth": new.auth}))
            JobRules.of(new.vllm)
        except CaptionFlowError as exc:
            log.warning("config reload refused: %s", exc)
            return AdminResult(ok=False, message=f"nothing changed: {exc}")
        live, restart = plan_reload(old, new)
        if any(k.startswith("vllm.") or k == "heartbeat_seconds" for k in live):
            previous = old.heartbeat_seconds
            old.heartbeat_seconds = new.heartbeat_seconds  # part of what workers are sent
            try:
                await o.update_job(new.vllm.model_dump(mode="python"))
            except ConfigError as exc:
                old.heartbeat_seconds = previous
                return AdminResult(ok=False, message=f"nothing changed: {exc}")
        for key in LIVE_KEYS - {"vllm"}:
            setattr(old, key, getattr(new, key))
        for key in LIVE_LIMITS:
            setattr(old.limits, key, getattr(new.limits, key))
        if any(k.startswith("auth.") for k in live):
            old.auth = new.auth
            o.authenticate.replace_config(new.auth)
            await self.close_revoked()
        text = f"changed: {', '.join(live) or 'nothing'}"
        if restart:
            text += f"; needs a restart: {', '.join(restart)}"
        log.info("config reloaded: %s", text)
        o.note("config", "config reloaded: " + text)
        return AdminResult(ok=True, message=text, changed=live, restart_needed=restart)

    async def add_token(self, message: AddToken) -> AdminResult:
        o = self._o
        try:
            await o.store.run_db(
                o.store.db.add_token, message.role, message.name, message.token_hash
            )
        except CaptionFlowError as exc:
            return AdminResult(ok=False, message=str(exc))
        o.authenticate.add(message.role, message.name, message.token_hash)
        log.info("%s token %r added", message.role, message.name)
        o.note("config", f"{message.role} token {message.name} added")
        return AdminResult(ok=True, message=f"{message.role} token {message.name!r} added")

    async def revoke(self, message: RevokeToken) -> AdminResult:
        """Refuse the name's token from now on; its sessions are closed by the caller."""
        o = self._o
        roles = [r for r in o.authenticate.roles_of(message.name) if message.role in (None, r)]
        if not roles:
            role = f"{message.role} " if message.role else ""
            return AdminResult(ok=False, message=f"no {role}token named {message.name!r}")
        for role in roles:
            await o.store.run_db(o.store.db.revoke_token, role, message.name)
            o.authenticate.revoke(role, message.name)
        log.warning("token %r revoked (%s)", message.name, ", ".join(roles))
        o.note("revoked", f"token {message.name} revoked ({', '.join(roles)})")
        return AdminResult(
            ok=True,
            message=f"{message.name!r} revoked",
            changed=[f"{r}:{message.name}" for r in roles],
        )

    async def close_revoked(self) -> int:
        """Close every session whose token is no longer accepted. Returns how many."""
        o = self._o
        gone = [
            s
            for s in o.sessions.values()
            if not o.authenticate.knows(s.identity.role, s.identity.contributor)
        ]
        await asyncio.gather(
            *(s.websocket.close(CLOSE_BAD_TOKEN, "token revoked") for s in gone),
            return_exceptions=True,
        )
        return len(gone)

    def list_tokens(self) -> AdminResult:
        rows = [
            {"role": t.role, "name": t.name, "source": t.source, "revoked": t.revoked}
            for t in self._o.authenticate.listing()
        ]
        return AdminResult(ok=True, data={"tokens": rows})
