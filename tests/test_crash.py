"""Crash safety with real processes: the orchestrator is SIGKILLed at random moments and at
fixed dangerous points (through the fault-injection hook), a worker is SIGKILLed mid-chunk,
and everything restarts on the same data directory. In the end every item has exactly one
row, every caption a worker saw acknowledged is in it unchanged, no chunk is left leased and
the journal is empty."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import TIME_UNIT, WORKER_TOKENS, free_port, metric, read_rows

from caption_flow import faults
from caption_flow.storage.rows import NO_TEXT
from caption_flow.storage.state import StateDB

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

CHUNK_SIZE = 4


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
                        "chunk_size": CHUNK_SIZE,
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
        self.starts: collections.Counter[str] = collections.Counter()
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.env.pop(faults.ENV, None)
        self.logs = tmp / "logs"
        self.logs.mkdir()

    def _spawn(
        self, name: str, args: list[str], fault: str | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        env = self.env if fault is None else {**self.env, faults.ENV: fault}
        return subprocess.Popen(
            [sys.executable, "-m", "caption_flow", "-vv", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.tmp,
        )

    def start_orchestrator(self, fault: str | None = None) -> None:
        """Start it and wait until it serves; with ``fault``, armed to kill itself there."""
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
            fault,
        )
        deadline = time.monotonic() + 30 * TIME_UNIT
        while metric(self.port, "items_done") is None:
            assert self.orchestrator.poll() is None, self.log("orchestrator")
            assert time.monotonic() < deadline, "orchestrator did not come up"
            time.sleep(0.05)

    def start_worker(self, name: str) -> None:
        """Each start of a worker writes its own acknowledgement log."""
        self.starts[name] += 1
        ack_log = self.logs / f"ack-{name}-{self.starts[name]}.jsonl"
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
                "--ack-log",
                str(ack_log),
            ],
        )

    def wait_items_done(self, at_least: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds * TIME_UNIT
        while (metric(self.port, "items_done") or 0) < at_least:
            assert time.monotonic() < deadline, self.log("orchestrator")
            time.sleep(0.05)

    def wait_orchestrator_killed(self, seconds: float) -> None:
        """The armed fault fired: the orchestrator killed itself with SIGKILL."""
        assert self.orchestrator is not None
        try:
            code = self.orchestrator.wait(timeout=seconds * TIME_UNIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the armed fault never fired:\n{self.log('orchestrator')}")
        assert code == -signal.SIGKILL, f"exit {code}:\n{self.log('orchestrator')}"

    def kill(self, proc: subprocess.Popen[bytes] | None) -> None:
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def finish(self) -> None:
        """Wait for every worker to finish the dataset, then stop the orchestrator cleanly."""
        for name, proc in self.workers.items():
            try:
                proc.wait(timeout=200 * TIME_UNIT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {name} did not finish:\n{self.log('worker-' + name)}")
        assert self.orchestrator is not None
        self.orchestrator.send_signal(signal.SIGTERM)  # a clean stop flushes the journal
        assert self.orchestrator.wait(timeout=30 * TIME_UNIT) == 0, self.log("orchestrator")

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def acknowledged(self) -> list[dict[str, Any]]:
        """Every line of every acknowledgement log. Only a killed worker's last line may be
        cut short."""
        lines: list[dict[str, Any]] = []
        for path in sorted(self.logs.glob("ack-*.jsonl")):
            text = path.read_text()
            rows = text.split("\n")
            for i, line in enumerate(rows):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    assert i == len(rows) - 1, f"{path}: broken line {i}: {line!r}"
        return lines

    def stop_all(self) -> None:
        for proc in [*self.workers.values(), self.orchestrator]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def check_output(cluster: Cluster, images: list[Path]) -> set[str]:
    """One row per item; every acknowledged caption in it unchanged; no chunk left leased
    and nothing left in the journal. Returns the keys acknowledged to a worker."""
    rows = read_rows(cluster.data)
    counts = collections.Counter(r["item_key"] for r in rows)
    assert set(counts) == {p.name for p in images}, "every item has a row"
    duplicated = {k: n for k, n in counts.items() if n > 1}
    assert not duplicated, f"items written twice: {duplicated}"
    assert all(r["error"] is None and r["captions"] for r in rows)

    by_key = {r["item_key"]: r for r in rows}
    acked = cluster.acknowledged()
    for line in acked:
        row = by_key[line["key"]]
        for field, texts in line["outputs"].items():
            # One entry per prompt; blank text is stored as "" (see rows.records_to_table).
            assert row[field] == [t if t.strip() else "" for t in texts], (line, row)
        if line["error"] is not None:
            assert row["error"] == line["error"], (line, row)
        elif not any(t.strip() for texts in line["outputs"].values() for t in texts):
            assert row["error"] == NO_TEXT, (line, row)
        else:
            assert row["error"] is None, (line, row)

    db = StateDB(cluster.data / "state.db")
    try:
        statuses = collections.Counter(c.status for c in db.load_chunks())
        chunks = -(-len(images) // CHUNK_SIZE)
        assert statuses == {"done": chunks}, statuses
        assert db.journal_size() == 0
        assert db.quarantined() == []
    finally:
        db.close()
    return {line["key"] for line in acked}


def test_sigkill_orchestrator_and_worker_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(24)
    rng = random.Random(20261125)
    cluster = Cluster(tmp_path, images[0].parent, tiny_model_dir)
    try:
        cluster.start_orchestrator()
        cluster.start_worker("alice")
        cluster.start_worker("bob")

        # Kill the worker mid-chunk: once it has delivered some work, but not all.
        cluster.wait_items_done(4, 120)
        cluster.kill(cluster.workers["alice"])

        # Kill the orchestrator at random moments while work is in flight, and restart it.
        kills = 0
        while kills < 3:
            time.sleep(rng.uniform(0.3, 1.5) * TIME_UNIT)
            done = metric(cluster.port, "items_done")
            if done is not None and done >= len(images):
                break
            cluster.kill(cluster.orchestrator)
            kills += 1
            cluster.start_orchestrator()
        cluster.start_worker("alice")  # the killed worker comes back too
        cluster.finish()
    finally:
        cluster.stop_all()

    assert kills >= 1
    acked = check_output(cluster, images)
    assert len(acked) >= 4, "the workers logged what was acknowledged to them"


@pytest.mark.parametrize(
    "fault",
    [
        # A part is renamed into place, not yet recorded: start-up must remove it (its rows
        # are still in the journal) and write them again, once.
        f"{faults.PART_RENAMED}:1",
        # Results are durable, the ack is not sent: the worker resends, the orchestrator
        # acknowledges the copy as a duplicate and stores nothing twice.
        f"{faults.RESULTS_COMMITTED}:3",
    ],
)
def test_a_kill_at_a_dangerous_point_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_model_dir: Path, image_folder, fault: str
) -> None:
    images = image_folder(16)
    cluster = Cluster(tmp_path, images[0].parent, tiny_model_dir)
    try:
        cluster.start_orchestrator(fault=fault)
        cluster.start_worker("alice")
        cluster.start_worker("bob")
        cluster.wait_orchestrator_killed(120)
        cluster.start_orchestrator()  # without the fault
        cluster.finish()
    finally:
        cluster.stop_all()

    acked = check_output(cluster, images)
    # Most items were acknowledged to a worker. Not necessarily all: results made durable
    # just before the kill can complete their chunk, and a chunk that is done is not handed
    # back to its worker at the reconnect, so that worker drops those results unacknowledged
    # (they are in the output all the same: check_output proved one row per item).
    assert acked <= {p.name for p in images}
    assert len(acked) >= len(images) // 2, acked
