"""The captioner: templates, stages, engine caching and failures, on the tiny model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import StubEngine, cuda_out_of_memory, stub_loader

from caption_flow.config.models import ModelConfig, SamplingConfig, StageConfig
from caption_flow.demo.tiny_model import generate_images
from caption_flow.engines.base import CaptionInput, GenerationRequest
from caption_flow.engines.captioner import Captioner, job_stages
from caption_flow.engines.prompts import placeholders, render_prompt
from caption_flow.engines.spec import spec_from_job
from caption_flow.errors import ConfigError, EngineError, EngineUnavailableError

GREEDY = SamplingConfig(temperature=0.0, max_tokens=8, repetition_penalty=1.0)


def make_job(model: Path | str, **changes: object) -> ModelConfig:
    settings: dict[str, object] = {"model": str(model), "sampling": GREEDY}
    settings.update(changes)
    return ModelConfig.model_validate(settings)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    paths = generate_images(tmp_path_factory.mktemp("images"), 4, seed=1)
    return [Image.open(p).convert("RGB") for p in paths]


@pytest.fixture(scope="module")
def captioner() -> Iterator[Captioner]:
    shared = Captioner("transformers")
    yield shared
    shared.close()


# --- logic without a model -------------------------------------------------------------


def test_render_prompt_fills_columns_and_keeps_missing_placeholders() -> None:
    values = {"alt_text": "a red dog", "tags": ["dog", "red", ""], "n": 3, "none": None}
    assert (
        render_prompt("Describe. Alt text: {alt_text}", values) == "Describe. Alt text: a red dog"
    )
    assert render_prompt("Tags: {tags} ({n})", values) == "Tags: dog, red (3)"
    assert render_prompt("Alt: {missing} {none}", values) == "Alt: {missing} {none}"
    assert render_prompt('Answer as {"tags": [..]} for {tags}', values) == (
        'Answer as {"tags": [..]} for dog, red'
    )
    assert placeholders("{a} {b} {a} {1}") == ["a", "b"]


def test_job_stages_default_order_and_errors() -> None:
    (default,) = job_stages(ModelConfig(inference_prompts=["p1", "p2"], output_field="alt"))
    assert (default.prompts, default.output_field, default.sampling) == (["p1", "p2"], "alt", None)
    stages = [
        StageConfig(name="caption", prompts=["c {tags}"], requires=["tags"]),
        StageConfig(name="tags", prompts=["t"], output_field="tags"),
    ]
    assert [s.name for s in job_stages(ModelConfig(stages=stages))] == ["tags", "caption"]
    cycle = [StageConfig(name="a", prompts=["x"], requires=["b"]), *stages[:1]]
    cycle.append(StageConfig(name="b", prompts=["y"], requires=["a"]))
    with pytest.raises(ConfigError, match="unknown"):
        job_stages(ModelConfig(stages=cycle))
    with pytest.raises(ConfigError, match="cycle"):
        job_stages(ModelConfig(stages=[cycle[0], cycle[2]]))
    with pytest.raises(ConfigError, match="twice"):
        job_stages(ModelConfig(stages=[stages[1], stages[1]]))


def test_spec_from_job_worker_flags_win() -> None:
    job = ModelConfig(
        model="org/model", revision="abc", dtype="bfloat16", mm_processor_kwargs={"a": [1]}
    )
    spec = spec_from_job(job)
    assert (spec.model, spec.revision, spec.dtype) == ("org/model", "abc", "bfloat16")
    assert spec.mm_processor_kwargs == (("a", (1,)),) and hash(spec)
    other = spec_from_job(job, model="org/other", precision="float16", device="cpu")
    assert (other.model, other.revision, other.dtype, other.device) == (
        "org/other",
        None,
        "float16",
        "cpu",
    )


# --- real inference ----------------------------------------------------------------------


def test_captions_for_several_prompts(
    captioner: Captioner, tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    job = make_job(tiny_model_dir, inference_prompts=["describe this image", "short caption"])
    batch = [CaptionInput(f"k{i}", im) for i, im in enumerate(images)]
    results = captioner.caption(batch, job)
    assert len(results) == 4
    for result in results:
        assert result.error is None
        assert list(result.outputs) == ["captions"]
        assert len(result.outputs["captions"]) == 2 and all(result.outputs["captions"])
        assert result.tokens == 16
    assert captioner.model_name(job) == str(tiny_model_dir)


def test_prompt_templates_use_columns(
    captioner: Captioner, tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    template = "describe. alt text: {alt_text}"
    job = make_job(tiny_model_dir, inference_prompts=[template])
    captioner.caption([CaptionInput("warm-up", images[0])], job)
    engine = captioner.engines[spec_from_job(job)]

    def direct(image: Image.Image, prompt: str) -> list[str]:
        return [engine.generate([GenerationRequest(image, prompt)], GREEDY)[0].text.strip()]

    # A random model ignores the prompt for some images; use one where the prompt shows.
    image = next(
        im for im in images if direct(im, template) != direct(im, "describe. alt text: red dog")
    )
    (filled,) = captioner.caption([CaptionInput("a", image, {"alt_text": "red dog"})], job)
    (unfilled,) = captioner.caption([CaptionInput("b", image, {"title": "x"})], job)
    assert filled.outputs["captions"] == direct(image, "describe. alt text: red dog")
    assert unfilled.outputs["captions"] == direct(image, template)


def test_two_stage_workflow_feeds_tags_into_the_caption(
    captioner: Captioner, tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    stages = [
        StageConfig(
            name="caption",
            prompts=["describe this image. tags: {tags}"],
            requires=["tags"],
        ),
        StageConfig(
            name="tags",
            prompts=["tags of this image"],
            output_field="tags",
            sampling=GREEDY.model_copy(update={"max_tokens": 4}),
        ),
    ]
    job = make_job(tiny_model_dir, stages=stages)
    results = captioner.caption([CaptionInput("k", im) for im in images[:2]], job)
    assert len(captioner.engines) == 1  # both stages share one engine
    engine = captioner.engines[spec_from_job(job)]
    for image, result in zip(images, results, strict=False):
        assert result.error is None
        assert set(result.outputs) == {"tags", "captions"}
        (tags,) = result.outputs["tags"]
        assert len(tags.split()) <= 4 and tags
        expected = engine.generate(
            [GenerationRequest(image, f"describe this image. tags: {tags}")], GREEDY
        )[0]
        assert result.outputs["captions"] == [expected.text.strip()]
        assert result.tokens == 4 + 8


def test_spec_change_reloads_but_sampling_change_does_not(
    tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    captioner = Captioner("transformers", device="cpu")
    batch = [CaptionInput("k", images[0])]
    try:
        captioner.caption(batch, make_job(tiny_model_dir))
        (first,) = captioner.engines.values()
        changed = make_job(
            tiny_model_dir,
            inference_prompts=["other prompt"],
            sampling=SamplingConfig(temperature=1.0, max_tokens=4, seed=1),
        )
        assert captioner.caption(batch, changed)[0].error is None
        assert list(captioner.engines.values()) == [first]
        (result,) = captioner.caption(batch, make_job(tiny_model_dir, dtype="bfloat16"))
        (second,) = captioner.engines.values()
        assert second is not first and result.error is None
        with pytest.raises(EngineError, match="closed"):  # the old engine was released
            first.generate([GenerationRequest(images[0], "x")], GREEDY)
    finally:
        captioner.close()
    assert not captioner.engines


def test_a_bad_image_fails_alone_on_the_real_engine(
    captioner: Captioner, tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    sliver = Image.new("RGB", (300, 1))  # the Qwen2-VL processor refuses aspect ratios > 200
    batch = [CaptionInput(f"k{i}", im) for i, im in enumerate(images)]
    batch[1] = CaptionInput("bad", sliver)
    results = captioner.caption(batch, make_job(tiny_model_dir))
    # Bisected down to single requests: its neighbour in the same half succeeds.
    failed = results[1]
    assert failed.error and "aspect ratio" in failed.error
    assert failed.error.startswith("stage default:")
    assert failed.outputs == {}
    for ok in results[:1] + results[2:]:
        assert ok.error is None and ok.outputs["captions"]


# --- engine failures, on a stub engine (a GPU cannot run out of memory on this machine) -----


class EngineDeadError(Exception):
    """Named like vLLM's, which the captioner must recognise without importing vLLM."""


