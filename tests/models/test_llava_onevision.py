"""LLaVA-OneVision in one process: for images of every kind of grid (shrunk past anyres_max_9 or not)
and for clips, the placeholder run the processor makes is exactly as long as the rows the family's
arithmetic says and the whole model's tower makes, and the family's encoder gives those rows bitwise."""

from __future__ import annotations

import io
from functools import lru_cache

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from services.common.video import VideoLimits, decode_video
from services.models.base import IMAGE, VIDEO
from services.models.llava_next import LlavaNext
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes, video_bytes

_LIMITS = VideoLimits(max_frame_pixels=1 << 24, max_seconds=60, max_frames=32, max_total_pixels=1 << 30)


@lru_cache(maxsize=1)
def _loaded():
    model_dir = tiny_checkpoint("llava_onevision")
    family = family_for(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return family, family.load_processor(model_dir), model


def _shrunk(family, height: int, width: int) -> bool:
    """Whether the model shrinks this image's unpadded grid (anyres_max_N): fewer rows than LLaVA-NeXT's
    arithmetic (the same tiles, unpadding and row ends, no cap) gives."""
    return family.num_image_tokens(height, width) < LlavaNext.num_image_tokens(family, height, width)


@pytest.mark.parametrize("size", [(160, 120), (96, 200), (320, 240), (400, 90), (300, 300)])  # (width, height)
def test_image_rows_match_the_model(size):
    family, processor, model = _loaded()
    image = Image.open(io.BytesIO(image_bytes(*size, seed=3)))
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": IMAGE}, {"type": "text", "text": "Hi"}]}])
    (item,) = family.preprocess(processor, text, [image]).items
    whole = processor(text=[text], images=[image], return_tensors="pt")
    with torch.inference_mode():
        expected = model.model.get_image_features(pixel_values=whole["pixel_values"], image_sizes=whole["image_sizes"],
                                                  batch_num_images=whole["batch_num_images"]).pooler_output[0]
    assert item.length == expected.shape[0] == family.num_image_tokens(size[1], size[0])
    (rows,) = family.encode(model, IMAGE, [item.encoder_inputs])
    assert torch.equal(rows.embeddings, expected)


def test_the_test_images_reach_the_shrinking_step():
    family, _, _ = _loaded()
    assert _shrunk(family, 240, 320) and _shrunk(family, 300, 300)
    assert not _shrunk(family, 120, 160) and not _shrunk(family, 90, 400)  # 90 x 400: unpadded to 1/4 of its grid


def test_video_is_one_run_of_pooled_frames_and_a_row_end():
    family, processor, model = _loaded()
    video = decode_video(video_bytes(seed=4), _LIMITS, where="video",
                         choose=lambda metadata: family.video_frame_indices(processor, metadata, 2.0, 32))
    image = Image.open(io.BytesIO(image_bytes(96, 96, seed=5)))
    content = [{"type": IMAGE}, {"type": VIDEO}, {"type": "text", "text": "Compare them."}]
    text = family.render_chat(processor, [{"role": "user", "content": content}])
    processed = family.preprocess(processor, text, [image], videos=[video])
    assert [item.modality for item in processed.items] == [IMAGE, VIDEO]
    clip = processed.items[1]
    frames = len(video.frames)
    assert clip.length == frames * family.tokens_per_frame + 1 and processed.items[0].offset + processed.items[0].length == clip.offset
    whole = processor(text=[text], images=[image], return_tensors="pt", **family.video_processor_kwargs([video]))
    assert processed.token_ids == whole["input_ids"][0].tolist()
    with torch.inference_mode():
        expected = model.model.get_video_features(pixel_values_videos=whole["pixel_values_videos"]).pooler_output[0]
    (rows,) = family.encode(model, VIDEO, [clip.encoder_inputs])
    assert torch.equal(rows.embeddings, expected)
    family.check_encoder_item(VIDEO, clip.encoder_inputs, where="clip")


def test_clips_batched_match_alone_bitwise():
    """The family claims "exact" batching: clips of one frame count run in one tower call, and each
    clip's rows are bitwise its rows alone (a clip of another frame count runs in its own call)."""
    family, processor, model = _loaded()
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": VIDEO}, {"type": "text", "text": "Hi"}]}])
    items = []
    for seed, seconds in ((1, 2.0), (2, 2.0), (3, 3.0)):
        video = decode_video(video_bytes(seconds=seconds, seed=seed), _LIMITS, where="video",
                             choose=lambda metadata: family.video_frame_indices(processor, metadata, 2.0, 32))
        (item,) = family.preprocess(processor, text, [], videos=[video]).items
        items.append(item.encoder_inputs)
    assert len({item["pixel_values_videos"].shape[1] for item in items}) == 2
    alone = [family.encode(model, VIDEO, [item])[0].embeddings for item in items]
    batched = [rows.embeddings for rows in family.encode(model, VIDEO, items)]
    assert all(torch.equal(a, b) for a, b in zip(alone, batched, strict=True))
