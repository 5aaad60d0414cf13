"""The original caption-flow README, followed as its users would: its configs with every
documented key, its commands and flags, its quickstart. Real subprocesses of the CLI."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from support import (
    TIME_UNIT,
    free_port,
    metric,
    original_monitor_yaml,
    original_orchestrator_yaml,
    original_worker_yaml,
    read_rows,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "COLUMNS": "160",
    # vLLM's CPU build, light: in-process engine core, 1 GiB of KV cache.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}
caption_flow = partial(run_cli, env=ENV)


def spawn(*args: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "caption_flow", *args],
            cwd=cwd,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    """Ctrl-C, as a user stops a service; it must exit cleanly."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=60 * TIME_UNIT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"did not stop on Ctrl-C:\n{log.read_text()[-3000:]}") from None
    assert code == 0, log.read_text()[-3000:]


def engine_for_quickstart() -> bool:
    """The original worker.yaml says ``vllm: true``; run it so where vLLM imports."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def test_quickstart(tmp_path: Path, tiny_model_dir: Path, image_folder) -> None:
    """README steps 1-5 from a fresh folder: configs in ./config, the services with no other
    flags, the monitor, then scan_chunks --fix on the result."""
    images = image_folder(6)
    port = free_port()
    vllm = engine_for_quickstart()
    config = tmp_path / "config"
    config.mkdir()
    (config / "orchestrator.yaml").write_text(
        original_orchestrator_yaml(port, images[0].parent, tiny_model_dir)
    )
    (config / "worker.yaml").write_text(original_worker_yaml(port, vllm=vllm))
    (config / "monitor.yaml").write_text(original_monitor_yaml(port))
    orch_log, worker_log = tmp_path / "orchestrator.log", tmp_path / "worker.log"

    orch = spawn("orchestrator", cwd=tmp_path, log=orch_log)
    worker = None
    try:
        wait_until(lambda: metric(port, "items_total") == 6, 30, "the orchestrator listing")
        worker = spawn("worker", "--gpu-id", "0", cwd=tmp_path, log=worker_log)
        # Nothing documented makes a worker exit when done: stop it once all is stored.
        wait_until(
            lambda: metric(port, "items_done") == 6 or worker.poll() is not None,
            150,
            "all items done",
        )
        assert worker.poll() is None, worker_log.read_text()[-3000:]
        watched = caption_flow("monitor", "--once", cwd=tmp_path)
        assert watched.returncode == 0, watched.stderr[-2000:]
        assert "6 of 6" in watched.stdout and "local-gpu" in watched.stdout
        stop(worker, worker_log)
        stop(orch, orch_log)
    finally:
        for process in (worker, orch):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    orch_text = orch_log.read_text()
    for key in ("checkpoint_dir", "caption_buffer_size", "checkpoint_interval"):
        assert f"orchestrator.storage.{key} (original caption-flow)" in orch_text
    rows = read_rows(tmp_path / "caption_data")
    assert collections.Counter(r["item_key"] for r in rows) == {p.name: 1 for p in images}
    assert {r["dataset"] for r in rows} == {"quickstart@1.0"}
    assert {r["worker"] for r in rows} == {"local-gpu"}
    assert all(len(r["captions"]) == 3 for r in rows)

    scanned = caption_flow(
        "scan_chunks", "--data-dir", "./caption_data", "--checkpoint-dir", "./checkpoints",
        "--fix", cwd=tmp_path,
    )  # fmt: skip
    assert scanned.returncode == 0, scanned.stdout[-2000:] + scanned.stderr[-2000:]
    assert "now clean" in scanned.stdout
    assert len(read_rows(tmp_path / "caption_data")) == 6


def test_underscore_names_are_hidden_aliases() -> None:
    from click.testing import CliRunner

    from caption_flow.cli.main import cli

    runner = CliRunner()
    listing = runner.invoke(cli, ["--help"]).output
    assert "generate-cert" in listing and "scan-chunks" in listing
    assert "generate_cert" not in listing and "scan_chunks" not in listing
    for alias in ("generate_cert", "inspect_cert", "scan_chunks"):
        shown = runner.invoke(cli, [alias, "--help"])
        assert shown.exit_code == 0, (alias, shown.output)
    assert runner.invoke(cli, ["no_such_command"]).exit_code == 2


def test_worker_vllm_flag_is_the_vllm_engine() -> None:
    from click.testing import CliRunner

    from caption_flow.cli.main import cli

    done = CliRunner().invoke(cli, ["worker", "--vllm", "--engine", "transformers"])
    assert done.exit_code == 2 and "--vllm contradicts --engine transformers" in done.output


async def test_queue_sizes_of_the_original_set_what_a_worker_holds() -> None:
    """readahead_size (prefetch_items): chunks are asked for, one at a time, until those
    held beyond the current one have that many items."""
    from caption_flow.config.models import WorkerConfig
    from caption_flow.protocol.messages import ChunkLease, ItemRef
    from caption_flow.worker.client import Worker

    def lease(n: int, size: int) -> ChunkLease:
        return ChunkLease(f"c{n}", "s", [ItemRef(i, f"k{i}") for i in range(size)])

    worker = Worker(WorkerConfig.model_validate({"readahead_size": 5, "vllm": False}))
    try:
        assert worker._chunks_wanted() == 2  # one to caption, one ahead
        worker.current = lease(0, 4)
        worker.queue.put_nowait(lease(1, 4))
        assert worker._chunks_wanted() == 1  # 4 items ahead < 5
        worker.queue.put_nowait(lease(2, 4))
        assert worker._chunks_wanted() == 0
        worker.current = None  # the first queued chunk is about to be current
        assert worker._chunks_wanted() == 1
        plain = Worker(WorkerConfig(prefetch_chunks=1))
        plain.queue.put_nowait(lease(1, 400))
        assert plain._chunks_wanted() == 1  # counted in chunks, whatever their size
        plain.captioner.close()
    finally:
        worker.captioner.close()


def orchestrator_yaml(images: Path, model: Path, port: int, data: Path, **extra: object) -> str:
    """An orchestrator config of ours (current keys) for the CLI tests below."""
    import yaml
    from support import MONITOR_TOKEN as MONITOR
    from support import WORKER_TOKENS

    return yaml.safe_dump(
        {
            "orchestrator": {
                "host": "127.0.0.1",
                "port": port,
                "dataset": {"type": "local_folder", "path": str(images)},
                "chunk_size": 2,
                "status_interval": 3600,
                "storage": {"data_dir": str(data), "compact_seconds": 0.5},
                "vllm": {
                    "model": str(model),
                    "batch_size": 2,
                    "inference_prompts": ["describe this image"],
                    "sampling": {"temperature": 0.0, "max_tokens": 4},
                },
                "auth": {
                    "worker_tokens": [{"name": n, "token": t} for n, t in WORKER_TOKENS.items()],
                    "monitor_tokens": [{"name": "watcher", "token": MONITOR}],
                },
                **extra,
            }
        }
    )


def test_orchestrator_no_ssl_vllm_flags_and_the_monitor(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    """--no-ssl serves ws:// although the config names certificate files that do not even
    exist; --vllm is accepted and says who chooses the engine; the monitor connects with
    its token and is refused without one."""
    from support import MONITOR_TOKEN as MONITOR

    images = image_folder(3)
    port = free_port()
    config = tmp_path / "orch.yaml"
    missing = {"cert": str(tmp_path / "none.pem"), "key": str(tmp_path / "none.key")}
    config.write_text(
        orchestrator_yaml(images[0].parent, tiny_model_dir, port, tmp_path / "d", ssl=missing)
    )
    log = tmp_path / "orch.log"
    orch = spawn(
        "orchestrator", "--config", str(config), "--no-ssl", "--vllm", cwd=tmp_path, log=log
    )
    try:
        wait_until(lambda: metric(port, "items_total") == 3 or orch.poll() is not None, 30, "up")
        assert orch.poll() is None, log.read_text()[-3000:]
        server = f"ws://127.0.0.1:{port}"
        seen = caption_flow(
            "monitor", "--once", "--server", server, "--token", MONITOR, cwd=tmp_path
        )
        assert seen.returncode == 0, seen.stderr[-2000:]
        assert "0 of 3" in seen.stdout and "chunks" in seen.stdout
        refused = caption_flow(
            "monitor", "--once", "--server", server, "--token", "wrong-token", cwd=tmp_path
        )
        assert refused.returncode == 2 and "refused the monitor" in refused.stderr
        stop(orch, log)
    finally:
        if orch.poll() is None:
            orch.kill()
            orch.wait()
    text = log.read_text()
    assert "--no-ssl: serving plain ws://" in text
    assert "--vllm: every worker chooses its engine" in text


def test_worker_gpus_list_starts_one_named_worker_per_gpu(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    """--gpus 0,1 (no GPU needed: the transformers engine on the CPU): two processes named
    NAME-gpu0 and NAME-gpu1 share the dataset, one row per item; a bad token fails both and
    the command with them."""
    from support import WORKER_TOKENS

    images = image_folder(12)
    port = free_port()
    data = tmp_path / "d"
    config = tmp_path / "orch.yaml"
    config.write_text(orchestrator_yaml(images[0].parent, tiny_model_dir, port, data))
    orch_log = tmp_path / "orch.log"
    orch = spawn("orchestrator", "--config", str(config), cwd=tmp_path, log=orch_log)
    server = f"ws://127.0.0.1:{port}"
    common = ["worker", "--server", server, "--name", "box", "--engine", "transformers"]
    try:
        wait_until(lambda: metric(port, "items_total") == 12 or orch.poll() is not None, 30, "up")
        assert orch.poll() is None, orch_log.read_text()[-3000:]
        refused = caption_flow(*common, "--token", "not-a-token", "--gpus", "0,1", cwd=tmp_path)
        assert refused.returncode == 1
        assert "box-gpu0 exited with status" in refused.stderr
        assert "box-gpu1 exited with status" in refused.stderr
        done = caption_flow(
            *common, "--token", WORKER_TOKENS["alice"], "--exit-when-done", "--gpus", "0,1",
            cwd=tmp_path, timeout=150,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "all 2 workers stopped cleanly" in done.stderr
        stop(orch, orch_log)
    finally:
        if orch.poll() is None:
            orch.kill()
            orch.wait()
    rows = read_rows(data)
    assert collections.Counter(r["item_key"] for r in rows) == {p.name: 1 for p in images}
    assert {r["worker"] for r in rows} == {"box-gpu0", "box-gpu1"}
