"""InternVL through the three services (separate processes) against transformers run whole.

Images: a tile count per image that varies with its aspect ratio (the processor returns no per-image
count: the family reads it back from the placeholder runs). Video: each chosen frame is one tile
(`Frame{i}: <img>...</img>`), a video one item of a run per frame, its frames merged into pixel_values
between the images' tiles in prompt order."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from services.common.errors import InvalidArgument
from services.common.video import VideoLimits, decode_video
from services.models.base import IMAGE, VIDEO
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes, video_bytes
from tests.parity import CASES, VIDEO_CASES, family_services, media_parity_tests, model_info_test, parity_tests

services = family_services("internvl")
test_parity = parity_tests("internvl")
test_model_info = model_info_test("internvl")
test_video_parity = media_parity_tests("internvl", VIDEO_CASES)

_LIMITS = VideoLimits(max_frame_pixels=1 << 24, max_seconds=60, max_frames=32, max_total_pixels=1 << 30)


def _prompt(prompt: str, images: list[bytes]):
    model_dir = tiny_checkpoint("internvl")
    processor = AutoProcessor.from_pretrained(model_dir)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    pil_images = [Image.open(io.BytesIO(data)) for data in images]
    return model_dir, processor, text, pil_images


def test_tiles_per_image_follow_aspect_ratio():
    """Each item carries exactly its own tiles, and the test images give different tile counts."""
    prompt, images = CASES["two-images"]
    model_dir, processor, text, pil_images = _prompt(prompt, images)
    family = family_for(model_dir)
    processed = family.preprocess(processor, text, pil_images)
    seq = AutoConfig.from_pretrained(model_dir).image_seq_length
    tiles = [item.encoder_inputs["pixel_values"].shape[0] for item in processed.items]
    assert [item.length for item in processed.items] == [t * seq for t in tiles]
    # what the image processor alone makes of each image, one at a time
    alone = [processor.image_processor(images=[img], return_tensors="pt")["pixel_values"].shape[0] for img in pil_images]
    assert tiles == alone
    counts = set(tiles)
    for case in ("one-image", "one-image-other"):
        _, _, one_text, one_images = _prompt(*CASES[case])
        counts.add(family.preprocess(processor, one_text, one_images).items[0].encoder_inputs["pixel_values"].shape[0])
    assert len(counts) >= 3, f"test images give tile counts {counts}: too alike to test the per-item cut"
    assert all(t > 1 for t in counts), "every test image should be tiled (grid + thumbnail)"
    # the items' pixel values, back in order, are the processor's
    whole = processor(text=[text], images=pil_images, return_tensors="pt")["pixel_values"]
    assert torch.equal(torch.cat([item.encoder_inputs["pixel_values"] for item in processed.items]), whole)


def test_encode_matches_the_whole_model_features():
    """Per-item rows, from one batched tower call, are the model's own image features in order."""
    prompt, images = CASES["two-images"]
    model_dir, processor, text, pil_images = _prompt(prompt, images)
    family = family_for(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processed = family.preprocess(processor, text, pil_images)
    rows = family.encode(model, "image", [item.encoder_inputs for item in processed.items])
    whole = processor(text=[text], images=pil_images, return_tensors="pt")
    with torch.inference_mode():
        expected = model.model.get_image_features(pixel_values=whole["pixel_values"]).pooler_output
    assert [r.embeddings.shape[0] for r in rows] == [item.length for item in processed.items]
    assert torch.equal(torch.cat([r.embeddings for r in rows]), expected.reshape(-1, expected.shape[-1]))


@pytest.mark.parametrize("bad", ["half-size", "no-tiles", "3-d"])
def test_encode_rejects_malformed_tiles(bad):
    model_dir = tiny_checkpoint("internvl")
    family = family_for(model_dir)
    h, w = family.tile_size
    shape = {"half-size": (1, 3, h // 2, w // 2), "no-tiles": (0, 3, h, w), "3-d": (2, h, w)}[bad]
    with pytest.raises(InvalidArgument) as caught:
        family.check_encoder_item("image", {"pixel_values": torch.zeros(shape)}, where="item 0")
    assert caught.value.reason == "ENCODER_INPUT_INVALID"


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
