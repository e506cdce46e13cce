"""Qwen2-Audio in one process: the family's pieces against transformers' whole model, bit for bit."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import torch
from transformers import AutoModelForMultimodalLM

from services.common.audio import Audio
from services.common.errors import InvalidArgument
from services.models.base import AUDIO, PlacedEmbeddings
from services.models.qwen2_audio import Qwen2Audio
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import audio_bytes

CLIPS = [(1.0, 1), (2.5, 2), (0.3, 3)]  # (seconds, seed)


def _clip(seconds: float, seed: int) -> Audio:
    with wave.open(io.BytesIO(audio_bytes(seconds=seconds, seed=seed))) as clip:
        samples = np.frombuffer(clip.readframes(clip.getnframes()), np.int16).astype(np.float32) / 32768
    return Audio(samples=samples, sampling_rate=16000)


@pytest.fixture(scope="module")
def model_dir():
    return tiny_checkpoint("qwen2_audio")


@pytest.fixture(scope="module")
def family(model_dir) -> Qwen2Audio:
    family = family_for(model_dir)
    assert isinstance(family, Qwen2Audio) and family.modalities == (AUDIO,)
    return family


@pytest.fixture(scope="module")
def processor(family, model_dir):
    return family.load_processor(model_dir)


@pytest.fixture(scope="module")
def whole(model_dir):
    return AutoModelForMultimodalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def encoder_model(family, model_dir):
    model = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_encoder(model)
    return model


def _prompt(family, processor, num_clips: int, text: str = "What do you hear?") -> str:
    content = [{"type": AUDIO} for _ in range(num_clips)] + [{"type": "text", "text": text}]
    return family.render_chat(processor, [{"role": "user", "content": content}])


def test_render_chat_marks_audio_parts(family, processor):
    assert _prompt(family, processor, 2, "hi") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\nhi<|im_end|>\n"
        "<|im_start|>assistant\n")


def _whole_rows(whole, processor, text: str, audios: list[Audio]) -> tuple[list[int], torch.Tensor]:
    """The prompt's embeddings as transformers' whole model builds them (audio rows merged)."""
    inputs = processor(text=[text], audio=[a.samples for a in audios], return_tensors="pt")
    captured: dict[str, torch.Tensor] = {}

    def keep(module, args, kwargs) -> None:
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = whole.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.inference_mode():
            whole(**inputs)
    finally:
        hook.remove()
    return inputs["input_ids"][0].tolist(), captured["embeds"][0]


def test_encoder_rows_equal_whole_model(family, processor, whole, encoder_model):
    audios = [_clip(*clip) for clip in CLIPS]
    text = _prompt(family, processor, len(audios))
    prompt = family.preprocess(processor, text, [], audios=audios)
    ids, expected = _whole_rows(whole, processor, text, audios)
    assert prompt.token_ids == ids
    assert [item.length for item in prompt.items] == [25, 62, 7]  # 100, 250, 30 frames
    rows = family.encode(encoder_model, AUDIO, [item.encoder_inputs for item in prompt.items])
    for item, got in zip(prompt.items, rows):
        assert family.check_encoder_item(AUDIO, item.encoder_inputs, where="item")["tokens"] == item.length
        assert torch.equal(got.embeddings, expected[item.offset : item.offset + item.length])


def test_llm_prefill_equals_whole_model(family, model_dir, processor, whole, encoder_model):
    audios = [_clip(*CLIPS[0])]
    text = _prompt(family, processor, 1)
    prompt = family.preprocess(processor, text, [], audios=audios)
    rows = family.encode(encoder_model, AUDIO, [item.encoder_inputs for item in prompt.items])
    llm = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_llm(llm)
    assert llm.model.audio_tower is None and llm.model.multi_modal_projector is None
    placed = [PlacedEmbeddings(AUDIO, item.offset, item.length, emb, item.position_inputs)
              for item, emb in zip(prompt.items, rows)]
    token_ids = torch.tensor(prompt.token_ids)
    with torch.inference_mode():
        prefill = family.prefill_inputs(llm, token_ids, placed)
        out = family.language_model(llm)(inputs_embeds=prefill.inputs_embeds, position_ids=prefill.position_ids,
                                         attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                                         past_key_values=family.new_cache(llm), use_cache=True)
        inputs = processor(text=[text], audio=[a.samples for a in audios], return_tensors="pt")
        expected = whole.model(**inputs).last_hidden_state  # the decoder's output, before lm_head
    # Compared before lm_head: a GEMM over one row and over the prompt's rows may round the last row's
    # logits differently (~3e-6 here), which is the engine's concern, not the family's.
    assert torch.equal(out.last_hidden_state, expected), (out.last_hidden_state - expected).abs().max()


def _item(family, processor) -> dict[str, torch.Tensor]:
    prompt = family.preprocess(processor, _prompt(family, processor, 1), [], audios=[_clip(*CLIPS[0])])
    return dict(prompt.items[0].encoder_inputs)


@pytest.mark.parametrize("damage", ["mel-bins", "not-30s", "mask-hole", "mask-empty", "mask-float", "missing"])
def test_schema_rejects_malformed_audio(family, processor, damage):
    item = _item(family, processor)
    assert family.check_encoder_item(AUDIO, item, where="item 0", max_patches=3000)["tokens"] == 25
    if damage == "mel-bins":
        item["input_features"] = item["input_features"][:, :80]
    elif damage == "not-30s":
        item["input_features"] = item["input_features"][..., :1000]
        item["feature_attention_mask"] = item["feature_attention_mask"][:, :1000]
    elif damage == "mask-hole":
        item["feature_attention_mask"] = item["feature_attention_mask"].clone()
        item["feature_attention_mask"][0, 5] = 0
    elif damage == "mask-empty":
        item["feature_attention_mask"] = torch.zeros_like(item["feature_attention_mask"])
    elif damage == "mask-float":
        item["feature_attention_mask"] = item["feature_attention_mask"].float()
    else:
        del item["feature_attention_mask"]
    with pytest.raises(InvalidArgument) as err:
        family.check_encoder_item(AUDIO, item, where="item 0")
    assert err.value.reason == "ENCODER_INPUT_INVALID"


def test_budget_counts_the_padded_frames(family, processor):
    with pytest.raises(InvalidArgument) as err:
        family.check_encoder_item(AUDIO, _item(family, processor), where="item 0", max_patches=2999)
    assert err.value.reason == "ITEM_TOO_LARGE"


def test_a_clip_over_30_s_is_refused_not_cut(family, processor):
    """transformers keeps the first 30 s of a longer clip; the family says so instead of dropping audio."""
    long = Audio(samples=np.zeros(30 * 16000 + 1, np.float32), sampling_rate=16000)
    text = _prompt(family, processor, 1)
    assert family.preprocess(processor, text, [], audios=[Audio(long.samples[:-1], 16000)]).items[0].length == 750
    with pytest.raises(InvalidArgument) as err:
        family.preprocess(processor, text, [], audios=[long])
    assert err.value.reason == "AUDIO_TOO_LONG" and err.value.metadata == {"maxAudioSeconds": "30"}


@pytest.mark.parametrize(("seconds", "ok"), [(0.03, False), (0.05, False), (0.07, True)])
def test_a_clip_too_short_for_two_rows_is_refused(family, processor, seconds, ok):
    """Under 2 rows transformers' Qwen2-Audio takes its legacy merge and fails: refused before it."""
    clip = Audio(samples=np.full(round(seconds * 16000), 0.1, np.float32), sampling_rate=16000)
    text = _prompt(family, processor, 1)
    if ok:
        assert family.preprocess(processor, text, [], audios=[clip]).items[0].length == 2
        return
    with pytest.raises(InvalidArgument) as err:
        family.preprocess(processor, text, [], audios=[clip])
    assert err.value.reason == "AUDIO_TOO_SHORT" and "at least 2 (70 ms)" in err.value.message
