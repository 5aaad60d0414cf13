"""generate-cert and inspect-cert as a user runs them, then a whole run over wss:// with the
certificate they made: a worker that skips verification captions everything, one that
verifies is refused at the handshake with a clear error."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from support import TIME_UNIT, orchestrator_config, read_rows, running, worker_config

from caption_flow.cli.certs import describe
from caption_flow.cli.main import cli
from caption_flow.config.models import DataWorkerConfig, TLSConfig, WorkerConfig
from caption_flow.dataworker.client import DataWorker
from caption_flow.errors import ProtocolError
from caption_flow.security.certs import CertificateError, generate_self_signed, inspect_certificate
from caption_flow.worker.client import Worker

pytestmark = pytest.mark.timeout(120)


SELF_SIGNED = ["generate-cert", "--self-signed", "--domain"]
MORE = ["--domain", "captions.example.org"]
LETSENCRYPT = ["generate-cert", "--domain", "captions.example.org", "--email", "ops@example.org"]


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``caption-flow`` entry point in a child process (exit codes, one-line errors)."""
    return subprocess.run(
        [sys.executable, "-m", "caption_flow", *args],
        capture_output=True,
        text=True,
        timeout=60 * TIME_UNIT,
        env=env,
        check=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_generate_writes_certbot_names_a_0600_key_and_every_san(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    old = os.umask(0)  # the key's mode must come from its creation, not from the umask
    try:
        result = CliRunner().invoke(
            cli,
            [*SELF_SIGNED, "localhost", "--domain", "127.0.0.1", "--output-dir", str(out), *MORE],
        )
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    cert_path, key_path = out / "fullchain.pem", out / "privkey.pem"
    assert mode(key_path) == 0o600
    assert mode(cert_path) == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["fullchain.pem", "privkey.pem"]  # no tmp
    cert = load(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "captions.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    # localhost is not added unless asked
    only = generate_self_signed(["captions.example.org"], tmp_path / "one")
    only_san = load(only.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert only_san.value.get_values_for_type(x509.DNSName) == ["captions.example.org"]
    assert only_san.value.get_values_for_type(x509.IPAddress) == []
    # the key is the certificate's
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    days = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=364) < days <= datetime.timedelta(days=365)
    rsa = generate_self_signed(["localhost"], tmp_path / "rsa", key_type="rsa", days=10)
    assert inspect_certificate(rsa.cert).key == "RSA 2048"
    assert mode(rsa.key) == 0o600


def test_existing_files_are_kept_unless_force(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    first = generate_self_signed(["localhost"], out)
    before = (first.cert.read_bytes(), first.key.read_bytes())
    args = ["generate-cert", "--self-signed", "--domain", "localhost", "--output-dir", str(out)]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code != 0
    assert isinstance(refused.exception, CertificateError)
    assert "--force" in str(refused.exception)
    assert (first.cert.read_bytes(), first.key.read_bytes()) == before
    replaced = CliRunner().invoke(cli, [*args, "--force"])
    assert replaced.exit_code == 0, replaced.output
    assert first.cert.read_bytes() != before[0] and first.key.read_bytes() != before[1]
    assert mode(first.key) == 0o600
    with pytest.raises(CertificateError, match="neither a domain name nor an IP"):
        generate_self_signed(["bad name/with slash"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_inspect_shows_every_field(tmp_path: Path) -> None:
    made = generate_self_signed(["localhost", "127.0.0.1"], tmp_path, days=30)
    result = CliRunner().invoke(cli, ["inspect-cert", str(made.cert)])
    assert result.exit_code == 0, result.output
    fields = {
        label.strip(): value.strip()
        for label, _, value in (line.partition(":") for line in result.output.splitlines())
    }
    assert fields["subject"] == "CN=localhost"
    assert fields["issuer"] == "CN=localhost"
    assert fields["SANs"] == "DNS:localhost, IP:127.0.0.1"
    assert fields["self-signed"] == "yes"
    assert fields["days left"] == "29"  # 30 days less the seconds since it was made
    assert fields["not before"].endswith("UTC") and fields["not after"].endswith("UTC")
    fingerprint = load(made.cert).fingerprint(hashes.SHA256()).hex(":").upper()
    assert f"SHA-256 fingerprint: {fingerprint}" in result.output
    # The original tool's spelling is the same command.
    assert CliRunner().invoke(cli, ["inspect_cert", str(made.cert)]).output == result.output
    # Expiry, seen from 40 days on: negative days left, said in words.
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=40)
    info = inspect_certificate(made.cert, now=later)
    assert info.days_left == -11
    assert dict(describe(info))["days left"] == "-11 (EXPIRED 11 day(s) ago)"


def test_inspect_refuses_what_is_not_a_certificate_in_one_line(tmp_path: Path) -> None:
    made = generate_self_signed(["localhost"], tmp_path)
    done = run_cli(["inspect-cert", str(made.key)])  # the real entry point: exit code, stderr
    assert done.returncode != 0 and not done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "is not a certificate (PEM or DER) (it holds a private key)" in lines[0]
    (tmp_path / "notes.txt").write_text("hello\n")
    for path, why in (
        (tmp_path / "notes.txt", "notes.txt is not a certificate"),
        (tmp_path / "missing.pem", "cannot read"),
    ):
        result = CliRunner().invoke(cli, ["inspect-cert", str(path)])
        assert result.exit_code != 0
        assert isinstance(result.exception, CertificateError) and why in str(result.exception)
        assert "\n" not in str(result.exception)


def test_letsencrypt_without_certbot_says_how_to_install_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}  # no certbot anywhere on PATH
    done = run_cli(
        [*LETSENCRYPT, "--output-dir", str(tmp_path / "certs")],
        env=env,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "certbot is not installed" in lines[0] and "install" in lines[0]
    assert not (tmp_path / "certs" / "fullchain.pem").exists()


def test_letsencrypt_through_certbot_links_its_files(tmp_path: Path, monkeypatch) -> None:
    """certbot needs a public domain, port 80 and the network, none of which a test has, so
    a stand-in program named certbot plays its part: it records its arguments and writes
    live/NAME/ as certbot does (a certificate made here stands in for Let's Encrypt's)."""
    issued = generate_self_signed(["captions.example.org"], tmp_path / "issued")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "certbot"
    fake.write_text(
        textwrap.dedent(f"""\
            #!{sys.executable}
            import pathlib, shutil, sys
            args = sys.argv[1:]
            pathlib.Path({str(tmp_path / "argv.txt")!r}).write_text("\\n".join(args))
            if "fail.example.org" in args:
                print("Some challenges have failed.", file=sys.stderr)
                sys.exit(1)
            live = pathlib.Path(args[args.index("--config-dir") + 1]) / "live"
            live = live / args[args.index("--cert-name") + 1]
            live.mkdir(parents=True)
            shutil.copy({str(issued.cert)!r}, live / "fullchain.pem")
            shutil.copy({str(issued.key)!r}, live / "privkey.pem")
            """)
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    out = tmp_path / "certs"
    result = CliRunner().invoke(
        cli,
        [*LETSENCRYPT, "--output-dir", str(out)],
    )
    assert result.exit_code == 0, result.output
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    assert argv[:2] == ["certonly", "--standalone"]
    for flag, value in (
        ("-d", "captions.example.org"),
        ("-m", "ops@example.org"),
        ("--config-dir", str(out / "letsencrypt" / "config")),
        ("--work-dir", str(out / "letsencrypt" / "work")),
        ("--logs-dir", str(out / "letsencrypt" / "logs")),
    ):
        assert argv[argv.index(flag) + 1] == value
    assert "--agree-tos" in argv and "--non-interactive" in argv
    assert (out / "fullchain.pem").is_symlink()  # a renewal updates what the links point at
    assert (out / "fullchain.pem").read_bytes() == issued.cert.read_bytes()
    assert (out / "privkey.pem").read_bytes() == issued.key.read_bytes()
    failed = CliRunner().invoke(
        cli,
        [*LETSENCRYPT[:2], "fail.example.org", *LETSENCRYPT[3:], "--output-dir", str(tmp_path)],
    )
    assert isinstance(failed.exception, CertificateError)
    assert "certbot failed (exit 1): Some challenges have failed." in str(failed.exception)


def wss_worker(port: int, verify: bool) -> Worker:
    config = worker_config(port, "alice", verify_ssl=verify).model_dump()
    return Worker(WorkerConfig.model_validate({**config, "server": f"wss://127.0.0.1:{port}"}))


async def test_full_run_over_wss_with_a_generated_certificate(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(6)
    out = tmp_path / "certs"
    made = CliRunner().invoke(
        cli,
        ["generate-cert", "--self-signed", "--domain", "127.0.0.1", "--output-dir", str(out)],
    )
    assert made.exit_code == 0, made.output
    config = orchestrator_config(tmp_path / "data", images[0].parent, tiny_model_dir)
    tls = TLSConfig(cert=out / "fullchain.pem", key=out / "privkey.pem")
    async with running(config.model_copy(update={"ssl": tls})) as orch:
        # Verifying: the self-signed certificate is refused at the handshake, at once.
        strict = wss_worker(orch.port, verify=True)
        with pytest.raises(ProtocolError, match=r"certificate .* is not trusted") as refused:
            await asyncio.wait_for(strict.run(), timeout=30 * TIME_UNIT)
        assert "self-signed" in str(refused.value) and "--no-verify-ssl" in str(refused.value)
        assert orch.snapshot()["items_done"] == 0
        # A dataworker likewise stops at once, naming its own setting.
        feeder = DataWorker(
            DataWorkerConfig(server=f"wss://127.0.0.1:{orch.port}", token="dataworker-token-x")
        )
        with pytest.raises(ProtocolError, match=r"certificate .* is not trusted") as refused:
            await asyncio.wait_for(feeder.run(), timeout=30 * TIME_UNIT)
        assert "dataworker.verify_ssl: false" in str(refused.value)
        # Not verifying (--no-verify-ssl): the whole folder over wss://.
        await asyncio.wait_for(wss_worker(orch.port, verify=False).run(), 120 * TIME_UNIT)
    rows = read_rows(tmp_path / "data")
    assert sorted(r["item_key"] for r in rows) == sorted(p.name for p in images)
    assert all(r["error"] is None and r["contributor_id"] == "alice" for r in rows)
