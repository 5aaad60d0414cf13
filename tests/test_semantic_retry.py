"""One semantic retry for empty, refused, invalid-JSON and schema-breaking captions.

A scripted engine stands in for a model that refuses or breaks JSON on cue (a real tiny
model cannot be made to); the last test drives the real openai engine against the stand-in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from PIL import Image
from test_openai_engine import StandIn, endpoint

from caption_flow.config.models import ModelConfig, SamplingConfig, StageConfig, WorkerConfig
from caption_flow.engines.base import CaptionInput, EngineSpec, Generation, GenerationRequest
from caption_flow.engines.captioner import Captioner
from caption_flow.engines.checks import caption_problem
from caption_flow.engines.openai_engine import openai_loader
from caption_flow.errors import ConfigError
from caption_flow.orchestrator.results import JobRules, check_items
from caption_flow.protocol.messages import ItemResult

RETRY = "answer plainly this time"
SCHEMA = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["tags"],
}


class ScriptedEngine:
    """Answers ``reply(prompt)``; records each call's prompts and sampling."""

    def __init__(self, spec: EngineSpec, reply: Callable[[str], str]) -> None:
        self.spec = spec
        self.reply = reply
        self.calls: list[tuple[list[str], SamplingConfig]] = []

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[Generation]:
        self.calls.append(([r.prompt for r in requests], sampling))
        return [Generation(self.reply(r.prompt), 2) for r in requests]

    def close(self) -> None:
        pass


def run(job: ModelConfig, reply: Callable[[str], str], count: int = 3) -> tuple[Any, Any]:
    engines: list[ScriptedEngine] = []

    def load(kind: Any, spec: EngineSpec) -> ScriptedEngine:
        engines.append(ScriptedEngine(spec, reply))
        return engines[-1]

    captioner = Captioner("transformers", loader=load)
    image = Image.new("RGB", (16, 16))
    batch = [CaptionInput(f"k{i}", image, {"n": i}) for i in range(count)]
    return captioner.caption(batch, job), engines[0]


def job(**kw: Any) -> ModelConfig:
    return ModelConfig(model="m", inference_prompts=["describe {n}"], **kw)


def test_a_refusal_is_retried_once_with_the_retry_prompt_and_sampling() -> None:
    retry_sampling = SamplingConfig(temperature=0.0, max_tokens=99)

    def reply(prompt: str) -> str:
        if prompt == "describe 1":
            return "I'm sorry, I can't help"
        return "a red square" if prompt == f"{RETRY} 1" else "fine"

    results, engine = run(job(retry_prompt=RETRY + " {n}", retry_sampling=retry_sampling), reply)
    assert [r.outputs for r in results] == [
        {"captions": ["fine"]},
        {"captions": ["a red square"]},
        {"captions": ["fine"]},
    ]
    assert results[1].tokens == 4, "both attempts' tokens count"
    (first, _), (second, sampling) = engine.calls
    assert first == ["describe 0", "describe 1", "describe 2"]
    assert second == [f"{RETRY} 1"] and sampling == retry_sampling


def test_a_second_refusal_fails_the_item_with_the_reason() -> None:
    results, engine = run(
        job(refusal_markers=["I cannot"]),
        lambda p: "I CANNOT do that" if p == "describe 2" else "ok",
    )
    assert results[2].error == "stage default: refused ('I cannot') (after a retry)"
    assert results[2].outputs == {}
    assert [r.error for r in results[:2]] == [None, None]
    assert [c[0] for c in engine.calls] == [
        ["describe 0", "describe 1", "describe 2"],
        ["describe 2"],
    ], "without a retry_prompt the retry repeats the item's prompt, once"


def test_a_caption_that_only_mentions_a_marker_later_is_not_a_refusal() -> None:
    assert caption_problem("A sign that says I cannot park here", ["I cannot"], None) is None


def test_invalid_json_is_retried_and_schema_breaking_json_fails_per_stage_schema() -> None:
    answers = {
        "describe 0": '{"tags": ["red"]}',
        "describe 1": "{tags: red",
        "describe 2": '{"tags": "red"}',
        "fix 1": '{"tags": ["fixed"]}',
        "fix 2": '{"tags": 3}',
    }
    stage = StageConfig(
        name="tags",
        prompts=["describe {n}"],
        output_field="tags",
        output_schema=SCHEMA,
        retry_prompt="fix {n}",
    )
    results, engine = run(job(stages=[stage]), answers.__getitem__)
    assert json.loads(results[0].outputs["tags"][0]) == {"tags": ["red"]}
    assert json.loads(results[1].outputs["tags"][0]) == {"tags": ["fixed"]}
    assert results[2].error is not None
    assert results[2].error.startswith("stage tags: JSON breaks the schema at tags")
    assert results[2].error.endswith("(after a retry)")
    assert engine.calls[1][0] == ["fix 1", "fix 2"], "both bad answers, one retry call"


