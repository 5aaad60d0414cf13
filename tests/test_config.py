"""Configuration: discovery order, validation errors that name the key, flag overrides."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from support import original_monitor_yaml, original_orchestrator_yaml, original_worker_yaml

from caption_flow.cli.configs import (
    dataworker_config,
    monitor_config,
    orchestrator_config,
    tls_overrides,
    worker_config,
)
from caption_flow.config.discovery import candidate_paths, find_config
from caption_flow.config.legacy import ORCHESTRATOR_DROPPED, STORAGE_DROPPED
from caption_flow.config.models import MonitorConfig
from caption_flow.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CONFIG_DIRS", f"{tmp_path / 'xdg1'}:{tmp_path / 'xdg2'}")
    monkeypatch.chdir(work)
    return tmp_path


def test_discovery_order(isolated: Path) -> None:
    paths = candidate_paths("worker")
    work, home = isolated / "work", isolated / "home"
    assert paths[:4] == [
        work / "worker.yaml",
        work / "config" / "worker.yaml",
        home / ".caption-flow" / "worker.yaml",
        isolated / "xdg" / "caption-flow" / "worker.yaml",
    ]
    assert paths[4] == Path("/etc/caption-flow/worker.yaml")
    assert paths[5:7] == [
        isolated / "xdg1" / "caption-flow" / "worker.yaml",
        isolated / "xdg2" / "caption-flow" / "worker.yaml",
    ]
    assert paths[-1] == work / "examples" / "worker.yaml"


def test_first_match_wins(isolated: Path) -> None:
    low = isolated / "xdg2" / "caption-flow" / "worker.yaml"
    low.parent.mkdir(parents=True)
    low.write_text("worker: {name: from-xdg-dirs}\n")
    assert worker_config(None, {}).name == "from-xdg-dirs"
    high = isolated / "home" / ".caption-flow" / "worker.yaml"
    high.parent.mkdir(parents=True)
    high.write_text("worker: {name: from-home}\n")
    assert worker_config(None, {}).name == "from-home"
    (isolated / "work" / "worker.yaml").write_text("worker: {name: from-cwd}\n")
    assert worker_config(None, {}).name == "from-cwd"
    assert find_config("worker") == isolated / "work" / "worker.yaml"


def test_flags_override_the_file(isolated: Path) -> None:
    (isolated / "work" / "orchestrator.yaml").write_text(
        "orchestrator:\n  port: 9000\n  vllm: {model: a/b, batch_size: 4}\n"
    )
    config = orchestrator_config(None, {"port": 9100, "vllm.batch_size": None, "host": "::1"})
    assert (config.port, config.host, config.vllm.model, config.vllm.batch_size) == (
        9100,
        "::1",
        "a/b",
        4,
    )


def test_invalid_key_is_named_with_the_file(isolated: Path) -> None:
    path = isolated / "work" / "orchestrator.yaml"
    path.write_text("orchestrator:\n  vllm:\n    sampling:\n      temprature: 0.5\n")
    with pytest.raises(ConfigError) as info:
        orchestrator_config(None, {})
    message = str(info.value)
    assert "orchestrator.vllm.sampling.temprature" in message and str(path) in message


def test_invalid_value_is_named(isolated: Path) -> None:
    (isolated / "work" / "orchestrator.yaml").write_text(
        "orchestrator: {chunk_size: 0, vllm: {inference_prompts: []}}\n"
    )
    with pytest.raises(ConfigError) as info:
        orchestrator_config(None, {})
    assert "orchestrator.chunk_size" in str(info.value)
    assert "orchestrator.vllm.inference_prompts" in str(info.value)


def test_missing_explicit_file_is_an_error(isolated: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        worker_config(str(isolated / "nope.yaml"), {})


def test_shipped_examples_are_valid(isolated: Path) -> None:
    orch = orchestrator_config(str(EXAMPLES / "orchestrator.yaml"), {})
    work = worker_config(str(EXAMPLES / "worker.yaml"), {})
    watch = monitor_config(str(EXAMPLES / "monitor.yaml"), {})
    feeder = dataworker_config(str(EXAMPLES / "dataworker.yaml"), {})
    assert feeder.token == "change-me-dataworker" and feeder.threads == 0
    assert orch.auth.dataworker_tokens and orch.prepare.buffer_memory_mb == 256
    assert orch.vllm.inference_prompts and work.server.startswith("ws")
    # Every key the original documents is spelled out in the shipped monitor.yaml.
    text = (EXAMPLES / "monitor.yaml").read_text()
    assert all(f"  {key}:" in text for key in MonitorConfig.model_fields)
    assert watch.token and watch.refresh_rate > 0


def test_examples_fallback_can_be_left_out(isolated: Path) -> None:
    example = isolated / "work" / "examples" / "worker.yaml"
    example.parent.mkdir()
    example.write_text("worker: {name: from-examples}\n")
    assert find_config("worker") == example
    assert find_config("worker", examples=False) is None  # what `run` uses
    assert all("examples" not in p.parts for p in candidate_paths("worker", examples=False))


# -- the original caption-flow's keys (issue 9) -------------------------------------------


def legacy_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "caption_flow.config.legacy"]


def test_original_orchestrator_yaml_loads_with_one_line_per_unused_key(
    isolated: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = isolated / "work" / "orchestrator.yaml"
    path.write_text(original_orchestrator_yaml(8765, Path("/data/images"), Path("/models/m")))
    with caplog.at_level(logging.INFO, logger="caption_flow.config.legacy"):
        config = orchestrator_config(None, {"port": 9000})  # flags re-validate the dump
    assert config.dataset.type == "local_folder" and config.dataset.version == "1.0"
    assert config.dataset.label == "quickstart@1.0"  # the output's dataset column
    assert (config.port, config.chunk_size, config.chunks_per_request) == (9000, 1000, 2)
    assert config.vllm.sampling.stop == ["<|end|>", "<|endoftext|>", "<|im_end|>"]
    assert [t.name for t in config.auth.dataworker_tokens] == ["data feeder 1"]
    lines = legacy_lines(caplog)
    for key in [*STORAGE_DROPPED, *ORCHESTRATOR_DROPPED]:
        mine = [line for line in lines if f".{key} (original caption-flow) has no effect" in line]
        assert len(mine) == 1, (key, lines)
    caption_buffer = next(line for line in lines if "caption_buffer_size" in line)
    assert "storage.compact_rows" in caption_buffer
    assert sum("local_folder" in line for line in lines) == 1


def test_original_worker_yaml_loads(isolated: Path, caplog: pytest.LogCaptureFixture) -> None:
    (isolated / "work" / "worker.yaml").write_text(original_worker_yaml(8765))
    with caplog.at_level(logging.INFO, logger="caption_flow.config.legacy"):
        config = worker_config(None, {"batch_size": 4})
    assert (config.engine, config.prefetch_items, config.ready_items) == ("vllm", 256, 128)
    assert (config.name, config.gpu_id, config.batch_size) == ("local-gpu", 0, 4)
    assert len(legacy_lines(caplog)) == 3  # vllm, readahead_size, inference_queue_size
    (isolated / "work" / "worker.yaml").write_text("worker: {vllm: false}\n")
    assert worker_config(None, {}).engine == "transformers"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("worker: {vllm: true, engine: transformers}\n", "contradicts worker.engine"),
        ("worker: {vllm: maybe}\n", "worker.vllm must be true or false"),
        ("worker: {readahead_size: 8, prefetch_items: 9}\n", "keep prefetch_items"),
        ("worker: {readahead_sise: 8}\n", "worker.readahead_sise"),
        ("worker: {inference_queue_size: 0}\n", "worker.ready_items"),
    ],
)
def test_original_worker_keys_still_refuse_nonsense(isolated: Path, text: str, named: str) -> None:
    path = isolated / "work" / "worker.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        worker_config(None, {})
    assert named in str(info.value) and str(path) in str(info.value)


def test_unknown_keys_beside_the_original_ones_stay_errors(isolated: Path) -> None:
    (isolated / "work" / "orchestrator.yaml").write_text(
        "orchestrator:\n  min_chunk_buffer: 10\n  storage: {checkpoint_dirr: ./c}\n"
        "  dataset: {type: localfolder}\n"
    )
    with pytest.raises(ConfigError) as info:
        orchestrator_config(None, {})
    assert "orchestrator.storage.checkpoint_dirr" in str(info.value)
    assert "orchestrator.dataset.type" in str(info.value)


def test_monitor_config_is_found_like_the_others(isolated: Path) -> None:
    work = isolated / "work"
    assert monitor_config(None, {}) == MonitorConfig()  # nothing found: defaults
    (work / "config").mkdir()
    (work / "config" / "monitor.yaml").write_text(original_monitor_yaml(1111))
    assert monitor_config(None, {}).server == "ws://127.0.0.1:1111"
    # A monitor section in an orchestrator.yaml found earlier in the order wins.
    (work / "orchestrator.yaml").write_text(
        "orchestrator: {port: 2222}\nmonitor: {server: 'ws://h:2222', token: t2}\n"
    )
    assert monitor_config(None, {}).server == "ws://h:2222"
    # At one place, monitor.yaml comes before orchestrator.yaml's section.
    (work / "monitor.yaml").write_text("monitor: {server: 'ws://h:3333', refresh_rate: 2}\n")
    found = monitor_config(None, {"token": "from-flag"})
    assert (found.server, found.refresh_rate, found.token) == ("ws://h:3333", 2.0, "from-flag")
    # --config may name an orchestrator.yaml; the orchestrator's own keys are not its business.
    assert monitor_config(str(work / "orchestrator.yaml"), {}).token == "t2"
    (work / "other.yaml").write_text("orchestrator: {port: 1}\n")
    with pytest.raises(ConfigError, match="no monitor section"):
        monitor_config(str(work / "other.yaml"), {})
    (work / "monitor.yaml").write_text("monitor: {refresh_rat: 2}\n")
    with pytest.raises(ConfigError, match=r"monitor\.refresh_rat"):
        monitor_config(None, {})


def test_orchestrator_without_monitor_section_is_skipped(isolated: Path) -> None:
    work = isolated / "work"
    (work / "orchestrator.yaml").write_text("orchestrator: {port: 1}\n")
    (work / "config").mkdir()
    (work / "config" / "orchestrator.yaml").write_text("monitor: {token: deeper}\n")
    assert monitor_config(None, {}).token == "deeper"


def test_no_ssl_and_cert_flags(isolated: Path) -> None:
    (isolated / "work" / "orchestrator.yaml").write_text(
        "orchestrator:\n  ssl: {cert: /etc/x/fullchain.pem, key: /etc/x/privkey.pem}\n"
    )
    plain = orchestrator_config(None, tls_overrides(None, None, no_ssl=True))
    assert plain.ssl.cert is None and plain.ssl.key is None
    given = orchestrator_config(None, tls_overrides("c.pem", "k.pem", no_ssl=False))
    assert (str(given.ssl.cert), str(given.ssl.key)) == ("c.pem", "k.pem")
    with pytest.raises(ConfigError, match="--no-ssl contradicts"):
        tls_overrides("c.pem", None, no_ssl=True)
