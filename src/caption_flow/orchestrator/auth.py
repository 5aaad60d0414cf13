"""Token checks per role. Constant-time comparison; tokens may be stored as ``sha256:<hex>``.

The contributor is the token's name, never what a message claims.
"""

from __future__ import annotations

import hashlib
import hmac

from caption_flow.config.models import AuthConfig, TokenEntry
from caption_flow.protocol.connection import Identity


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
