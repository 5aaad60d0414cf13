"""Configuration: discovery order, validation errors that name the key, flag overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from caption_flow.cli.configs import orchestrator_config, worker_config
from caption_flow.config.discovery import candidate_paths, find_config
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
    assert orch.vllm.inference_prompts and work.server.startswith("ws")


def test_examples_fallback_can_be_left_out(isolated: Path) -> None:
    example = isolated / "work" / "examples" / "worker.yaml"
    example.parent.mkdir()
    example.write_text("worker: {name: from-examples}\n")
    assert find_config("worker") == example
    assert find_config("worker", examples=False) is None  # what `run` uses
    assert all("examples" not in p.parts for p in candidate_paths("worker", examples=False))
