"""EVS (efficient video sampling): what pruning at a rate saves and drops on a still vs a moving clip.

    python bench/evs.py --model DIR                 # a Qwen2-VL checkpoint; 8 s clips, 224x160, rate 0.5
    python bench/evs.py --model DIR --quick         # 4 s, 96x64: a smoke test

Each clip (tests/media.py's square on a seeded background: standing still, or crossing the frame) is
sampled and decoded as the processor does (the family's frames at --fps), run through the model's
HF processor and the tower as the encoder does, then pruned by services/models/evs.py. The count
EVS keeps is the rate's (vLLM's rule: max(tokens per frame, int(tokens x (1 - rate))), the same
for both clips); what differs is what the dropped tokens were: near-copies of the frame before
(dissimilarity 1 - cos ~ 0) on the still clip, changed content on the moving one. Writes JSON (--out)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.video import VideoLimits, decode_video  # noqa: E402
from services.encoder.towers import load_towers  # noqa: E402
from services.models import evs  # noqa: E402
from services.models.base import VIDEO  # noqa: E402
from services.models.checkpoint import Checkpoint  # noqa: E402
from tests.media import video_bytes  # noqa: E402

NEAR_COPY = 0.01  # a later-frame token whose dissimilarity is below this is a near-copy of the one before
LIMITS = VideoLimits(max_frame_pixels=50_000_000, max_seconds=3600, max_frames=64, max_total_pixels=1 << 30)


def measure(checkpoint: Checkpoint, model, processor, *, motion: bool, seconds: float, width: int, height: int,
            fps: float, rate: float) -> dict:
    family = checkpoint.family
    clip = decode_video(video_bytes(seconds=seconds, width=width, height=height, motion=motion, seed=7), LIMITS,
                        where="clip", choose=lambda meta: family.video_frame_indices(processor, meta, fps, 64))
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": VIDEO}, {"type": "text", "text": "?"}]}])
    prompt = family.preprocess(processor, text, [], videos=[clip])
    (item,) = prompt.items
    frames, per_frame = family.video_token_grid(item.encoder_inputs)
    with torch.inference_mode():
        (emb,) = family.encode(model, VIDEO, [item.encoder_inputs])
    scores = evs.dissimilarity(emb.embeddings, frames).flatten()
    kept = evs.kept_indexes(emb.embeddings, frames, rate)
    dropped = torch.ones_like(scores, dtype=torch.bool)
    dropped[kept] = False
    later = scores[per_frame:]
    return {
        "clip": "moving" if motion else "still", "frames_sampled": len(clip.frames), "frame_groups": frames,
        "tokens_per_group": per_frame, "video_tokens": item.length, "kept": int(kept.numel()),
        "saved": item.length - int(kept.numel()), "prompt_tokens": len(prompt.token_ids),
        "prompt_tokens_pruned": len(prompt.token_ids) - (item.length - int(kept.numel())),
        "later_tokens_near_copies": int((later < NEAR_COPY).sum()), "later_tokens": int(later.numel()),
        "dropped_max_dissimilarity": float(scores[dropped].max()) if dropped.any() else 0.0,
        "dropped_mean_dissimilarity": float(scores[dropped].mean()) if dropped.any() else 0.0,
        "later_mean_dissimilarity": float(later.mean()) if later.numel() else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint of a family with EVS (Qwen2-VL)")
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second (the processor's --video-fps)")
    parser.add_argument("--quick", action="store_true", help="short small clips: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("evs.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seconds, width, height = (4.0, 96, 64) if args.quick else (8.0, 224, 160)
    checkpoint = Checkpoint(args.model)
    if not checkpoint.family.supports_video_pruning:
        parser.error(f"the {checkpoint.family.name} family has no EVS")
    processor = checkpoint.family.load_processor(checkpoint.path)
    model = load_towers(checkpoint, "cpu")
    rows = [measure(checkpoint, model, processor, motion=motion, seconds=seconds, width=width, height=height,
                    fps=args.fps, rate=args.rate) for motion in (False, True)]
    report = {"family": checkpoint.family.name, "rate": args.rate, "seconds": seconds, "size": [width, height],
              "near_copy_below": NEAR_COPY, "clips": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{checkpoint.family.name}, rate {args.rate}, {seconds:g} s {width}x{height} clips at {args.fps:g} fps")
    print("clip    groups x tokens  kept/video  saved  prompt before->after  near-copies(later)  dropped max / mean dissim.")
    for r in rows:
        print(f"{r['clip']:7} {r['frame_groups']:>6} x {r['tokens_per_group']:<6} {r['kept']:>4}/{r['video_tokens']:<5}  "
              f"{r['saved']:>5}  {r['prompt_tokens']:>6} -> {r['prompt_tokens_pruned']:<6}  "
              f"{r['later_tokens_near_copies']:>5}/{r['later_tokens']:<5}        "
              f"{r['dropped_max_dissimilarity']:.2e} / {r['dropped_mean_dissimilarity']:.2e}")


if __name__ == "__main__":
    main()
