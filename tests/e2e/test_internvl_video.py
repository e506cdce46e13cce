"""InternVL video through the three services (separate processes) against transformers run whole:
each chosen frame is one tile (`Frame{i}: <img>...</img>`), a video one item of a run per frame,
its frames merged into pixel_values between the images' tiles in prompt order."""

from __future__ import annotations

import io

import torch
from PIL import Image

from services.common.video import VideoLimits, decode_video
from services.models.base import IMAGE, VIDEO
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes, video_bytes
from tests.parity import VIDEO_CASES, family_services, media_parity_tests

services = family_services("internvl")
test_video_parity = media_parity_tests("internvl", VIDEO_CASES)

_LIMITS = VideoLimits(max_frame_pixels=1 << 24, max_seconds=60, max_frames=32, max_total_pixels=1 << 30)


def test_video_before_image_keeps_the_processors_tile_order():
    """A video ahead of an image: its frames come first in pixel_values, and its item owns one run per
    frame, each one tile; the items' tiles in prompt order are the processor's whole pixel_values."""
    model_dir = tiny_checkpoint("internvl")
    family = family_for(model_dir)
    processor = family.load_processor(model_dir)
    video = decode_video(video_bytes(seed=3), _LIMITS, where="video",
                         choose=lambda metadata: family.video_frame_indices(processor, metadata, 2.0, 32))
    image = Image.open(io.BytesIO(image_bytes(128, 64, seed=6, kind="gradient")))
    content = [{"type": VIDEO}, {"type": IMAGE}, {"type": "text", "text": "Compare them."}]
    text = family.render_chat(processor, [{"role": "user", "content": content}])
    processed = family.preprocess(processor, text, [image], videos=[video])
    assert [item.modality for item in processed.items] == [VIDEO, IMAGE]
    frames = len(video.frames)
    assert frames > 1
    clip = processed.items[0]
    assert [n for _, n in clip.placeholder_runs] == [family.tokens_per_tile] * frames
    assert clip.encoder_inputs["pixel_values"].shape[0] == frames
    whole = processor(text=[text], images=[image], return_tensors="pt", **family.video_processor_kwargs([video]))
    assert processed.token_ids == whole["input_ids"][0].tolist()
    assert torch.equal(torch.cat([item.encoder_inputs["pixel_values"] for item in processed.items]),
                       whole["pixel_values"])


def test_a_clip_slower_than_the_sampling_fps_gives_every_frame():
    """A 1-fps clip sampled at 2 fps: transformers' InternVL sampler refuses (more frames asked than the
    clip has); the family's choice falls back to every frame, as Qwen2-VL's sampler clamps."""
    model_dir = tiny_checkpoint("internvl")
    family = family_for(model_dir)
    processor = family.load_processor(model_dir)
    video = decode_video(video_bytes(seconds=4, fps=1, seed=5), _LIMITS, where="video",
                         choose=lambda metadata: family.video_frame_indices(processor, metadata, 2.0, 32))
    assert video.metadata.frames_indices == [0, 1, 2, 3] and len(video.frames) == 4
