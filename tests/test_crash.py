"""Crash safety with real processes: the orchestrator is SIGKILLed at random moments and
restarted on the same data directory, and a worker is SIGKILLed mid-chunk. In the end every
item has exactly one row, and no chunk is left leased."""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from support import TIME_UNIT, WORKER_TOKENS, read_rows

from caption_flow.storage.state import StateDB

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def items_done(port: int) -> int | None:
    """The orchestrator's own count, from its /metrics endpoint; None while it is down."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    match = re.search(r"^captionflow_items_done (\d+)$", text, re.M)
    return int(match.group(1)) if match else None


class Cluster:
    """Orchestrator and worker subprocesses running the real CLI."""

    def __init__(self, tmp: Path, images: Path, model: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.data = tmp / "data"
        self.orch_cfg = tmp / "orchestrator.yaml"
        self.orch_cfg.write_text(
            yaml.safe_dump(
                {
                    "orchestrator": {
                        "dataset": {"type": "local_folder", "path": str(images)},
                        "chunk_size": 4,
                        "lease_seconds": 4.0 * TIME_UNIT,
                        "max_chunk_attempts": 50,
                        "status_interval": 3600,
                        "vllm": {
                            "model": str(model),
                            "batch_size": 2,
                            "inference_prompts": ["describe this image"],
                            "sampling": {"temperature": 0.0, "max_tokens": 4},
                        },
                        "storage": {"compact_rows": 6, "compact_seconds": 0.3},
                        "auth": {
                            "worker_tokens": [
                                {"name": n, "token": t} for n, t in WORKER_TOKENS.items()
                            ]
                        },
                    }
                }
            )
        )
        # Found by discovery (./worker.yaml in the workers' working directory).
        (tmp / "worker.yaml").write_text(
            yaml.safe_dump({"worker": {"reconnect_max_seconds": 1.0, "decode_threads": 1}})
        )
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.logs = tmp / "logs"
        self.logs.mkdir()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        return subprocess.Popen(
            [sys.executable, "-m", "caption_flow", "-vv", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.tmp,
        )

    def start_orchestrator(self) -> None:
        self.orchestrator = self._spawn(
            "orchestrator",
            [
                "orchestrator",
                "--config",
                str(self.orch_cfg),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data),
            ],
        )
        deadline = time.monotonic() + 30 * TIME_UNIT
        while items_done(self.port) is None:
            assert self.orchestrator.poll() is None, self.log("orchestrator")
            assert time.monotonic() < deadline, "orchestrator did not come up"
            time.sleep(0.05)

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(
            f"worker-{name}",
            [
                "worker",
                "--server",
                f"ws://127.0.0.1:{self.port}",
                "--token",
                WORKER_TOKENS[name],
                "--name",
                name,
                "--engine",
                "transformers",
                "--exit-when-done",
            ],
        )

    def kill(self, proc: subprocess.Popen[bytes] | None) -> None:
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for proc in [*self.workers.values(), self.orchestrator]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigkill_orchestrator_and_worker_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(36)
    rng = random.Random(20261125)
    cluster = Cluster(tmp_path, images[0].parent, tiny_model_dir)
    try:
        cluster.start_orchestrator()
        cluster.start_worker("alice")
        cluster.start_worker("bob")

        # Kill the worker mid-chunk: once it has delivered some work, but not all.
        deadline = time.monotonic() + 120 * TIME_UNIT
        while (items_done(cluster.port) or 0) < 4:
            assert time.monotonic() < deadline, cluster.log("worker-alice")
            time.sleep(0.05)
        cluster.kill(cluster.workers["alice"])

        # Kill the orchestrator at random moments while work is in flight, and restart it.
        kills = 0
        while kills < 3:
            time.sleep(rng.uniform(0.3, 2.0) * TIME_UNIT)
            done = items_done(cluster.port)
            if done is not None and done >= len(images):
                break
            cluster.kill(cluster.orchestrator)
            kills += 1
            cluster.start_orchestrator()
        cluster.start_worker("alice")  # the killed worker comes back too

        for name, proc in cluster.workers.items():
            try:
                proc.wait(timeout=200 * TIME_UNIT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {name} did not finish:\n{cluster.log('worker-' + name)}")
        assert cluster.orchestrator is not None
        cluster.orchestrator.send_signal(signal.SIGTERM)  # a clean stop flushes the journal
        assert cluster.orchestrator.wait(timeout=30) == 0, cluster.log("orchestrator")
    finally:
        cluster.stop_all()

    assert kills >= 1
    rows = read_rows(cluster.data)
    counts = collections.Counter(r["item_key"] for r in rows)
    assert set(counts) == {p.name for p in images}, "every item has a row"
    duplicated = {k: n for k, n in counts.items() if n > 1}
    assert not duplicated, f"items written twice: {duplicated}"
    assert all(r["error"] is None and r["captions"] for r in rows)
    db = StateDB(cluster.data / "state.db")
    statuses = collections.Counter(c.status for c in db.load_chunks())
    assert statuses == {"done": 9}, statuses
    assert db.journal_size() == 0
    db.close()
