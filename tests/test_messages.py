"""What a new user reads: one clear line per failure, logs that say what they did, and help
that shows defaults. The CLI runs as a real subprocess wherever its output is the point."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import TIME_UNIT, eventually, orchestrator_config, worker_config

from caption_flow.cli.configs import found_config
from caption_flow.cli.main import cli
from caption_flow.cli.preflight import check_port_free, port_error
from caption_flow.config.models import DatasetConfig, ImageConfig
from caption_flow.engines.startup_log import StartupLog, one_line, root_cause
from caption_flow.engines.vllm_engine import start_error
from caption_flow.errors import ConfigError, ImageError
from caption_flow.images.decode import decode_image, error_reason
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.sources import check_dataset
from caption_flow.worker.client import Worker

pytestmark = pytest.mark.timeout(120)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
ENV.pop("VLLM_LOGGING_LEVEL", None)
TIMESTAMPED = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def caption_flow(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "caption_flow", *args],
        cwd=cwd,
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=60 * TIME_UNIT,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI sets up logging for the whole process; put the test run's back afterwards."""
    for name in ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("caption_flow", "caption_flow.cli", "vllm", "PIL")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


# -- a busy port --------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "orchestrator"])
def test_busy_port_is_one_error_line_and_exit_2(
    command: str, busy_port: int, tmp_path: Path, image_folder
) -> None:
    images = image_folder(1)[0].parent
    config = tmp_path / "orchestrator.yaml"
    config.write_text(f"orchestrator:\n  dataset: {{path: {images}}}\n")
    done = caption_flow(
        command,
        "--config", str(config),
        "--port", str(busy_port),
        "--data-dir", str(tmp_path / "data"),
        *(["--host", "127.0.0.1"] if command == "orchestrator" else []),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = error_lines(done.stderr)
    assert f"port {busy_port} is already in use" in line and "--port" in line
    assert not (tmp_path / "data").exists()


def test_a_real_bind_failure_becomes_the_same_line(busy_port: int) -> None:
    with pytest.raises(ConfigError, match=f"port {busy_port} is already in use"):
        check_port_free("127.0.0.1", busy_port)
    with socket.socket() as second, pytest.raises(OSError) as info:
        second.bind(("127.0.0.1", busy_port))
    converted = port_error(info.value, "127.0.0.1", busy_port)
    assert converted is not None and str(busy_port) in str(converted)
    assert port_error(FileNotFoundError(2, "no such file"), "127.0.0.1", busy_port) is None
    check_port_free("127.0.0.1", 0)  # any free port: nothing to check


# -- which config file ----------------------------------------------------------------------
def test_the_loaded_config_file_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg-dirs"))
    caplog.set_level(logging.INFO, logger="caption_flow.cli")
    assert found_config("worker", None) is None
    assert "worker config: no file found; using built-in defaults" in caplog.text
    (tmp_path / "examples").mkdir()
    example = tmp_path / "examples" / "worker.yaml"
    example.write_text("worker: {}\n")
    caplog.clear()
    assert found_config("worker", None, examples=False) is None  # run's discovery
    assert found_config("worker", None) == example
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(example) in warning.getMessage() and "--config" in warning.getMessage()
    own = tmp_path / "config" / "worker.yaml"
    own.parent.mkdir()
    own.write_text("worker: {}\n")
    caplog.clear()
    assert found_config("worker", None) == own
    assert f"worker config: {own}" in caplog.text


def test_run_says_which_config_and_skips_examples(tmp_path: Path) -> None:
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "orchestrator.yaml").write_text(
        "orchestrator:\n  dataset: {path: /from/the/example}\n"
    )
    done = caption_flow("run", "--data-dir", "data", cwd=tmp_path)
    assert done.returncode == 2
    assert "orchestrator config: no file found; using built-in defaults" in done.stderr
    assert "/from/the/example" not in done.stderr  # the example's dataset was not taken
    config = tmp_path / "mine.yaml"
    config.write_text("orchestrator:\n  dataset: {path: ./nowhere}\n")
    done = caption_flow("run", "--config", str(config), "--data-dir", "data", cwd=tmp_path)
    assert f"orchestrator config: {config}" in done.stderr
    assert error_lines(done.stderr) == [
        "error: dataset folder not found: ./nowhere (dataset.path or --dataset)"
    ]


