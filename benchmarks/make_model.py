"""Build a randomly initialised vision-language model with a real model's shape, offline.

    python benchmarks/make_model.py --shape qwen2.5-vl-3b --out DIR [--dtype bfloat16]
                                    [--device cpu|cuda] [--seed 0]

No checkpoint can be downloaded on the machines that benchmark captionflow, yet a GPU figure
means something only for a model of the real size: the same layers, widths, heads, vocabulary
and image processor as the published model. This script writes such a model: the
architecture and sizes of the named family (numbers below, copied from each model's published
``config.json`` and ``preprocessor_config.json`` on the Hugging Face hub), random weights, a
tokenizer built here whose special tokens sit at the real ids, the real image processor
settings and a Qwen-style chat template, all saved with ``save_pretrained`` (safetensors).

Random weights write nonsense, so a benchmark must fix the output length (``ignore_eos``);
greedy decoding never picks a special token or an id past the tokenizer (their rows of the
output embedding are zeroed, so their logits stay at 0 below the best random one).

The weights are made directly in the target dtype (bf16 by default) on ``--device``: the 3B
shape needs about 7.5 GB there and never an fp32 copy. ``--shape tiny`` builds the project's
tiny test model (``caption_flow.demo.tiny_model``). Building is idempotent: a folder that
already holds the same recipe is returned at once (a marker file, written last).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = ".captionflow-make-model.json"
RECIPE_VERSION = 1

#: Qwen2's tokenizer: 151,643 byte-level BPE tokens, then these added tokens from id 151643
#: on, in this order (tokenizer_config.json's added_tokens_decoder of the Qwen2(.5)-VL models).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",  # 151643: bos, pad
    "<|im_start|>",  # 151644
    "<|im_end|>",  # 151645: eos of the chat models
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",  # 151652
    "<|vision_end|>",  # 151653
    "<|vision_pad|>",  # 151654
    "<|image_pad|>",  # 151655
    "<|video_pad|>",  # 151656
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",  # 151664
]
FIRST_SPECIAL_ID = 151643

#: A Qwen2-VL-style chat template: the default system message, images as
#: <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# preprocessor_config.json of Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct (the same numbers).
IMAGE_PROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}

# Text settings every Qwen2(.5)-VL config.json shares.
_QWEN_TEXT = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "mrope_section": [16, 24, 24],
    },
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
}
# Vision settings every Qwen2.5-VL config.json shares (only out_hidden_size differs).
_QWEN25_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "hidden_act": "silu",
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}


@dataclass(frozen=True)
class Shape:
    """One model family's published architecture."""

    name: str
    source: str  # the hub repository whose config.json these numbers are copied from
    architecture: str  # "qwen2_5_vl" or "qwen2_vl"
    text: dict[str, Any]
    vision: dict[str, Any]
    tie_word_embeddings: bool
    published_parameters: float  # the count the hub's page gives (safetensors metadata)


