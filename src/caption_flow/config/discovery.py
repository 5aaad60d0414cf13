"""Find and load a component's YAML file in the documented order; first match wins."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from caption_flow.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def candidate_paths(
    component: str,
    explicit: str | os.PathLike[str] | None = None,
    examples: bool = True,
) -> list[Path]:
    """Where ``component``.yaml is looked for, in order.

    ``./examples/`` comes last, as in the original caption-flow, whose users run the
    services from a clone; ``examples=False`` leaves it out (``run``, which is new and whose
    user would not expect the sample's model and paths).
    """
    name = f"{component}.yaml"
    if explicit is not None:
        return [Path(explicit)]
    home = Path.home()
    xdg_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    xdg_dirs = [Path(p) for p in os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":") if p]
    return [
        Path.cwd() / name,
        Path.cwd() / "config" / name,
        home / ".caption-flow" / name,
        xdg_home / "caption-flow" / name,
        Path("/etc/caption-flow") / name,
        *[d / "caption-flow" / name for d in xdg_dirs],
        *([Path.cwd() / "examples" / name] if examples else []),
    ]


def is_example(path: Path) -> bool:
    """Whether ``path`` is the ``./examples/`` fallback rather than a user's own file."""
    return path.parent.name == "examples" and path.parent.parent == Path.cwd()


def find_config(
    component: str, explicit: str | os.PathLike[str] | None = None, examples: bool = True
) -> Path | None:
    """The first existing candidate, or None. An explicit path that is missing is an error."""
    paths = candidate_paths(component, explicit, examples)
    if explicit is not None:
        if not paths[0].is_file():
            raise ConfigError(f"config file not found: {paths[0]}")
        return paths[0]
    return next((p for p in paths if p.is_file()), None)


def find_config_or_section(
    component: str, host: str, explicit: str | os.PathLike[str] | None = None
) -> Path | None:
    """Like :func:`find_config`, but at each place ``host``.yaml holding a top-level
    ``component:`` section counts too, after ``component``.yaml (the monitor's settings
    may live in orchestrator.yaml)."""
    if explicit is not None:
        return find_config(component, explicit)
    own = candidate_paths(component)
    hosts = candidate_paths(host)
    for mine, theirs in zip(own, hosts, strict=True):
        if mine.is_file():
            return mine
        if theirs.is_file() and component in _top_level_keys(theirs):
            return theirs
    return None


def _top_level_keys(path: Path) -> set[str]:
    """The top-level keys of a YAML file; none when it cannot be read (loading it for real
    reports why)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    """Validate ``data`` against ``model``; errors name each bad key and the source."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None


def load_file(model: type[M], path: Path | None) -> M:
    """Load and validate one YAML file (or the defaults when ``path`` is None)."""
    if path is None:
        return model()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return validate(model, data, str(path))


def apply_overrides(config: M, overrides: dict[str, Any], source: str = "command line") -> M:
    """Return ``config`` with dotted-key overrides (``vllm.model``) applied; None means unset."""
    data = config.model_dump(mode="python")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate(type(config), data, source)


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` laid over it; nested mappings merge key by key."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
