"""The engine interface: image + prompt in, generated text out.

An engine adapter (vLLM, transformers) only turns requests into generations. Everything that
is the same for every engine (prompt templates, stages, empty-output filtering, retry with a
smaller batch, per-item failures) lives in :mod:`caption_flow.engines.captioner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from caption_flow.config.models import SamplingConfig


@dataclass(frozen=True)
class EngineSpec:
    """Everything whose change means reloading the model (prompts and sampling do not)."""

    model: str
    revision: str | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int = 16384
    gpu_memory_utilization: float = 0.92
    enforce_eager: bool = False
    limit_mm_per_prompt: tuple[tuple[str, int], ...] = (("image", 1),)
    disable_mm_preprocessor_cache: bool = False
    mm_processor_kwargs: tuple[tuple[str, Any], ...] = ()
    trust_remote_code: bool = False
    device: str = "auto"


@dataclass
class GenerationRequest:
    """One prompt about one image; ``output_schema``: the JSON schema the answer must match
    (engines that can constrain decoding use it, the captioner checks every answer)."""

    image: Image.Image
    prompt: str
    output_schema: dict[str, Any] | None = None


@dataclass
class Generation:
    """The text generated for one request, and how many tokens it took.

    ``error`` is set instead of raising when an engine knows which single request failed
    (a remote endpoint answering 400, or out of retries): raising would make the captioner
    bisect and send the batch's other requests again.
    """

    text: str
    tokens: int = 0
    error: str | None = None
    model: str = ""  # who answered, where it is not the engine's own model (an endpoint's)


class Engine(Protocol):
    """A loaded model. ``generate`` returns one Generation per request, in order.

    It may raise :class:`caption_flow.errors.EngineError` (or run out of memory); the
    captioner then retries with a smaller batch and finally fails the items.
    """

    spec: EngineSpec

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[Generation]: ...

    def close(self) -> None: ...


@dataclass
class CaptionInput:
    """An image ready for inference, with the dataset columns prompt templates may use."""

    key: str
    image: Image.Image
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaptionOutput:
    """Per item: one list per output field (one entry per prompt), or an error."""

    outputs: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    tokens: int = 0
    model: str = ""  # the models that answered, where the engines said (else the job's)
