"""``generate-cert`` and ``inspect-cert``: flags in, :mod:`caption_flow.security` does the work.

Errors are :class:`~caption_flow.security.certs.CertificateError` (a CaptionFlowError), which
the entry point prints as one line with a non-zero exit.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import click

from caption_flow.security.certs import (
    DEFAULT_DAYS,
    KEY_TYPES,
    CertificateError,
    CertInfo,
    generate_self_signed,
    inspect_certificate,
)


@click.command("generate-cert")
@click.option(
    "--self-signed",
    is_flag=True,
    help="make a self-signed certificate here (no network); without it, certbot obtains one "
    "from Let's Encrypt",
)
@click.option(
    "--domain",
    "domains",
    multiple=True,
    required=True,
    help="a DNS name or IP address the certificate is for (repeat for several; the first is "
    "the common name)",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("certs"),
    help="folder for fullchain.pem and privkey.pem",
)
@click.option("--email", help="contact address for Let's Encrypt (required without --self-signed)")
@click.option("--days", type=int, default=DEFAULT_DAYS, help="validity of a self-signed one")
@click.option("--key-type", type=click.Choice(KEY_TYPES), default="ec", help="EC P-256 or RSA 2048")
@click.option("--staging", is_flag=True, help="certbot: Let's Encrypt's test server")
@click.option("--force", is_flag=True, help="replace existing fullchain.pem and privkey.pem")
def generate_cert(
    self_signed: bool,
    domains: tuple[str, ...],
    output_dir: Path,
    email: str | None,
    days: int,
    key_type: str,
    staging: bool,
    force: bool,
) -> None:
    """Make a TLS certificate for the orchestrator (orchestrator.ssl.cert and .key)."""
    if self_signed:
        paths = generate_self_signed(domains, output_dir, days=days, key_type=key_type, force=force)
        trust = "workers must trust it: worker.verify_ssl: false (--no-verify-ssl), for tests only"
    else:
        from caption_flow.security.certbot import obtain_certificate

        if not email:
            raise CertificateError(
                "--email is required for a Let's Encrypt certificate (or use --self-signed)"
            )
        paths = obtain_certificate(domains, email, output_dir, staging=staging, force=force)
        trust = "renew it with certbot renew --config-dir " + str(output_dir / "letsencrypt/config")
    click.echo(f"certificate: {paths.cert}")
    click.echo(f"private key: {paths.key} (mode 0600)")
    click.echo(f"orchestrator: --cert {paths.cert} --key {paths.key}; {trust}")


@click.command("inspect-cert")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def inspect_cert(file: Path) -> None:
    """Show a certificate: subject, SANs, issuer, validity, days left, SHA-256 fingerprint."""
    info = inspect_certificate(file)
    for label, value in describe(info):
        click.echo(f"{label + ':':<20} {value}")


def describe(info: CertInfo) -> list[tuple[str, str]]:
    """The lines ``inspect-cert`` prints, as (label, value)."""
    if info.days_left < 0:
        left = f"{info.days_left} (EXPIRED {-info.days_left} day(s) ago)"
    elif info.not_before > datetime.datetime.now(datetime.UTC):
        left = f"{info.days_left} (not valid yet)"
    else:
        left = str(info.days_left)
    return [
        ("subject", info.subject),
        ("SANs", ", ".join(info.sans) or "(none: clients that check names will refuse it)"),
        ("issuer", info.issuer),
        ("self-signed", "yes" if info.self_signed else "no"),
        ("not before", _utc(info.not_before)),
        ("not after", _utc(info.not_after)),
        ("days left", left),
        ("SHA-256 fingerprint", info.fingerprint_sha256),
        ("key", info.key),
        ("certificates in file", str(info.chain_length)),
    ]


def _utc(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
