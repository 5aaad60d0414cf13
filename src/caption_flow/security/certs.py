"""Certificates for the orchestrator's wss://: make a self-signed one, read any one back.

Files use certbot's names (``fullchain.pem``, ``privkey.pem``), so ``orchestrator.ssl`` points
at a made certificate and at one from Let's Encrypt the same way. A private key is created
with mode 0600 under a temporary name and renamed into place: it is never readable by others,
not even for an instant, and a crash never leaves half a key behind.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from caption_flow.errors import CaptionFlowError

log = logging.getLogger(__name__)

CERT_FILE = "fullchain.pem"
KEY_FILE = "privkey.pem"
KEY_TYPES = ("ec", "rsa")
DEFAULT_DAYS = 365
# Python's ssl refuses RSA keys under 2048 bits at its default security level.
RSA_BITS = 2048
# A certificate that became valid "now" is refused by a peer whose clock is a little behind.
CLOCK_SKEW = datetime.timedelta(minutes=5)
# X.509 limits a common name to 64 characters; a longer domain is still in the SANs.
CN_MAX = 64


class CertificateError(CaptionFlowError):
    """A certificate cannot be made, obtained or read; the message says which file and why."""


@dataclass(frozen=True)
class CertPaths:
    """Where a certificate and its key are: what ``orchestrator.ssl.cert`` and ``.key`` take."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertInfo:
    """What ``inspect-cert`` shows about the first (leaf) certificate of a file."""

    subject: str
    issuer: str
    sans: list[str]
    not_before: datetime.datetime
    not_after: datetime.datetime
    days_left: int  # whole days until not_after; negative once expired
    fingerprint_sha256: str  # colon-separated upper-case hex, as browsers show it
    self_signed: bool
    key: str  # "EC secp256r1", "RSA 2048"
    chain_length: int  # certificates in the file (a fullchain holds the issuers too)

    @property
    def expired(self) -> bool:
        return self.days_left < 0 or self.not_after <= datetime.datetime.now(datetime.UTC)


def subject_alt_name(name: str) -> x509.GeneralName:
    """An IP literal becomes an IPAddress entry, anything else a DNS name (IDNA-encoded)."""
    name = name.strip()
    with contextlib.suppress(ValueError):
        return x509.IPAddress(ipaddress.ip_address(name))
    label = name.removeprefix("*.")
    bad = not label or any(c.isspace() or c in "/:@\\" for c in name)
    if not bad:
        try:
            ascii_name = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            bad = True
    if bad:
        raise CertificateError(
            f"{name!r} is neither a domain name nor an IP address; give --domain e.g. "
            "example.org, localhost or 127.0.0.1"
        )
    return x509.DNSName(ascii_name)


def generate_self_signed(
    domains: Sequence[str],
    output_dir: Path,
    days: int = DEFAULT_DAYS,
    key_type: str = "ec",
    force: bool = False,
) -> CertPaths:
    """Write ``fullchain.pem`` and ``privkey.pem`` for ``domains`` (each one a SAN, the first
    also the subject's common name) into ``output_dir``. Existing files are refused unless
    ``force``."""
    if not domains:
        raise CertificateError("give at least one --domain")
    if days < 1:
        raise CertificateError(f"--days must be at least 1, not {days}")
    sans = [subject_alt_name(d) for d in domains]
    paths = CertPaths(output_dir / CERT_FILE, output_dir / KEY_FILE)
    if not force:
        _refuse_existing(paths)
    key = _new_key(key_type)
    first = str(sans[0].value)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, first)] if len(first) <= CN_MAX else []
    )
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    usage = x509.KeyUsage(
        digital_signature=True,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_private(paths.key, key_pem, force)
    write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM), force)
    log.info("wrote a self-signed certificate for %s to %s", ", ".join(domains), output_dir)
    return paths


def _new_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise CertificateError(f"key type {key_type!r} is not one of {', '.join(KEY_TYPES)}")


def _refuse_existing(paths: CertPaths) -> None:
    there = [p for p in (paths.cert, paths.key) if p.exists() or p.is_symlink()]
    if there:
        raise CertificateError(
            f"{', '.join(map(str, there))} already exist(s); nothing was written: use --force "
            "to replace them, or another --output-dir"
        )


def write_private(path: Path, data: bytes, force: bool) -> None:
    """Write a key readable by its owner only (see the module docstring)."""
    _write_atomic(path, data, 0o600, force)


def write_public(path: Path, data: bytes, force: bool) -> None:
    _write_atomic(path, data, 0o644, force)


def _write_atomic(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create a temporary file with ``mode`` (umask may only narrow it), fsync it, then put
    it in place: replacing ``path`` with ``force``, else linking it, which fails if ``path``
    appeared meanwhile."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise CertificateError(
                    f"{path} already exists; nothing was replaced (use --force to replace it)"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file (leaf first), or the one in a DER file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        hint = " (it holds a private key)" if b"PRIVATE KEY-----" in data else ""
        raise CertificateError(f"{path} is not a certificate (PEM or DER){hint}") from None


def inspect_certificate(path: Path, now: datetime.datetime | None = None) -> CertInfo:
    """Read the leaf certificate of ``path``; ``now`` (UTC) for the days left."""
    chain = load_certificates(path)
    cert = chain[0]
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [_describe_name(n) for n in san]
    except x509.ExtensionNotFound:
        sans = []
    not_after = cert.not_valid_after_utc
    return CertInfo(
        subject=cert.subject.rfc4514_string() or "(empty)",
        issuer=cert.issuer.rfc4514_string() or "(empty)",
        sans=sans,
        not_before=cert.not_valid_before_utc,
        not_after=not_after,
        days_left=(not_after - now) // datetime.timedelta(days=1),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        self_signed=_is_self_signed(cert),
        key=_describe_key(cert),
        chain_length=len(chain),
    )


def _describe_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    return f"{type(name).__name__}:{name.value}"


def _describe_key(cert: x509.Certificate) -> str:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unknown"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__.removesuffix("PublicKey")


def _is_self_signed(cert: x509.Certificate) -> bool:
    """Issued by itself: same name, and its own key verifies its signature."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
