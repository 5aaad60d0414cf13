"""Token checks per role. Constant-time comparison; tokens may be stored as ``sha256:<hex>``.

The contributor is the token's name, never what a message claims.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from dataclasses import dataclass

from caption_flow.config.models import AuthConfig, OrchestratorConfig, TokenEntry
from caption_flow.errors import ConfigError
from caption_flow.protocol.connection import Identity

log = logging.getLogger(__name__)

# The example configs' tokens start with this; they are public, so they only guard loopback.
PLACEHOLDER_PREFIX = "change-me"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: OrchestratorConfig) -> None:
    """Refuse public placeholder tokens on a reachable address; warn about plain text.

    Raises ConfigError naming the token entry and what to do.
    """
    if is_loopback(config.host):
        return
    auth = config.auth
    for role, entries in (
        ("worker_tokens", auth.worker_tokens),
        ("monitor_tokens", auth.monitor_tokens),
        ("admin_tokens", auth.admin_tokens),
        ("dataworker_tokens", auth.dataworker_tokens),
    ):
        for entry in entries:
            if entry.token.startswith(PLACEHOLDER_PREFIX) or len(entry.token) < 8:
                raise ConfigError(
                    f"orchestrator.auth.{role}: the token of {entry.name!r} is an example or "
                    f"too short, and host {config.host} is reachable from other machines; set "
                    "a long random token of your own, or listen on 127.0.0.1"
                )
    if config.ssl.cert is None:
        log.warning(
            "listening on %s WITHOUT TLS: tokens and captions cross the network in plain "
            "text; set orchestrator.ssl.cert and .key (or put a TLS proxy in front)",
            config.host,
        )


def hash_token(token: str) -> str:
    """The form to put in a config file instead of the token itself."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def _matches(entry: TokenEntry, presented: str, presented_hash: str) -> bool:
    if entry.token.startswith("sha256:"):
        return hmac.compare_digest(entry.token, presented_hash)
    return hmac.compare_digest(entry.token.encode(), presented.encode())


ROLES = ("worker", "monitor", "admin", "dataworker")


@dataclass(frozen=True)
class TokenInfo:
    """One token as ``tokens list`` shows it: never the token or its hash."""

    role: str
    name: str
    source: str  # "config" or "db"
    revoked: bool


def _config_entries(auth: AuthConfig) -> dict[str, list[TokenEntry]]:
    return {
        "worker": auth.worker_tokens,
        "monitor": auth.monitor_tokens,
        "admin": auth.admin_tokens,
        "dataworker": auth.dataworker_tokens,
    }


class Authenticator:
    """Tokens of the config and of the state database, less the revoked ones.

    Called on the event loop for every hello, so everything it needs is in memory: the
    database's rows are loaded once (:meth:`load`) and mirrored by :meth:`add` and
    :meth:`revoke` after the database has them.
    """

    def __init__(self, auth: AuthConfig) -> None:
        self._by_role: dict[str, list[TokenEntry]] = _config_entries(auth)
        self._stored: dict[str, list[TokenEntry]] = {role: [] for role in ROLES}
        self._revoked: set[tuple[str, str]] = set()

    def __call__(self, role: str, token: str) -> Identity | None:
        found: Identity | None = None
        hashed = hash_token(token)  # once: every stored token is a hash
        # Check every entry so timing does not reveal which one matched.
        for entry in self._entries(role):
            if _matches(entry, token, hashed) and found is None:
                found = Identity(role=role, contributor=entry.name)
        if found is not None and (role, found.contributor) in self._revoked:
            return None
        return found

    def _entries(self, role: str) -> tuple[TokenEntry, ...]:
        """The config's tokens of ``role``, then the database's."""
        return (*self._by_role.get(role, []), *self._stored.get(role, []))

    def replace_config(self, auth: AuthConfig) -> None:
        """A reloaded config's tokens; stored tokens and revocations stay."""
        self._by_role = _config_entries(auth)

    def load(self, rows: list[tuple[str, str, str, str, float | None]]) -> None:
        """The state database's ``tokens`` rows: (role, name, hash, source, revoked)."""
        for role, name, token_hash, _source, revoked in rows:
            if revoked is not None:
                self._revoked.add((role, name))
            if token_hash and role in self._stored:
                self._stored[role].append(TokenEntry(name=name, token=token_hash))

    def add(self, role: str, name: str, token_hash: str) -> None:
        self._stored[role] = [e for e in self._stored[role] if e.name != name]
        self._stored[role].append(TokenEntry(name=name, token=token_hash))
        self._revoked.discard((role, name))

    def revoke(self, role: str, name: str) -> None:
        self._revoked.add((role, name))

    def knows(self, role: str, name: str) -> bool:
        """Whether some token of ``role`` named ``name`` is still accepted."""
        return (role, name) not in self._revoked and any(
            e.name == name for e in self._entries(role)
        )

    def roles_of(self, name: str) -> list[str]:
        """The roles with a token named ``name`` (revoked or not)."""
        return [role for role in ROLES if any(e.name == name for e in self._entries(role))]

    def listing(self) -> list[TokenInfo]:
        shown: list[TokenInfo] = []
        for role in ROLES:
            for source, entries in (("config", self._by_role[role]), ("db", self._stored[role])):
                shown += [
                    TokenInfo(role, e.name, source, (role, e.name) in self._revoked)
                    for e in entries
                ]
        return shown
