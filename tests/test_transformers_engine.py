"""The transformers engine on the tiny model: real inference, nothing mocked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from caption_flow.config.models import ModelConfig, SamplingConfig
from caption_flow.demo.tiny_model import build_tiny_model, generate_images
from caption_flow.engines.base import EngineSpec, GenerationRequest
from caption_flow.engines.factory import load_engine, resolve_kind
from caption_flow.engines.spec import spec_from_job
from caption_flow.engines.transformers_engine import (
    TransformersEngine,
    engine_error,
    resolve_dtype,
)
from caption_flow.errors import EngineError

GREEDY = SamplingConfig(temperature=0.0, max_tokens=8, repetition_penalty=1.0)
PROMPTS = ["describe this image in detail", "short caption", "what colour is the dog"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    loaded = TransformersEngine(EngineSpec(model=str(tiny_model_dir)))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    paths = generate_images(tmp_path_factory.mktemp("images"), 6)
    return [Image.open(p).convert("RGB") for p in paths]


def test_batch_of_several_prompts_per_image(
    engine: TransformersEngine, images: list[Image.Image]
) -> None:
    requests = [GenerationRequest(im, p) for im in images[:4] for p in PROMPTS]
    generations = engine.generate(requests, GREEDY)
    assert len(generations) == len(requests)
    assert all(g.text.strip() for g in generations)
    # The tiny model never ends early under greedy decoding (see build_tiny_model).
    assert [g.tokens for g in generations] == [8] * len(requests)
    assert engine.device == "cpu" and engine.model.dtype == torch.float32


def test_greedy_is_deterministic_and_independent_of_batching(
    engine: TransformersEngine, images: list[Image.Image]
) -> None:
    requests = [GenerationRequest(im, PROMPTS[i % 3]) for i, im in enumerate(images)]
    first = [g.text for g in engine.generate(requests, GREEDY)]
    again = [g.text for g in engine.generate(requests, GREEDY)]
    alone = [engine.generate([r], GREEDY)[0].text for r in requests[:3]]
    assert first == again
    assert alone == first[:3]  # left padding does not change a row's result
    assert len(set(first)) > 1  # different images and prompts give different captions


def test_seeded_sampling_is_reproducible(
    engine: TransformersEngine, images: list[Image.Image]
) -> None:
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, max_tokens=8, seed=7)
    requests = [GenerationRequest(im, PROMPTS[0]) for im in images[:3]]
    first = [g.text for g in engine.generate(requests, sampling)]
    assert first == [g.text for g in engine.generate(requests, sampling)]
    assert all(first)


def test_stop_string_cuts_text_and_counts_tokens(
    engine: TransformersEngine, images: list[Image.Image]
) -> None:
    request = GenerationRequest(images[0], PROMPTS[0])
    words = engine.generate([request], GREEDY)[0].text.split()
    stop = words[2]
    cut = engine.generate([request], GREEDY.model_copy(update={"stop": [stop]}))[0]
    assert stop not in cut.text
    assert cut.text.split() == words[: words.index(stop)]
    assert 1 <= cut.tokens < 8


def test_max_tokens_limits_generation(
    engine: TransformersEngine, images: list[Image.Image]
) -> None:
    short = engine.generate(
        [GenerationRequest(images[1], PROMPTS[1])], GREEDY.model_copy(update={"max_tokens": 3})
    )[0]
    assert short.tokens == 3
    assert len(short.text.split()) <= 3


def test_bad_image_fails_the_batch_with_engine_error(
    engine: TransformersEngine, images: list[Image.Image]
) -> None:
    sliver = Image.new("RGB", (1, 300))  # aspect ratio 300: the Qwen2-VL processor refuses it
    with pytest.raises(EngineError, match="aspect ratio"):
        engine.generate([GenerationRequest(images[0], "a"), GenerationRequest(sliver, "b")], GREEDY)
    assert engine.generate([], GREEDY) == []


def test_closed_engine_raises(tiny_model_dir: Path, images: list[Image.Image]) -> None:
    spec = spec_from_job(ModelConfig(model=str(tiny_model_dir)), precision="bfloat16")
    engine = load_engine("transformers", spec)
    assert isinstance(engine, TransformersEngine)
    assert engine.model.dtype == torch.bfloat16
    assert engine.generate([GenerationRequest(images[0], "a")], GREEDY)[0].text
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.generate([GenerationRequest(images[0], "a")], GREEDY)


def test_missing_local_model_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="does not exist"):
        TransformersEngine(EngineSpec(model=str(tmp_path / "nowhere")))
    # A hub id goes through from_pretrained; offline and not cached, that fails cleanly.
    with pytest.raises(EngineError, match="loading captionflow-test/no-such-model"):
        TransformersEngine(EngineSpec(model="captionflow-test/no-such-model", revision="main"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="loading"):
        TransformersEngine(EngineSpec(model=str(tmp_path / "empty")))


def test_dtype_and_kind_resolution() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("auto", "cuda") == "auto"
    with pytest.raises(EngineError, match="unsupported dtype"):
        resolve_dtype("int3", "cpu")
    if not torch.cuda.is_available():
        assert resolve_kind("auto") == "transformers"


def test_out_of_memory_is_named_in_the_message() -> None:
    error = engine_error("generating 8 captions", torch.OutOfMemoryError("CUDA out of memory"))
    assert str(error).startswith("out of memory while generating 8 captions")
    assert "ValueError" in str(engine_error("x", ValueError("bad")))


def test_build_is_idempotent(tiny_model_dir: Path) -> None:
    marker = tiny_model_dir / ".captionflow-tiny-model.json"
    before = marker.stat().st_mtime_ns
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert marker.stat().st_mtime_ns == before


def test_generated_images_are_deterministic_and_mixed(tmp_path: Path) -> None:
    first = generate_images(tmp_path / "a", 6, seed=3)
    second = generate_images(tmp_path / "b", 6, seed=3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert {p.suffix for p in first} == {".jpg", ".png"}
    sizes = {Image.open(p).size for p in first}
    assert len(sizes) > 1
