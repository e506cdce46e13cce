"""Qwen2.5-Omni's thinker in one process: the family's items, encoder rows, positions and decoder output
against transformers' whole model, bit for bit, for clips alone, images alone and both."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from services.common.audio import Audio
from services.common.errors import InvalidArgument
from services.models.base import AUDIO, IMAGE, PlacedEmbeddings
from services.models.qwen2_5_omni_thinker import Qwen2_5OmniThinker
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import audio_bytes, image_bytes

CASES = {  # part types in order: ("image", (w, h)) or ("audio", (seconds, seed))
    "one-clip": [(AUDIO, (1.0, 1))],
    "two-clips": [(AUDIO, (1.0, 1)), (AUDIO, (2.5, 2))],
    "image-then-clip": [(IMAGE, (160, 120)), (AUDIO, (1.0, 1))],
    "clip-image-clip": [(AUDIO, (0.4, 3)), (IMAGE, (96, 200)), (AUDIO, (1.3, 4))],
    "one-row-clip": [(AUDIO, (0.03, 5))],  # 3 frames: the shortest clip with an embedding row
}


def _clip(seconds: float, seed: int) -> Audio:
    with wave.open(io.BytesIO(audio_bytes(seconds=seconds, seed=seed))) as clip:
        samples = np.frombuffer(clip.readframes(clip.getnframes()), np.int16).astype(np.float32) / 32768
    return Audio(samples=samples, sampling_rate=16000)


@pytest.fixture(scope="module")
def model_dir():
    return tiny_checkpoint("qwen2_5_omni_thinker")


@pytest.fixture(scope="module")
def family(model_dir) -> Qwen2_5OmniThinker:
    family = family_for(model_dir)
    assert isinstance(family, Qwen2_5OmniThinker) and family.modalities == (IMAGE, AUDIO)
    return family


@pytest.fixture(scope="module")
def processor(family, model_dir):
    return family.load_processor(model_dir)


@pytest.fixture(scope="module")
def whole(model_dir):
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(family, model_dir):
    encoder = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_encoder(encoder)
    llm = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_llm(llm)
    return encoder, llm


def _request(family, processor, case: str):
    parts = CASES[case]
    images = [Image.open(io.BytesIO(image_bytes(*size, seed=i))) for i, (kind, size) in enumerate(parts) if kind == IMAGE]
    audios = [_clip(*clip) for kind, clip in parts if kind == AUDIO]
    content = [{"type": kind} for kind, _ in parts] + [{"type": "text", "text": "What is this?"}]
    return family.render_chat(processor, [{"role": "user", "content": content}]), images, audios


def _whole(whole, processor, text, images, audios) -> tuple[dict, dict]:
    """transformers' inputs and what its decoder gets (inputs_embeds, position_ids) and gives."""
    inputs = processor(text=[text], images=images or None, audio=[a.samples for a in audios], return_tensors="pt")
    captured: dict[str, torch.Tensor] = {}

    def keep(module, args, kwargs) -> None:
        captured.update(embeds=kwargs["inputs_embeds"], positions=kwargs["position_ids"])

    hook = whole.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.inference_mode():
            captured["hidden"] = whole.model(**inputs).last_hidden_state
    finally:
        hook.remove()
    return inputs, captured


@pytest.mark.parametrize("case", list(CASES))
def test_pieces_equal_whole_model(family, processor, whole, models, case):
    encoder, llm = models
    text, images, audios = _request(family, processor, case)
    prompt = family.preprocess(processor, text, images, audios=audios)
    inputs, expected = _whole(whole, processor, text, images, audios)
    assert prompt.token_ids == inputs["input_ids"][0].tolist()
    assert [item.modality for item in prompt.items] == [kind for kind, _ in CASES[case]]
    placed = []
    for modality in (IMAGE, AUDIO):
        items = [item for item in prompt.items if item.modality == modality]
        if not items:
            continue
        rows = family.encode(encoder, modality, [item.encoder_inputs for item in items])
        for item, got in zip(items, rows):
            family.check_encoder_item(modality, item.encoder_inputs, where="item")
            family.check_position_inputs(modality, item.position_inputs, item.length, where="item")
            assert torch.equal(got.embeddings, expected["embeds"][0, item.offset : item.offset + item.length])
            placed.append(PlacedEmbeddings(modality, item.offset, item.length, got, item.position_inputs))
    token_ids = torch.tensor(prompt.token_ids)
    with torch.inference_mode():
        prefill = family.prefill_inputs(llm, token_ids, sorted(placed, key=lambda p: p.offset))
        out = family.language_model(llm)(inputs_embeds=prefill.inputs_embeds, position_ids=prefill.position_ids,
                                         attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                                         past_key_values=family.new_cache(llm), use_cache=True)
    assert torch.equal(prefill.inputs_embeds, expected["embeds"])
    assert torch.equal(prefill.position_ids, expected["positions"])
    assert torch.equal(out.last_hidden_state, expected["hidden"])


def test_position_inputs_must_match_the_placeholders(family, processor):
    text, images, audios = _request(family, processor, "one-clip")
    (item,) = family.preprocess(processor, text, images, audios=audios).items
    with pytest.raises(InvalidArgument) as err:
        family.check_position_inputs(AUDIO, {"audio_feature_lengths": torch.tensor([400])}, item.length, where="i")
    assert err.value.reason == "POSITION_INPUT_INVALID"


def test_a_clip_without_a_row_is_refused(family, processor):
    """Under 3 frames a clip makes no embedding row: transformers drops its placeholder; refused instead."""
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": AUDIO}]}])
    assert family.preprocess(processor, text, [], audios=[_clip(0.03, 1)]).items[0].length == 1
    with pytest.raises(InvalidArgument) as err:
        family.preprocess(processor, text, [], audios=[_clip(0.01, 1)])
    assert err.value.reason == "AUDIO_TOO_SHORT"
