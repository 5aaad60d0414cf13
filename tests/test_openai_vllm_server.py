"""The openai engine against a real vLLM OpenAI-compatible server on the CPU (tiny model).

Greedy captions through the server match the in-process vLLM engine's. Images go as PNG
(lossless), so both see the same pixels. A JSON schema sent as ``response_format`` is
enforced by the server, on a second tiny model whose tokenizer spells bytes (the word-level
one cannot write JSON for vLLM's grammar backend: shared/notes/ENVIRONMENT.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import pytest
from PIL import Image
from support import TIME_UNIT, free_port

from caption_flow.config.models import EndpointConfig, ModelConfig, SamplingConfig
from caption_flow.demo.tiny_model import build_tiny_model, generate_images
from caption_flow.engines.base import EngineSpec, GenerationRequest
from caption_flow.engines.checks import schema_problem
from caption_flow.engines.openai_engine import OpenAIEngine
from caption_flow.engines.spec import spec_from_job

pytestmark = pytest.mark.vllm

GREEDY = SamplingConfig(temperature=0.0, max_tokens=12, repetition_penalty=1.0)
PROMPTS = ["describe this image", "what is in the photo"]
# What the in-process engine sets too (engines/vllm_engine.py): JSON without free whitespace.
STRUCTURED = {"backend": "xgrammar", "disable_any_whitespace": True}
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "outdoor": {"type": "boolean"}},
    "required": ["colour", "outdoor"],
    "additionalProperties": False,
}


@contextlib.contextmanager
def vllm_server(model: Path, folder: Path) -> Iterator[str]:
    """``vllm.entrypoints.openai.api_server`` on the CPU for ``model``; yields its /v1 URL."""
    pytest.importorskip("vllm")
    port = free_port()
    log = (folder / "server.log").open("w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--model", str(model), "--served-model-name", "tiny"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512"]
    command += ["--enforce-eager", "--dtype", "float32", "--gpu-memory-utilization", "0.3"]
    command += ["--structured-outputs-config", json.dumps(STRUCTURED)]
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 240 * TIME_UNIT
        while True:
            assert process.poll() is None, f"the server exited; see {log.name}"
            assert time.monotonic() < deadline, f"the server did not answer; see {log.name}"
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with vllm_server(tiny_model_dir, tmp_path_factory.mktemp("vllm-server")) as url:
        yield url


def test_greedy_captions_through_the_server_match_the_in_process_engine(
    server: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from caption_flow.engines.vllm_engine import VLLMEngine

    images = [Image.open(p).convert("RGB") for p in generate_images(tmp_path, 3)]
    requests = [GenerationRequest(image, prompt) for image in images for prompt in PROMPTS]
    endpoint = EndpointConfig(
        name="vllm-cpu",
        base_url=server,
        model="tiny",
        timeout_seconds=120 * TIME_UNIT,
        extra_body={"repetition_penalty": 1.0},  # not the model's generation_config default
    )
    remote = OpenAIEngine(EngineSpec(model="tiny"), [endpoint], image_format="png")
    try:
        through_server = remote.generate(requests, GREEDY)
    finally:
        remote.close()
    assert all(g.error is None for g in through_server), [g.error for g in through_server]
    assert any(g.text.strip() for g in through_server)

    job = ModelConfig(
        model=str(tiny_model_dir),
        dtype="float32",
        max_model_len=512,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
        sampling=GREEDY,
    )
    local = VLLMEngine(spec_from_job(job))
    try:
        in_process = local.generate(requests, GREEDY)
    finally:
        local.close()
    # Compared as stored (the captioner strips every caption): the server's detokenizer keeps
    # the first token's leading space where the in-process engine's output does not.
    assert [g.text.strip() for g in through_server] == [g.text.strip() for g in in_process]


def test_the_server_enforces_the_jobs_json_schema(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The openai engine sends ``output_schema`` as ``response_format``; the server's grammar
    makes even a random model answer with JSON of that schema."""
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-bytes") / "m", tokenizer="bytes")
    images = [Image.open(p).convert("RGB") for p in generate_images(tmp_path, 3)]
    sampling = SamplingConfig(temperature=0.0, max_tokens=48, repetition_penalty=1.0)
    with vllm_server(model, tmp_path_factory.mktemp("vllm-json-server")) as url:
        endpoint = EndpointConfig(
            name="vllm-json", base_url=url, model="tiny", timeout_seconds=120 * TIME_UNIT
        )
        remote = OpenAIEngine(EngineSpec(model="tiny"), [endpoint], image_format="png")
        try:
            constrained = remote.generate(
                [GenerationRequest(im, "describe", output_schema=SCHEMA) for im in images],
                sampling,
            )
            free = remote.generate([GenerationRequest(im, "describe") for im in images], sampling)
        finally:
            remote.close()
    assert all(g.error is None for g in constrained), [g.error for g in constrained]
    for generation in constrained:
        assert schema_problem(generation.text, SCHEMA) is None, generation.text
    # Without the schema the same model writes no JSON: the server's grammar did it.
    assert all(schema_problem(g.text, SCHEMA) is not None for g in free)
