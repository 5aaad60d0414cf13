"""Shared fixtures: the tiny offline model (built once per session) and generated images."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Nothing in the tests may reach the network; local model folders load offline.
# One thread per op: on shared 2-core machines OpenMP spinning made the tiny model's
# generate calls up to 10x slower than with a single thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from caption_flow.demo.tiny_model import build_tiny_model, generate_images


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2-VL model; ``CAPTIONFLOW_TINY_MODEL`` names a folder to build once and
    reuse across sessions (the build is idempotent)."""
    reuse = os.environ.get("CAPTIONFLOW_TINY_MODEL")
    path = Path(reuse) if reuse else tmp_path_factory.mktemp("tiny-model") / "qwen2-vl"
    return build_tiny_model(path)


ImageFolderFactory = Callable[..., list[Path]]


@pytest.fixture
def image_folder(tmp_path: Path) -> ImageFolderFactory:
    """``image_folder(count, size=(96, 72), seed=0, name="images")`` writes images and
    returns their paths."""

    def make(
        count: int, size: tuple[int, int] = (96, 72), seed: int = 0, name: str = "images"
    ) -> list[Path]:
        return generate_images(tmp_path / name, count, size=size, seed=seed)

    return make
