"""Phi-4-multimodal audio in one process: the family's items and encoder rows against transformers' whole
embedding module, bit for bit, for a clip alone, clips of different lengths, and clips beside images."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from services.common.audio import Audio
from services.common.errors import InvalidArgument
from services.models.base import AUDIO, IMAGE
from services.models.phi4mm import Phi4Multimodal
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import audio_bytes, image_bytes


def _clip(seconds: float, seed: int) -> Audio:
    with wave.open(io.BytesIO(audio_bytes(seconds=seconds, seed=seed))) as clip:
        samples = np.frombuffer(clip.readframes(clip.getnframes()), np.int16).astype(np.float32) / 32768
    return Audio(samples=samples, sampling_rate=16000)


CASES = {  # (images as (width, height), clips as (seconds, seed))
    "one-clip": ([], [(1.0, 1)]),
    "two-clips-padded": ([], [(1.0, 1), (2.5, 2)]),  # the first is padded to the second's frames, with a mask
    "image-then-clip": ([(160, 120)], [(1.0, 1)]),  # the vision projection
    "clip-between-images": ([(160, 120), (448, 448)], [(0.7, 3), (1.3, 4)]),
    "same-clip-twice": ([], [(1.0, 1), (1.0, 1)]),  # one batch of two with a frame mask
}


@pytest.fixture(scope="module")
def model_dir():
    return tiny_checkpoint("phi4mm")


@pytest.fixture(scope="module")
def family(model_dir) -> Phi4Multimodal:
    family = family_for(model_dir)
    assert isinstance(family, Phi4Multimodal) and AUDIO in family.modalities
    return family


@pytest.fixture(scope="module")
def processor(family, model_dir):
    return family.load_processor(model_dir)


@pytest.fixture(scope="module")
def whole(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def encoder_model(family, model_dir):
    model = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_encoder(model)
    return model


def _request(family, processor, case: str):
    sizes, clips = CASES[case]
    images = [Image.open(io.BytesIO(image_bytes(w, h, seed=i))) for i, (w, h) in enumerate(sizes)]
    audios = [_clip(seconds, seed) for seconds, seed in clips]
    content = ([{"type": IMAGE} for _ in images[:1]] + [{"type": AUDIO} for _ in audios[:1]]
               + [{"type": IMAGE} for _ in images[1:]] + [{"type": AUDIO} for _ in audios[1:]]
               + [{"type": "text", "text": "What is this?"}])
    text = family.render_chat(processor, [{"role": "user", "content": content}])
    return text, images, audios


def _whole_rows(whole, processor, text, images, audios) -> tuple[list[int], torch.Tensor]:
    """What transformers' embedding module writes over the prompt (its own processor call, no sampling_rate)."""
    inputs = processor(text=[text], images=images or None, audio=[a.samples for a in audios], return_tensors="pt")
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    with torch.inference_mode():
        rows = whole.model.embed_tokens_extend(ids, whole.model.embed_tokens(ids), **inputs)
    return ids[0].tolist(), rows[0]


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_rows_equal_whole_model(family, processor, whole, encoder_model, case):
    text, images, audios = _request(family, processor, case)
    prompt = family.preprocess(processor, text, images, audios=audios)
    expected_ids, expected = _whole_rows(whole, processor, text, images, audios)
    assert prompt.token_ids == expected_ids
    modalities = [item.modality for item in prompt.items]
    assert sorted(modalities) == sorted([IMAGE] * len(images) + [AUDIO] * len(audios))
    for modality in (IMAGE, AUDIO):
        items = [item for item in prompt.items if item.modality == modality]
        rows = family.encode(encoder_model, modality, [item.encoder_inputs for item in items])
        for item, got in zip(items, rows):
            family.check_encoder_item(modality, item.encoder_inputs, where="item")
            assert torch.equal(got.embeddings, expected[item.offset : item.offset + item.length])
            if modality == AUDIO and len(audios) == 1:
                assert item.hash_context == ("vision" if images else "")