def test_an_empty_caption_is_retried_and_still_empty_keeps_its_place() -> None:
    results, engine = run(job(), lambda p: "", count=1)
    assert results[0].error is None and results[0].outputs == {"captions": [""]}
    assert len(engine.calls) == 2


def test_an_invalid_schema_is_the_jobs_fault() -> None:
    with pytest.raises(ConfigError, match="not a valid JSON schema"):
        run(job(output_schema={"type": 12}), lambda p: "{}")


def test_the_openai_engine_gets_the_same_retry_against_the_stand_in() -> None:
    def reply(prompt: str) -> str:
        return '{"tags": ["ok"]}' if prompt.startswith("fix") else "I'm sorry, no."

    with StandIn(reply=reply) as server:
        config = WorkerConfig(engine="openai", endpoints=[endpoint(server)])
        captioner = Captioner("openai", model_override="model-a", loader=openai_loader(config))
        try:
            image = Image.new("RGB", (16, 16))
            results = captioner.caption(
                [CaptionInput("k", image, {"n": 0})],
                job(output_schema=SCHEMA, retry_prompt="fix {n}"),
            )
        finally:
            captioner.close()
    assert results[0].error is None
    assert json.loads(results[0].outputs["captions"][0]) == {"tags": ["ok"]}
    prompts = [r["messages"][0]["content"][1]["text"] for r in server.requests]
    assert prompts == ["describe 0", "fix 0"]
    assert all(r["response_format"]["json_schema"]["schema"] == SCHEMA for r in server.requests)


def test_the_orchestrator_accepts_only_json_matching_the_schema_in_its_fields() -> None:
    rules = JobRules.of(job(output_schema=SCHEMA))
    assert rules.json_schemas.keys() == {"captions"}

    def item(text: str) -> ItemResult:
        return ItemResult(item_id=1, key="k", outputs={"captions": [text]})

    assert check_items([item('{"tags": []}')], rules) is None
    assert check_items([item("")], rules) is None, "no text is the store's NO_TEXT, not bad JSON"
    assert check_items([item("{tags")], rules) == "item 1: a 'captions' entry: not valid JSON"
    # Valid JSON that breaks the schema is refused too (a worker that skipped its check).
    wrong = check_items([item('{"tags": "not a list"}')], rules)
    assert wrong is not None and "breaks the schema at tags" in wrong
    # While workers switch jobs, either job's schema passes; a field only one job
    # constrains is not checked.
    other = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    both = rules.merged(JobRules.of(job(output_schema=other)))
    assert check_items([item('{"tags": []}')], both) is None
    assert check_items([item('{"n": 3}')], both) is None
    assert check_items([item('{"x": 3}')], both) is not None
    assert rules.merged(JobRules.of(job())).json_schemas == {}
    deep = "[" * 3000 + "]" * 3000
    assert check_items([item(deep)], rules) is not None, "deep nesting is refused, no crash"
    assert check_items([item("{tags")], JobRules.of(job())) is None, "no schema, no JSON rule"


def test_a_larger_retry_budget_widens_the_caption_length_rule() -> None:
    plain = JobRules.of(job())
    wider = JobRules.of(job(retry_sampling=SamplingConfig(max_tokens=4096)))
    assert wider.max_caption_chars > plain.max_caption_chars


def test_named_json_repairs_fix_a_caption_before_it_is_checked() -> None:
    """invalid_escapes and duplicate_array_items, each only when the job names it: a repaired
    caption needs no retry; without the repair the same answer is retried, then failed."""
    broken = '{"tags": ["C:\\dir", "cat", "cat"]}'  # \d is no JSON escape; "cat" twice
    assert json.loads(broken.replace("\\d", "\\\\d"))  # the repair makes it valid JSON

    results, engine = run(
        job(output_schema=SCHEMA, json_repairs=["invalid_escapes", "duplicate_array_items"]),
        lambda prompt: broken,
        count=1,
    )
    (text,) = results[0].outputs["captions"]
    assert json.loads(text) == {"tags": ["C:\\dir", "cat"]}
    assert len(engine.calls) == 1, "no retry was needed"

    results, engine = run(job(output_schema=SCHEMA), lambda prompt: broken, count=1)
    assert results[0].error is not None and "invalid JSON" in results[0].error
    assert len(engine.calls) == 2, "retried once, then failed"

    # Only escapes repaired: valid JSON, duplicates kept as the model wrote them.
    results, _ = run(
        job(output_schema=SCHEMA, json_repairs=["invalid_escapes"]),
        lambda prompt: broken,
        count=1,
    )
    assert json.loads(results[0].outputs["captions"][0])["tags"] == ["C:\\dir", "cat", "cat"]
