"""The command line as a user runs it: real subprocesses of ``caption-flow``."""

from __future__ import annotations

import collections
import os
from functools import partial
from pathlib import Path

import pytest
from support import read_rows, run_cli

pytestmark = pytest.mark.timeout(300)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
caption_flow = partial(run_cli, env=ENV, timeout=240)


def test_run_with_flag_shortcuts(tmp_path: Path, tiny_model_dir: Path, image_folder) -> None:
    images = image_folder(7)
    done = caption_flow(
        "run",
        "--dataset", str(images[0].parent),
        "--model", str(tiny_model_dir),
        "--data-dir", str(tmp_path / "out"),
        "--prompt", "describe this image",
        "--prompt", "name its colours",
        "--prompt", "one word",
        "--batch-size", "3",
        "--engine", "transformers",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "7 of 7" in done.stdout
    rows = read_rows(tmp_path / "out")
    assert collections.Counter(r["item_key"] for r in rows) == {p.name: 1 for p in images}
    # One entry per prompt, in prompt order, even where the random model (default sampling,
    # temperature 0.7) ended a generation at once: that entry is "".
    assert all(len(r["captions"]) == 3 for r in rows)
    assert sum(all(r["captions"]) for r in rows) >= 4
    assert all(r["model"] == str(tiny_model_dir) and r["error"] is None for r in rows)


def test_demo_runs_offline(tmp_path: Path) -> None:
    done = caption_flow("demo", "--workdir", str(tmp_path / "demo"), "--images", "6", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 of 6" in done.stdout and "gibberish" in done.stderr
    assert len(read_rows(tmp_path / "demo" / "data")) == 6


def test_invalid_config_names_the_key_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "orchestrator.yaml"
    bad.write_text("orchestrator:\n  chunk_sise: 10\n")
    done = caption_flow("orchestrator", "--config", str(bad), "--data-dir", "d", cwd=tmp_path)
    assert done.returncode == 2
    assert "orchestrator.chunk_sise" in done.stderr and str(bad) in done.stderr
    assert not (tmp_path / "d").exists()
