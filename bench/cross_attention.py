"""Llama 3.2 Vision (mllama) through the cross-attention contract: what an image costs on the wire, in
the LLM's cache and per decode step, measured on a checkpoint and computed for Llama-3.2-11B-Vision.

    OMP_NUM_THREADS=2 .venv/bin/python bench/cross_attention.py [--size bench|tiny] [--steps 20]
        [--batch 8] [--model DIR] [--json]

Measured (in process, on the stripped language model as the LLM service loads it): the bytes of one
image's cross_attention_states as the encoder returns them; the cross-attention K/V one image adds to a
request's cache; the ms of one decode forward for rows of 0, 1 and 2 images at batch 1 and at `--batch`
(rows of one kind merged into one batch cache, as the engine's Batch.decode runs them), the fastest of
`--steps` steps. Computed: the same for Llama-3.2-11B-Vision's config (bf16), beside a
LLaVA-1.5-style image of 576 rows at the same hidden size. docs/coverage-mllama.md quotes both.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.llm.engine.batch_cache import BatchCache
from services.models.base import IMAGE, PlacedEmbeddings
from services.models.registry import family_for
from services.tiny_checkpoints import make_model
from tests.media import image_bytes

# meta-llama/Llama-3.2-11B-Vision(-Instruct) config.json: 560 px tiles of patch 14, 4 tiles; text 4096
# wide, 40 layers of which 8 cross-attention, 32 heads, 8 KV heads (head_dim 128), MLP 14336.
LLAMA_3_2_11B = dict(image_size=560, patch_size=14, max_num_tiles=4, hidden=4096, layers=40, cross_layers=8,
                     heads=32, kv_heads=8, intermediate=14336, dtype_bytes=2, params=10.6e9)
LLAVA_ROWS = 576  # LLaVA-1.5's rows per image (336 px, patch 14), the replace-the-placeholders layout


def computed(c: dict = LLAMA_3_2_11B) -> dict:
    """Per image: bytes on the wire, cache bytes, and decode MACs per token of the cross-attention layers."""
    patches = (c["image_size"] // c["patch_size"]) ** 2 + 1
    rows = c["max_num_tiles"] * patches  # padding tiles included (exactness needs them)
    head_dim, kv_width = c["hidden"] // c["heads"], c["kv_heads"] * c["hidden"] // c["heads"]
    states = rows * c["hidden"] * c["dtype_bytes"]
    cross_kv = c["cross_layers"] * 2 * rows * kv_width * c["dtype_bytes"]
    self_kv_per_token = (c["layers"] - c["cross_layers"]) * 2 * kv_width * c["dtype_bytes"]
    # One decoded token through one cross-attention layer: q and o projections, the MLP, and attention
    # (QK and AV) over one image's rows.
    layer_macs = 2 * c["hidden"] ** 2 + 3 * c["hidden"] * c["intermediate"]
    attention_macs_per_image = 2 * c["heads"] * head_dim * rows
    return {
        "rows_per_image": rows, "patches_per_tile": patches,
        "states_bytes_per_image": states,
        "states_bytes_per_real_tile": patches * c["hidden"] * c["dtype_bytes"],
        "llava_style_bytes_per_image": LLAVA_ROWS * c["hidden"] * c["dtype_bytes"],
        "kv_bytes_if_sent_instead": cross_kv,
        "cross_kv_cache_bytes_per_image": cross_kv,
        "self_kv_cache_bytes_per_token": self_kv_per_token,
        "cross_kv_equals_text_tokens": cross_kv / self_kv_per_token,
        "prefill_kv_projection_macs_per_image": c["cross_layers"] * 2 * rows * c["hidden"] * kv_width,
        "decode_cross_layer_macs_per_token": c["cross_layers"] * layer_macs,
        "decode_cross_attention_macs_per_token_per_image": c["cross_layers"] * attention_macs_per_image,
        "decode_whole_model_macs_per_token": c["params"],
        "decode_cross_kv_read_bytes_per_image": cross_kv,
        "decode_weight_read_bytes": c["params"] * c["dtype_bytes"],
    }


def _requests(family, processor, model, num_images: int, count: int) -> list[tuple[torch.Tensor, list]]:
    out = []
    for i in range(count):
        images = [Image.open(io.BytesIO(image_bytes(160 + 8 * i, 120, seed=i + k))) for k in range(num_images)]
        content = [{"type": IMAGE} for _ in images] + [{"type": "text", "text": f"Describe it, please ({i})."}]
        processed = family.preprocess(processor, family.render_chat(processor, [{"role": "user", "content": content}]),
                                      images)
        placed = [PlacedEmbeddings(IMAGE, item.offset, item.length, emb, item.position_inputs)
                  for item, emb in zip(processed.items, family.encode(model, IMAGE, [it.encoder_inputs for it in processed.items])
                                       if processed.items else [])]
        out.append((torch.tensor(processed.token_ids), placed))
    return out


def _step_ms(family, model, requests, reps: int) -> float:
    """One decode forward over `requests` merged into one batch cache, as the engine's Batch.decode runs it
    (sampling aside): the fastest of `reps` steps, in ms (the fastest: other processes share the CPU)."""
    language_model, embed = family.language_model(model), model.get_input_embeddings()
    caches, prefills = [], []
    for token_ids, placed in requests:
        prefill = family.prefill_inputs(model, token_ids, placed)
        cache = family.new_cache(model)
        language_model(inputs_embeds=prefill.inputs_embeds, position_ids=prefill.position_ids,
                       attention_mask=torch.ones(1, token_ids.shape[0], dtype=torch.long), past_key_values=cache,
                       use_cache=True, **prefill.layer_kwargs)
        caches.append((cache, token_ids.shape[0]))
        prefills.append(prefill.for_decode())
    batch = BatchCache(*caches[0], torch.device("cpu"), family.fixed_cache_layers)
    for cache, length in caches[1:]:
        batch.append(cache, length)
    lengths = [length for _, length in caches]
    last = torch.full((len(requests), 1), 100)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        language_model(inputs_embeds=embed(last), position_ids=family.batch_decode_position_ids(prefills, lengths),
                       attention_mask=batch.step_mask(), past_key_values=batch.cache, use_cache=True,
                       **family.batch_decode_kwargs(prefills, lengths))
        times.append((time.perf_counter() - started) * 1e3)
        batch.advance()
        lengths = [n + 1 for n in lengths]
    return min(times)


def measure(model_dir: Path, reps: int, batch: int) -> dict:
    family = family_for(model_dir)
    model = family.load_model(model_dir, torch.float32, "cpu")
    processor = family.load_processor(model_dir)
    by_images = {n: _requests(family, processor, model, n, batch) for n in (0, 1, 2)}
    states = by_images[1][0][1][0].embeddings.embeddings
    family.strip_for_llm(model)
    steps = {}
    with torch.inference_mode():
        for n, requests in by_images.items():
            for size in (1, batch):
                steps[f"{n}_images_batch_{size}"] = _step_ms(family, model, requests[:size], reps)
    text = family.text_config
    kv_width = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    return {
        "model": str(model_dir), "rows_per_image": states.shape[0], "hidden": states.shape[1],
        "states_bytes_per_image_fp32": states.numel() * states.element_size(),
        "cross_kv_cache_bytes_per_image_fp32": len(text.cross_attention_layers) * 2 * states.shape[0] * kv_width * 4,
        "decode_ms_per_step": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an mllama checkpoint folder (default: a built one)")
    parser.add_argument("--size", default="bench", choices=("tiny", "bench"))
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per case (the fastest counts)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model_dir = args.model or ROOT / "build" / "bench-models" / f"mllama-{args.size}"
    if not (model_dir / "config.json").exists():
        make_model("mllama", model_dir, size=args.size)
    result = {"measured": measure(model_dir, args.steps, args.batch),
              "computed_llama_3_2_11b_vision": computed()}
    print(json.dumps(result, indent=None if args.json else 1))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"# {time.perf_counter() - started:.1f} s", file=sys.stderr)
