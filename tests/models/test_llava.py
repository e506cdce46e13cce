"""LLaVA-1.5 and LLaVA-NeXT families in one process: checkpoints, placeholder runs, encoder rows.

The e2e parity tests prove the split end to end on a few images; these pin what they rest on: the
tiny checkpoints look like the llava-hf ones (template, BOS, tokens per image), and for every
aspect ratio the LLaVA-NeXT placeholder run the processor makes is exactly as long as the rows
get_image_features + pack_image_features make of that image.
"""

from __future__ import annotations

import io
from functools import lru_cache

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from services.common.errors import FailedPrecondition, InvalidArgument
from services.models.base import IMAGE, PlacedEmbeddings
from services.models.registry import family_for
from services.tiny_checkpoints import make_model
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes



@lru_cache(maxsize=2)
def _loaded(name: str):
    model_dir = tiny_checkpoint(name)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return family_for(model_dir), AutoProcessor.from_pretrained(model_dir), model


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes(width, height, seed=seed)))


def _prompt(family, processor, num_images: int, text: str = "Describe this image.") -> str:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return family.render_chat(processor, [{"role": "user", "content": content}])


def test_chat_templates_are_llava_hf_ones():
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]
    messages = [{"role": "user", "content": content}]
    family, processor, _ = _loaded("llava")
    assert family.render_chat(processor, messages) == "USER: <image>\n<image>\nhi ASSISTANT:"
    family, processor, _ = _loaded("llava_next")
    assert family.render_chat(processor, messages) == "[INST] <image>\n<image>\nhi [/INST]"


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_checkpoint_loads_offline_like_llava_hf(name):
    family, processor, model = _loaded(name)
    assert type(family).__name__ == {"llava": "Llava", "llava_next": "LlavaNext"}[name]
    tok, config = processor.tokenizer, model.config
    assert config.image_token_index == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert processor.patch_size == config.vision_config.patch_size and processor.num_additional_image_tokens == 1
    assert tok("hi").input_ids[0] == tok.bos_token_id  # the Llama tokenizer's <s>
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("</s>")]
    assert type(processor.image_processor).__name__ == {"llava": "CLIPImageProcessor",
                                                       "llava_next": "LlavaNextImageProcessor"}[name]


def test_llava_every_image_gets_36_tokens():
    family, processor, model = _loaded("llava")
    images = [_image(160, 120, 1), _image(30, 300, 2), _image(500, 20, 3)]
    processed = family.preprocess(processor, _prompt(family, processor, 3), images)
    assert [item.length for item in processed.items] == [36, 36, 36] == [family.tokens_per_tile] * 3
    rows = family.encode(model, IMAGE, [item.encoder_inputs for item in processed.items])
    assert [tuple(r.embeddings.shape) for r in rows] == [(36, 64)] * 3


# (width, height): the harness's images, both orientations of extreme ratios, sizes at and off the
# tile grid, one pixel. Every one must give a run exactly as long as the model's rows.
LLAVA_NEXT_SIZES = [(160, 120), (96, 200), (96, 96), (128, 64), (300, 40), (40, 300), (57, 113), (112, 56),
                    (1000, 999), (1, 1), (3, 500)]


@pytest.mark.parametrize(("width", "height"), LLAVA_NEXT_SIZES)
def test_llava_next_run_length_equals_packed_rows(width, height):
    family, processor, model = _loaded("llava_next")
    processed = family.preprocess(processor, _prompt(family, processor, 1), [_image(width, height)])
    (item,) = processed.items
    image_token_id = model.config.image_token_index
    assert processed.token_ids.count(image_token_id) == item.length
    assert set(processed.token_ids[item.offset : item.offset + item.length]) == {image_token_id}
    assert item.encoder_inputs["image_sizes"].tolist() == [[height, width]]
    (rows,) = family.encode(model, IMAGE, [item.encoder_inputs])
    assert tuple(rows.embeddings.shape) == (item.length, model.config.text_config.hidden_size)


