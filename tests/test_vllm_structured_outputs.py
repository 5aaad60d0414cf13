"""vLLM's structured outputs on the CPU: a job's ``output_schema`` constrains decoding, so
even a random model writes JSON of that schema. The tiny model here spells bytes (a word-level
vocabulary cannot write ``{"``: see shared/notes/ENVIRONMENT.md). Runs after
test_vllm_engine.py, whose engine is closed by then (one in-process engine at a time)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

from caption_flow.config.models import ModelConfig, SamplingConfig
from caption_flow.demo.tiny_model import build_tiny_model, generate_images
from caption_flow.engines.base import CaptionInput, GenerationRequest
from caption_flow.engines.captioner import Captioner
from caption_flow.engines.checks import schema_problem
from caption_flow.engines.spec import spec_from_job
from caption_flow.engines.vllm_engine import VLLMEngine

pytestmark = pytest.mark.vllm

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "outdoor": {"type": "boolean"},
    },
    "required": ["colour", "outdoor"],
    "additionalProperties": False,
}


def _job(model: Path) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "model": str(model),
            "dtype": "float32",
            "max_model_len": 512,
            "gpu_memory_utilization": 0.3,
            "enforce_eager": True,
            "sampling": SamplingConfig(temperature=0.0, max_tokens=48, repetition_penalty=1.0),
            "inference_prompts": ["describe this image as JSON"],
            "output_schema": SCHEMA,
        }
    )


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bytes") / "m", tokenizer="bytes")


@pytest.fixture(scope="module")
def engine(byte_model: Path) -> Iterator[VLLMEngine]:
    pytest.importorskip("vllm")
    shared = VLLMEngine(spec_from_job(_job(byte_model)))
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    folder = tmp_path_factory.mktemp("json-images")
    return [Image.open(p).convert("RGB") for p in generate_images(folder, 4)]


def test_the_schema_constrains_decoding(engine: VLLMEngine, images: list[Image.Image]) -> None:
    sampling = _job(Path(".")).sampling
    constrained = engine.generate(
        [GenerationRequest(im, "describe", output_schema=SCHEMA) for im in images], sampling
    )
    for generation in constrained:
        assert schema_problem(generation.text, SCHEMA) is None, generation.text
        assert json.loads(generation.text)["colour"] in ("red", "green", "blue")
    # The same random model, unconstrained, writes bytes that are no JSON at all: the
    # schema, not luck, made the answers above valid.
    free = engine.generate([GenerationRequest(im, "describe") for im in images], sampling)
    assert all(schema_problem(g.text, SCHEMA) is not None for g in free), free


def test_a_batch_mixing_schemas_gets_each_its_own(
    engine: VLLMEngine, images: list[Image.Image]
) -> None:
    other = {"type": "object", "properties": {"tag": {"enum": ["x", "y"]}}, "required": ["tag"]}
    requests = [
        GenerationRequest(images[0], "describe", output_schema=SCHEMA),
        GenerationRequest(images[1], "describe", output_schema=other),
    ]
    first, second = engine.generate(requests, _job(Path(".")).sampling)
    assert schema_problem(first.text, SCHEMA) is None, first.text
    assert schema_problem(second.text, other) is None, second.text


def test_the_captioner_stores_json_captions_without_retries(
    engine: VLLMEngine, byte_model: Path, images: list[Image.Image]
) -> None:
    job = _job(byte_model)
    captioner = Captioner("vllm", loader=lambda kind, spec: engine)
    results = captioner.caption(
        [CaptionInput(key=f"k{i}", image=im) for i, im in enumerate(images)], job
    )
    for result in results:
        assert result.error is None, result
        (text,) = result.outputs[job.output_field]
        assert schema_problem(text, SCHEMA) is None