SHAPES: dict[str, Shape] = {
    "qwen2.5-vl-3b": Shape(
        name="qwen2.5-vl-3b",
        source="Qwen/Qwen2.5-VL-3B-Instruct config.json",
        architecture="qwen2_5_vl",
        text={
            **_QWEN_TEXT,
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128000,
            "max_window_layers": 70,
        },
        vision={**_QWEN25_VISION, "out_hidden_size": 2048},
        tie_word_embeddings=True,
        published_parameters=3.75e9,
    ),
    "qwen2.5-vl-7b": Shape(
        name="qwen2.5-vl-7b",
        source="Qwen/Qwen2.5-VL-7B-Instruct config.json",
        architecture="qwen2_5_vl",
        text={
            **_QWEN_TEXT,
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "max_window_layers": 28,
        },
        vision={**_QWEN25_VISION, "out_hidden_size": 3584},
        tie_word_embeddings=False,
        published_parameters=8.29e9,
    ),
    "qwen2-vl-2b": Shape(
        name="qwen2-vl-2b",
        source="Qwen/Qwen2-VL-2B-Instruct config.json",
        architecture="qwen2_vl",
        text={
            **_QWEN_TEXT,
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "max_window_layers": 28,
        },
        vision={
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 1536,  # the merger's output: the text hidden size
            "mlp_ratio": 4,
            "num_heads": 16,
            "hidden_act": "quick_gelu",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        tie_word_embeddings=True,
        published_parameters=2.21e9,
    ),
}
SHAPE_NAMES = [*SHAPES, "tiny"]


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------
def _classes(shape: Shape) -> tuple[type, type, type]:
    """(config class, model class, processor class) of the shape's architecture."""
    import transformers as tf

    if shape.architecture == "qwen2_5_vl":
        return (
            tf.Qwen2_5_VLConfig,
            tf.Qwen2_5_VLForConditionalGeneration,
            tf.Qwen2_5_VLProcessor,
        )
    return tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor


def build_config(shape: Shape, layers: int | None = None) -> Any:
    """The transformers config of ``shape``. ``layers`` (tests, trial runs) cuts the text
    and vision depth to that many blocks and keeps every width."""
    config_class, _, _ = _classes(shape)
    text = json.loads(json.dumps(shape.text))  # a deep copy: the configs keep what they get
    vision = json.loads(json.dumps(shape.vision))
    if layers is not None:
        text["num_hidden_layers"] = layers
        vision["depth"] = layers
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = [layers - 1]
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN_SPECIAL_TOKENS.index("<|image_pad|>") + FIRST_SPECIAL_ID,
        video_token_id=QWEN_SPECIAL_TOKENS.index("<|video_pad|>") + FIRST_SPECIAL_ID,
        vision_start_token_id=QWEN_SPECIAL_TOKENS.index("<|vision_start|>") + FIRST_SPECIAL_ID,
        vision_end_token_id=QWEN_SPECIAL_TOKENS.index("<|vision_end|>") + FIRST_SPECIAL_ID,
        tie_word_embeddings=shape.tie_word_embeddings,
    )


def _filler(i: int) -> str:
    """The ``i``-th filler token: a space (byte-level 'Ġ') and a letters-only word, so that
    decoded captions read as words of a few letters, about a real token's length."""
    letters = ""
    i += 1
    while i:
        i, rest = divmod(i - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "\u0120" + letters


def build_tokenizer() -> Any:
    """A byte-level tokenizer with Qwen2's layout: the 256 byte symbols, filler words up to
    id 151642, then Qwen's added tokens at their real ids (151643-151664). It has no merges,
    so text encodes one token per byte (a prompt is a few times longer than with the real
    tokenizer; the image's tokens dominate anyway)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    fillers = (_filler(i) for i in range(FIRST_SPECIAL_ID - len(alphabet)))
    vocab = {token: i for i, token in enumerate([*alphabet, *fillers])}
    assert len(vocab) == FIRST_SPECIAL_ID
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(QWEN_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=131072,
    )


def build_processor(shape: Shape, tokenizer: Any) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    _, _, processor_class = _classes(shape)
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**IMAGE_PROCESSOR),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def count_parameters(shape: Shape, layers: int | None = None) -> int:
    """Parameters of the shape's model, built on the meta device (no memory, no time)."""
    import torch

    _, model_class, _ = _classes(shape)
    with torch.device("meta"):
        model = model_class(build_config(shape, layers))
    _tie_embeddings(model, shape)  # tied embeddings are one tensor
    return sum(p.numel() for p in model.parameters())


def _tie_embeddings(model: Any, shape: Shape) -> None:
    """Share input and output embeddings where the published model does (2B, 3B). By hand:
    in a process that loaded other models first (the test suite), transformers' own
    tie_weights() was seen to leave them apart."""
    if shape.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def _build_into(
    folder: Path, shape: Shape, dtype: str, device: str, seed: int, layers: int | None
) -> int:
    import torch
    from transformers import GenerationConfig

    _, model_class, _ = _classes(shape)
    tokenizer = build_tokenizer()
    processor = build_processor(shape, tokenizer)
    config = build_config(shape, layers)
    torch.manual_seed(seed)
    # Made in the target dtype on the target device: HF's own initialisation (normal with
    # initializer_range 0.02, norms at one) runs there, no fp32 copy anywhere.
    with torch.device(device):
        model = model_class._from_config(config, dtype=getattr(torch, dtype)).eval()
    _tie_embeddings(model, shape)
    with torch.no_grad():
        model.get_output_embeddings().weight[FIRST_SPECIAL_ID:].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=FIRST_SPECIAL_ID,
        eos_token_id=[FIRST_SPECIAL_ID + 2, FIRST_SPECIAL_ID],
        pad_token_id=FIRST_SPECIAL_ID,
    )
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="5GB")
    processor.save_pretrained(folder)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # a vLLM started later sizes its cache by free memory
    return parameters


