"""The bench-size Qwen2-VL's proportions next to a real one's (Qwen2-VL-2B-Instruct), from config
numbers only: parameters and forward FLOPs of the vision tower per image and of the language
model per token. Prints the Markdown table docs/benchmarks.md quotes.

    python bench/proportions.py [--bench-config build/bench-models/qwen2_vl-bench/config.json]

FLOPs = 2 x multiply-adds of the matrix products (norms, activations, softmax left out).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Qwen/Qwen2-VL-2B-Instruct config.json (huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json):
# text hidden_size 1536, num_hidden_layers 28, num_attention_heads 12, num_key_value_heads 2,
# intermediate_size 8960, vocab_size 151936, tie_word_embeddings true; vision_config depth 32,
# embed_dim 1280, mlp_ratio 4, num_heads 16, patch_size 14, temporal_patch_size 2,
# spatial_merge_size 2, hidden_size 1536 (the merger's output = the text hidden size).
QWEN2_VL_2B = {
    "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "patch_size": 14,
                      "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3, "hidden_size": 1536},
}


@dataclass(frozen=True)
class Shape:
    name: str
    params_vision: float
    params_lm: float
    flops_per_image: float  # vision tower, one image of `patches` patches
    flops_per_token: float  # language model, one token, attention over `context` earlier tokens
    patches: int
    image_tokens: int
    context: int


def shape(name: str, config: dict, image_px: int = 448, text_tokens: int = 32, new_tokens: int = 128) -> Shape:
    text = config.get("text_config", config)
    v = config["vision_config"]
    d, depth = v["embed_dim"], v["depth"]
    mlp = d * v["mlp_ratio"]
    merge = v["spatial_merge_size"] ** 2
    patch_in = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    patches = (image_px // v["patch_size"]) ** 2
    image_tokens = patches // merge
    h, layers = text["hidden_size"], text["num_hidden_layers"]
    head_dim = h // text["num_attention_heads"]
    kv = text["num_key_value_heads"] * head_dim
    inter, vocab = text["intermediate_size"], text["vocab_size"]

    block = 3 * d * d + d * d + 2 * d * mlp  # qkv, proj, fc1, fc2
    merger = (merge * d) ** 2 + merge * d * v["hidden_size"]
    params_vision = patch_in * d + depth * block + merger
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    layer = h * h + 2 * h * kv + h * h + 3 * h * inter  # q, k, v, o, gate/up/down
    params_lm = vocab * h * (1 if tied else 2) + layers * layer

    # Vision: every patch through every block; full attention over the image's patches.
    macs_image = patches * (patch_in * d + depth * (block + 2 * patches * d)) + image_tokens * merger
    context = image_tokens + text_tokens + new_tokens // 2  # a mid-decode token of an image request
    macs_token = layers * (layer + 2 * context * h) + vocab * h  # lm_head on the token
    return Shape(name, params_vision, params_lm, 2 * macs_image, 2 * macs_token, patches, image_tokens, context)


def table(shapes: list[Shape]) -> str:
    rows = ["| | " + " | ".join(s.name for s in shapes) + " |", "|---|" + "---|" * len(shapes)]

    def row(label: str, fn) -> None:
        rows.append(f"| {label} | " + " | ".join(fn(s) for s in shapes) + " |")

    row("vision tower parameters", lambda s: f"{s.params_vision / 1e6:.1f} M")
    row("language model parameters", lambda s: f"{s.params_lm / 1e6:.1f} M")
    row("vision / language parameters", lambda s: f"{s.params_vision / s.params_lm:.2f}")
    row("patches / image tokens per 448x448 image", lambda s: f"{s.patches} / {s.image_tokens}")
    row("vision FLOPs per image", lambda s: f"{s.flops_per_image / 1e9:.2f} GFLOP")
    row(f"LM FLOPs per token (decode, context ~{shapes[0].context})",
        lambda s: f"{s.flops_per_token / 1e6:.1f} MFLOP")
    row("LM prefill FLOPs of the image tokens", lambda s: f"{s.image_tokens * s.flops_per_token / 1e9:.2f} GFLOP")
    row("one image = how many decoded tokens (FLOPs)", lambda s: f"{s.flops_per_image / s.flops_per_token:.0f}")

    def image_share(s: Shape) -> str:
        prompt = s.image_tokens + 32  # prefill: image tokens + the text (as `context`)
        request = s.flops_per_image + (prompt + 128) * s.flops_per_token
        return f"{s.flops_per_image / request:.0%}"

    row("vision share of an image request's FLOPs (288-token prompt, 128 new tokens)", image_share)
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-config", type=Path, default=ROOT / "build" / "bench-models" / "qwen2_vl-bench" / "config.json")
    args = p.parse_args()
    bench = json.loads(args.bench_config.read_text())
    print(table([shape("qwen2_vl bench (make-model --size bench)", bench), shape("Qwen2-VL-2B-Instruct", QWEN2_VL_2B)]))


if __name__ == "__main__":
    main()
