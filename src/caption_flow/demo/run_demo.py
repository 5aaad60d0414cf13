"""``caption-flow demo``: the real pipeline on generated images and a tiny local model.

Nothing is downloaded. The model is randomly initialised, so its captions are gibberish; the
point is that every part runs for real: websocket protocol, leasing, inference, durable
storage and Parquet output.
"""

from __future__ import annotations

import os
from pathlib import Path

from caption_flow.config.models import (
    DatasetConfig,
    ModelConfig,
    OrchestratorConfig,
    SamplingConfig,
    StorageConfig,
    WorkerConfig,
)
from caption_flow.demo.tiny_model import build_tiny_model, generate_images

DEMO_PROMPTS = ["describe this image in detail", "list the main colours"]

#: vLLM settings for a tiny model that work on an ordinary machine; a user's own wins.
#: On the CPU, vLLM reserves gpu_memory_utilization of all system RAM unless the KV cache
#: has an explicit size (GiB); in-process engine start takes seconds instead of half a minute.
VLLM_DEMO_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
VLLM_DEMO_MEMORY_FRACTION = 0.3  # of a GPU's memory: the tiny model needs almost none


def demo_configs(
    workdir: Path, images: int = 48, engine: str = "transformers"
) -> tuple[OrchestratorConfig, WorkerConfig]:
    """Build (or reuse) the model and images under ``workdir`` and return the run's configs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if engine == "vllm":
        for name, value in VLLM_DEMO_ENV.items():
            os.environ.setdefault(name, value)
    workdir = workdir.absolute()
    model_dir = build_tiny_model(workdir / "tiny-qwen2-vl")
    image_dir = workdir / "images"
    if len(list(image_dir.glob("*"))) != images:
        for old in image_dir.glob("*"):
            old.unlink()
        generate_images(image_dir, images)
    orchestrator = OrchestratorConfig(
        host="127.0.0.1",
        port=0,
        dataset=DatasetConfig(type="local_folder", path=str(image_dir), name="demo-images"),
        vllm=ModelConfig(
            model=str(model_dir),
            batch_size=8,
            max_model_len=512,
            enforce_eager=True,
            gpu_memory_utilization=VLLM_DEMO_MEMORY_FRACTION,
            limit_mm_per_prompt={"image": 1, "video": 0},
            inference_prompts=DEMO_PROMPTS,
            sampling=SamplingConfig(temperature=0.0, max_tokens=12, repetition_penalty=1.0),
        ),
        storage=StorageConfig(data_dir=workdir / "data", compact_seconds=2.0),
        chunk_size=16,
        lease_seconds=60,
        status_interval=10,
    )
    worker = WorkerConfig(name="demo-worker", engine=engine)  # type: ignore[arg-type]
    return orchestrator, worker