def _raises(exc: BaseException) -> Callable[[object], None]:
    def fail(requests: object) -> None:
        raise exc

    return fail


def _chained(cause: BaseException) -> BaseException:
    """An EngineError whose own text says nothing, raised from ``cause`` (as engines do)."""
    try:
        raise cause
    except BaseException as inner:
        try:
            raise EngineError("generating 8 captions failed") from inner
        except EngineError as outer:
            return outer


@pytest.mark.parametrize(
    "fail",
    [
        cuda_out_of_memory,
        _raises(_chained(torch.OutOfMemoryError("CUDA out of memory."))),
        _raises(RuntimeError("CUDA error: an illegal memory access was encountered")),
        _raises(RuntimeError("CUDA error: device-side assert triggered")),
        _raises(_chained(EngineDeadError("EngineCore encountered an issue"))),
    ],
    ids=["oom-wrapped", "oom-chained", "cuda-error", "device-assert", "engine-dead"],
)
def test_engine_level_errors_raise_and_fail_no_item(
    fail: Callable[[object], None], images: list[Image.Image]
) -> None:
    engines: list[StubEngine] = []
    captioner = Captioner("transformers", loader=stub_loader(engines, fail=fail))
    batch = [CaptionInput(f"k{i}", im) for i, im in enumerate(images)]
    with pytest.raises(EngineUnavailableError):
        captioner.caption(batch, make_job("stub", inference_prompts=["a", "b"]))
    # No bisection: a smaller batch is the worker's decision, not a reason to fail items.
    assert engines[0].calls == [8]


