"""The vLLM engine: the GPU worker's fast path behind the same interface as transformers.

vLLM is imported only when an engine is built, never at import time, so the worker can pin
its GPU (``CUDA_VISIBLE_DEVICES``) before anything initialises CUDA. All requests of a call
go to one ``LLM.generate`` so vLLM's scheduler batches them; prompts and sampling are per
call and never reload the model. Every foreign exception becomes :class:`EngineError` here.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from typing import Any

from caption_flow.config.models import SamplingConfig
from caption_flow.engines.base import EngineSpec, Generation, GenerationRequest
from caption_flow.engines.chat import format_prompt
from caption_flow.engines.hub import loadable_location, model_location
from caption_flow.engines.startup_log import StartupLog, is_pointer, one_line, root_cause
from caption_flow.engines.transformers_engine import engine_error
from caption_flow.errors import EngineError

logger = logging.getLogger(__name__)

#: We only ever send images: other modalities get no memory budget unless the spec asks.
_UNUSED_MODALITIES = {"video": 0, "audio": 0}


class _RepeatedThreadWarning(logging.Filter):
    """vLLM's CPU backend replaces ``torch.set_num_threads`` with a warning; with the engine
    in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as in the demo) vLLM's own image
    processing calls it for every request: dozens of identical lines about vLLM's internals."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("CPU backend doesn't allow to use `torch.set_num")


_CPU_WORKER_LOGGER = "vllm.v1.worker.cpu_worker"


def engine_args(spec: EngineSpec, platform_device: str = "cuda") -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments: every spec field, so a changed field is a changed model.

    ``auto`` precision on the CPU is float32, as in the transformers engine: vLLM would pick
    bfloat16, whose matrix products are about 6x slower on CPUs without AVX-512/AMX, and whose
    captions would differ from the transformers engine's.
    """
    cpu_auto = spec.dtype == "auto" and platform_device == "cpu"
    args: dict[str, Any] = {
        "model": model_location(spec.model),
        "revision": spec.revision,
        "dtype": "float32" if cpu_auto else spec.dtype,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "max_model_len": spec.max_model_len,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "enforce_eager": spec.enforce_eager,
        "limit_mm_per_prompt": {**_UNUSED_MODALITIES, **dict(spec.limit_mm_per_prompt)},
        "mm_processor_kwargs": dict(spec.mm_processor_kwargs) or None,
        # JSON captions (a job's output_schema) without free whitespace: compact to store,
        # and a weak model cannot spend max_tokens on tabs between the braces.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        "trust_remote_code": spec.trust_remote_code,
    }
    if spec.disable_mm_preprocessor_cache:
        # vLLM replaced its disable_mm_preprocessor_cache switch by a size; 0 turns it off.
        args["mm_processor_cache_gb"] = 0
    return args


def sampling_params(
    params_class: Any, sampling: SamplingConfig, schemas: Sequence[dict[str, Any] | None]
) -> Any:
    """One ``SamplingParams`` for the batch, or one per request when some have a JSON schema:
    vLLM's structured outputs then constrain decoding, so the caption is valid JSON of that
    schema by construction (and the worker's check after the fact never has to retry it)."""
    if all(schema is None for schema in schemas):
        return params_class(**sampling_kwargs(sampling))
    from vllm.sampling_params import StructuredOutputsParams

    made: dict[str, Any] = {}
    params = []
    for schema in schemas:
        key = json.dumps(schema, sort_keys=True)
        if key not in made:
            structured = StructuredOutputsParams(json=schema) if schema is not None else None
            made[key] = params_class(**sampling_kwargs(sampling), structured_outputs=structured)
        params.append(made[key])
    return params


def sampling_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments; temperature 0 is greedy in vLLM too."""
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "repetition_penalty": sampling.repetition_penalty,
        "skip_special_tokens": sampling.skip_special_tokens,
        "stop": list(sampling.stop) or None,
        "seed": sampling.seed,
        "ignore_eos": sampling.ignore_eos,
    }


def start_error(model: str, exc: BaseException, startup: StartupLog) -> EngineError:
    """One line that names why vLLM did not start, even when the cause was raised in one of
    its engine processes and the exception here only says "see root cause above"."""
    action = f"starting vLLM for {model}"
    cause = root_cause(startup.text()) if is_pointer(str(exc)) else None
    if cause is not None:
        if "gpu-memory-utilization" in cause:  # vLLM names its own flag, not our key
            cause += (
                " [captionflow: set vllm.gpu_memory_utilization in the orchestrator config, "
                "or the KV cache size in GiB with VLLM_CPU_KVCACHE_SPACE on a CPU]"
            )
        return EngineError(f"{action} failed: {cause}")
    message = one_line(str(engine_error(action, exc)))
    if is_pointer(str(exc)) and startup.active:
        message += " (run with -v to see vLLM's log)"
    return EngineError(message)


def _check_device(device: str, platform_device: str) -> None:
    """vLLM runs on the platform it was built for; a GPU is chosen with CUDA_VISIBLE_DEVICES,
    which makes the chosen one device 0."""
    if device not in ("auto", platform_device, f"{platform_device}:0"):
        raise EngineError(
            f"vLLM runs on {platform_device!r}, not {device!r}; pick a GPU with "
            "CUDA_VISIBLE_DEVICES, or use the transformers engine"
        )


def _generation(output: Any) -> Generation:
    """The first completion; edge whitespace dropped, as vLLM's incremental detokenizer may
    add a leading space that a whole-sequence decode (transformers) does not."""
    completion = output.outputs[0]
    return Generation(text=completion.text.strip(), tokens=len(completion.token_ids))


def _abort_unfinished(llm: Any) -> None:
    """Drop requests a failed call left in the engine, so the next call starts clean."""
    engine = llm.llm_engine
    leftover = list(getattr(engine.output_processor, "request_states", {}))
    if leftover:
        logger.info("aborting %d requests left by a failed call", len(leftover))
        engine.abort_request(leftover, internal=True)


def _shutdown(llm: Any) -> None:
    """Stop vLLM's engine core (its processes, distributed state, KV cache)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:  # already dead or half-built: nothing left to free
        logger.warning("vLLM shutdown: %s: %s", type(exc).__name__, exc)


class VLLMEngine:
    """A model served by ``vllm.LLM`` for offline multimodal generation.

    If vLLM's engine core dies (out of memory in its process, a crash), the call raises
    :class:`EngineError` and the next call starts a fresh engine with the same spec.
    """

    def __init__(self, spec: EngineSpec) -> None:
        from vllm.platforms import current_platform

        _check_device(spec.device, current_platform.device_type)
        if current_platform.device_type == "cpu":
            cpu_worker_log = logging.getLogger(_CPU_WORKER_LOGGER)
            if not any(isinstance(f, _RepeatedThreadWarning) for f in cpu_worker_log.filters):
                cpu_worker_log.addFilter(_RepeatedThreadWarning())
        self.spec = spec
        self._args = engine_args(spec, current_platform.device_type)
        self._llm: Any = None
        self._closed = False
        self._start()

    def _start(self) -> None:
        from transformers import AutoProcessor
        from vllm import LLM

        loadable_location(self.spec.model, self.spec.revision)  # a hub id fails fast offline
        logger.info("starting vLLM for %s", self.spec.model)
        startup = StartupLog()
        try:
            with startup:
                self._processor = AutoProcessor.from_pretrained(
                    self._args["model"],
                    revision=self.spec.revision,
                    trust_remote_code=self.spec.trust_remote_code,
                )
                self._llm = LLM(**self._args)
        except Exception as exc:  # foreign code: anything it raises becomes our error
            raise start_error(self.spec.model, exc, startup) from exc
        finally:
            startup.close()

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` (for inspection, e.g. ``llm.model_config``); starts one if needed."""
        if self._closed:
            raise EngineError("engine is closed")
        if self._llm is None:
            self._start()
        return self._llm

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[Generation]:
        """One Generation per request, in order; raises EngineError for the whole batch."""
        from vllm import SamplingParams

        llm = self.llm
        if not requests:
            return []
        try:
            prompts = dict.fromkeys(r.prompt for r in requests)  # a few prompts, many images
            texts = {p: format_prompt(self._processor, p) for p in prompts}
            inputs = [
                {"prompt": texts[r.prompt], "multi_modal_data": {"image": r.image}}
                for r in requests
            ]
            params = sampling_params(SamplingParams, sampling, [r.output_schema for r in requests])
            outputs = llm.generate(inputs, params, use_tqdm=False)
        except EngineError:
            raise
        except Exception as exc:  # foreign code: anything it raises becomes our error
            self._recover(llm, exc)
            raise engine_error(f"generating {len(requests)} captions with vLLM", exc) from exc
        return [_generation(o) for o in outputs]

    def _recover(self, llm: Any, exc: Exception) -> None:
        """Keep a live engine usable; drop a dead one so the next call restarts it."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            logger.error("vLLM engine died (%s); restarting on the next call", exc)
            self._release()
            return
        try:
            _abort_unfinished(llm)
        except Exception as abort_exc:  # cannot clean up: start over rather than serve junk
            logger.error("vLLM could not abort requests (%s); restarting", abort_exc)
            self._release()

    def _release(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        _shutdown(llm)
        del llm
        gc.collect()
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Free the engine and its memory (KV cache, weights); generate() then raises."""
        if self._closed:
            return
        self._closed = True
        self._release()
        logger.info("closed vLLM engine for %s", self.spec.model)
