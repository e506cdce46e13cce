"""What a video costs the processor before the model: decode time and frames sampled, ours vs
transformers' own pyav loader, for a 10 s 720p clip and a 10 min 720p clip.

    python bench/video_decode.py [--model-dir DIR] [--fps 2] [--max-frames 32] [--quick]
        [--out bench/results/video_decode.json]

Ours (services/common/video.py): read the header, let the family's video processor choose frames
(ModelFamily.video_frame_indices at --fps, capped at --max-frames, as the processor service does),
seek to each chosen frame and decode only what lies between its keyframe and it. Theirs:
transformers.video_utils.load_video(backend="pyav"), which decodes every frame and keeps the chosen
ones — the same frames, bit for bit (tests/common/test_video.py). Clips are H.264 at 30 fps with a
keyframe every 2 s (a common encoder setting), made once with av into build/bench-media/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.video import VideoLimits, decode_video  # noqa: E402
from services.models.registry import family_for  # noqa: E402

FPS, GOP_S = 30, 2


def make_clip(path: Path, seconds: int, width: int, height: int) -> Path:
    """A moving gradient with a square crossing it, H.264 (ultrafast preset: the encode is not what we measure)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.mp4")
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "g": str(FPS * GOP_S)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * FPS):
            pixels = np.stack([(x + 3 * i) % 256, (y + i) % 256, np.full_like(x, (5 * i) % 256)], -1).astype(np.uint8)
            left = (7 * i) % (width - 64)
            pixels[100:164, left : left + 64] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


def measure(model_dir: Path, clip: Path, fps: float, max_frames: int, full: bool) -> dict:
    from transformers import AutoProcessor
    from transformers.video_utils import load_video

    family = family_for(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    data = clip.read_bytes()
    limits = VideoLimits(max_frame_pixels=1 << 24, max_seconds=3600, max_frames=max_frames, max_total_pixels=1 << 30)
    start = time.perf_counter()
    ours = decode_video(data, limits, lambda meta: family.video_frame_indices(processor, meta, fps, max_frames), "bench")
    ours_s = time.perf_counter() - start
    result = {"clip": clip.name, "bytes": len(data), "duration_s": ours.metadata.duration,
              "frames_in_clip": ours.metadata.total_num_frames, "size": [ours.metadata.width, ours.metadata.height],
              "frames_sampled": len(ours.metadata.frames_indices), "ours_decode_s": round(ours_s, 3)}
    if full:
        indices = list(ours.metadata.frames_indices)
        start = time.perf_counter()
        frames, _ = load_video(str(clip), backend="pyav", sample_indices_fn=lambda metadata, **_: indices)
        result["transformers_load_video_s"] = round(time.perf_counter() - start, 3)
        result["same_frames"] = bool(np.array_equal(frames, ours.frames))
        result["speedup"] = round(result["transformers_load_video_s"] / ours_s, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "build/bench-models/qwen2_vl-bench")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--max-frames", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a 4 s 320x180 clip and a 40 s one (smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/video_decode.json")
    args = parser.parse_args()
    media = ROOT / "build/bench-media"
    if args.quick:
        clips = [make_clip(media / "quick-4s.mp4", 4, 320, 180), make_clip(media / "quick-40s.mp4", 40, 320, 180)]
    else:
        clips = [make_clip(media / "720p-10s.mp4", 10, 1280, 720), make_clip(media / "720p-10min.mp4", 600, 1280, 720)]
    results = [measure(args.model_dir, clip, args.fps, args.max_frames, full=True) for clip in clips]
    report = {"model_dir": str(args.model_dir), "fps": args.fps, "max_frames": args.max_frames,
              "threads": os.cpu_count(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
