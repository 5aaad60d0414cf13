"""``caption-flow scan-chunks``: a data directory checked against its Parquet parts, and
repaired with ``--fix`` without losing a caption.

One real run (8 images, three parts) per module; each case damages its own copy of it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from support import TIME_UNIT, caption_all, orchestrator_config, read_rows, run_cli

from caption_flow.cli.main import cli
from caption_flow.config.models import OrchestratorConfig, StorageConfig
from caption_flow.demo.tiny_model import generate_images
from caption_flow.storage.rows import JournalRecord, StoredItem, encode_record
from caption_flow.storage.state import id_runs

pytestmark = pytest.mark.timeout(120)

PARTS = ("part-00000001.parquet", "part-00000002.parquet", "part-00000003.parquet")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> OrchestratorConfig:
    """A finished run: 8 images in chunks of 3, a part per chunk (``compact_rows=3``)."""
    base = tmp_path_factory.mktemp("scan-run")
    images = generate_images(base / "images", 8)[0].parent
    data = base / "data"
    storage = StorageConfig(data_dir=data, compact_rows=3, compact_seconds=0.5, group_commit_ms=2)
    config = orchestrator_config(data, images, tiny_model_dir, chunk_size=3, storage=storage)
    asyncio.run(caption_all(config))
    assert sorted(p.name for p in (data / "captions").glob("*.parquet")) == list(PARTS)
    return config


@pytest.fixture
def data(run: OrchestratorConfig, tmp_path: Path) -> Path:
    """This test's own copy of the finished run."""
    copy = tmp_path / "data"
    shutil.copytree(run.storage.data_dir, copy)
    return copy


def captions(data_dir: Path) -> set[tuple[str, tuple[str, ...]]]:
    return {(r["item_key"], tuple(r["captions"])) for r in read_rows(data_dir)}


