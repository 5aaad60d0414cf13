"""Token checks per role. Constant-time comparison; tokens may be stored as ``sha256:<hex>``.

The contributor is the token's name, never what a message claims.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging

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


def _matches(entry: TokenEntry, presented: str) -> bool:
    if entry.token.startswith("sha256:"):
        return hmac.compare_digest(entry.token, hash_token(presented))
    return hmac.compare_digest(entry.token.encode(), presented.encode())


class Authenticator:
    def __init__(self, auth: AuthConfig) -> None:
        self._by_role: dict[str, list[TokenEntry]] = {
            "worker": auth.worker_tokens,
            "monitor": auth.monitor_tokens,
            "admin": auth.admin_tokens,
            "dataworker": auth.dataworker_tokens,
        }

    def __call__(self, role: str, token: str) -> Identity | None:
        found: Identity | None = None
        # Check every entry so timing does not reveal which one matched.
        for entry in self._by_role.get(role, []):
            if _matches(entry, token) and found is None:
                found = Identity(role=role, contributor=entry.name)
        return found
