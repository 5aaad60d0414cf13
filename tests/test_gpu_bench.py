"""The GPU benchmark keeps working between GPU sessions: its CPU smoke run, its deadline, and
the real shapes it builds (sizes and token ids checked without building any weights)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import CLI_ENV, TIME_UNIT

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import make_model  # noqa: E402


def bench_gpu(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / "bench_gpu.py"), *args],
        cwd=cwd,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=timeout * TIME_UNIT,
    )


def table_rows(markdown: str) -> list[dict[str, str]]:
    """The benchmark table's rows as dicts keyed by column name."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for line in lines[2:]
    ]


def test_smoke_on_the_cpu_with_the_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    out, data = tmp_path / "table.md", tmp_path / "cells.json"
    done = bench_gpu(
        "--shape", "tiny", "--model-dir", str(tiny_model_dir), "--engines", "transformers",
        "--images", "8", "--batch-sizes", "4,8", "--max-tokens", "4",
        "--workdir", str(tmp_path / "work"), "--out", str(out), "--json", str(data),
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table_rows(out.read_text())
    assert [(r["engine"], r["batch"]) for r in rows] == [
        ("transformers", "4"),
        ("transformers", "8"),
    ]
    for row in rows:
        assert float(row["pipeline img/s"]) > 0 and float(row["alone img/s"]) > 0
        assert row["done/failed"] == "8/0"
        assert row["torch peak GiB"] == "-"  # no GPU here
    assert "on CPU" in out.read_text()
    cells: list[dict[str, Any]] = json.loads(data.read_text())["cells"]
    # ignore_eos: every image generates exactly max_tokens, so token rates are honest.
    assert [c["tokens"] for c in cells] == [8 * 4, 8 * 4]
    assert all(0 < c["busy"] <= 1 and c["first_result_s"] > 0 for c in cells)
    # 8 images in batches of 4, then of 8: the engine calls of each pipeline run.
    assert [c["engine_calls"] for c in cells] == [2, 1]
    assert all(
        len(c["pipeline_runs_img_s"]) == 1 and c["pipeline_runs_img_s"][0] > 0 for c in cells
    )


def test_its_own_deadline_writes_what_it_has(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    done = bench_gpu(
        "--shape", "tiny", "--engines", "transformers", "--timeout", "0.5",
        "--workdir", str(tmp_path / "work"), "--out", str(out),
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 124, done.stderr[-2000:]
    assert "Stopped by --timeout" in out.read_text()


@pytest.mark.parametrize("name", sorted(make_model.SHAPES))
def test_real_shapes_have_the_published_sizes(name: str) -> None:
    shape = make_model.SHAPES[name]
    count = make_model.count_parameters(shape)  # on the meta device: no weights
    assert count == pytest.approx(shape.published_parameters, rel=0.03)
    config = make_model.build_config(shape)
    text, vision = config.text_config, config.vision_config
    assert text.hidden_size == shape.text["hidden_size"]
    assert text.num_hidden_layers == shape.text["num_hidden_layers"]
    assert text.num_key_value_heads == shape.text["num_key_value_heads"]
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert config.tie_word_embeddings == shape.tie_word_embeddings
    assert vision.depth == 32
    # The vision tower's output feeds the language model.
    merged = getattr(vision, "out_hidden_size", None) or vision.hidden_size
    assert merged == text.hidden_size
    assert config.image_token_id == 151655 and config.video_token_id == 151656
    assert (config.vision_start_token_id, config.vision_end_token_id) == (151652, 151653)


def test_tokenizer_and_processor_use_the_real_ids(tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    shape = make_model.SHAPES["qwen2.5-vl-3b"]
    make_model.build_processor(shape, make_model.build_tokenizer()).save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)  # as the engines load it
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 151665 <= shape.text["vocab_size"]
    for offset, token in enumerate(make_model.QWEN_SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == 151643 + offset, token
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (151645, 151643)
    assert tokenizer.decode([256, 257, 300]) == " a b as"  # filler words, not garbage
    size = processor.image_processor.size  # min_pixels and max_pixels, as transformers 5 keeps them
    assert (size.shortest_edge, size.longest_edge) == (3136, 12845056)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[prompt], images=[Image.new("RGB", (512, 512))], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 36, 36]]  # 504 px: 36 x 36 patches of 14
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(151655) == 36 * 36 // 4  # merged 2 x 2: 324 image tokens


def test_a_folder_holding_another_build_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds files but not this build"):
        make_model.build_model("qwen2-vl-2b", tmp_path)


@pytest.mark.vllm
def test_smoke_with_vllm_on_the_cpu(tmp_path: Path, tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    out, data = tmp_path / "table.md", tmp_path / "cells.json"
    done = bench_gpu(
        "--shape", "tiny", "--model-dir", str(tiny_model_dir), "--engines", "vllm",
        "--images", "8", "--batch-sizes", "4", "--max-tokens", "4",
        "--workdir", str(tmp_path / "work"), "--out", str(out), "--json", str(data),
        cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = table_rows(out.read_text())
    assert row["engine"] == "vllm" and float(row["pipeline img/s"]) > 0
    assert [c["tokens"] for c in json.loads(data.read_text())["cells"]] == [8 * 4]
