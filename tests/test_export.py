"""Exports and stats against a real run's output (tiny model, real orchestrator and worker),
read back item by item and compared with the store."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from support import (
    TIME_UNIT,
    FakeHub,
    caption_all,
    eventually,
    orchestrator_config,
    read_rows,
    running,
    worker_config,
)

from caption_flow.cli.main import cli
from caption_flow.config.models import DatasetConfig, OrchestratorConfig, StorageConfig
from caption_flow.demo.tiny_model import generate_images
from caption_flow.errors import ConfigError
from caption_flow.export import Selection, WriterOptions, collect_stats, export
from caption_flow.export.reader import recorded_parts
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.sources.webdataset import WebDatasetSource
from caption_flow.storage import identity
from caption_flow.storage.parts import part_name
from caption_flow.storage.rows import JournalRecord, StoredItem, records_to_table
from caption_flow.storage.state import StateDB
from caption_flow.worker.client import Worker


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> OrchestratorConfig:
    """A finished run over 8 images, 2 of them in a subfolder; a part per chunk of 3."""
    base = tmp_path_factory.mktemp("export-run")
    images = base / "images"
    generate_images(images, 6)
    generate_images(images / "sub", 2, seed=1)
    data = base / "data"
    storage = StorageConfig(data_dir=data, compact_rows=3, compact_seconds=0.5, group_commit_ms=2)
    config = orchestrator_config(data, images, tiny_model_dir, chunk_size=3, storage=storage)
    asyncio.run(caption_all(config))
    return config


@pytest.fixture(scope="module")
def store(run: OrchestratorConfig) -> dict[tuple[str, str], dict[str, Any]]:
    rows = read_rows(run.storage.data_dir)
    assert len(rows) == 8
    return {(r["shard"], r["item_key"]): r for r in rows}


def ok_rows(store: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {k: r for k, r in store.items() if r["error"] is None}


def do_export(data_dir: Path, fmt: str, output: Path | None, **kw: Any) -> Any:
    selection = Selection(**{k: kw.pop(k) for k in list(kw) if k in Selection.__annotations__})
    return export(data_dir, fmt, selection, WriterOptions(output=output, **kw))


def test_parquet_round_trip_and_readers(
    run: OrchestratorConfig, store: dict, tmp_path: Path
) -> None:
    out = tmp_path / "pq"
    result = do_export(run.storage.data_dir, "parquet", out, rows_per_file=3)
    expected = ok_rows(store)
    assert expected, "the tiny model captioned nothing"
    files = sorted(out.glob("captions-*.parquet"))
    assert result.rows == len(expected) and files == result.files
    assert len(files) == -(-len(expected) // 3)
    schemas = {pq.read_schema(f) for f in files}
    assert len(schemas) == 1
    got = {(r["shard"], r["item_key"]): r for f in files for r in pq.read_table(f).to_pylist()}
    assert got == expected  # every column, item by item

    from datasets import load_dataset

    hf = load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    assert sorted((r["item_key"], tuple(r["captions"])) for r in hf) == sorted(
        (r["item_key"], tuple(r["captions"])) for r in expected.values()
    )
    n = duckdb.sql(f"SELECT count(DISTINCT item_key) FROM read_parquet('{out}/*.parquet')")
    assert n.fetchall()[0][0] == len(expected)
    import pandas as pd

    frame = pd.read_parquet(out)
    assert sorted(frame["item_key"]) == sorted(k for _, k in expected)

    with pytest.raises(ConfigError, match="--overwrite"):
        do_export(run.storage.data_dir, "parquet", out)
    assert do_export(run.storage.data_dir, "parquet", out, overwrite=True).rows == len(expected)
    assert len(list(out.glob("captions-*.parquet"))) == 1


def test_jsonl_round_trip_with_failed(run: OrchestratorConfig, store: dict, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = do_export(run.storage.data_dir, "jsonl", out, include_failed=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.rows == len(lines) == len(store)
    for line in lines:
        row = store[(line["shard"], line["item_key"])]
        assert line["captions"] == row["captions"]
        assert line["contributor_id"] == row["contributor_id"] == "alice"
        assert datetime.fromisoformat(line["timestamp"]) == row["timestamp"]


def folder_copy(run: OrchestratorConfig, tmp_path: Path) -> DatasetConfig:
    copy = tmp_path / "images"
    shutil.copytree(run.dataset.path, copy)
    return run.dataset.model_copy(update={"path": str(copy)})


def test_txt_beside_images_never_overwrites(
    run: OrchestratorConfig, store: dict, tmp_path: Path
) -> None:
    dataset = folder_copy(run, tmp_path)
    root = Path(dataset.path)
    result = do_export(run.storage.data_dir, "txt", None, dataset=dataset)
    expected = {k: r for k, r in ok_rows(store).items() if any(t.strip() for t in r["captions"])}
    assert result.rows == len(expected)
    for (_, key), row in expected.items():
        first = next(t for t in row["captions"] if t.strip())
        assert (root / key).with_suffix(".txt").read_text() == first + "\n"
    assert (root / "sub").is_dir() and any((root / "sub").glob("*.txt"))

    edited = (root / next(iter(expected))[1]).with_suffix(".txt")
    edited.write_text("by hand\n")
    again = do_export(run.storage.data_dir, "txt", None, dataset=dataset)
    assert again.rows == 0 and sum(again.skipped.values()) == len(expected)
    assert edited.read_text() == "by hand\n"
    forced = do_export(run.storage.data_dir, "txt", None, dataset=dataset, overwrite=True)
    assert forced.rows == len(expected) and edited.read_text() != "by hand\n"

    mirror = tmp_path / "mirror"
    do_export(run.storage.data_dir, "txt", mirror, dataset=dataset, caption="all")
    for (_, key), row in expected.items():
        joined = "\n\n".join(t for t in row["captions"] if t.strip())
        assert (mirror / key).with_suffix(".txt").read_text() == joined + "\n"


def read_tars(folder: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                key, ext = member.name.split(".", 1)
                data = archive.extractfile(member)
                assert data is not None
                samples.setdefault(key, {})[ext] = data.read()
    return samples


def test_webdataset_from_folder(run: OrchestratorConfig, store: dict, tmp_path: Path) -> None:
    out = tmp_path / "wds"
    result = do_export(run.storage.data_dir, "webdataset", out, shard_size=3, dataset=run.dataset)
    expected = ok_rows(store)
    assert result.rows == len(expected)
    assert len(list(out.glob("shard-*.tar"))) == -(-len(expected) // 3)
    samples = read_tars(out)
    assert len(samples) == len(expected)
    root = Path(run.dataset.path)
    for (_, key), row in expected.items():
        sample = samples[key.rsplit(".", 1)[0]]
        ext = key.rsplit(".", 1)[1]
        assert sample[ext] == (root / key).read_bytes()
        meta = json.loads(sample["json"])
        assert meta["item_key"] == key and meta["captions"] == row["captions"]
        assert sample["txt"].decode() == next((t for t in row["captions"] if t.strip()), "")
    # Our own reader takes the new shards as a dataset: the layout is webdataset's.
    source = WebDatasetSource(DatasetConfig(type="webdataset", path=str(out)))
    listed = [k for s in source.list_shards() for k in s.keys]
    assert sorted(listed) == sorted(samples)


def tar_store(tmp_path: Path) -> tuple[Path, dict[str, bytes], DatasetConfig]:
    """A tar dataset and a data directory holding its output, written as the store writes it:
    two recorded parts where one item appears twice (an older and a newer row), and one
    failed item."""
    images = {f"s{i:03d}": generate_images(tmp_path / "src", 3)[i].read_bytes() for i in range(3)}
    tar_path = tmp_path / "shards" / "data-000.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as archive:
        for key, data in images.items():
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    dataset = DatasetConfig(type="webdataset", path=str(tar_path))
    data = tmp_path / "data"
    db = StateDB(data / "state.db")
    identity.record(db, identity.DatasetIdentity.of(dataset))
    (data / "captions").mkdir()

    def part(seq: int, when: float, items: list[StoredItem]) -> None:
        record = JournalRecord("d", str(tar_path), "c0", "m", "alice", "w", when, items)
        table = records_to_table([record], ["captions"])
        pq.write_table(table, data / "captions" / part_name(seq))
        db.adopt_part(part_name(seq), table.num_rows)

    def ok(i: int, text: str) -> StoredItem:
        return StoredItem(item_id=i, key=f"s{i:03d}", outputs={"captions": [f"{text} s{i:03d}"]})

    part(0, 1000.0, [ok(0, "old"), ok(1, "old")])
    part(1, 2000.0, [ok(1, "new"), StoredItem(item_id=2, key="s002", error="decode failed")])
    db.close()
    return data, images, dataset


def test_webdataset_from_tars_keeps_latest_row(tmp_path: Path) -> None:
    data, images, _ = tar_store(tmp_path)
    out = tmp_path / "wds"
    # The dataset comes from state.db's record; failed rows stay out unless asked for.
    assert do_export(data, "webdataset", tmp_path / "ok").rows == 2
    assert sorted(read_tars(tmp_path / "ok")) == ["s000", "s001"]
    result = do_export(data, "webdataset", out, include_failed=True)
    assert result.rows == 3
    samples = read_tars(out)
    assert {k: s["jpg"] for k, s in samples.items()} == images
    assert samples["s001"]["txt"] == b"new s001" and samples["s000"]["txt"] == b"old s000"
    assert json.loads(samples["s002"]["json"])["error"] == "decode failed"
    txt = do_export(data, "txt", tmp_path / "txt")
    assert txt.rows == 2
    assert (tmp_path / "txt" / "data-000" / "s001.txt").read_text() == "new s001\n"


def test_filters(run: OrchestratorConfig, store: dict, tmp_path: Path) -> None:
    data = run.storage.data_dir
    ok = ok_rows(store)

    def keys(**kw: Any) -> list[str]:
        out = tmp_path / f"f{time.monotonic_ns()}.jsonl"
        do_export(data, "jsonl", out, **kw)
        return sorted(json.loads(line)["item_key"] for line in out.read_text().splitlines())

    longest = max(len(r["captions"][0]) for r in ok.values())
    assert keys(where=f"len(captions[1]) >= {longest}") == sorted(
        k for (_, k), r in ok.items() if len(r["captions"][0]) >= longest
    )
    assert keys(where="item_key LIKE 'sub/%'") == sorted(k for (_, k) in ok if k.startswith("sub/"))
    assert len(keys(limit=2)) == 2
    assert keys(contributors=("bob",)) == []
    assert keys(contributors=("alice",)) == sorted(k for _, k in ok)
    assert keys(since=datetime(2100, 1, 1, tzinfo=UTC)) == []
    assert len(keys(since=datetime(2000, 1, 1, tzinfo=UTC))) == len(ok)
    with pytest.raises(ConfigError, match="no output field 'tags'"):
        keys(fields=("tags",))
    with pytest.raises(ConfigError, match="--where"):
        keys(where="no_such_column > 1")


def test_stats_match_the_store(run: OrchestratorConfig, store: dict) -> None:
    stats = collect_stats(run.storage.data_dir)
    failed = [r for r in store.values() if r["error"] is not None]
    assert (stats["items_total"], stats["items_done"], stats["rows"]) == (8, 8, 8)
    assert stats["rows_failed"] == len(failed)
    assert stats["contributors"] == [{"contributor": "alice", "rows": 8, "failed": len(failed)}]
    prompts = stats["captions"]["captions"]
    assert [p["prompt"] for p in prompts] == [1, 2]
    for p in prompts:
        texts = [r["captions"][p["prompt"] - 1].strip() for r in ok_rows(store).values()]
        lengths = sorted(len(t) for t in texts if t)
        assert p["texts"] == len(lengths) and p["empty"] == len(texts) - len(lengths)
        if lengths:
            assert (p["min"], p["max"]) == (lengths[0], lengths[-1])
    cli_out = CliRunner().invoke(cli, ["stats", "--data-dir", str(run.storage.data_dir), "--json"])
    assert cli_out.exit_code == 0, cli_out.output
    assert json.loads(cli_out.output) == json.loads(json.dumps(stats))


def test_cli_export(run: OrchestratorConfig, store: dict, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["export", "--data-dir", str(run.storage.data_dir), "--format", "parquet"]
    done = CliRunner().invoke(
        cli, [*args, "--output", str(out), "--fields", "captions", "--limit", "3"]
    )
    assert done.exit_code == 0, done.output
    table = pq.read_table(out / "captions-00000.parquet")
    assert table.num_rows == min(3, len(ok_rows(store)))
    bad = CliRunner().invoke(cli, [*args, "--output", str(out), "--since", "yesterday"])
    assert bad.exit_code != 0


async def test_export_while_a_worker_captions(tmp_path: Path, tiny_model_dir: Path) -> None:
    images = tmp_path / "images"
    generate_images(images, 40, size=(64, 48))
    data = tmp_path / "data"
    storage = StorageConfig(data_dir=data, compact_rows=2, compact_seconds=0.2, group_commit_ms=2)
    config = orchestrator_config(data, images, tiny_model_dir, chunk_size=2, storage=storage)
    orch = Orchestrator(config)
    await orch.start()
    exports: list[list[str]] = []
    try:
        worker = Worker(worker_config(orch.port))
        task = asyncio.create_task(worker.run())
        await eventually(lambda: (data / "state.db").exists(), 30, "state.db")
        while not task.done():
            out = tmp_path / f"e{len(exports)}.jsonl"
            committed = await asyncio.to_thread(lambda: len(recorded_parts(data)))
            if committed:
                await asyncio.to_thread(do_export, data, "jsonl", out, include_failed=True)
                exports.append([json.loads(x)["item_key"] for x in out.read_text().splitlines()])
            await asyncio.sleep(0.05)
        await asyncio.wait_for(task, 120 * TIME_UNIT)
    finally:
        await orch.stop()
    final = {r["item_key"]: r for r in read_rows(data)}
    assert len(final) == 40
    partial = [e for e in exports if 0 < len(e) < 40]
    assert partial, f"no export caught the run midway ({[len(e) for e in exports]})"
    for keys in exports:
        assert len(keys) == len(set(keys)), "an item exported twice"
        assert set(keys) <= set(final)
    sizes = [len(e) for e in exports]
    assert sizes == sorted(sizes), "an export lost items an earlier one had"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The stand-in hub; the tests run offline for the real hub, so offline mode is lifted
    for this loopback endpoint only (a library setting, nothing of ours)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as fake:
        yield fake


def test_push_to_hub_card_and_resume(
    run: OrchestratorConfig, store: dict, tmp_path: Path, hub: FakeHub
) -> None:
    from caption_flow.export.hub import PushError, push

    data = run.storage.data_dir
    staging = tmp_path / "staging"
    kw: dict[str, Any] = {"token": "t", "endpoint": hub.endpoint, "rows_per_file": 2}
    hub.fail_commits_after = 1  # the hub fails after the first shard
    with pytest.raises(PushError, match="run the same command again"):
        push(data, "org/caps", staging, Selection(), private=True, config=run, **kw)
    shards = sorted(staging.glob("captions-*.parquet"))
    expected = ok_rows(store)
    assert len(shards) == -(-len(expected) // 2) > 1
    assert len(hub.repos["org/caps"]) == 1 and hub.private["org/caps"]

    hub.fail_commits_after = None
    result = push(data, "org/caps", staging, Selection(), license_id="cc-by-4.0", config=run, **kw)
    files = hub.repos["org/caps"]
    assert len(result.already_there) == 1 and len(result.uploaded) == len(shards) - 1
    assert sorted(n for n in files if n.startswith("data/")) == [f"data/{p.name}" for p in shards]
    for path in shards:
        assert files[f"data/{path.name}"] == path.read_bytes()
    pushed = [r for p in shards for r in pq.read_table(p).to_pylist()]
    assert {(r["shard"], r["item_key"]): r for r in pushed} == expected
    card = files["README.md"].decode()
    assert "license: cc-by-4.0" in card and "path: data/*.parquet" in card
    assert run.vllm.model in card and all(p in card for p in run.vllm.inference_prompts)
    assert "| alice | 8 |" in card

    commits = len(hub.commits)
    again = push(data, "org/caps", staging, Selection(), config=run, **kw)
    assert again.uploaded == [] and len(hub.commits) == commits + 1  # the card only

    smaller = push(data, "org/caps", tmp_path / "s2", Selection(limit=1), config=run, **kw)
    assert len(smaller.removed) == len(shards)  # an earlier export's shards are taken out
    assert [n for n in hub.repos["org/caps"] if n.startswith("data/")] == smaller.uploaded


def test_publish_to_a_path_resumes_and_follows_repairs(tmp_path: Path) -> None:
    from caption_flow.export.publish import Publisher

    data, _, _ = tar_store(tmp_path)
    (data / "contributors.parquet").write_bytes(b"table v1")
    target = tmp_path / "mirror"
    publisher = Publisher(data, str(target), every_s=3600)
    first = publisher.publish_once()
    parts = sorted(p.name for p in (data / "captions").glob("part-*.parquet"))
    assert first.copied == sorted([*(f"captions/{n}" for n in parts), "contributors.parquet"])
    for name in first.copied:
        assert (target / name).read_bytes() == (data / name).read_bytes()
    # A new publisher (a restart) finds everything there: nothing is sent again.
    restarted = Publisher(data, str(target), every_s=3600)
    restarted._tables = dict(publisher._tables)
    assert restarted.publish_once().copied == []
    # A repair replaces part 0 (as `requeue` does: intend the new part, then swap).
    db = StateDB(data / "state.db")
    new = db.intend_part(part_name)
    shutil.copy(data / "captions" / parts[0], data / "captions" / new)
    db.swap_part(parts[0], new, 2, [])
    db.close()
    round3 = restarted.publish_once()
    assert round3.copied == [f"captions/{new}"]
    assert round3.removed == [f"captions/{parts[0]}"] and not (target / round3.removed[0]).exists()


def test_cli_publish_once(run: OrchestratorConfig, tmp_path: Path) -> None:
    args = ["publish", "--data-dir", str(run.storage.data_dir), "--to", str(tmp_path / "b")]
    done = CliRunner().invoke(cli, [*args, "--once"])
    assert done.exit_code == 0, done.output
    parts = recorded_parts(run.storage.data_dir)
    assert sorted(p.name for p in (tmp_path / "b" / "captions").iterdir()) == [
        p.name for p in parts
    ]
    copies = list((tmp_path / "b" / "captions").iterdir())
    before = {p: p.stat().st_mtime_ns for p in copies}
    # A new process sends no part again (only the two small tables, whose state it lacks).
    assert CliRunner().invoke(cli, [*args, "--once"]).exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in copies} == before


def test_publish_to_hub_retries_until_it_succeeds(tmp_path: Path, hub: FakeHub) -> None:
    from caption_flow.export.publish import Publisher

    data, _, _ = tar_store(tmp_path)
    publisher = Publisher(
        data, "huggingface", repo="org/live", every_s=0.05, token="t", endpoint=hub.endpoint
    )
    hub.fail_commits_after = 0  # the hub refuses every commit at first
    publisher.start()
    try:
        time.sleep(0.3 * TIME_UNIT)
        assert publisher.failures > 0 and hub.repos["org/live"] == {}
        hub.fail_commits_after = None
        deadline = time.monotonic() + 20 * TIME_UNIT
        while len(hub.repos["org/live"]) < 2:
            assert time.monotonic() < deadline, "the publisher never caught up"
            time.sleep(0.02)
    finally:
        publisher.stop()
    parts = sorted(p.name for p in (data / "captions").glob("part-*.parquet"))
    assert sorted(hub.repos["org/live"]) == [f"captions/{n}" for n in parts]
    assert all(
        hub.repos["org/live"][f"captions/{n}"] == (data / "captions" / n).read_bytes()
        for n in parts
    )


class _JsonEngine:
    """Answers JSON for even-sized images, plain text otherwise (a stand-in for a model
    with an output_schema: what matters here is how the export writes the text)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def generate(self, requests: Any, sampling: Any) -> list[Any]:
        from caption_flow.engines.base import Generation

        return [
            Generation(
                json.dumps({"w": r.image.width, "tags": ["a", "b"]})
                if r.image.width % 2 == 0
                else "plain words"
            )
            for r in requests
        ]

    def close(self) -> None:
        pass


