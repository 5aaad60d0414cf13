"""Is a hub model id loadable from here? Answered in seconds, before an engine tries.

Without a network, transformers and vLLM retry a hub id for minutes (printing each warning
more than once) before giving up. A model already in the local cache loads offline; any
other id is looked up once on the hub with a short time-out, and an offline setting
(``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``) skips even that.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from caption_flow.errors import EngineError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 5.0
_TRUE = {"1", "on", "yes", "true"}


def model_location(model: str) -> str:
    """A local folder as an absolute path; anything else is a hub id for from_pretrained.

    A name written as a path that does not exist fails here, instead of being looked up on
    the hub (slow, and a confusing error when offline).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.absolute())
    if model.startswith(("/", "./", "../", "~")) or path.suffix in (".json", ".safetensors"):
        raise EngineError(f"model folder {model!r} does not exist")
    return model


def loadable_location(model: str, revision: str | None = None) -> str:
    """:func:`model_location`, with a hub id checked by :func:`check_hub_model` first."""
    location = model_location(model)
    if not Path(location).is_dir():
        check_hub_model(location, revision)
    return location


def hub_offline() -> bool:
    """Whether the user has switched the Hugging Face hub off for this process."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception as exc:  # a malformed id: the hub lookup below says what is wrong
        logger.debug("cache lookup of %s: %s", repo_id, exc)
        return False
    return isinstance(found, str)


def check_hub_model(repo_id: str, revision: str | None = None) -> None:
    """Raise EngineError at once when hub model ``repo_id`` cannot be loaded from here.

    Call it for hub ids only (a local folder needs no check). Passes when the model is in
    the local cache or the hub knows it; errors other than "unreachable" and "not found"
    (rate limits, a hub hiccup) are left to the engine's own loading.
    """
    if _cached(repo_id, revision):
        return
    what = repo_id if revision is None else f"{repo_id}@{revision}"
    if hub_offline():
        raise EngineError(
            f"loading {what}: not a local folder and not in the Hugging Face cache, and "
            "the hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE): download it "
            "on a machine with a network, or give the path of a local model folder"
        )
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        model_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_SECONDS)
    except GatedRepoError:
        raise EngineError(
            f"loading {what}: the model is gated; accept its terms on the hub and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise EngineError(
            f"loading {what}: no such model on the Hugging Face hub (a typo, or a private model: "
            "log in with `hf auth login` or HF_TOKEN); a local model is given as a folder path"
        ) from None
    except RevisionNotFoundError:
        raise EngineError(f"loading {what}: the model has no revision {revision!r}") from None
    except HfHubHTTPError as exc:
        logger.debug("hub lookup of %s: %s; leaving it to the engine", what, exc)
    except Exception as exc:  # httpx and socket errors: the hub cannot be reached
        raise EngineError(
            f"loading {what}: not in the local Hugging Face cache, and the hub at "
            f"{constants.ENDPOINT} cannot be reached ({type(exc).__name__}: {exc}): check "
            "the network, or give the path of a local model folder"
        ) from None
