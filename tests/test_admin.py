"""Admin commands against a real orchestrator on 127.0.0.1: tokens, config reloads, live job
changes reaching a real worker, and the leaderboard against the stored rows.

The CLI runs through click's CliRunner on a thread (it runs its own event loop), the
orchestrator on the test's loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import support
import yaml
from click.testing import CliRunner, Result
from support import (
    ADMIN_TOKEN,
    WORKER_TOKENS,
    close_code,
    eventually,
    orchestrator_config,
    raw_hello,
    read_rows,
    running,
    worker_config,
)

from caption_flow.cli.admin import client_config, request
from caption_flow.cli.main import cli
from caption_flow.config.models import AuthConfig, TokenEntry
from caption_flow.errors import ConfigError
from caption_flow.orchestrator.server import Orchestrator
from caption_flow.protocol.messages import AdminResult, ConfigUpdate, ReloadConfig, Welcome, decode
from caption_flow.worker.client import Worker


async def run_cli(port: int, *args: str, token: str = ADMIN_TOKEN) -> Result:
    argv = [*args, "--server", f"ws://127.0.0.1:{port}", "--token", token]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv)


async def welcomed(port: int, role: str, token: str) -> Any:
    ws = await raw_hello(port, role, token)
    async with asyncio.timeout(10 * support.TIME_UNIT):
        assert isinstance(decode(await ws.recv()), Welcome)
    return ws


async def test_tokens_added_revoked_and_kept_across_a_restart(
    tmp_path: Path, image_folder: Any
) -> None:
    image_folder(5)
    config = orchestrator_config(tmp_path / "data", tmp_path / "images", tmp_path / "no-model")
    async with running(config) as orch:
        added = await run_cli(
            orch.port, "admin", "tokens", "add", "--role", "worker", "--name", "carol"
        )
        assert added.exit_code == 0, added.output
        carol_token = added.stdout.strip().splitlines()[-1]
        carol = await welcomed(orch.port, "worker", carol_token)
        alice = await welcomed(orch.port, "worker", WORKER_TOKENS["alice"])

        revoked = await run_cli(orch.port, "admin", "tokens", "revoke", "--name", "carol")
        assert revoked.exit_code == 0, revoked.output
        assert await close_code(carol, 10) == 4001, "a revoked token's session is closed at once"
        assert await close_code(await raw_hello(orch.port, "worker", carol_token), 10) == 4001
        assert alice.close_code is None, "other sessions go on"
        unknown = await run_cli(orch.port, "admin", "tokens", "revoke", "--name", "nobody")
        assert unknown.exit_code != 0 and "no token named 'nobody'" in str(unknown.exception)
        # A config token can be revoked too.
        assert (
            await run_cli(orch.port, "admin", "tokens", "revoke", "--name", "bob")
        ).exit_code == 0
        dave = await run_cli(
            orch.port, "admin", "tokens", "add", "--role", "monitor", "--name", "dave"
        )
        dave_token = dave.stdout.strip().splitlines()[-1]

        # Tokens from a file (the admin section; the monitor section's for status).
        conf = tmp_path / "monitor.yaml"
        conf.write_text(
            yaml.safe_dump(
                {
                    "monitor": {"server": f"ws://127.0.0.1:{orch.port}", "token": "wrong"},
                    "admin": {"token": ADMIN_TOKEN},
                }
            )
        )
        listed = await asyncio.to_thread(
            CliRunner().invoke, cli, ["admin", "tokens", "list", "--json", "--config", str(conf)]
        )
        assert listed.exit_code == 0, listed.output
        shown = {
            (t["role"], t["name"]): (t["source"], t["revoked"]) for t in json.loads(listed.stdout)
        }
        assert shown[("worker", "carol")] == ("db", True)
        assert shown[("worker", "bob")] == ("config", True)
        assert shown[("worker", "alice")] == ("config", False)
        assert shown[("monitor", "dave")] == ("db", False)
        assert carol_token not in listed.output and dave_token not in listed.output
        await alice.close()

    with sqlite3.connect(tmp_path / "data" / "state.db") as db:
        stored = dict(db.execute("SELECT name, token_hash FROM tokens WHERE source='db'"))
    assert stored["dave"] == "sha256:" + hashlib.sha256(dave_token.encode()).hexdigest()
    assert all(carol_token not in h and dave_token not in h for h in stored.values())

    again = Orchestrator(config)  # a restart: the database's tokens and revocations hold
    await again.start()
    try:
        await (await welcomed(again.port, "monitor", dave_token)).close()
        await (await welcomed(again.port, "worker", WORKER_TOKENS["alice"])).close()
        assert await close_code(await raw_hello(again.port, "worker", carol_token), 10) == 4001
        bob = await raw_hello(again.port, "worker", WORKER_TOKENS["bob"])
        assert await close_code(bob, 10) == 4001
    finally:
        await again.stop()


def _running_section(orch: Orchestrator) -> dict[str, Any]:
    section = orch.config.model_dump(mode="json")
    section.pop("auth")
    return section


async def test_reload_config_applies_live_keys_and_refuses_invalid_files(
    tmp_path: Path, image_folder: Any
) -> None:
    image_folder(5)
    config = orchestrator_config(tmp_path / "data", tmp_path / "images", tmp_path / "no-model")
    async with running(config) as orch:
        worker = await welcomed(orch.port, "worker", WORKER_TOKENS["alice"])
        bob = await welcomed(orch.port, "worker", WORKER_TOKENS["bob"])
        job_before = orch.job

        bad = tmp_path / "bad.yaml"
        bad.write_text(
            yaml.safe_dump({"orchestrator": {**_running_section(orch), "chunk_size": 0}})
        )
        refused = await run_cli(orch.port, "admin", "reload-config", str(bad))
        assert refused.exit_code != 0 and isinstance(refused.exception, ConfigError)
        assert "chunk_size" in str(refused.exception)
        # The orchestrator checks too, whatever a client checked: nothing changes.
        client = client_config(None, f"ws://127.0.0.1:{orch.port}", ADMIN_TOKEN, False)
        section = {**_running_section(orch), "vllm": {"inference_prompts": []}}
        answer = await request(client, "admin", ReloadConfig(config=section))
        assert isinstance(answer, AdminResult) and not answer.ok
        assert "nothing changed" in answer.message and "inference_prompts" in answer.message
        assert orch.job is job_before and orch.config.chunk_size == 5

        good = _running_section(orch)
        good["chunk_size"] = 7
        good["vllm"]["inference_prompts"] = ["one prompt"]
        good["lease_seconds"] = 99.0
        good["storage"]["compact_rows"] = 123
        path = tmp_path / "orchestrator.yaml"
        path.write_text(yaml.safe_dump({"orchestrator": good}))
        done = await run_cli(orch.port, "admin", "reload-config", str(path))
        assert done.exit_code == 0, done.output
        assert "changed: vllm.inference_prompts" in done.output
        assert "needs a restart: chunk_size, lease_seconds, storage" in done.output
        assert orch.config.chunk_size == 5 and orch.job.inference_prompts == ["one prompt"]
        assert orch.config.lease_seconds != 99.0 and orch.config.storage.compact_rows != 123
        async with asyncio.timeout(10 * support.TIME_UNIT):  # pushed to the connected worker
            while not isinstance(update := decode(await worker.recv()), ConfigUpdate):
                pass
        assert update.config["vllm"]["inference_prompts"] == ["one prompt"]
        # No auth section in the file: the running tokens stay (the original tool lost them).
        await (await welcomed(orch.port, "worker", WORKER_TOKENS["alice"])).close()
        assert bob.close_code is None

        # An auth section is applied: bob's token is gone, so is his session.
        auth = AuthConfig(
            worker_tokens=[TokenEntry(name="alice", token=WORKER_TOKENS["alice"])],
            admin_tokens=[TokenEntry(name="root", token=ADMIN_TOKEN)],
        )
        path.write_text(yaml.safe_dump({"orchestrator": {**good, "auth": auth.model_dump()}}))
        done = await run_cli(orch.port, "admin", "reload-config", str(path))
        assert done.exit_code == 0 and "auth.worker_tokens" in done.output, done.output
        assert await close_code(bob, 10) == 4001
        assert worker.close_code is None
        await worker.close()


async def test_set_prompt_reaches_a_running_worker_and_the_leaderboard_counts_rows(
    tmp_path: Path, image_folder: Any, tiny_model_dir: Path
) -> None:
    image_folder(40)
    config = orchestrator_config(tmp_path / "data", tmp_path / "images", tiny_model_dir)
    async with running(config) as orch:
        workers = [Worker(worker_config(orch.port, n)) for n in ("alice", "bob")]
        runs = asyncio.gather(*(w.run() for w in workers))
        await eventually(lambda: orch.book is not None and orch.book.items_done >= 4, 60, "results")
        changed = await run_cli(orch.port, "admin", "set-prompt", "one prompt only")
        assert changed.exit_code == 0, changed.output
        await asyncio.wait_for(runs, 120 * support.TIME_UNIT)
        await eventually(lambda: len(read_rows(config.storage.data_dir)) == 40, 30, "compaction")
        rows = read_rows(config.storage.data_dir)
        rows.sort(key=lambda r: r["timestamp"])
        assert len(rows[0]["captions"]) == 2, "the first results were made with two prompts"
        assert len(rows[-1]["captions"]) == 1, "the last ones with the prompt set meanwhile"

        per = Counter(r["contributor_id"] for r in rows)
        failed = Counter(r["contributor_id"] for r in rows if r["error"] is not None)
        captions = Counter()
        for r in rows:
            captions[r["contributor_id"]] += sum(1 for c in r["captions"] or [] if c.strip())
        await eventually(
            lambda: sum(c["items"] for c in orch.leaderboard.rows) == 40, 10, "leaderboard"
        )
        board = await run_cli(orch.port, "contributors", "--json", token=support.MONITOR_TOKEN)
        assert board.exit_code == 0, board.output
        shown = {c["contributor"]: c for c in json.loads(board.stdout)}
        assert {n: c["items"] for n, c in shown.items()} == dict(per)
        assert {n: c["failed"] for n, c in shown.items() if c["failed"]} == dict(failed)
        assert {n: c["captions"] for n, c in shown.items()} == dict(captions)
        assert abs(sum(c["share"] for c in shown.values()) - 1.0) < 0.01

        status = await run_cli(orch.port, "status", "--json", token=support.MONITOR_TOKEN)
        assert status.exit_code == 0, status.output
        snap = json.loads(status.stdout)
        assert snap["items_done"] == 40 and snap["prompts"] == ["one prompt only"]
        admin_status = await run_cli(orch.port, "status")  # an admin token works too
        assert admin_status.exit_code == 0 and "items 40/40 done" in admin_status.output


def test_plan_reload_sorts_live_keys_from_restart_keys(tmp_path: Path) -> None:
    from caption_flow.orchestrator.admin import plan_reload

    old = orchestrator_config(tmp_path, tmp_path, tmp_path)
    new = old.model_copy(deep=True)
    assert plan_reload(old, new) == ([], [])
    new.host = "0.0.0.0"
    new.status_interval = 5
    new.limits.messages_per_second = 7
    new.limits.max_queue = 3
    new.vllm.sampling.temperature = 0.5
    new.auth.monitor_tokens = []
    assert plan_reload(old, new) == (
        ["auth.monitor_tokens", "limits.messages_per_second", "status_interval", "vllm.sampling"],
        ["host", "limits.max_queue"],
    )
