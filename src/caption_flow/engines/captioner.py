"""What every engine shares: stages, prompt templates, engine caching, retries, failures.

The worker hands a batch of decoded images and the job to :class:`Captioner`; it gets back
one :class:`CaptionOutput` per item. Item-level problems (an engine error on a request that
still fails when sent alone) become ``CaptionOutput.error``, never an exception, so one bad
image cannot stop a worker. Engine-level problems (out of memory, a lost CUDA context, a dead
engine process) are not the items' fault: they raise :class:`EngineUnavailableError` and no
item fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from caption_flow.config.models import ModelConfig, SamplingConfig, StageConfig
from caption_flow.engines.base import (
    CaptionInput,
    CaptionOutput,
    Engine,
    EngineSpec,
    Generation,
    GenerationRequest,
)
from caption_flow.engines.checks import EMPTY, caption_problem, repair_json, schema_text
from caption_flow.engines.factory import EngineKind, load_engine
from caption_flow.engines.prompts import render_prompt
from caption_flow.engines.spec import spec_from_job
from caption_flow.errors import ConfigError, EngineError, EngineUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_STAGE = "default"

# Messages that mean the device or the engine is unusable, not that a request is bad.
_UNAVAILABLE_MARKERS = ("cuda error", "out of memory", "device-side assert")
# Class names (matched without importing torch or vLLM): torch.OutOfMemoryError (also
# torch.cuda.OutOfMemoryError) and vLLM's EngineDeadError.
_UNAVAILABLE_CLASSES = ("OutOfMemoryError", "EngineDead")

EngineLoader = Callable[[EngineKind, EngineSpec], Engine]


def job_stages(job: ModelConfig) -> list[StageConfig]:
    """The job's stages in dependency order; a job without stages is one stage.

    Raises ConfigError for duplicate names, unknown ``requires`` and cycles: a job like
    that fails on every item, so it is the job that is wrong, not the items.
    """
    if not job.stages:
        return [
            StageConfig(
                name=DEFAULT_STAGE,
                prompts=list(job.inference_prompts),
                output_field=job.output_field,
            )
        ]
    by_name: dict[str, StageConfig] = {}
    for stage in job.stages:
        if stage.name in by_name:
            raise ConfigError(f"stage {stage.name!r} is defined twice")
        if not stage.prompts or any(not p.strip() for p in stage.prompts):
            raise ConfigError(f"stage {stage.name!r} needs at least one non-empty prompt")
        by_name[stage.name] = stage
    for stage in job.stages:
        unknown = [r for r in stage.requires if r not in by_name]
        if unknown:
            raise ConfigError(f"stage {stage.name!r} requires unknown stage(s) {unknown}")
    ordered: list[StageConfig] = []
    done: set[str] = set()
    while len(ordered) < len(job.stages):
        ready = [s for s in job.stages if s.name not in done and all(r in done for r in s.requires)]
        if not ready:
            stuck = sorted(s.name for s in job.stages if s.name not in done)
            raise ConfigError(f"stages {stuck} require each other (a cycle)")
        for stage in ready:  # keep the configured order among stages that are ready
            ordered.append(stage)
            done.add(stage.name)
    return ordered


@dataclass
class _ItemState:
    outputs: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    tokens: int = 0
    models: dict[str, None] = field(default_factory=dict)  # answering models, in order


# One request's result: the generation, or why it failed.
_Result = Generation | str


class Captioner:
    """Runs jobs on lazily loaded engines, cached by EngineSpec.

    Stages on the same model share one engine; a job whose spec changed (other model,
    dtype, ...) closes the engines it no longer needs before loading new ones. Changes of
    prompts or sampling never reload anything.
    """

    def __init__(
        self,
        kind: EngineKind = "auto",
        *,
        model_override: str | None = None,
        precision: str | None = None,
        device: str = "auto",
        loader: EngineLoader | None = None,
    ) -> None:
        """``loader`` loads an engine for a spec (default: :func:`load_engine`); tests pass
        one to stand in for what needs a GPU."""
        self.kind: EngineKind = kind
        self.model_override = model_override
        self.precision = precision
        self.device = device
        self._loader = loader
        self._engines: dict[EngineSpec, Engine] = {}

    @property
    def engines(self) -> Mapping[EngineSpec, Engine]:
        """The engines loaded now (read-only view)."""
        return MappingProxyType(self._engines)

    def stage_spec(self, job: ModelConfig, stage: StageConfig) -> EngineSpec:
        """The worker's model flag wins over the stage's model, which wins over the job's."""
        return spec_from_job(
            job,
            model=self.model_override or stage.model,
            precision=self.precision,
            device=self.device,
        )

    def model_name(self, job: ModelConfig) -> str:
        """The model(s) that caption this job, as recorded with the results."""
        names = [self.stage_spec(job, s).model for s in job_stages(job)]
        return ",".join(dict.fromkeys(names))

    def caption(self, batch: Sequence[CaptionInput], job: ModelConfig) -> list[CaptionOutput]:
        """Caption ``batch``: one CaptionOutput per item, in order.

        Raises ConfigError for an invalid stage graph and EngineError when a model cannot
        be loaded (both concern the whole job, not single items), and EngineUnavailableError
        when the engine cannot run right now (the caller retries smaller or later).
        """
        stages = job_stages(job)
        specs = {stage.name: self.stage_spec(job, stage) for stage in stages}
        self._release_unneeded(set(specs.values()))
        states = [_ItemState() for _ in batch]
        for stage in stages:
            alive = [i for i, s in enumerate(states) if s.error is None]
            if not alive:
                break
            engine = self._engine(specs[stage.name])
            self._run_stage(engine, stage, job, batch, states, alive)
        return [
            CaptionOutput(
                outputs={} if s.error else s.outputs,
                error=s.error,
                tokens=s.tokens,
                model=",".join(s.models),
            )
            for s in states
        ]

    def _run_stage(
        self,
        engine: Engine,
        stage: StageConfig,
        job: ModelConfig,
        batch: Sequence[CaptionInput],
        states: list[_ItemState],
        alive: list[int],
    ) -> None:
        """All (image, prompt) pairs of the stage go to the engine in one call; the answers
        that fail a semantic check go again in one more call (see :meth:`_retry`)."""
        schema = stage.output_schema if stage.output_schema is not None else job.output_schema
        owners: list[int] = []
        requests: list[GenerationRequest] = []
        values: dict[int, dict[str, object]] = {}
        for index in alive:
            item = batch[index]
            values[index] = {**item.columns, **states[index].outputs}
            for template in stage.prompts:
                owners.append(index)
                prompt = render_prompt(template, values[index])
                requests.append(GenerationRequest(item.image, prompt, output_schema=schema))
        results = self._generate(engine, requests, stage.sampling or job.sampling)
        self._retry(engine, stage, job, schema, requests, [values[i] for i in owners], results)
        texts: dict[int, list[str]] = {index: [] for index in alive}
        for index, result in zip(owners, results, strict=True):
            state = states[index]
            if isinstance(result, str):
                if state.error is None:
                    state.error = f"stage {stage.name}: {result}"
                continue
            state.tokens += result.tokens
            if result.model:
                state.models[result.model] = None
            # One entry per prompt, in prompt order, "" where the engine produced nothing:
            # with several prompts, an entry is matched to its prompt by position.
            texts[index].append(result.text.strip())
        for index in alive:
            if states[index].error is None:
                states[index].outputs[stage.output_field] = texts[index]

    def _retry(
        self,
        engine: Engine,
        stage: StageConfig,
        job: ModelConfig,
        schema: dict[str, Any] | None,
        requests: list[GenerationRequest],
        values: list[dict[str, object]],
        results: list[_Result],
    ) -> None:
        """One semantic retry, in place: an empty, refused, invalid or schema-breaking answer
        is asked again with the retry prompt and sampling. An answer still bad after it
        becomes the item's failure reason; one still empty stays "" (an item with no text
        at all is failed downstream)."""
        repairs = job.json_repairs if schema is not None else []
        text_of_schema = schema_text(schema) if schema is not None else None

        def checked(generation: Generation) -> tuple[Generation, str | None]:
            """The answer after the job's JSON repairs, and what is still wrong with it."""
            if repairs:
                generation = _repaired(generation, repairs)
            return generation, caption_problem(generation.text, job.refusal_markers, text_of_schema)

        problems: dict[int, str] = {}
        for position, result in enumerate(results):
            if isinstance(result, Generation):
                results[position], problem = checked(result)
                if problem is not None:
                    problems[position] = problem
        if not problems:
            return
        template = stage.retry_prompt or job.retry_prompt
        sampling = stage.retry_sampling or job.retry_sampling or stage.sampling or job.sampling
        again = [
            GenerationRequest(
                requests[p].image,
                render_prompt(template, values[p]) if template else requests[p].prompt,
                output_schema=schema,
            )
            for p in problems
        ]
        logger.info("retrying %d answer(s) that failed a check", len(again))
        for (position, first), second in zip(
            problems.items(), self._generate(engine, again, sampling), strict=True
        ):
            previous = results[position]
            spent = previous.tokens if isinstance(previous, Generation) else 0
            if isinstance(second, str):
                results[position] = f"{first}; the retry failed: {second}"
                continue
            second, problem = checked(second)
            if problem is None or problem == EMPTY:
                results[position] = Generation(
                    second.text, spent + second.tokens, model=second.model
                )
            else:
                results[position] = f"{problem} (after a retry)"

    def _generate(
        self, engine: Engine, requests: list[GenerationRequest], sampling: SamplingConfig
    ) -> list[_Result]:
        """Generate; a failed batch is bisected until only the requests that fail alone fail.

        At most ``2 * len(requests) - 1`` engine calls. An engine-level failure (see
        :func:`unavailable`) is raised at once as EngineUnavailableError, at any depth.
        """
        try:
            # A Generation with an error is that one request's failure, known without bisecting.
            return [g.error or g for g in self._checked(engine, requests, sampling)]
        except Exception as exc:  # engines raise EngineError; anything else is recorded too
            if unavailable(exc):
                raise EngineUnavailableError(
                    f"engine unavailable on a batch of {len(requests)}: {_reason(exc)}"
                ) from exc
            reason = _reason(exc)
        if len(requests) == 1:
            logger.warning("request failed alone: %s", reason)
            return [reason]
        logger.info("batch of %d failed (%s); bisecting", len(requests), reason)
        middle = len(requests) // 2
        return self._generate(engine, requests[:middle], sampling) + self._generate(
            engine, requests[middle:], sampling
        )

    @staticmethod
    def _checked(
        engine: Engine, requests: list[GenerationRequest], sampling: SamplingConfig
    ) -> list[Generation]:
        generations = engine.generate(requests, sampling)
        if len(generations) != len(requests):
            raise EngineError(
                f"engine returned {len(generations)} generations for {len(requests)} requests"
            )
        return generations

    def _engine(self, spec: EngineSpec) -> Engine:
        engine = self._engines.get(spec)
        if engine is None:
            engine = (self._loader or load_engine)(self.kind, spec)
            self._engines[spec] = engine
        return engine

    def _release_unneeded(self, needed: set[EngineSpec]) -> None:
        """Close engines this job does not use, before any new one takes their memory."""
        for spec in [s for s in self._engines if s not in needed]:
            logger.info("closing engine for %s: the job no longer uses it", spec.model)
            self._close(self._engines.pop(spec))

    def close(self) -> None:
        """Close every loaded engine."""
        while self._engines:
            _, engine = self._engines.popitem()
            self._close(engine)

    @staticmethod
    def _close(engine: Engine) -> None:
        try:
            engine.close()
        except Exception:  # closing must not fail the caller; the leak is logged
            logger.exception("closing the engine for %s failed", engine.spec.model)


def unavailable(exc: BaseException) -> bool:
    """True when ``exc`` (or what it was raised from) says the engine cannot run right now.

    Engines wrap foreign errors in EngineError ``from`` the original, so the chain is walked.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        if isinstance(current, EngineUnavailableError):
            return True
        names = [cls.__name__ for cls in type(current).__mro__]
        if any(marker in name for name in names for marker in _UNAVAILABLE_CLASSES):
            return True
        if isinstance(current, (RuntimeError, EngineError)):
            text = str(current).lower()
            if any(marker in text for marker in _UNAVAILABLE_MARKERS):
                return True
        current = current.__cause__ or current.__context__
    return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EngineError):
        return str(exc)
    logger.error("engine raised %s instead of EngineError", type(exc).__name__, exc_info=exc)
    return f"{type(exc).__name__}: {exc}"


def _repaired(generation: Generation, repairs: Sequence[str]) -> Generation:
    """The generation with the job's JSON repairs applied to its text."""
    text = repair_json(generation.text, repairs)
    if text == generation.text:
        return generation
    return Generation(text, generation.tokens, generation.error, generation.model)
