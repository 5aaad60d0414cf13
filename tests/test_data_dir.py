"""One dataset and one orchestrator per data directory: the dataset's identity in state.db,
an exclusive lock that names its holder, a lock left by a killed process taken over, and
``--force-new-dataset`` moving the earlier run aside. Real orchestrators, files and processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
from support import TIME_UNIT, orchestrator_config, run_cli

from caption_flow.errors import StorageError
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.storage.identity import META_KEY, REPLACED_DIR
from caption_flow.storage.lock import LOCK_NAME, DataDirLock

pytestmark = pytest.mark.timeout(120)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
caption_flow = partial(run_cli, env=ENV)


async def started(data: Path, images: Path, **overrides: object) -> Orchestrator:
    orch = Orchestrator(orchestrator_config(data, images, data.parent / "no-model", **overrides))
    await orch.start()
    return orch


def identity_of(data: Path) -> dict[str, object]:
    conn = sqlite3.connect(data / "state.db")
    try:
        (value,) = conn.execute("SELECT value FROM meta WHERE key=?", (META_KEY,)).fetchone()
    finally:
        conn.close()
    return dict(json.loads(value))


async def test_another_dataset_is_refused_and_force_moves_the_old_run_aside(
    tmp_path: Path, image_folder
) -> None:
    first = image_folder(4)[0].parent
    other = image_folder(3, seed=1, name="other")[0].parent
    data = tmp_path / "data"
    orch = await started(data, first)
    await orch.stop()
    assert identity_of(data) == {
        "type": "local_folder",
        "location": str(first.resolve()),
        "subset": None,
        "split": None,
        "revision": None,
    }
    before = (data / "state.db").read_bytes()

    with pytest.raises(StorageError) as refused:
        Orchestrator(orchestrator_config(data, other, tmp_path / "no-model"))
    message = str(refused.value)
    assert str(first.resolve()) in message and str(other.resolve()) in message
    assert "--data-dir" in message and "--force-new-dataset" in message
    assert (data / "state.db").read_bytes() == before, "a refused start changes nothing"

    # The same dataset by another spelling of its path is the same dataset.
    orch = await started(data, Path(os.path.relpath(first)) / ".")
    assert orch.snapshot()["items_total"] == 4
    await orch.stop()

    storage = orchestrator_config(data, other, tmp_path / "m").storage
    orch = await started(
        data, other, storage=storage.model_copy(update={"force_new_dataset": True})
    )
    try:
        assert orch.snapshot()["items_total"] == 3, "only the new dataset's items"
    finally:
        await orch.stop()
    assert identity_of(data)["location"] == str(other.resolve())
    (moved,) = (data / REPLACED_DIR).iterdir()
    assert identity_of(moved)["location"] == str(first.resolve()), "the old run is kept whole"


async def test_a_different_dataset_is_refused_on_the_command_line(
    tmp_path: Path, image_folder, tiny_model_dir: Path
) -> None:
    first = image_folder(2)[0].parent
    other = image_folder(2, seed=1, name="other")[0].parent
    data = tmp_path / "data"
    orch = await started(data, first)  # a data directory holding a run of ``first``
    await orch.stop()

    args = ["run", "--dataset", str(other), "--data-dir", str(data), "--model", str(tiny_model_dir)]
    done = await asyncio.to_thread(caption_flow, *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(first.resolve()) in done.stderr, done.stderr
    assert "--force-new-dataset" in done.stderr and "Traceback" not in done.stderr


async def test_a_second_orchestrator_on_a_locked_directory_is_refused(
    tmp_path: Path, image_folder
) -> None:
    images = image_folder(3)[0].parent
    data = tmp_path / "data"
    orch = await started(data, images)
    try:
        with pytest.raises(StorageError) as refused:
            Orchestrator(orchestrator_config(data, images, tmp_path / "no-model"))
        holder = f"pid {os.getpid()} on host "
        assert holder in str(refused.value) and f"port {orch.port}" in str(refused.value)

        config = tmp_path / "orchestrator.yaml"
        config.write_text(
            textwrap.dedent(f"""\
                orchestrator:
                  host: 127.0.0.1
                  port: 0
                  dataset: {{type: local_folder, path: {images}}}
                  storage: {{data_dir: {data}}}
                """)
        )
        done = caption_flow("orchestrator", "--config", str(config), cwd=tmp_path)
        assert done.returncode == 2, done.stderr[-2000:]
        assert holder in done.stderr and f"port {orch.port}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    finally:
        await orch.stop()
    # Stopped: the directory is free again.
    orch = await started(data, images)
    await orch.stop()


def test_a_lock_left_by_a_killed_process_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from caption_flow.storage.lock import DataDirLock\n"
            f"lock = DataDirLock.acquire(Path({str(data)!r}), port=4321)\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StorageError, match=f"pid {holder.pid} on host .*port 4321"):
            DataDirLock.acquire(data)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30 * TIME_UNIT)
    assert json.loads((data / LOCK_NAME).read_text())["pid"] == holder.pid, "left behind"

    caplog.set_level(logging.WARNING, logger="caption_flow")
    lock = DataDirLock.acquire(data, port=1)
    try:
        assert f"pid {holder.pid}" in caplog.text and "took over" in caplog.text
        assert json.loads((data / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


async def test_a_database_without_identity_adopts_the_dataset_of_its_next_start(
    tmp_path: Path, image_folder, caplog: pytest.LogCaptureFixture
) -> None:
    from caption_flow.storage.state import StateDB

    images = image_folder(3)[0].parent
    other = image_folder(2, seed=1, name="other")[0].parent
    data = tmp_path / "data"
    orch = await started(data, images)
    await orch.stop()
    db = StateDB(data / "state.db")  # as an earlier release left it: no identity recorded
    db.conn.execute("DELETE FROM meta WHERE key=?", (META_KEY,))
    db.close()

    caplog.set_level(logging.WARNING, logger="caption_flow")
    orch = await started(data, images)
    assert orch.snapshot()["items_total"] == 3
    await orch.stop()
    assert "records no dataset" in caplog.text and str(images.resolve()) in caplog.text
    assert identity_of(data)["location"] == str(images.resolve())
    with pytest.raises(StorageError, match="belongs to"):
        Orchestrator(orchestrator_config(data, other, tmp_path / "no-model"))