def _recipe(shape: str, dtype: str, seed: int, layers: int | None) -> dict[str, Any]:
    return {
        "version": RECIPE_VERSION,
        "shape": shape,
        "dtype": dtype,
        "seed": seed,
        "layers": layers,
    }


def is_built(
    path: Path, shape: str, dtype: str = "bfloat16", seed: int = 0, layers: int | None = None
) -> bool:
    """Whether ``path`` holds a complete build of this recipe."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return {k: marker.get(k) for k in _recipe(shape, dtype, seed, layers)} == _recipe(
        shape, dtype, seed, layers
    )


def built_parameters(path: Path) -> int | None:
    """The parameter count recorded by the build in ``path`` (None: not built here)."""
    try:
        return int(json.loads((Path(path) / MARKER).read_text())["parameters"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_model(
    shape: str,
    out: Path,
    dtype: str = "bfloat16",
    device: str = "cpu",
    seed: int = 0,
    layers: int | None = None,
) -> Path:
    """Build ``shape`` into ``out`` (created if needed) unless it holds that build already;
    return ``out``. Built in a sibling temporary folder and moved in, the marker last, so an
    interrupted build never looks complete."""
    out = Path(out).absolute()
    if shape == "tiny":
        from caption_flow.demo.tiny_model import build_tiny_model

        return build_tiny_model(out)
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; use one of {', '.join(SHAPE_NAMES)}")
    if is_built(out, shape, dtype, seed, layers):
        return out
    if out.is_dir() and any(out.iterdir()):
        raise SystemExit(
            f"{out} holds files but not this build ({shape}, {dtype}, seed {seed}, layers "
            f"{layers}); give another --out or empty it"
        )
    from caption_flow.demo.tiny_model import build_in_place

    t0 = time.monotonic()
    parameters = build_in_place(
        out,
        lambda staging: _build_into(staging, SHAPES[shape], dtype, device, seed, layers),
        MARKER,
        lambda built: {
            **_recipe(shape, dtype, seed, layers),
            "parameters": built,
            "source": SHAPES[shape].source,
        },
    )
    print(
        f"{shape}: {parameters:,} parameters ({parameters / 1e9:.2f} B) in {dtype} on "
        f"{device}, built and saved to {out} in {time.monotonic() - t0:.0f} s",
        file=sys.stderr,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=SHAPE_NAMES)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu", help="where to build the weights (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--layers", type=int, default=None, help="trial builds: this many text and vision blocks"
    )
    parser.add_argument(
        "--count-only", action="store_true", help="print the parameter count (meta device) only"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.count_only:
        if args.shape == "tiny":
            parser.error("--count-only takes a real shape")
        count = count_parameters(SHAPES[args.shape], args.layers)
        print(f"{args.shape}: {count:,} parameters ({count / 1e9:.2f} B)")
        return 0
    path = build_model(args.shape, args.out, args.dtype, args.device, args.seed, args.layers)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
