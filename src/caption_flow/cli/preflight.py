"""Checks the CLI runs before anything starts: nothing is created, no bar is drawn, when a
port is taken or a dataset is missing. Each failure is one line that says what to do."""

from __future__ import annotations

import errno
import socket

from caption_flow.errors import ConfigError


def port_error(exc: OSError, host: str, port: int) -> ConfigError | None:
    """``exc`` from binding ``host:port`` as one clear line, or None if it is not a bind error."""
    where = f"{host or '*'}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            f"port {port} is already in use ({where}): another orchestrator or program is "
            "listening there; pick another with --port, or stop that process"
        )
    if exc.errno == errno.EACCES:
        return ConfigError(
            f"not allowed to listen on {where} (ports below 1024 need privileges); "
            "pick another with --port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(
            f"cannot listen on {where}: {host} is not an address of this machine; "
            "use --host 0.0.0.0 or one of its addresses"
        )
    return None


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError when ``host:port`` cannot be bound (taken, privileged, foreign).

    A quick bind and close, with the same SO_REUSEADDR the server uses, so a port left in
    TIME_WAIT by an earlier run is not reported. Port 0 (any free port) is not checked.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                clear = port_error(exc, host, port)
                if clear is not None:
                    raise clear from None
                raise
