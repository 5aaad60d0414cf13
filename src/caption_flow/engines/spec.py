"""Turn the job a worker receives (plus its own flags) into an EngineSpec.

The spec is what decides whether a loaded model can be reused, so it holds only what needs
a reload and is hashable: dicts become sorted tuples.
"""

from __future__ import annotations

from typing import Any

from caption_flow.config.models import ModelConfig
from caption_flow.engines.base import EngineSpec


def freeze(value: Any) -> Any:
    """A hashable copy: dicts become sorted tuples of pairs, lists and sets tuples."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(freeze(v) for v in value))
    return value


def spec_from_job(
    job: ModelConfig,
    *,
    model: str | None = None,
    precision: str | None = None,
    device: str = "auto",
) -> EngineSpec:
    """The spec for ``job``; the worker's ``model`` and ``precision`` flags win over it.

    The job's ``revision`` names a commit of the job's model, so it is dropped when
    ``model`` replaces that model with another one.
    """
    chosen = model or job.model
    return EngineSpec(
        model=chosen,
        revision=job.revision if chosen == job.model else None,
        dtype=precision or job.dtype,
        tensor_parallel_size=job.tensor_parallel_size,
        max_model_len=job.max_model_len,
        gpu_memory_utilization=job.gpu_memory_utilization,
        enforce_eager=job.enforce_eager,
        limit_mm_per_prompt=freeze(job.limit_mm_per_prompt),
        disable_mm_preprocessor_cache=job.disable_mm_preprocessor_cache,
        mm_processor_kwargs=freeze(job.mm_processor_kwargs),
        trust_remote_code=job.trust_remote_code,
        device=device,
    )
