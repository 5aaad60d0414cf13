"""The vLLM engine on the tiny model: real inference, checked against transformers.

One engine serves the whole module (starting one costs seconds). vLLM runs in-process here
(VLLM_ENABLE_V1_MULTIPROCESSING=0): quicker to start, but all engines of the process share
vLLM's distributed state, so the test that closes an engine and loads another runs last.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

# Before vLLM is imported anywhere: in-process engine, 1 GiB KV cache on the CPU, no hub.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

from caption_flow.config.models import ModelConfig, SamplingConfig
from caption_flow.demo.tiny_model import generate_images
from caption_flow.engines.base import CaptionInput, Engine, EngineSpec, GenerationRequest
from caption_flow.engines.captioner import Captioner
from caption_flow.engines.factory import EngineKind, load_engine
from caption_flow.engines.spec import spec_from_job
from caption_flow.engines.vllm_engine import VLLMEngine, engine_args, sampling_kwargs
from caption_flow.errors import EngineError

pytestmark = pytest.mark.vllm

PROMPTS = ["describe this image", "what is in the photo"]
GREEDY = SamplingConfig(temperature=0.0, max_tokens=12, repetition_penalty=1.0)


def _job(model: Path, **changes: object) -> ModelConfig:
    """The job the shared engine serves: float32 (what both engines make of "auto" on the
    CPU, said outright), a short context and, on a GPU, room for a second engine."""
    fields: dict[str, object] = {
        "model": str(model),
        "dtype": "float32",
        "max_model_len": 512,
        "gpu_memory_utilization": 0.3,
        "enforce_eager": True,
        "sampling": GREEDY,
        "inference_prompts": PROMPTS,
        **changes,
    }
    return ModelConfig.model_validate(fields)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    folder = tmp_path_factory.mktemp("vllm-images")
    return [Image.open(p).convert("RGB") for p in generate_images(folder, 6)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[VLLMEngine]:
    pytest.importorskip("vllm")
    shared = VLLMEngine(spec_from_job(_job(tiny_model_dir)))
    yield shared
    shared.close()


def _requests(images: list[Image.Image]) -> list[GenerationRequest]:
    return [GenerationRequest(image, prompt) for image in images for prompt in PROMPTS]


def test_every_spec_field_becomes_an_engine_argument() -> None:
    spec = EngineSpec(
        model="org/model",
        revision="abc123",
        dtype="bfloat16",
        tensor_parallel_size=2,
        max_model_len=4096,
        gpu_memory_utilization=0.5,
        enforce_eager=True,
        limit_mm_per_prompt=(("image", 2),),
        disable_mm_preprocessor_cache=True,
        mm_processor_kwargs=(("max_pixels", 1000),),
        trust_remote_code=True,
    )
    assert engine_args(spec) == {
        "model": "org/model",
        "revision": "abc123",
        "dtype": "bfloat16",
        "tensor_parallel_size": 2,
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.5,
        "enforce_eager": True,
        "limit_mm_per_prompt": {"video": 0, "audio": 0, "image": 2},
        "mm_processor_cache_gb": 0,
        "mm_processor_kwargs": {"max_pixels": 1000},
        "trust_remote_code": True,
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    defaults = engine_args(EngineSpec(model="org/model"))
    assert defaults["dtype"] == "auto"
    assert engine_args(EngineSpec(model="org/model"), "cpu")["dtype"] == "float32"
    assert engine_args(spec, "cpu")["dtype"] == "bfloat16"  # only "auto" is resolved
    assert "mm_processor_cache_gb" not in defaults  # vLLM's own default cache stays on
    assert defaults["mm_processor_kwargs"] is None
    assert defaults["trust_remote_code"] is False


def test_sampling_config_maps_to_sampling_params() -> None:
    sampling = SamplingConfig(
        temperature=0.3,
        top_p=0.8,
        max_tokens=7,
        repetition_penalty=1.2,
        skip_special_tokens=False,
        stop=["."],
        seed=5,
        ignore_eos=True,
    )
    assert sampling_kwargs(sampling) == {
        "temperature": 0.3,
        "top_p": 0.8,
        "max_tokens": 7,
        "repetition_penalty": 1.2,
        "skip_special_tokens": False,
        "stop": ["."],
        "seed": 5,
        "ignore_eos": True,
    }
    assert sampling_kwargs(GREEDY)["stop"] is None


def test_a_device_vllm_cannot_use_is_refused_before_loading(tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    with pytest.raises(EngineError, match="CUDA_VISIBLE_DEVICES"):
        VLLMEngine(EngineSpec(model=str(tiny_model_dir), device="cuda:1"))


def test_spec_fields_reach_vllm(engine: VLLMEngine) -> None:
    config = engine.llm.model_config
    assert config.max_model_len == 512
    assert str(config.dtype) == "torch.float32"
    assert config.enforce_eager is True
    assert config.multimodal_config.get_limit_per_prompt("image") == 1
    assert config.multimodal_config.get_limit_per_prompt("video") == 0


@pytest.mark.parametrize(
    "changes", [{}, {"repetition_penalty": 1.05}, {"stop": ["."]}], ids=["plain", "penalty", "stop"]
)
def test_greedy_captions_match_transformers(
    engine: VLLMEngine, images: list[Image.Image], changes: dict[str, object]
) -> None:
    from caption_flow.engines.transformers_engine import TransformersEngine

    requests = _requests(images)
    sampling = GREEDY.model_copy(update=changes)
    reference = TransformersEngine(engine.spec)
    try:
        expected = reference.generate(requests, sampling)
    finally:
        reference.close()
    got = engine.generate(requests, sampling)
    assert [g.text for g in got] == [e.text for e in expected]
    assert [g.tokens for g in got] == [e.tokens for e in expected]
    assert len({g.text for g in got}) > 2  # images and prompts do change the captions


def test_sampling_changes_apply_without_reload(
    engine: VLLMEngine, images: list[Image.Image]
) -> None:
    llm = engine.llm
    requests = _requests(images[:2])
    short = engine.generate(requests, GREEDY.model_copy(update={"max_tokens": 3}))
    long = engine.generate(requests, GREEDY.model_copy(update={"max_tokens": 9}))
    assert [g.tokens for g in short] == [3] * len(requests)
    assert [g.tokens for g in long] == [9] * len(requests)
    for s, g in zip(short, long, strict=True):
        assert g.text.startswith(s.text)

    sampled = SamplingConfig(temperature=1.0, top_p=0.9, max_tokens=9, seed=7)
    first = engine.generate(requests, sampled)
    assert engine.generate(requests, sampled) == first  # the seed makes sampling repeatable
    reseeded = engine.generate(requests, sampled.model_copy(update={"seed": 8}))
    assert [g.text for g in reseeded] != [g.text for g in first]

    stop = long[0].text.split()[2]
    stopped = engine.generate(requests[:1], GREEDY.model_copy(update={"stop": [stop]}))
    assert stop not in stopped[0].text
    assert long[0].text.startswith(stopped[0].text)
    assert engine.llm is llm


def test_a_rejected_image_fails_the_call_not_the_engine(
    engine: VLLMEngine, images: list[Image.Image]
) -> None:
    requests = _requests(images[:2])
    before = engine.generate(requests, GREEDY)
    too_narrow = Image.new("RGB", (4000, 10))  # aspect ratio over 200: Qwen2-VL refuses it
    with pytest.raises(EngineError, match="vLLM"):
        engine.generate([*requests, GenerationRequest(too_narrow, PROMPTS[0])], GREEDY)
    assert engine.generate(requests, GREEDY) == before
    assert engine.generate([], GREEDY) == []


def test_a_failure_mid_batch_is_an_engine_error_and_leaves_no_requests_behind(
    engine: VLLMEngine, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = _requests(images[:2])
    before = engine.generate(requests, GREEDY)
    llm_engine = engine.llm.llm_engine
    step = llm_engine.step
    steps: list[int] = []

    def step_until_out_of_memory() -> object:
        steps.append(1)
        if len(steps) == 3:  # some tokens generated, every request unfinished
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step()

    monkeypatch.setattr(llm_engine, "step", step_until_out_of_memory)
    with pytest.raises(EngineError, match="out of memory"):
        engine.generate(requests, GREEDY)
    assert engine.generate(requests, GREEDY) == before  # no leftovers mixed into the results


def test_captioner_runs_the_vllm_engine(
    engine: VLLMEngine,
    images: list[Image.Image],
    tiny_model_dir: Path,
) -> None:
    def shared_engine(kind: EngineKind, spec: EngineSpec) -> VLLMEngine:
        assert (kind, spec) == ("vllm", engine.spec)
        return engine

    batch = [CaptionInput(key=str(i), image=image) for i, image in enumerate(images)]
    outputs = Captioner("vllm", loader=shared_engine).caption(batch, _job(tiny_model_dir))
    expected = engine.generate(_requests(images), GREEDY)
    assert [o.error for o in outputs] == [None] * len(images)
    assert [o.outputs["captions"] for o in outputs] == [
        [g.text for g in expected[i : i + len(PROMPTS)]]
        for i in range(0, len(expected), len(PROMPTS))
    ]
    assert sum(o.tokens for o in outputs) == sum(g.tokens for g in expected)


@pytest.mark.cuda
def test_gpu_memory_stays_within_the_budget(engine: VLLMEngine) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    free, total = torch.cuda.mem_get_info()
    assert total - free <= (engine.spec.gpu_memory_utilization + 0.05) * total


def test_a_spec_change_closes_the_engine_and_loads_another(
    engine: VLLMEngine,
    images: list[Image.Image],
    tiny_model_dir: Path,
) -> None:
    """Runs last: closing the shared engine tears down state every in-process engine uses."""

    def shared_or_new(kind: EngineKind, spec: EngineSpec) -> Engine:
        return engine if spec == engine.spec else load_engine(kind, spec)

    captioner = Captioner("vllm", loader=shared_or_new)
    batch = [CaptionInput(key="0", image=images[0])]
    old_llm = weakref.ref(engine.llm)
    changed = _job(
        tiny_model_dir,
        max_model_len=256,
        disable_mm_preprocessor_cache=True,
        mm_processor_kwargs={"max_pixels": 56 * 56},
    )
    try:
        assert captioner.caption(batch, _job(tiny_model_dir))[0].error is None
        outputs = captioner.caption(batch, changed)
        (new_engine,) = captioner.engines.values()
        assert isinstance(new_engine, VLLMEngine) and new_engine is not engine
        config = new_engine.llm.model_config
        assert config.max_model_len == 256
        assert config.multimodal_config.mm_processor_cache_gb == 0
        assert config.multimodal_config.mm_processor_kwargs == {"max_pixels": 56 * 56}
        assert outputs[0].error is None and len(outputs[0].outputs["captions"]) == 2
    finally:
        captioner.close()
    gc.collect()
    assert old_llm() is None  # close() let go of the model and its KV cache
    with pytest.raises(EngineError, match="closed"):
        engine.generate(_requests(images[:1]), GREEDY)