def test_audio_rows_depend_on_the_request(family, processor, encoder_model):
    """The power of the test above: the same clip's rows differ with images in the prompt (projection) and
    beside a longer clip (padding), so items must carry both and their cache keys must differ."""
    def rows(case: str) -> torch.Tensor:
        text, images, audios = _request(family, processor, case)
        items = [i for i in family.preprocess(processor, text, images, audios=audios).items if i.modality == AUDIO]
        return family.encode(encoder_model, AUDIO, [item.encoder_inputs for item in items])[0].embeddings

    alone, with_image, padded = rows("one-clip"), rows("image-then-clip"), rows("two-clips-padded")
    assert alone.shape == with_image.shape == padded.shape
    assert not torch.allclose(alone, with_image, atol=1e-3)
    assert not torch.equal(alone, padded)


def _audio_item(family, processor) -> dict[str, torch.Tensor]:
    text, images, audios = _request(family, processor, "two-clips-padded")
    return dict(family.preprocess(processor, text, images, audios=audios).items[0].encoder_inputs)


@pytest.mark.parametrize("damage", ["mel-bins", "frames-over-features", "tokens", "mode", "missing", "float-sizes"])
def test_schema_rejects_malformed_audio(family, processor, damage):
    item = _audio_item(family, processor)
    family.check_encoder_item(AUDIO, item, where="item 0")
    if damage == "mel-bins":
        item["audio_input_features"] = item["audio_input_features"][..., :40]
    elif damage == "frames-over-features":
        item["audio_frames"] = torch.tensor([item["audio_input_features"].shape[1] + 1])
    elif damage == "tokens":
        item["audio_embed_sizes"] = item["audio_embed_sizes"] + 1
    elif damage == "mode":
        item["audio_projection_mode"] = torch.tensor([2])
    elif damage == "missing":
        del item["audio_frames"]
    else:
        item["audio_embed_sizes"] = item["audio_embed_sizes"].float()
    with pytest.raises(InvalidArgument) as err:
        family.check_encoder_item(AUDIO, item, where="item 0")
    assert err.value.reason == "ENCODER_INPUT_INVALID"


def test_audio_budget_counts_frames(family, processor):
    item = _audio_item(family, processor)
    frames = item["audio_input_features"].shape[1]
    assert family.check_encoder_item(AUDIO, item, where="item 0", max_patches=frames)["tokens"] == 13  # 98 valid frames / 8, ceil
    with pytest.raises(InvalidArgument) as err:
        family.check_encoder_item(AUDIO, item, where="item 0", max_patches=frames - 1)
    assert err.value.reason == "ITEM_TOO_LARGE"


def test_same_clip_twice_is_two_items(family, processor, encoder_model):
    """Deduplicated by mm_hash, the clip would be encoded alone (no frame mask): not transformers' rows."""
    text, images, audios = _request(family, processor, "same-clip-twice")
    first, second = family.preprocess(processor, text, images, audios=audios).items
    assert (first.hash_context, second.hash_context) == ("clip 1 of 2", "clip 2 of 2")
    pair = family.encode(encoder_model, AUDIO, [first.encoder_inputs, second.encoder_inputs])
    (alone,) = family.encode(encoder_model, AUDIO, [first.encoder_inputs])
    assert torch.equal(pair[0].embeddings, pair[1].embeddings)
    assert not torch.equal(pair[0].embeddings, alone.embeddings)


def test_a_clip_shorter_than_a_window_is_refused(family, processor):
    """The feature extractor fails on fewer samples than its 400-sample window (25 ms); refused with the reason."""
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": AUDIO}]}])
    clip = Audio(samples=np.full(400, 0.1, np.float32), sampling_rate=16000)
    assert family.preprocess(processor, text, [], audios=[clip]).items[0].length == 1
    with pytest.raises(InvalidArgument) as err:
        family.preprocess(processor, text, [], audios=[Audio(clip.samples[:399], 16000)])
    assert err.value.reason == "AUDIO_TOO_SHORT" and "at least 400 (25 ms)" in err.value.message
