"""The transformers engine: any image-text-to-text model, without vLLM.

It runs where vLLM does not (CPU, Apple, unusual models) and serves as the reference that
vLLM's output is checked against. Requests are batched with left padding; every foreign
exception is turned into :class:`EngineError` here, so the captioner only knows our types.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from caption_flow.config.models import SamplingConfig
from caption_flow.engines.base import EngineSpec, Generation, GenerationRequest
from caption_flow.engines.chat import format_prompt
from caption_flow.engines.hub import loadable_location
from caption_flow.errors import EngineError
from caption_flow.images.decode import error_reason

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float16", "bfloat16", "float32")


def resolve_device(device: str) -> str:
    """``auto`` means the first CUDA GPU when there is one, else the CPU."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    """A torch dtype: ``auto`` is float32 on the CPU (half precision is slow there) and
    the checkpoint's own dtype on accelerators."""
    if dtype not in _DTYPES:
        raise EngineError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    if dtype == "auto":
        return torch.float32 if device == "cpu" else "auto"
    return getattr(torch, dtype)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, a MemoryError, or a RuntimeError from a failed allocation."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def engine_error(action: str, exc: BaseException) -> EngineError:
    """``exc`` from torch or transformers as our EngineError, saying when memory ran out."""
    if is_out_of_memory(exc):
        return EngineError(f"out of memory while {action}: {error_reason(exc)}")
    return EngineError(f"{action} failed: {error_reason(exc)}")


# The vLLM engine imported these under their first, private names.


class _StopStrings(StoppingCriteria):
    """Stop a row once its generated text contains a stop string.

    transformers' own ``stop_strings`` cannot handle some vocabularies (it fails on
    word-level tokenizers); decoding the tail of each row works with any tokenizer. It also
    records after how many generated tokens each row stopped, for the token count.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_length = prompt_length
        self.window = 2 * max(len(s) for s in self.stops) + 8
        self.stopped_after: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, tail in enumerate(input_ids[:, start:].tolist()):
            if row in self.stopped_after:
                done[row] = True
                continue
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(stop in text for stop in self.stops):
                self.stopped_after[row] = generated
                done[row] = True
        return done  # type: ignore[return-value]


class TransformersEngine:
    """A model loaded with AutoModelForImageTextToText + AutoProcessor."""

    def __init__(self, spec: EngineSpec) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.spec = spec
        self.device = resolve_device(spec.device)
        if self.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Leave a core to image decoding and the websocket: on small machines a torch
            # thread that competes with them stalls every batch (measured: 2 threads on 2
            # cores ran the pipeline at 60 img/s, 1 thread at 95).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
        dtype = resolve_dtype(spec.dtype, self.device)
        location = loadable_location(spec.model, spec.revision)
        common: dict[str, Any] = {
            "revision": spec.revision,
            "trust_remote_code": spec.trust_remote_code,
        }
        logger.info("loading %s (dtype %s) on %s with transformers", location, dtype, self.device)
        try:
            self.processor = AutoProcessor.from_pretrained(
                location, **common, **dict(spec.mm_processor_kwargs)
            )
            model: Any = AutoModelForImageTextToText.from_pretrained(
                location, dtype=dtype, **common
            )
            self.model: Any = model.to(self.device).eval()
        except EngineError:
            raise
        except Exception as exc:  # foreign code: anything it raises becomes our error
            raise engine_error(f"loading {spec.model}", exc) from exc
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._eos_ids = self._stop_token_ids()
        self._closed = False

    def _stop_token_ids(self) -> set[int]:
        """Token ids that end a generation: the generation config's and the tokenizer's EOS."""
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(i) for i in eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _generation_kwargs(self, sampling: SamplingConfig) -> dict[str, Any]:
        """Our sampling settings as generate() arguments; temperature 0 means greedy."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "repetition_penalty": sampling.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling.ignore_eos:
            kwargs["min_new_tokens"] = sampling.max_tokens
        if sampling.temperature > 0:
            # top_k=0 switches off transformers' default top-k of 50 (vLLM has none).
            kwargs.update(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0
            )
        else:
            kwargs["do_sample"] = False
        return kwargs

    @contextlib.contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """Seed sampling for this call only, leaving the caller's random state alone."""
        if seed is None:
            yield
            return
        devices = [self.model.device] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[Generation]:
        """One Generation per request, in order; raises EngineError for the whole batch."""
        if self._closed:
            raise EngineError("engine is closed")
        if not requests:
            return []
        try:
            texts = [format_prompt(self.processor, r.prompt) for r in requests]
            inputs = self.processor(
                text=texts,
                images=[r.image for r in requests],
                padding=True,
                return_tensors="pt",
            ).to(self.model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            prompt_length = inputs["input_ids"].shape[1]
            kwargs = self._generation_kwargs(sampling)
            stopper = None
            if any(sampling.stop):
                stopper = _StopStrings(self.tokenizer, sampling.stop, prompt_length)
                kwargs["stopping_criteria"] = StoppingCriteriaList([stopper])
            with torch.inference_mode(), self._seeded(sampling.seed):
                output = self.model.generate(**inputs, **kwargs)
            generated = output[:, prompt_length:].tolist()
        except Exception as exc:  # foreign code: anything it raises becomes our error
            if self.device.startswith("cuda") and is_out_of_memory(exc):
                torch.cuda.empty_cache()
            raise engine_error(f"generating {len(requests)} captions", exc) from exc
        limits = stopper.stopped_after if stopper else {}
        return [
            self._decode(tokens[: limits.get(row, len(tokens))], sampling)
            for row, tokens in enumerate(generated)
        ]

    def _decode(self, tokens: list[int], sampling: SamplingConfig) -> Generation:
        """Cut at the first end token (counted, not shown) and at the first stop string."""
        count = len(tokens)
        for i, token in enumerate(tokens):
            if token in self._eos_ids:
                count = i + 1
                tokens = tokens[:i]
                break
        else:
            pad = self.tokenizer.pad_token_id
            while tokens and tokens[-1] == pad:
                tokens = tokens[:-1]
            count = len(tokens)
        text: str = self.tokenizer.decode(tokens, skip_special_tokens=sampling.skip_special_tokens)
        for stop in sampling.stop:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return Generation(text=text, tokens=count)

    def close(self) -> None:
        """Free the model (and GPU memory); generate() afterwards raises EngineError."""
        if self._closed:
            return
        self._closed = True
        self.model = None
        if self.device.startswith("cuda"):
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        logger.info("closed transformers engine for %s", self.spec.model)
