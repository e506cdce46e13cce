"""Nemotron-H Omni in one process: the checkpoint, placeholder runs, encoder rows and the hybrid cache.

The e2e parity test proves the split across processes; these pin what it rests on: the tiny
checkpoint has the real model's shape (RADIO tower, hybrid Mamba/attention/MoE text model, <img>
wrapped runs of h*w/4 <image> tokens), the encoder rows are the whole model's bit for bit, and the
engine's prefill + token-by-token decode through the family's cache is generate()'s, with the Mamba
state actually carried (dropping it changes the tokens, so the parity test has power there too).
"""

from __future__ import annotations

import asyncio
import io
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.cache_utils import DummyLayer, DynamicLayer, LinearAttentionLayer

from services.common.audio import Audio, AudioLimits, decode_audio
from services.common.errors import InvalidArgument
from services.common.video import Video, VideoLimits, decode_video, video_from_frames
from services.llm.engine import Engine, Finished
from services.llm.sampling import SamplingSpec
from services.models.base import AUDIO, IMAGE, VIDEO, ItemEmbeddings, PlacedEmbeddings
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import audio_bytes, image_bytes, video_bytes

MAX_NEW_TOKENS = 12


@lru_cache(maxsize=1)
def _loaded():
    model_dir = tiny_checkpoint("nemotron_h_omni")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return family_for(model_dir), AutoProcessor.from_pretrained(model_dir), model


def _image(width: int, height: int, seed: int = 0, kind: str = "noise") -> Image.Image:
    return Image.open(io.BytesIO(image_bytes(width, height, seed=seed, kind=kind)))


def _prompt(family, processor, num_images: int, text: str = "Describe this image.") -> str:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return family.render_chat(processor, [{"role": "user", "content": content}])


def _generate(model, processor, text: str, images: list[Image.Image]) -> list[int]:
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_checkpoint_has_the_omni_shape():
    family, processor, model = _loaded()
    config, tok = model.config, processor.tokenizer
    assert type(family).__name__ == "NemotronHOmni" and config.architectures == ["NemotronH_Omni_Reasoning_V3"]
    assert type(processor).__name__ == "NemotronH_Omni_Reasoning_V3Processor"
    assert type(processor.image_processor).__name__ == "NemotronH_Omni_Reasoning_V3ImageProcessor"
    assert config.vision_config.model_type == "radio" and config.text_config.model_type == "nemotron_h"
    assert config.vision_config.video_temporal_patch_size == config.video_temporal_patch_size == 2
    assert config.vision_config.patch_dim == 768 and config.audio_config.model_type == "parakeet_encoder"
    assert config.audio_token_id == tok.convert_tokens_to_ids("<so_embedding>") == processor.audio_token_id
    # hybrid: Mamba, MoE and attention blocks, as hybrid_override_pattern "MEM*E"
    assert config.text_config.hybrid_override_pattern == "MEM*E"
    assert config.image_token_id == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "</s>")]


