"""Crash safety with dataworkers, real processes: GPU workers that cannot read the dataset get
their items through the orchestrator's prepared-item buffer, filled by two dataworkers. A
dataworker, a worker and the orchestrator are each SIGKILLed mid-run and restarted (clients
reconnect by themselves). In the end every item has exactly one row, every acknowledged
caption is in it unchanged, no chunk is left leased, the journal is empty, and items did
travel from a dataworker to a worker."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from support import TIME_UNIT, metric
from test_crash import Cluster, check_output

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

DATAWORKER_TOKENS = {"feeder-1": "feeder-one-secret", "feeder-2": "feeder-two-secret"}


class FedCluster(Cluster):
    """The crash test's cluster, with workers that cannot read the dataset (read_dataset
    "no", a dataset path that does not exist) and dataworker subprocesses that feed them."""

    def __init__(self, tmp: Path, images: Path, model: Path) -> None:
        super().__init__(tmp, images, model)
        config = yaml.safe_load(self.orch_cfg.read_text())
        orchestrator = config["orchestrator"]
        orchestrator["auth"]["dataworker_tokens"] = [
            {"name": n, "token": t} for n, t in DATAWORKER_TOKENS.items()
        ]
        orchestrator["prepare"] = {
            "wait_seconds": 3.0 * TIME_UNIT,
            "lease_seconds": 3.0 * TIME_UNIT,
            # A little ahead only, and room for a few items: dataworkers keep preparing while
            # workers caption, and wait (holding a chunk) while the buffer is full.
            "ahead_chunks": 1,
            "buffer_memory_mb": 0.02,
            "buffer_disk_mb": 0,
        }
        self.orch_cfg.write_text(yaml.safe_dump(config))
        # Both found by discovery in the clients' working directory.
        (tmp / "worker.yaml").write_text(
            yaml.safe_dump(
                {
                    "worker": {
                        "reconnect_max_seconds": 1.0,
                        "decode_threads": 1,
                        "read_dataset": "no",
                        "dataset_path": str(tmp / "no-such-folder"),
                    }
                }
            )
        )
        (tmp / "dataworker.yaml").write_text(
            yaml.safe_dump({"dataworker": {"reconnect_max_seconds": 1.0, "heartbeat_seconds": 1.0}})
        )
        self.dataworkers: dict[str, subprocess.Popen[bytes]] = {}
        # Highest values /metrics showed; its counters restart with each orchestrator.
        self.seen = {"items_relayed_total": 0.0, "prepared_items": 0.0, "items_served_total": 0.0}
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def start_dataworker(self, name: str) -> None:
        self.dataworkers[name] = self._spawn(
            f"dataworker-{name}",
            [
                "dataworker",
                "--server",
                f"ws://127.0.0.1:{self.port}",
                "--token",
                DATAWORKER_TOKENS[name],
                "--name",
                name,
                "--threads",
                "1",
                "--exit-when-done",
            ],
        )

    def start_sampling(self) -> None:
        self._sampling.set()
        self._sampler.start()

    def _sample(self) -> None:
        while self._sampling.is_set():
            for name in self.seen:
                value = metric(self.port, name)
                if value is not None:
                    self.seen[name] = max(self.seen[name], value)
            time.sleep(0.1)

    def wait_buffer_used(self, seconds: float) -> None:
        """Until a dataworker's item was in the buffer or relayed to a worker."""
        deadline = time.monotonic() + seconds * TIME_UNIT
        while not (self.seen["items_relayed_total"] or self.seen["prepared_items"]):
            assert time.monotonic() < deadline, self.log("orchestrator")
            for name, proc in self.dataworkers.items():
                assert proc.poll() is None, self.log(f"dataworker-{name}")
            time.sleep(0.05)

    def finish(self) -> None:
        """Workers finish the dataset, then the dataworkers see the run finished and stop by
        themselves (exit 0), then the orchestrator stops cleanly."""
        for name, proc in [*self.workers.items(), *self.dataworkers.items()]:
            role = "worker" if name in self.workers else "dataworker"
            try:
                code = proc.wait(timeout=200 * TIME_UNIT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{role} {name} did not finish:\n{self.log(f'{role}-{name}')}")
            assert code == 0, f"{role} {name} exit {code}:\n{self.log(f'{role}-{name}')}"
        super().finish()

    def stop_all(self) -> None:
        self._sampling.clear()
        if self._sampler.is_alive():
            self._sampler.join(timeout=10)
        for proc in self.dataworkers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        super().stop_all()


def test_sigkill_dataworker_worker_and_orchestrator_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(24)
    rng = random.Random(20261126)
    cluster = FedCluster(tmp_path, images[0].parent, tiny_model_dir)
    try:
        cluster.start_orchestrator()
        cluster.start_sampling()
        cluster.start_dataworker("feeder-1")
        cluster.start_worker("alice")
        cluster.start_worker("bob")

        # Kill the first dataworker once the buffer holds its work: the buffer is small, so
        # it is most likely still holding a chunk it cannot put. The second one takes over.
        cluster.wait_buffer_used(60)
        cluster.kill(cluster.dataworkers["feeder-1"])
        cluster.start_dataworker("feeder-2")

        # Kill a worker once it has delivered some work, but not all.
        cluster.wait_items_done(4, 120)
        cluster.kill(cluster.workers["alice"])
        relayed_before_restarts = cluster.seen["items_relayed_total"]

        # Kill the orchestrator at random moments while work is in flight, and restart it;
        # the killed dataworker comes back after the first restart.
        kills = 0
        feeder_back = False
        while kills < 2:
            time.sleep(rng.uniform(0.5, 1.5) * TIME_UNIT)
            done = metric(cluster.port, "items_done")
            if done is not None and done >= len(images):
                break
            cluster.kill(cluster.orchestrator)
            kills += 1
            cluster.start_orchestrator()
            if not feeder_back:
                cluster.start_dataworker("feeder-1")
                feeder_back = True
        if not feeder_back:
            cluster.start_dataworker("feeder-1")
        cluster.start_worker("alice")  # the killed worker comes back too
        cluster.finish()
    finally:
        cluster.stop_all()

    assert kills >= 1, "the orchestrator was killed mid-run"
    acked = check_output(cluster, images)
    assert len(acked) >= 4, "the workers logged what was acknowledged to them"
    assert cluster.seen["items_relayed_total"] > 0, (
        f"no item went from a dataworker to a worker: {cluster.seen}, "
        f"{relayed_before_restarts} before the restarts"
    )
