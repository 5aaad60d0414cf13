"""A real certificate from Let's Encrypt, through the ``certbot`` program when installed.

certbot keeps its account, archive and logs under ``OUTPUT_DIR/letsencrypt/`` (no root-owned
``/etc/letsencrypt`` needed); ``OUTPUT_DIR/fullchain.pem`` and ``privkey.pem`` are relative
links to its ``live/`` copies, so a renewal with the same ``--config-dir`` updates them (the
orchestrator reads them at start). The standalone challenge listens on port 80 of this host,
which the domain must point at.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from caption_flow.security.certs import (
    CERT_FILE,
    KEY_FILE,
    CertificateError,
    CertPaths,
    load_certificates,
    subject_alt_name,
)

log = logging.getLogger(__name__)

STATE_DIR = "letsencrypt"
# certbot itself times out its challenges; this only stops a hung process.
CERTBOT_TIMEOUT_S = 900
INSTALL_HINT = (
    "install it (`sudo apt install certbot`, `sudo snap install --classic certbot` or "
    "`pip install certbot`) and run this again, or use --self-signed for a test certificate"
)


def certbot_command(
    exe: str, domains: Sequence[str], email: str, state: Path, staging: bool
) -> list[str]:
    """The ``certbot certonly`` call: standalone challenge, non-interactive, its state under
    ``state``, the certificate named after the first domain."""
    cmd = [
        exe,
        "certonly",
        "--standalone",
        "--non-interactive",
        "--agree-tos",
        "-m",
        email,
        "--config-dir",
        str(state / "config"),
        "--work-dir",
        str(state / "work"),
        "--logs-dir",
        str(state / "logs"),
        "--cert-name",
        domains[0],
    ]
    for domain in domains:
        cmd += ["-d", domain]
    if staging:
        cmd.append("--staging")
    return cmd


def obtain_certificate(
    domains: Sequence[str],
    email: str,
    output_dir: Path,
    staging: bool = False,
    force: bool = False,
) -> CertPaths:
    """Run certbot for ``domains`` and link its certificate and key into ``output_dir``."""
    if not domains:
        raise CertificateError("give at least one --domain")
    if "@" not in email.strip("@"):
        raise CertificateError(f"--email {email!r} is not an e-mail address")
    for domain in domains:
        subject_alt_name(domain)  # the same check as for a self-signed one
    paths = CertPaths(output_dir / CERT_FILE, output_dir / KEY_FILE)
    there = [p for p in (paths.cert, paths.key) if p.exists() or p.is_symlink()]
    if there and not force:
        raise CertificateError(
            f"{', '.join(map(str, there))} already exist(s); certbot was not run: use --force "
            "to replace them, or another --output-dir"
        )
    exe = shutil.which("certbot")
    if exe is None:
        raise CertificateError(f"certbot is not installed (not on PATH): {INSTALL_HINT}")
    state = output_dir / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    cmd = certbot_command(exe, domains, email, state, staging)
    log.info("running %s", " ".join(cmd))
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CERTBOT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise CertificateError(f"certbot did not finish within {CERTBOT_TIMEOUT_S}s") from None
    except OSError as exc:
        raise CertificateError(f"cannot run {exe}: {exc}") from None
    if done.returncode != 0:
        said = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise CertificateError(
            f"certbot failed (exit {done.returncode}): {said[-1] if said else 'no message'}; "
            f"its log is in {state / 'logs'}"
        )
    live = state / "config" / "live" / domains[0]
    for name, target in ((CERT_FILE, paths.cert), (KEY_FILE, paths.key)):
        source = live / name
        if not source.exists():
            raise CertificateError(f"certbot succeeded but wrote no {source}")
        _link(source, target)
    load_certificates(paths.cert)  # what was linked is a certificate
    log.info("certificate for %s from Let's Encrypt linked into %s", domains[0], output_dir)
    return paths


def _link(source: Path, target: Path) -> None:
    """Point ``target`` at ``source`` with a relative link, replacing what was there."""
    relative = os.path.relpath(source, target.parent)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(relative, tmp)
    os.replace(tmp, target)
