"""Pick and load an engine; the only place that knows which implementations exist."""

from __future__ import annotations

import logging
from typing import Literal

from caption_flow.engines.base import Engine, EngineSpec
from caption_flow.errors import EngineError

logger = logging.getLogger(__name__)

EngineKind = Literal["auto", "transformers", "vllm", "openai"]


def vllm_usable() -> bool:
    """vLLM is worth using only on a CUDA GPU and only when it imports (slow: seconds)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install is as good as none: fall back, say why
        logger.info("vLLM not usable (%s: %s); using transformers", type(exc).__name__, exc)
        return False
    return True


def resolve_kind(kind: EngineKind) -> Literal["transformers", "vllm", "openai"]:
    """``auto`` becomes vLLM on a CUDA machine with vLLM installed, else transformers."""
    if kind == "auto":
        return "vllm" if vllm_usable() else "transformers"
    if kind not in ("transformers", "vllm", "openai"):
        raise EngineError(f"unknown engine {kind!r}; use auto, transformers, vllm or openai")
    return kind


def load_engine(kind: EngineKind, spec: EngineSpec) -> Engine:
    """Load ``spec.model`` with the chosen engine; raises EngineError when it cannot."""
    chosen = resolve_kind(kind)
    if chosen == "openai":
        # Its endpoints are worker settings: the worker passes openai_engine.openai_loader.
        raise EngineError("the openai engine is loaded from the worker's endpoints")
    if chosen == "vllm":
        try:
            from caption_flow.engines.vllm_engine import VLLMEngine
        except ImportError as exc:
            raise EngineError(f"the vLLM engine is unavailable: {exc}") from exc
        engine: Engine = VLLMEngine(spec)
    else:
        from caption_flow.engines.transformers_engine import TransformersEngine

        engine = TransformersEngine(spec)
    logger.info("loaded %s with the %s engine", spec.model, chosen)
    return engine
