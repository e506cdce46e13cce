"""bench/video_decode.py runs (tiny Qwen2-VL, a 20 s clip) and decodes the same frames transformers'
loader keeps, and the frames sampled are the cap, not the clip's length in frames."""

from __future__ import annotations

from bench.video_decode import make_clip, measure
from tests.checkpoints import tiny_checkpoint


def test_video_decode_smoke(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", 20, 128, 72)
    result = measure(tiny_checkpoint("qwen2_vl"), clip, fps=2.0, max_frames=8, full=True)
    assert result["frames_in_clip"] == 600 and result["frames_sampled"] == 8
    assert result["same_frames"] and result["ours_decode_s"] > 0 and result["transformers_load_video_s"] > 0
