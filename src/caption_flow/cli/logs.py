"""Logging for the commands: set up once per command by its ``-v`` option.

Apart from :mod:`caption_flow.cli.main` so that commands defined in their own modules
(``monitor``) take the same ``-v`` without importing the group.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)

#: Commands that log their status lines by default (the others show progress or a report).
SERVICES = ("orchestrator", "worker", "monitor")

#: Where ``-v`` leaves its total count in ``ctx.meta``.
VERBOSITY = "caption_flow.verbosity"


#: Libraries whose INFO and DEBUG lines are about their own internals, never shown.
_QUIET_LOGGERS = (
    "websockets",
    "transformers",
    "httpx",
    "httpcore",
    "filelock",
    "PIL",
    "urllib3",
    "fsspec",
    "huggingface_hub",
    "datasets",
    "asyncio",
    "torch",
)


def _log_handler() -> logging.Handler:
    """Rich on a terminal; one plain line per record when redirected (no wrapping)."""
    if console.is_terminal:
        return RichHandler(console=console, show_path=False, rich_tracebacks=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    return handler


def _setup_logging(verbose: int, service: bool) -> None:
    """Called once per command, with ``-v`` counted before and after the subcommand."""
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_log_handler())
    root.setLevel(level)
    # Services log their status lines by default; run and demo show a progress bar instead.
    logging.getLogger("caption_flow").setLevel(
        min(level, logging.INFO) if verbose or service else logging.WARNING
    )
    # The CLI's own few lines (which config file was loaded) are always worth a line.
    logging.getLogger("caption_flow.cli").setLevel(min(level, logging.INFO))
    for noisy in _QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    vllm_level = "INFO" if verbose else "WARNING"
    logging.getLogger("vllm").setLevel(vllm_level)
    # vLLM configures its own logger (in its engine processes too) from the environment, at
    # INFO and on stdout by default: keep it quiet unless -v, and off stdout, where the
    # summary table goes. A user's own setting wins.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", vllm_level)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def _verbosity(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    """``-v`` after the subcommand adds to ``-v`` before it; logging is set up here."""
    before = ctx.find_root().params.get("verbose", 0) or 0
    ctx.meta[VERBOSITY] = before + value  # for commands that start copies of themselves
    _setup_logging(before + value, service=ctx.info_name in SERVICES)


def verbose_option(command: Any) -> Any:
    return click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=_verbosity,
        show_default=False,
        help="-v: progress logs, -vv: debug (also accepted before the subcommand)",
    )(command)