def test_chat_template_renders_nemotron_turns():
    family, processor, _ = _loaded()
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]
    assert family.render_chat(processor, [{"role": "user", "content": content}]) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<image><image>hi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
               {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert processor.apply_chat_template(history, add_generation_prompt=True, tokenize=False, enable_thinking=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>b<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>")


# (width, height): the harness's images, extreme ratios both ways, tiny and large ones.
SIZES = [(160, 120), (96, 200), (96, 96), (128, 64), (300, 40), (40, 300), (1, 1), (3, 500), (1000, 999)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_run_is_wrapped_and_as_long_as_the_rows(width, height):
    family, processor, model = _loaded()
    processed = family.preprocess(processor, _prompt(family, processor, 1), [_image(width, height)])
    (item,) = processed.items
    h, w = item.encoder_inputs["image_grid_hw"][0].tolist()
    assert h % 2 == 0 and w % 2 == 0 and item.length == h * w // 4
    tokens = processor.tokenizer.convert_ids_to_tokens(processed.token_ids)
    assert tokens[item.offset - 1] == "<img>" and tokens[item.offset + item.length] == "</img>"
    assert set(tokens[item.offset : item.offset + item.length]) == {"<image>"}
    assert tuple(item.encoder_inputs["pixel_values"].shape) == (h * w, 768)
    (rows,) = family.encode(model, IMAGE, [item.encoder_inputs])
    assert tuple(rows.embeddings.shape) == (item.length, 64) and rows.embeddings.dtype == torch.float32


def test_items_cut_from_one_call_give_the_whole_models_rows_and_prefill():
    """Three images on three grids, packed by the processor into one pixel_values: the per-item slices,
    encoded as one batch, are the rows the whole model scatters, and the prefill is its masked_scatter."""
    family, processor, model = _loaded()
    images = [_image(96, 96, 5), _image(128, 64, 6, "gradient"), _image(160, 120, 1)]
    text = _prompt(family, processor, 3, "Compare them.")
    processed = family.preprocess(processor, text, images)
    assert [item.encoder_inputs["image_grid_hw"].tolist() for item in processed.items] == [[[6, 6]], [[4, 8]], [[8, 8]]]
    rows = family.encode(model, IMAGE, [item.encoder_inputs for item in processed.items])

    inputs = processor(text=[text], images=images, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == processed.token_ids
    with torch.inference_mode():
        whole = model.get_image_features(inputs["pixel_values"], inputs["image_grid_hw"]).pooler_output
    for mine, theirs in zip(rows, whole, strict=True):
        torch.testing.assert_close(mine.embeddings, theirs, rtol=0, atol=0)

    placed = [PlacedEmbeddings(IMAGE, item.offset, item.length, r, {}) for item, r in zip(processed.items, rows)]
    with torch.inference_mode():
        prefill = family.prefill_inputs(model, torch.tensor(processed.token_ids), placed)
        ids = inputs["input_ids"]
        mask = (ids == model.config.image_token_id)[..., None]
        expected = model.get_input_embeddings()(ids).masked_scatter(mask, torch.cat(whole))
    torch.testing.assert_close(prefill.inputs_embeds, expected, rtol=0, atol=0)
    assert prefill.position_ids is None and prefill.layer_kwargs == {}


def _engine_tokens(family, model, token_ids: list[int], placed: list[PlacedEmbeddings], eos: frozenset[int]) -> list[int]:
    """Greedy tokens from the LLM service's engine (prefill, then one token per step), in process."""

    async def run() -> list[int]:
        engine = Engine(family, model, max_running=2, max_waiting=2)
        try:
            out = []
            async for event in engine.generate(torch.tensor(token_ids), placed,
                                               SamplingSpec(max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=eos)):
                if not isinstance(event, Finished):
                    out.append(event.token_id)
            return out
        finally:
            engine.stop()

    return asyncio.run(run())


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_engine_with_the_hybrid_cache_decodes_like_generate(num_images):
    family, processor, model = _loaded()
    images = [_image(160, 120, 1), _image(96, 200, 2, "gradient")][:num_images]
    text = _prompt(family, processor, num_images, "Tell me about the sea." if not images else "Describe this.")
    processed = family.preprocess(processor, text, images)
    rows = family.encode(model, IMAGE, [item.encoder_inputs for item in processed.items]) if images else []
    placed = [PlacedEmbeddings(IMAGE, item.offset, item.length, r, {}) for item, r in zip(processed.items, rows)]
    eos = frozenset(model.generation_config.eos_token_id)
    assert _engine_tokens(family, model, processed.token_ids, placed, eos) == _generate(model, processor, text, images)


def test_cache_holds_mamba_state_and_decoding_needs_it():
    """The family's cache is the one generate() makes: conv + SSM state for the Mamba blocks, KV for the
    attention block, nothing for MoE. Resetting the Mamba state after prefill changes the greedy tokens,
    so token parity does check that the state is carried from prefill into decode."""
    family, processor, model = _loaded()
    text = _prompt(family, processor, 1)
    images = [_image(160, 120, 1)]
    processed = family.preprocess(processor, text, images)
    rows = family.encode(model, IMAGE, [processed.items[0].encoder_inputs])
    placed = [PlacedEmbeddings(IMAGE, processed.items[0].offset, processed.items[0].length, rows[0], {})]
    token_ids = torch.tensor(processed.token_ids)
    length = len(processed.token_ids)
    lm, head = family.language_model(model), family.lm_head(model)

    def greedy(reset_mamba: bool) -> list[int]:
        with torch.inference_mode():
            prefill = family.prefill_inputs(model, token_ids, placed)
            cache = family.new_cache(model)
            assert [type(layer) for layer in cache.layers] == [
                LinearAttentionLayer, DummyLayer, LinearAttentionLayer, DynamicLayer, DummyLayer]
            out = lm(inputs_embeds=prefill.inputs_embeds, attention_mask=torch.ones(1, length, dtype=torch.long),
                     past_key_values=cache, use_cache=True)
            assert cache.get_seq_length() == length  # read from the attention block, as the engine does
            conv, ssm = cache.layers[0].conv_states[0], cache.layers[0].recurrent_states[0]
            assert tuple(conv.shape) == (1, 64 + 2 * 2 * 16, 4) and tuple(ssm.shape) == (1, 8, 8, 16)
            if reset_mamba:
                for layer in cache.layers:
                    if isinstance(layer, LinearAttentionLayer):
                        layer.conv_states[0].zero_()
                        layer.recurrent_states[0].zero_()
            tokens = [int(head(out.last_hidden_state[:, -1]).argmax())]
            for _ in range(MAX_NEW_TOKENS - 1):
                n = cache.get_seq_length()
                assert family.decode_kwargs(prefill, n) == {} and family.decode_position_ids(prefill, n) is None
                out = lm(inputs_embeds=model.get_input_embeddings()(torch.tensor([[tokens[-1]]])),
                         attention_mask=torch.ones(1, n + 1, dtype=torch.long), past_key_values=cache, use_cache=True)
                tokens.append(int(head(out.last_hidden_state[:, -1]).argmax()))
            return tokens

    expected = _generate(model, processor, text, images)
    assert greedy(reset_mamba=False)[: len(expected)] == expected
    assert greedy(reset_mamba=True)[: len(expected)] != expected


def test_outputs_depend_on_prompt_and_image():
    family, processor, model = _loaded()
    one = _generate(model, processor, _prompt(family, processor, 1), [_image(160, 120, 1)])
    other = _generate(model, processor, _prompt(family, processor, 1), [_image(96, 200, 2, "gradient")])
    text_a = _generate(model, processor, _prompt(family, processor, 0, "Tell me a story."), [])
    text_b = _generate(model, processor, _prompt(family, processor, 0, "What is two plus two?"), [])
    assert one != other and text_a != text_b
    assert all(len(set(o)) > 1 for o in (one, other, text_a, text_b)), "an output is one repeated token"


def test_encoder_refuses_inputs_that_would_misplace_rows():
    family, processor, _ = _loaded()
    (item,) = family.preprocess(processor, _prompt(family, processor, 1), [_image(160, 120)]).items
    pixel_values, grid = item.encoder_inputs["pixel_values"], item.encoder_inputs["image_grid_hw"]
    h, w = grid[0].tolist()
    bad = [
        {"pixel_values": pixel_values[:-1], "image_grid_hw": grid},  # a patch short: later images would shift
        {"pixel_values": pixel_values, "image_grid_hw": torch.tensor([[w, h]]) if h != w else grid + 2},
        {"pixel_values": pixel_values[: (h - 1) * w], "image_grid_hw": torch.tensor([[h - 1, w]])},  # odd grid
        {"pixel_values": pixel_values, "image_grid_hw": grid.float()},
        {"pixel_values": pixel_values, "image_grid_hw": grid[0]},
        {"pixel_values": pixel_values[:, :700], "image_grid_hw": grid},
        {"pixel_values": pixel_values},
    ]
    family.check_encoder_item(IMAGE, item.encoder_inputs, where="item 0")
    for inputs in bad:
        with pytest.raises(InvalidArgument) as err:
            family.check_encoder_item(IMAGE, inputs, where="item 1")
        assert err.value.reason == "ENCODER_INPUT_INVALID"


def test_strip_for_llm_and_encoder_keep_what_each_half_needs():
    model_dir = tiny_checkpoint("nemotron_h_omni")
    family, processor, whole = _loaded()
    llm = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_llm(llm)
    assert llm.vision_model is None and llm.multi_modal_projector is None
    assert llm.get_input_embeddings() is family.language_model(llm).embeddings
    assert sum(p.numel() for p in llm.parameters()) < sum(p.numel() for p in whole.parameters())
    encoder = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_encoder(encoder)
    assert encoder.language_model is None
    (item,) = family.preprocess(processor, _prompt(family, processor, 1), [_image(96, 96)]).items
    (rows,) = family.encode(encoder, IMAGE, [item.encoder_inputs])
    (expected,) = family.encode(whole, IMAGE, [item.encoder_inputs])
    torch.testing.assert_close(rows.embeddings, expected.embeddings, rtol=0, atol=0)



# ---- video and audio ---------------------------------------------------------------------------
_VIDEO_LIMITS = VideoLimits(max_frame_pixels=10**7, max_seconds=600, max_frames=32, max_total_pixels=10**9)


def _video(family, processor, data: bytes, fps: float = 2.0) -> Video:
    """The clip as the processor service decodes it: the family's frames at `fps`, only those decoded."""
    return decode_video(data, _VIDEO_LIMITS, lambda meta: family.video_frame_indices(processor, meta, fps, 32), "video")


def _audio(family, processor, data: bytes) -> Audio:
    return decode_audio(data, family.audio_sampling_rate(processor), AudioLimits(max_seconds=600), "audio")


def _media_prompt(family, processor, kinds: list[str], text: str) -> str:
    content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": text}]
    return family.render_chat(processor, [{"role": "user", "content": content}])


def _placed(family, model, processed) -> list[PlacedEmbeddings]:
    """Each item encoded alone, its rows placed run by run (as the processor sends them to the LLM)."""
    placed = []
    for item in processed.items:
        (rows,) = family.encode(model, item.modality, [item.encoder_inputs])
        first = 0
        for offset, length in item.placeholder_runs:
            placed.append(PlacedEmbeddings(item.modality, offset, length,
                                           ItemEmbeddings(rows.embeddings[first : first + length]), {}))
            first += length
        assert first == rows.embeddings.shape[0] == item.length
    return placed


def test_video_runs_are_labelled_with_the_chosen_frames_times():
    """A 2 s clip at 8 fps, sampled at 2 fps: frames 0, 4, 8, 12, two per temporal patch, each chunk labelled
    with its frames' times; one wrapped run per chunk, the rows of get_video_features in order."""
    family, processor, model = _loaded()
    video = _video(family, processor, video_bytes(seed=1))
    assert list(video.metadata.frames_indices) == [0, 4, 8, 12]
    processed = family.preprocess(processor, _media_prompt(family, processor, [VIDEO], "Describe."), [], videos=[video])
    (item,) = processed.items
    text = processor.tokenizer.decode(processed.token_ids).replace("<image>", "")
    assert ("Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.50 seconds: <img></img>\n"
            "Frame 3 sampled at 1.00 seconds and frame 4 sampled at 1.50 seconds: <img></img>Describe.") in text
    tokens = processor.tokenizer.convert_ids_to_tokens(processed.token_ids)
    assert item.modality == VIDEO and len(item.placeholder_runs) == 2 and item.offset == item.runs[0][0]
    for offset, length in item.runs:
        assert tokens[offset - 1] == "<img>" and tokens[offset + length] == "</img>"
        assert set(tokens[offset : offset + length]) == {"<image>"} and length == item.length // 2
    (rows,) = family.encode(model, VIDEO, [item.encoder_inputs])
    with torch.inference_mode():
        whole = model.get_video_features(item.encoder_inputs["pixel_values_videos"]).pooler_output  # [2, n, hidden]
    torch.testing.assert_close(rows.embeddings, whole.flatten(0, 1), rtol=0, atol=0)


def test_transformers_own_sampling_labels_the_frames_with_the_wrong_times():
    """Why the reference samples in its loader (tests/reference.py OtherMedia.sample_in_loader): given every
    frame and do_sample_frames=True, transformers 5.23's processor samples frames 0, 4, 8, 12 but labels them
    with the times of frames 0..3. If this starts failing, transformers fixed it: drop sample_in_loader."""
    family, processor, _ = _loaded()
    data = video_bytes(seed=1)  # encoded once: x264's threads may encode a clip differently from one call to the next
    everything = _video(family, processor, data, fps=8.0)
    assert list(everything.metadata.frames_indices) == list(range(16))
    text = _media_prompt(family, processor, [VIDEO], "Describe.")
    out = processor(text=[text], videos=[everything.frames], video_metadata=everything.metadata, do_sample_frames=True,
                    fps=2.0, return_tensors="pt")
    assert "frame 2 sampled at 0.12 seconds" in processor.tokenizer.decode(out["input_ids"][0])
    chosen = _video(family, processor, data)  # the same frames, as the processor service has them
    assert list(processor.video_processor.sample_frames(everything.metadata, fps=2.0)) == [0, 4, 8, 12]
    assert np.array_equal(everything.frames[[0, 4, 8, 12]], chosen.frames) and out["pixel_values_videos"].shape[0] == 4
    ours = family.preprocess(processor, text, [], videos=[chosen])
    assert "frame 2 sampled at 0.50 seconds" in processor.tokenizer.decode(ours.token_ids)


def test_odd_frame_count_makes_a_short_last_chunk():
    family, processor, model = _loaded()
    video = _video(family, processor, video_bytes(seconds=2.5, seed=4))  # 5 frames at 2 fps
    processed = family.preprocess(processor, _media_prompt(family, processor, [VIDEO], "Go."), [], videos=[video])
    (item,) = processed.items
    assert len(item.runs) == 3 and "Frame 5 sampled at 2.00 seconds: <img>" in processor.tokenizer.decode(processed.token_ids)
    (rows,) = family.encode(model, VIDEO, [item.encoder_inputs])
    assert rows.embeddings.shape[0] == item.length == 3 * item.runs[0][1]


def test_image_video_and_audio_in_one_prompt_are_placed_in_prompt_order():
    """transformers 5.23 cannot run an image and a video in one prompt (its forward scatters the image rows
    over the video's image tokens too, and raises); the split places each item's own rows at its runs, in
    prompt order, which is the whole model's merge for each modality alone."""
    family, processor, model = _loaded()
    image = _image(96, 96, 5)
    video = _video(family, processor, video_bytes(seed=3))
    audio = _audio(family, processor, audio_bytes(seed=3))
    text = _media_prompt(family, processor, [VIDEO, IMAGE, AUDIO], "All of it.")
    processed = family.preprocess(processor, text, [image], videos=[video], audios=[audio])
    assert [item.modality for item in processed.items] == [VIDEO, IMAGE, AUDIO]
    inputs = processor(text=[text], images=[image], audio=[audio.samples], return_tensors="pt",
                       **family.video_processor_kwargs([video]))
    assert inputs["input_ids"][0].tolist() == processed.token_ids
    with torch.inference_mode():
        with pytest.raises(ValueError, match="feature vectors"):
            model(**inputs)
        rows = {VIDEO: model.get_video_features(inputs["pixel_values_videos"]).pooler_output.flatten(0, 1),
                IMAGE: model.get_image_features(inputs["pixel_values"], inputs["image_grid_hw"]).pooler_output[0],
                AUDIO: model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output}
        prefill = family.prefill_inputs(model, torch.tensor(processed.token_ids), _placed(family, model, processed))
        embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
        for item in processed.items:
            positions = torch.cat([torch.arange(offset, offset + length) for offset, length in item.placeholder_runs])
            embeds[positions] = rows[item.modality]
    torch.testing.assert_close(prefill.inputs_embeds[0], embeds, rtol=0, atol=0)


def test_audio_items_are_each_clips_own_features_and_two_clips_decode_like_generate():
    """Two clips in one prompt: the feature extractor pads them to the longer; each item keeps its own
    frames, the features of that clip processed alone (up to float rounding: the batched STFT sums in
    another order), and the engine's tokens over the clips encoded one by one are generate()'s over the
    padded batch."""
    family, processor, model = _loaded()
    clips = [_audio(family, processor, audio_bytes(seed=1)), _audio(family, processor, audio_bytes(seconds=2.5, seed=2))]
    text = _media_prompt(family, processor, [AUDIO, AUDIO], "Which is longer?")
    processed = family.preprocess(processor, text, [], audios=clips)
    tokens = processor.tokenizer.convert_ids_to_tokens(processed.token_ids)
    for item, clip in zip(processed.items, clips, strict=True):
        alone = processor.feature_extractor([clip.samples], sampling_rate=16000, return_tensors="pt")
        torch.testing.assert_close(item.encoder_inputs["input_features"], alone["input_features"], rtol=0, atol=1e-5)
        assert torch.equal(item.encoder_inputs["input_features_mask"].bool(), alone["attention_mask"])
        assert tokens[item.offset - 1] == "<so_start>" and tokens[item.offset + item.length] == "<so_end>"
        assert item.length == processor._estimate_audio_num_embeddings(clip.samples.size)
    eos = frozenset(model.generation_config.eos_token_id)
    inputs = processor(text=[text], audio=[clip.samples for clip in clips], return_tensors="pt")
    with torch.inference_mode():
        expected = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    placed = _placed(family, model, processed)
    assert _engine_tokens(family, model, processed.token_ids, placed, eos) == expected.tolist()


def test_silence_is_encoded():
    family, processor, model = _loaded()
    silence = Audio(samples=np.zeros(16000, np.float32), sampling_rate=16000)
    processed = family.preprocess(processor, _media_prompt(family, processor, [AUDIO], "Hm?"), [], audios=[silence])
    (rows,) = family.encode(model, AUDIO, [processed.items[0].encoder_inputs])
    assert torch.isfinite(rows.embeddings).all() and rows.embeddings.shape[0] == processed.items[0].length


def test_media_the_processor_would_get_wrong_are_refused():
    family, processor, _ = _loaded()
    video = _video(family, processor, video_bytes(seed=1))

    def reason(text: str, **media) -> str:
        with pytest.raises(InvalidArgument) as err:
            family.preprocess(processor, text, [], **media)
        return err.value.reason

    two = _media_prompt(family, processor, [VIDEO, VIDEO], "Compare.")
    assert reason(two, videos=[video, video]) == "TOO_MANY_MEDIA_ITEMS"
    typed = _media_prompt(family, processor, [VIDEO], "What is <video>?")
    assert reason(typed, videos=[video]) == "RESERVED_TOKEN_IN_TEXT"
    assert reason(_media_prompt(family, processor, [IMAGE], "Hm?"), audios=[]) == "RESERVED_TOKEN_IN_TEXT"  # no image
    text_only = _media_prompt(family, processor, [], "What is <video>?")  # stays text, as in transformers
    assert family.preprocess(processor, text_only, []).token_ids == processor(text=[text_only])["input_ids"][0]
    short = Audio(samples=np.full(319, 0.1, np.float32), sampling_rate=16000)  # under two 160-sample hops
    assert reason(_media_prompt(family, processor, [AUDIO], "Hm?"), audios=[short]) == "AUDIO_TOO_SHORT"
    no_tower = type(family)(family.config.__class__(**{**family.config.to_dict(), "audio_config": None}))
    with pytest.raises(InvalidArgument) as err:
        no_tower.preprocess(processor, _media_prompt(family, processor, [AUDIO], "Hm?"), [],
                            audios=[_audio(family, processor, audio_bytes(seed=1))])
    assert err.value.reason == "MODALITY_UNSUPPORTED"


def test_encoder_refuses_video_and_audio_inputs_that_would_misplace_rows():
    family, processor, _ = _loaded()
    video = _video(family, processor, video_bytes(seed=1))
    audio = _audio(family, processor, audio_bytes(seed=1))
    processed = family.preprocess(processor, _media_prompt(family, processor, [VIDEO, AUDIO], "Go."), [],
                                  videos=[video], audios=[audio])
    frames = processed.items[0].encoder_inputs["pixel_values_videos"]
    features, mask = (processed.items[1].encoder_inputs[name] for name in ("input_features", "input_features_mask"))
    assert family.check_encoder_item(VIDEO, {"pixel_values_videos": frames}, where="v")["tokens"] == processed.items[0].length
    assert family.check_encoder_item(AUDIO, processed.items[1].encoder_inputs, where="a")["tokens"] == processed.items[1].length
    holes = mask.clone()
    holes[0, 3] = 0
    bad = [
        (VIDEO, {"pixel_values_videos": frames[..., :-16]}),  # a side that is not whole merged patches
        (VIDEO, {"pixel_values_videos": frames[:, :2]}),  # two channels
        (VIDEO, {"pixel_values_videos": frames[0]}),
        (AUDIO, {"input_features": features, "input_features_mask": holes}),  # not ones then zeros
        (AUDIO, {"input_features": features, "input_features_mask": torch.ones_like(mask)}),  # no STFT tail
        (AUDIO, {"input_features": features, "input_features_mask": mask.bool()}),
        (AUDIO, {"input_features": features[..., :40], "input_features_mask": mask}),
        (AUDIO, {"input_features": features, "input_features_mask": mask[:, :-1]}),
    ]
    for modality, inputs in bad:
        with pytest.raises(InvalidArgument) as err:
            family.check_encoder_item(modality, inputs, where="item 1")
        assert err.value.reason == "ENCODER_INPUT_INVALID", (modality, list(inputs))


def test_video_sent_as_frames_is_labelled_at_its_rate():
    """Media.frames: every frame kept, times from the rate the caller gives (here 4 fps: 0.25 s apart)."""
    family, processor, model = _loaded()
    frames = list(_video(family, processor, video_bytes(seed=1)).frames[:3])
    video = video_from_frames(frames, 4.0, _VIDEO_LIMITS, "video")
    processed = family.preprocess(processor, _media_prompt(family, processor, [VIDEO], "Go."), [], videos=[video])
    text = processor.tokenizer.decode(processed.token_ids).replace("<image>", "")
    assert ("Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.25 seconds: <img></img>\n"
            "Frame 3 sampled at 0.50 seconds: <img></img>Go.") in text
    (rows,) = family.encode(model, VIDEO, [processed.items[0].encoder_inputs])
    assert rows.embeddings.shape[0] == processed.items[0].length
