"""The TLS context every client (worker, monitor, admin) uses to reach an orchestrator."""

from __future__ import annotations

import ssl


def client_ssl_context(server: str, verify: bool = True) -> ssl.SSLContext | None:
    """None for ``ws://``; for ``wss://`` the system's trust store, or no verification at
    all when ``verify`` is off (a self-signed certificate, ``--no-verify-ssl``)."""
    if not server.startswith("wss://"):
        return None
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