# -- logs and flags ---------------------------------------------------------------------------
def test_logs_are_one_line_per_record_when_not_a_terminal(tmp_path: Path) -> None:
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "images"
    done = caption_flow("-v", "run", "--dataset", str(deep), "--data-dir", "d", cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert lines and all(TIMESTAMPED.match(line) or line.startswith("error:") for line in lines)
    assert any(str(deep) in line and line.startswith("error:") for line in lines)  # not wrapped


def test_verbose_is_accepted_after_the_subcommand(restore_logging: None, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = str(tmp_path / "missing")
    result = runner.invoke(cli, ["run", "--dataset", missing, "-v"])
    assert isinstance(result.exception, ConfigError)  # got past option parsing
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("vllm").level == logging.INFO
    result = runner.invoke(cli, ["-v", "run", "--dataset", missing, "-v"])
    assert logging.getLogger().level == logging.DEBUG  # counts add up
    assert logging.getLogger("PIL").level == logging.WARNING  # -vv shows no PIL internals


def test_vllm_is_quiet_and_off_stdout_without_verbose(restore_logging: None) -> None:
    CliRunner().invoke(cli, ["run", "--dataset", "/nonexistent"])
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"
    assert logging.getLogger("vllm").level == logging.WARNING


def test_help_shows_defaults_and_explains_the_engine() -> None:
    runner = CliRunner()
    run_help = runner.invoke(cli, ["run", "--help"], terminal_width=200).output
    assert "[default: auto]" in run_help and "vLLM on a CUDA GPU" in run_help
    assert "[default: (config file, else ./caption_data)]" in run_help
    demo_help = runner.invoke(cli, ["demo", "--help"], terminal_width=200).output
    assert "[default: caption-flow-demo]" in demo_help and "tiny model" in demo_help
    assert "[default: 48]" in demo_help


# -- datasets ---------------------------------------------------------------------------------
def test_a_file_or_missing_dataset_is_refused_before_state_exists(tmp_path: Path) -> None:
    picture = tmp_path / "picture.jpg"
    picture.write_bytes(b"\xff\xd8")
    done = caption_flow("run", "--dataset", str(picture), "--data-dir", "d", cwd=tmp_path)
    assert done.returncode == 2
    [line] = error_lines(done.stderr)
    assert "is a file, not a folder" in line
    done = caption_flow("run", "--dataset", "./gone", "--data-dir", "d", cwd=tmp_path)
    assert error_lines(done.stderr) == [
        "error: dataset folder not found: ./gone (dataset.path or --dataset)"
    ]
    assert "captioning" not in done.stderr  # no progress bar was drawn
    assert not (tmp_path / "d").exists()  # no state.db either


def test_dataset_checks_per_type(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(b"")
    check_dataset(DatasetConfig(type="webdataset", path=str(tmp_path / "a.tar")))
    check_dataset(DatasetConfig(type="webdataset", path=str(tmp_path / "{a,b}.tar")))
    with pytest.raises(ConfigError, match="not found"):
        check_dataset(DatasetConfig(type="webdataset", path=str(tmp_path / "x-{0..3}.tar")))
    with pytest.raises(ConfigError, match="not found"):
        check_dataset(DatasetConfig(type="huggingface", path=str(tmp_path / "t.parquet")))
    check_dataset(DatasetConfig(type="huggingface", path="some-org/some-dataset"))  # hub: later


# -- reasons and models -----------------------------------------------------------------------
def test_decode_errors_name_no_memory_address() -> None:
    with pytest.raises(ImageError) as info:
        decode_image(b"this is not an image", ImageConfig())
    assert "0x" not in str(info.value) and "UnidentifiedImageError" in str(info.value)
    reason = error_reason(ValueError(f"bad {object()} here"))
    assert reason == "ValueError: bad here" and "0x" not in reason


def test_an_offline_hub_model_fails_fast_with_one_line(tmp_path: Path, image_folder) -> None:
    images = image_folder(2)[0].parent
    started = time.monotonic()
    done = caption_flow(
        "run", "--dataset", str(images), "--model", "made-up-org/no-such-model",
        "--data-dir", "d", "--engine", "transformers",
        cwd=tmp_path,
        HF_HUB_OFFLINE="1",
    )  # fmt: skip
    assert time.monotonic() - started < 20 * TIME_UNIT
    assert done.returncode == 2
    [line] = error_lines(done.stderr)
    assert "made-up-org/no-such-model" in line and "HF_HUB_OFFLINE" in line
    assert "Traceback" not in done.stderr and not (tmp_path / "d").exists()


def test_vllm_start_failure_names_the_cause_from_its_processes() -> None:
    # What vLLM's engine processes print when the CPU backend cannot reserve its memory
    # (seen on this machine), and what the parent then raises.
    child = (
        "(VllmWorker-0 pid=15) ERROR 11-27 13:09:14 [multiproc_executor.py:953] WorkerProc "
        "failed to start.\n"
        "(VllmWorker-0 pid=15) ERROR 11-27 13:09:14 [multiproc_executor.py:953]     raise "
        "ValueError(\n"
        "(VllmWorker-0 pid=15) ERROR 11-27 13:09:14 [multiproc_executor.py:953] ValueError: "
        "Available memory on node 0 (6.01/7.96 GiB) is less than desired.\n"
        "Exception: WorkerProc initialization failed due to an exception in a background "
        "process. See stack trace for root cause.\n"
    )
    assert (
        root_cause(child)
        == "ValueError: Available memory on node 0 (6.01/7.96 GiB) is less than desired."
    )
    logging.getLogger("vllm").setLevel(logging.WARNING)
    startup = StartupLog()
    try:
        with startup:  # what a child process writes to the inherited descriptors
            subprocess.run(["sh", "-c", f"printf %s '{child}' >&2"], check=True)
        pointer = RuntimeError("Engine core initialization failed. See root cause above.")
        message = str(start_error("tiny", pointer, startup))
    finally:
        startup.close()
        logging.getLogger("vllm").setLevel(logging.NOTSET)
    assert message == (
        "starting vLLM for tiny failed: ValueError: Available memory on node 0 "
        "(6.01/7.96 GiB) is less than desired."
    )
    assert "\n" not in one_line("1 validation error\n  bad value [type=x, input=y]\n")


# -- the worker's own words -------------------------------------------------------------------
async def test_idle_then_stopped_worker_says_so_once(
    tmp_path: Path, tiny_model_dir: Path, image_folder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="caption_flow.worker.client")
    images = image_folder(2)[0].parent
    orch = Orchestrator(orchestrator_config(tmp_path / "data", images, tiny_model_dir))
    await orch.start()
    worker = Worker(worker_config(orch.port).model_copy(update={"exit_when_done": False}))
    running = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: "waiting for work" in caplog.text, 60, "the idle line")
        await asyncio.sleep(1.5 * TIME_UNIT)  # several more polls for work
        worker.stop()
        await asyncio.wait_for(running, 30 * TIME_UNIT)
    finally:
        await orch.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("waiting for work: the dataset is finished") == 1
    assert "all work is done; stopping" not in messages
    assert any(m.startswith("stopped;") for m in messages)
