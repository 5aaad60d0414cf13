"""The openai engine against a real vLLM OpenAI-compatible server on the CPU (tiny model).

Greedy captions through the server match the in-process vLLM engine's. Images go as PNG
(lossless), so both see the same pixels. Structured outputs are not tested here: the tiny
model's word-level tokenizer cannot spell JSON for vLLM's grammar backend (see
shared/notes/ENVIRONMENT.md).
"""

from __future__ import annotations

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
from caption_flow.demo.tiny_model import generate_images
from caption_flow.engines.base import EngineSpec, GenerationRequest
from caption_flow.engines.openai_engine import OpenAIEngine
from caption_flow.engines.spec import spec_from_job

pytestmark = pytest.mark.vllm

GREEDY = SamplingConfig(temperature=0.0, max_tokens=12, repetition_penalty=1.0)
PROMPTS = ["describe this image", "what is in the photo"]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("vllm")
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm-server") / "server.log").open("w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--model", str(tiny_model_dir), "--served-model-name", "tiny"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512"]
    command += ["--enforce-eager", "--dtype", "float32", "--gpu-memory-utilization", "0.3"]
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