def db(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(data_dir / "state.db", isolation_level=None)


def done_flags(data_dir: Path) -> dict[str, int]:
    with db(data_dir) as conn:
        return dict(conn.execute("SELECT key, done FROM items").fetchall())


@pytest.fixture
def logging_kept() -> Iterator[None]:
    """The command sets up logging for a process; give the test session its own back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in ("caption_flow", "caption_flow.cli")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def scan_chunks(data_dir: Path, *args: str) -> tuple[int, str]:
    """``caption-flow scan-chunks`` in this process: (exit code, output)."""
    config = data_dir.parent / "empty.yaml"
    config.write_text("orchestrator: {}\n")
    argv = ["scan-chunks", "--config", str(config), "--data-dir", str(data_dir), *args]
    result = CliRunner().invoke(cli, argv, env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


caption_flow = run_cli


def summary(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("scan-chunks"))


def test_a_finished_run_is_clean_with_the_original_command_line(data: Path) -> None:
    before = captions(data)
    (data.parent / "config").mkdir()
    (data.parent / "config" / "orchestrator.yaml").write_text(
        f"orchestrator:\n  storage:\n    data_dir: {data}\n"
    )
    scanned = caption_flow("scan-chunks", cwd=data.parent)  # data dir from config/*.yaml
    assert scanned.returncode == 0, scanned.stdout + scanned.stderr
    assert "scan-chunks: clean" in scanned.stdout
    fixed = caption_flow(
        "scan-chunks", "--data-dir", str(data), "--checkpoint-dir", "./checkpoints", "--fix",
        cwd=data.parent,
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "nothing repaired; now clean" in fixed.stdout
    assert "--checkpoint-dir ./checkpoints ignored" in fixed.stderr
    assert "state.db" in fixed.stderr
    assert captions(data) == before and len(before) == 8
    assert not (data / "checkpoints").exists() and not (data.parent / "checkpoints").exists()


def test_a_deleted_part_requeues_its_items_and_the_next_run_restores_them(
    run: OrchestratorConfig, data: Path, logging_kept: None
) -> None:
    before = captions(data)
    gone = {r["item_key"] for r in pq.read_table(data / "captions" / PARTS[1]).to_pylist()}
    (data / "captions" / PARTS[1]).unlink()

    code, output = scan_chunks(data)
    assert code == 1
    assert "part-missing (1)" in summary(output) and "item-without-row (3)" in summary(output)
    assert PARTS[1] in output

    code, output = scan_chunks(data, "--fix")
    assert code == 0, output
    assert "now clean" in summary(output)
    flags = done_flags(data)
    assert {k for k, done in flags.items() if not done} == gone  # re-queued: captions gone
    assert captions(data) == {c for c in before if c[0] not in gone}  # the rest untouched
    with db(data) as conn:
        assert conn.execute("SELECT COUNT(*) FROM chunks WHERE status='pending'").fetchone() == (1,)
        assert PARTS[1] not in {r[0] for r in conn.execute("SELECT name FROM parts")}

    storage = run.storage.model_copy(update={"data_dir": data})
    asyncio.run(caption_all(run.model_copy(update={"storage": storage})))
    rows = read_rows(data)
    assert collections.Counter(r["item_key"] for r in rows) == {k: 1 for k in flags}
    assert all(done_flags(data).values())
    assert scan_chunks(data)[0] == 0


def test_a_recorded_duplicate_part_is_rewritten_keeping_every_caption(
    data: Path, logging_kept: None
) -> None:
    before = captions(data)
    folder = data / "captions"
    # A part holding part 1's rows again, then part 3's: recorded, and part 3 forgotten.
    both = pa.concat_tables([pq.read_table(folder / PARTS[0]), pq.read_table(folder / PARTS[2])])
    pq.write_table(both, folder / "part-00000009.parquet")
    (folder / PARTS[2]).unlink()
    with db(data) as conn:
        conn.execute(f"DELETE FROM parts WHERE name='{PARTS[2]}'")
        conn.execute("INSERT INTO parts VALUES('part-00000009.parquet', 5, 0, 'recorded', 9)")

    code, output = scan_chunks(data)
    assert code == 1 and "row-duplicate (3)" in summary(output), output

    code, output = scan_chunks(data, "--fix")
    assert code == 0 and "now clean" in summary(output), output
    assert "row-duplicate (3)" in summary(output)
    rows = read_rows(data)
    assert len(rows) == 8 and captions(data) == before
    assert not (folder / "part-00000009.parquet").exists()  # replaced by its rewrite
    assert pq.read_table(folder / "part-00000010.parquet").num_rows == 2  # part 3's rows


def test_an_unrecorded_copy_of_a_part_is_moved_aside(data: Path, logging_kept: None) -> None:
    before = captions(data)
    folder = data / "captions"
    shutil.copy(folder / PARTS[0], folder / "part-00000009.parquet")

    code, output = scan_chunks(data)
    assert code == 1 and "part-unrecorded (1)" in summary(output), output
    assert "part-00000009.parquet: moved aside, its rows are already in the output" in output

    code, output = scan_chunks(data, "--fix")
    assert code == 0 and "now clean" in summary(output), output
    assert (folder / "unrecognised" / "part-00000009.parquet").exists()  # kept, not output
    assert captions(data) == before and len(read_rows(data)) == 8


def test_an_unrecorded_part_of_done_items_is_recorded(data: Path, logging_kept: None) -> None:
    before = captions(data)
    with db(data) as conn:
        conn.execute(f"DELETE FROM parts WHERE name='{PARTS[2]}'")

    code, output = scan_chunks(data)
    assert code == 1, output
    assert "part-unrecorded (1)" in summary(output) and "item-without-row (2)" in summary(output)
    assert f"{PARTS[2]}: can be recorded" in output

    code, output = scan_chunks(data, "--fix")
    assert code == 0 and "now clean" in summary(output), output
    assert all(done_flags(data).values())  # nothing re-queued: the rows were there
    assert captions(data) == before
    with db(data) as conn:
        recorded = conn.execute("SELECT state, seq FROM parts WHERE name=?", (PARTS[2],))
        assert recorded.fetchone() == ("recorded", 3)


def test_a_stale_lease_is_put_back(data: Path, logging_kept: None) -> None:
    before = captions(data)
    with db(data) as conn:
        conn.execute(
            "UPDATE chunks SET status='leased', holder='alice/worker-alice', deadline=1 "
            "WHERE chunk_id=(SELECT MIN(chunk_id) FROM chunks)"
        )
    code, output = scan_chunks(data)
    assert code == 1 and "lease-stale (1)" in summary(output), output
    assert "alice/worker-alice" in output

    code, output = scan_chunks(data, "--fix")
    assert code == 0 and "now clean" in summary(output), output
    with db(data) as conn:  # back to pending, then done: every item of it is done
        chunks = conn.execute("SELECT status, holder, deadline FROM chunks").fetchall()
    assert chunks == [("done", None, None)] * 3
    assert captions(data) == before


def test_leftovers_of_an_interrupted_write_are_removed(data: Path, logging_kept: None) -> None:
    """A part written but not recorded (its rows are still elsewhere), and a temporary file."""
    before = captions(data)
    folder = data / "captions"
    shutil.copy(folder / PARTS[0], folder / "part-00000004.parquet")
    (folder / ".part-00000005.parquet.tmp").write_bytes(b"half a part")
    with db(data) as conn:
        conn.execute("INSERT INTO parts VALUES('part-00000004.parquet', 0, 0, 'intended', 4)")

    code, output = scan_chunks(data)
    assert code == 1 and "part-intended (1)" in summary(output), output
    assert "tmp-file" in output and "row-duplicate" not in output  # not output yet

    code, output = scan_chunks(data, "--fix")
    assert code == 0 and "now clean" in summary(output), output
    assert sorted(p.name for p in folder.iterdir()) == list(PARTS)
    assert captions(data) == before


def test_a_journal_left_behind_is_compacted(data: Path, logging_kept: None) -> None:
    """Rows that a stopped orchestrator had not compacted yet: information, not a problem."""
    before = captions(data)
    folder = data / "captions"
    rows = pq.read_table(folder / PARTS[2]).to_pylist()
    (folder / PARTS[2]).unlink()
    with db(data) as conn:
        ids = {k: i for k, i in conn.execute("SELECT key, item_id FROM items")}
        items = [
            StoredItem(ids[r["item_key"]], r["item_key"], {"captions": r["captions"]}) for r in rows
        ]
        record = JournalRecord(
            "test", rows[0]["shard"], rows[0]["chunk_id"], "m", "alice", "w", time.time(), items
        )
        item_ids = [i.item_id for i in items]
        assert len(id_runs(item_ids)) == 1
        conn.execute(f"DELETE FROM parts WHERE name='{PARTS[2]}'")
        conn.execute(
            "INSERT INTO journal(items, record, chunk_id, item_ids) VALUES(?,?,?,?)",
            (
                len(items),
                encode_record(record),
                rows[0]["chunk_id"],
                msgspec.msgpack.encode(item_ids),
            ),
        )

    code, output = scan_chunks(data)
    assert code == 0, output  # nothing is wrong: the next start compacts it
    assert "clean (for information: journal (2))" in summary(output)

    code, output = scan_chunks(data, "--fix")
    assert code == 0 and "journal (2)" in summary(output) and "now clean" in summary(output)
    with db(data) as conn:
        assert conn.execute("SELECT COUNT(*) FROM journal").fetchone() == (0,)
    assert captions(data) == before


def test_a_damaged_part_is_reported_and_left_alone(data: Path, logging_kept: None) -> None:
    part = data / "captions" / PARTS[1]
    damaged = part.read_bytes()[: part.stat().st_size // 2]
    part.write_bytes(damaged)

    code, output = scan_chunks(data)
    assert code == 1 and "part-damaged (1)" in summary(output), output
    assert f"{PARTS[1]}: " in output

    code, output = scan_chunks(data, "--fix")
    assert code == 1, output
    assert "not repaired: 3 item(s) without a row not re-queued" in output
    assert part.read_bytes() == damaged
    assert all(done_flags(data).values())  # its items are not taken for lost


def test_a_damaged_database_is_reported_and_left_alone(data: Path, logging_kept: None) -> None:
    state = data / "state.db"
    garbage = b"this is not a database" * 300
    state.write_bytes(garbage)
    for suffix in ("-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    for args in ((), ("--fix",)):
        code, output = scan_chunks(data, *args)
        assert code == 1 and "database-damaged" in summary(output), output
    assert state.read_bytes() == garbage


def test_fix_is_refused_while_an_orchestrator_holds_the_directory(
    data: Path, logging_kept: None
) -> None:
    stray = data / "captions" / "part-00000009.parquet"
    shutil.copy(data / "captions" / PARTS[0], stray)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path\n"
            "from caption_flow.storage.lock import DataDirLock\n"
            "lock = DataDirLock.acquire(Path(sys.argv[1]), port=4321)\n"
            "print('locked', flush=True); time.sleep(600)",
            str(data),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"  # bounded by the test's timeout
        refused = caption_flow("scan-chunks", "--data-dir", str(data), "--fix", cwd=data.parent)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "--fix refused" in refused.stderr and f"pid {holder.pid}" in refused.stderr
        assert stray.exists()  # nothing was repaired

        # Without --fix the scan runs beside it, and says the report may be moving.
        scanned = caption_flow("scan-chunks", "--data-dir", str(data), cwd=data.parent)
        assert scanned.returncode == 1, scanned.stdout + scanned.stderr
        assert "part-unrecorded (1)" in summary(scanned.stdout)
        assert f"pid {holder.pid}" in scanned.stdout and "may be moving" in scanned.stdout
    finally:
        holder.kill()
        holder.wait(10 * TIME_UNIT)
    code, output = scan_chunks(data, "--fix")  # the kernel dropped the dead holder's lock
    assert code == 0 and "now clean" in summary(output), output
    assert not stray.exists()