async def test_jsonl_writes_json_captions_as_parsed_values(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from caption_flow.engines.captioner import Captioner

    images = generate_images(tmp_path / "images", 6)
    config = orchestrator_config(tmp_path / "data", images[0].parent, tiny_model_dir)
    async with running(config) as orch:
        captioner = Captioner("transformers", loader=lambda kind, spec: _JsonEngine(spec))
        worker = Worker(worker_config(orch.port), captioner)
        await asyncio.wait_for(worker.run(), 60 * TIME_UNIT)
    stored = {r["item_key"]: r["captions"] for r in read_rows(tmp_path / "data")}
    texts = [t for captions in stored.values() for t in captions]
    assert any(t.startswith("{") for t in texts)
    assert "plain words" in texts, "the images' widths were all even"

    out = tmp_path / "out.jsonl"
    do_export(tmp_path / "data", "jsonl", out, json_fields=("captions",))
    for line in (json.loads(x) for x in out.read_text().splitlines()):
        # JSON text becomes the object it spells; anything else stays the string it was.
        expected = [json.loads(t) if t.startswith("{") else t for t in stored[line["item_key"]]]
        assert line["captions"] == expected

    runner = CliRunner()
    cli_out = tmp_path / "cli.jsonl"
    result = runner.invoke(
        cli,
        [
            "export",
            "--data-dir",
            str(tmp_path / "data"),
            "--format",
            "jsonl",
            "--output",
            str(cli_out),
            "--json-fields",
            "captions",
        ],
    )
    assert result.exit_code == 0, result.output
    assert cli_out.read_text() == out.read_text()