def test_llava_next_batch_of_different_grids_matches_whole_model():
    """Three images on three grids, zero-padded to one pixel_values tensor by the processor: the
    family's per-item slices, encoded as one batch, give the rows the whole model scatters."""
    family, processor, model = _loaded("llava_next")
    images = [_image(300, 40, 1), _image(96, 96, 2), _image(40, 300, 3)]
    text = _prompt(family, processor, 3, "Compare them.")
    processed = family.preprocess(processor, text, images)
    assert len({item.length for item in processed.items}) == 3
    assert len({item.encoder_inputs["pixel_values"].shape[0] for item in processed.items}) == 2  # 3+1 / 2x2+1 tiles
    rows = family.encode(model, IMAGE, [item.encoder_inputs for item in processed.items])

    inputs = processor(text=[text], images=images, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == processed.token_ids
    with torch.inference_mode():
        whole = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    for mine, theirs in zip(rows, whole):
        torch.testing.assert_close(mine.embeddings, theirs, rtol=0, atol=0)

    # And the LLM half: merged prefill embeddings equal the whole model's masked_scatter.
    placed = [PlacedEmbeddings(IMAGE, item.offset, item.length, r, {}) for item, r in zip(processed.items, rows)]
    with torch.inference_mode():
        prefill = family.prefill_inputs(model, torch.tensor(processed.token_ids), placed)
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        mask = (ids == model.config.image_token_index)[..., None]
        expected = embeds.masked_scatter(mask, torch.cat(whole))
    torch.testing.assert_close(prefill.inputs_embeds, expected, rtol=0, atol=0)
    assert prefill.position_ids is None


def test_image_newline_rows_are_in_the_encoder_output():
    family, processor, model = _loaded("llava_next")
    (item,) = family.preprocess(processor, _prompt(family, processor, 1), [_image(160, 120)]).items
    (rows,) = family.encode(model, IMAGE, [item.encoder_inputs])
    newline = model.model.image_newline
    is_newline = (rows.embeddings == newline).all(-1)
    # 160x120 -> 2x2 tiles, 8x8 patches, unpadded to 6 rows of 8: a newline after each row of 8.
    assert item.length == 16 + 6 * 9
    assert is_newline.nonzero().flatten().tolist() == [16 + 9 * r + 8 for r in range(6)]


def test_cut_placeholders_tells_touching_runs_apart_and_refuses_bad_counts():
    family, _, _ = _loaded("llava")
    ids = [1, 7, 7, 7, 7, 7, 2, 7, 7]
    assert family.cut_placeholders(ids, 7, [2, 3, 2]) == [1, 3, 7]
    with pytest.raises(InvalidArgument) as err:
        family.cut_placeholders(ids, 7, [3, 3])
    assert err.value.reason == "PLACEHOLDER_COUNT_MISMATCH"
    with pytest.raises(InvalidArgument, match="not contiguous"):
        family.cut_placeholders(ids, 7, [4, 3])


def test_encoder_refuses_inputs_that_would_misplace_rows():
    family, processor, _ = _loaded("llava_next")
    (item,) = family.preprocess(processor, _prompt(family, processor, 1), [_image(160, 120)]).items
    pixel_values, image_sizes = item.encoder_inputs["pixel_values"], item.encoder_inputs["image_sizes"]
    bad = [
        {"pixel_values": pixel_values[:-1], "image_sizes": image_sizes},  # one tile short: later items would shift
        {"pixel_values": pixel_values, "image_sizes": torch.tensor([[40, 300]])},  # sizes of another grid
        {"pixel_values": pixel_values, "image_sizes": image_sizes.float()},
        {"pixel_values": pixel_values[None], "image_sizes": image_sizes},  # still padded [1, tiles, ...]
        {"pixel_values": pixel_values},
    ]
    family.check_encoder_item(IMAGE, item.encoder_inputs, where="item 0")
    for inputs in bad:
        with pytest.raises(InvalidArgument) as err:
            family.check_encoder_item(IMAGE, inputs, where="item 1")
        assert err.value.reason == "ENCODER_INPUT_INVALID"
    family, _, _ = _loaded("llava")
    with pytest.raises(InvalidArgument, match=r"item 0: pixel_values dim 2 is 56, expected 84"):
        family.check_encoder_item(IMAGE, {"pixel_values": torch.zeros(1, 3, 56, 56)}, where="item 0")


def test_strip_for_llm_and_encoder_keep_what_each_half_needs():
    for name in ("llava", "llava_next"):
        model_dir = tiny_checkpoint(name)
        family = family_for(model_dir)
        llm = family.load_model(model_dir, torch.float32, "cpu")
        family.strip_for_llm(llm)
        assert llm.model.vision_tower is None and llm.model.multi_modal_projector is None
        assert sum(p.numel() for p in llm.parameters()) < sum(p.numel() for p in _loaded(name)[2].parameters())
        encoder = family.load_model(model_dir, torch.float32, "cpu")
        family.strip_for_encoder(encoder)
        assert encoder.model.language_model is None


def test_unknown_vision_tower_is_refused():
    config = AutoConfig.from_pretrained(tiny_checkpoint("llava"))
    config.vision_config.model_type = "pixtral"
    with pytest.raises(FailedPrecondition) as err:
        type(family_for(tiny_checkpoint("llava")))(config)
    assert err.value.reason == "MODEL_UNSUPPORTED"


@pytest.mark.parametrize(("name", "tokens"), [("llava", 256), ("llava_next", 256 + 32 * 33)])
def test_bench_size(name, tokens, tmp_path):
    out = make_model(name, tmp_path / "bench", seed=0, size="bench")
    family, processor = family_for(out), AutoProcessor.from_pretrained(out)
    # 448x448: LLaVA-1.5 crops it to 224 (16x16 patches); LLaVA-NeXT tiles it 2x2 (32x32 + 32 newlines).
    (item,) = family.preprocess(processor, _prompt(family, processor, 1), [_image(448, 448)]).items
    assert item.length == tokens
    assert family.hidden_size == 384