def test_one_bad_request_among_good_ones_fails_only_itself(images: list[Image.Image]) -> None:
    bad = Image.new("RGB", (7, 7))

    def fail(requests: list[GenerationRequest]) -> None:
        if any(r.image is bad for r in requests):
            raise EngineError("cannot process this image")

    engines: list[StubEngine] = []
    captioner = Captioner("transformers", loader=stub_loader(engines, fail=fail))
    batch = [CaptionInput(f"k{i}", images[i % 4]) for i in range(8)]
    batch[5] = CaptionInput("bad", bad)
    results = captioner.caption(batch, make_job("stub", inference_prompts=["a", "b"]))
    assert [r.error is not None for r in results] == [i == 5 for i in range(8)]
    assert results[5].error == "stage default: cannot process this image"
    for result in results[:5] + results[6:]:
        first, second = result.outputs["captions"]
        assert first.startswith("a ") and second.startswith("b ")
    # 16 requests (8 images x 2 prompts), the bad pair at 10-11: bisected depth first, only
    # the failing halves are split, well under the 2n bound.
    assert engines[0].calls == [16, 8, 8, 4, 2, 2, 1, 1, 4]


def test_closed_engine_fails_every_item_without_raising(
    tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    captioner = Captioner("transformers")
    job = make_job(tiny_model_dir)
    captioner.caption([CaptionInput("k", images[0])], job)
    next(iter(captioner.engines.values())).close()
    results = captioner.caption([CaptionInput(f"k{i}", im) for i, im in enumerate(images)], job)
    assert all(r.error == "stage default: engine is closed" for r in results)
    captioner.close()


def test_an_empty_generation_keeps_its_place(
    captioner: Captioner, tiny_model_dir: Path, images: list[Image.Image]
) -> None:
    job = make_job(tiny_model_dir, inference_prompts=["describe this image"])
    (plain,) = captioner.caption([CaptionInput("k", images[2])], job)
    first_word = plain.outputs["captions"][0].split()[0]
    stopped = job.model_copy(update={"sampling": GREEDY.model_copy(update={"stop": [first_word]})})
    (result,) = captioner.caption([CaptionInput("k", images[2])], stopped)
    assert result.error is None
    assert result.outputs == {"captions": [""]}, "one entry per prompt, empty or not"
    assert result.tokens >= 1


def test_unloadable_model_raises_engine_error(tmp_path: Path, images: list[Image.Image]) -> None:
    captioner = Captioner("transformers")
    with pytest.raises(EngineError):
        captioner.caption([CaptionInput("k", images[0])], make_job(tmp_path / "missing"))
    assert not captioner.engines
