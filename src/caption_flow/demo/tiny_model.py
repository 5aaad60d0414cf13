"""Build a tiny, randomly initialised Qwen2-VL model and synthetic images, fully offline.

Model weights cannot be downloaded on CI and demo machines, yet both engines (transformers
and vLLM) must run real inference. A ~600k-parameter Qwen2-VL with a word-level tokenizer
loads in under a second, captions in milliseconds and exercises the same code paths as a
real checkpoint. Its captions are random words, which is all tests and demos need.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

#: Written last: its presence (with matching content) means the folder holds a complete model.
MARKER = ".captionflow-tiny-model.json"
T = TypeVar("T")
_RECIPE_VERSION = 1

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]
# fmt: off
WORDS = [
    "system", "user", "assistant", "a", "an", "the", "this", "that", "is", "are", "of", "in",
    "on", "with", "and", "image", "photo", "picture", "shows", "describe", "detail", "details",
    "alt", "text", "tags", "caption", "short", "long", "red", "green", "blue", "yellow", "white",
    "black", "orange", "purple", "dog", "cat", "tree", "house", "car", "sky", "water", "person",
    "square", "circle", "background", "colour", "bright", "dark", "small", "large", ".", ",", ":",
]
# fmt: on

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _is_complete(path: Path, seed: int, tokenizer: str = "words") -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(
        marker.get("version") == _RECIPE_VERSION
        and marker.get("seed") == seed
        and marker.get("tokenizer", "words") == tokenizer
    )


def _build_tokenizer(kind: str = "words"):  # -> PreTrainedTokenizerFast
    """Word-level tokenizer (Qwen's special tokens plus a few dozen words joined by spaces),
    or ``bytes``: one token per byte, which can spell anything, JSON included (what vLLM's
    structured-output grammars need)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytes":
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    else:
        vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *WORDS])}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[1:7],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=2048,
    )


def _build_into(folder: Path, seed: int, tokenizer_kind: str = "words") -> None:
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _build_tokenizer(tokenizer_kind)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [8, 12, 12],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "dtype": "float32",
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 128,
            "num_heads": 2,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
        # Random logits for the special tokens would often end or blank a caption at once;
        # zeroed rows keep their logits at 0, below the best word's, so greedy decoding always
        # yields plain words and runs to max_tokens (predictable lengths for tests and demos).
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            for token_id in ids.values():
                head[token_id].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-file "shards" bar is noise in a demo's output
    try:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def build_tiny_model(path: Path, seed: int = 0, tokenizer: str = "words") -> Path:
    """Build the tiny model into ``path`` (created if needed) and return ``path``.
    ``tokenizer``: "words" (captions of plain words) or "bytes" (can write JSON).

    Idempotent: a folder that already holds a complete model for ``seed`` is returned at
    once. The model is built in a sibling temporary folder and its files moved in, the
    marker last, so an interrupted or concurrent build never leaves a folder that looks
    complete but is not.
    """
    path = Path(path).absolute()
    if _is_complete(path, seed, tokenizer):
        return path
    logger.info("building tiny Qwen2-VL model (seed %d) in %s", seed, path)
    marker = {
        "version": _RECIPE_VERSION,
        "seed": seed,
        "architecture": "Qwen2-VL",
        "tokenizer": tokenizer,
    }
    build_in_place(
        path, lambda staging: _build_into(staging, seed, tokenizer), MARKER, lambda _: marker
    )
    return path


def build_in_place(
    path: Path,
    build_into: Callable[[Path], T],
    marker_name: str,
    marker_of: Callable[[T], dict[str, Any]],
) -> T:
    """Build into a sibling temporary folder, move the files into ``path``, then write the
    marker (``marker_name``: ``marker_of(built)`` as JSON) last: an interrupted or concurrent
    build never leaves a folder that looks complete but is not. ``build_into``'s result."""
    path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        built = build_into(staging)
        for item in staging.iterdir():
            item.chmod(0o644)  # some writers create 0600 files; the model is meant to be shared
            os.replace(item, path / item.name)
        tmp_marker = path / f"{marker_name}.{os.getpid()}.tmp"
        tmp_marker.write_text(json.dumps(marker_of(built)))
        os.replace(tmp_marker, path / marker_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return built


_COLOURS = [
    (220, 40, 40),
    (40, 170, 60),
    (40, 80, 220),
    (235, 200, 40),
    (240, 240, 240),
    (25, 25, 25),
    (240, 140, 30),
    (140, 50, 170),
]


def generate_images(
    folder: Path, count: int, size: tuple[int, int] = (96, 72), seed: int = 0
) -> list[Path]:
    """Write ``count`` deterministic coloured images to ``folder`` and return their paths.

    Formats alternate between JPEG and PNG and sizes vary around ``size`` (some portrait),
    so the decode and resize paths see a realistic mix. The same arguments always give the
    same files and names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    paths: list[Path] = []
    for i in range(count):
        k = seed * 7919 + i
        background = _COLOURS[k % len(_COLOURS)]
        foreground = _COLOURS[(k * 3 + 1) % len(_COLOURS)]
        w = max(16, width + (k % 5 - 2) * width // 8)
        h = max(16, height + (k % 3 - 1) * height // 8)
        if k % 4 == 3:
            w, h = h, w
        image = Image.new("RGB", (w, h), background)
        draw = ImageDraw.Draw(image)
        box = (w // 5 + k % 7, h // 5 + k % 5, w * 3 // 4, h * 3 // 4)
        if k % 2:
            draw.ellipse(box, fill=foreground)
        else:
            draw.rectangle(box, fill=foreground)
        draw.line((0, h - 1 - k % h, w - 1, k % h), fill=(255 - background[0], 128, 64), width=2)
        suffix = "png" if i % 3 == 2 else "jpg"
        target = folder / f"img_{seed:03d}_{i:05d}.{suffix}"
        if suffix == "jpg":
            image.save(target, format="JPEG", quality=90)
        else:
            image.save(target, format="PNG")
        paths.append(target)
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m caption_flow.demo.tiny_model [DIR]``: build the model (and images)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m caption_flow.demo.tiny_model",
        description="Build a tiny random Qwen2-VL model offline, for tests and demos.",
    )
    parser.add_argument(
        "output", nargs="?", default="tiny-qwen2-vl", help="folder (default: ./tiny-qwen2-vl)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    parser.add_argument(
        "--images", type=int, default=0, help="also write this many test images to OUTPUT-images"
    )
    args = parser.parse_args(argv)
    model = build_tiny_model(Path(args.output), seed=args.seed)
    print(f"tiny model in {model}")  # the command's result, not a log line
    if args.images:
        folder = model.parent / f"{model.name}-images"
        generate_images(folder, args.images, seed=args.seed)
        print(f"{args.images} test images in {folder}")


if __name__ == "__main__":
    main()
