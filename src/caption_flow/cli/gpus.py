"""``caption-flow worker --gpus all|0,1,3``: one worker process per GPU, stopped together.

The parent never imports torch (a CUDA context in it would hold memory on every GPU): it
counts GPUs from ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``, starts ``caption-flow worker``
once per GPU with the same flags plus ``--gpu-id N --name NAME-gpuN``, forwards SIGINT and
SIGTERM to all of them (a second signal kills what is left), stops the others when one
fails, and exits non-zero if any failed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from types import FrameType

import click
from click.core import ParameterSource

from caption_flow.cli.logs import VERBOSITY
from caption_flow.errors import ConfigError

log = logging.getLogger(__name__)

#: Flags the parent sets per child, never passed through.
PER_CHILD = {"gpus", "gpu_id", "name"}
POLL_S = 0.2


def parse_gpus(spec: str) -> list[int]:
    """``all`` or a comma-separated list of GPU ids, as ints."""
    if spec.strip().lower() == "all":
        return visible_gpus()
    try:
        ids = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {spec}: give all, or GPU ids such as 0,1,3") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {spec}: give all, or distinct GPU ids such as 0,1,3")
    return ids


def visible_gpus() -> list[int]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else what
    ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        try:
            return [int(part) for part in visible.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(
                f"--gpus all: CUDA_VISIBLE_DEVICES={visible} names GPUs by UUID; give their "
                "ids instead, such as --gpus 0,1"
            ) from None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise ConfigError(
            "--gpus all: no GPU found (nvidia-smi is not installed and CUDA_VISIBLE_DEVICES "
            "is unset); name the GPUs, such as --gpus 0,1, or drop --gpus"
        )
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"--gpus all: nvidia-smi -L failed: {exc}") from None
    count = sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    if listing.returncode != 0 or count == 0:
        raise ConfigError(
            "--gpus all: nvidia-smi lists no GPU; name the GPUs, such as --gpus 0,1, or drop --gpus"
        )
    return list(range(count))


def passed_flags(ctx: click.Context) -> list[str]:
    """The flags the user gave this command, as arguments again (less the per-child ones)."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name is None or name in PER_CHILD or not isinstance(param, click.Option):
            continue
        if ctx.get_parameter_source(name) not in (
            ParameterSource.COMMANDLINE,
            ParameterSource.ENVIRONMENT,
        ):
            continue
        value = ctx.params.get(name)
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if param.is_flag:
            if value:
                args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    args += ["-v"] * int(ctx.meta.get(VERBOSITY, 0))
    return args


def run_per_gpu(spec: str, name: str, ctx: click.Context) -> int:
    """Start a worker per GPU of ``spec``; returns the exit status for the parent."""
    gpus = parse_gpus(spec)
    common = passed_flags(ctx)
    children: dict[int, subprocess.Popen[bytes]] = {}
    signals = 0

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        for child in children.values():
            if child.poll() is None:
                if signals == 1:
                    child.send_signal(signum)
                else:
                    child.kill()

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for gpu in gpus:
            argv = [sys.executable, "-m", "caption_flow", "worker", *common]
            argv += ["--gpu-id", str(gpu), "--name", f"{name}-gpu{gpu}"]
            # Its own process group: a terminal's Ctrl-C reaches the children once, from here.
            children[gpu] = subprocess.Popen(argv, process_group=0)
            log.info("worker %s-gpu%d started (pid %d)", name, gpu, children[gpu].pid)
        return _supervise(children, name)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _supervise(children: dict[int, subprocess.Popen[bytes]], name: str) -> int:
    """Wait for every child; the first failure stops the others."""
    stopping = False
    while any(child.poll() is None for child in children.values()):
        if not stopping:
            failed = [g for g, c in children.items() if c.returncode not in (None, 0)]
            if failed:
                stopping = True
                log.error(
                    "worker %s-gpu%d failed (exit %s); stopping the others",
                    name,
                    failed[0],
                    children[failed[0]].returncode,
                )
                for child in children.values():
                    if child.poll() is None:
                        child.terminate()
        time.sleep(POLL_S)
    bad = {g: c.returncode for g, c in children.items() if c.returncode != 0}
    for gpu, code in bad.items():
        log.error("worker %s-gpu%d exited with status %s", name, gpu, code)
    if not bad:
        log.info("all %d workers stopped cleanly", len(children))
    return 1 if bad else 0
