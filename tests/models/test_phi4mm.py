"""Phi-4-multimodal in one process: the family's pieces against transformers' whole model, bit for bit."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from services.common.errors import InvalidArgument
from services.models.base import IMAGE, ItemEmbeddings, PlacedEmbeddings
from services.models.phi4mm import Phi4Multimodal
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes

# Crop grids (down x across): 2x1 padded, 1x1 padded, 1x2 padded, 2x2 capped by dynamic_hd, 1x1 exact.
SIZES = [(900, 500), (160, 120), (300, 700), (2000, 1500), (448, 448)]


def _images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(image_bytes(w, h, seed=i))) for i, (w, h) in enumerate(sizes)]


@pytest.fixture(scope="module")
def model_dir():
    return tiny_checkpoint("phi4mm")


@pytest.fixture(scope="module")
def family(model_dir) -> Phi4Multimodal:
    family = family_for(model_dir)
    assert isinstance(family, Phi4Multimodal)
    return family


@pytest.fixture(scope="module")
def processor(family, model_dir):
    return family.load_processor(model_dir)


@pytest.fixture(scope="module")
def whole():
    """transformers' model, loaded as its users do (stock: no workaround applied)."""
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint("phi4mm"), dtype=torch.float32).eval()


def _prompt(family, processor, num_images: int, text: str = "Compare these.") -> str:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return family.render_chat(processor, [{"role": "user", "content": content}])


def test_checkpoint_loads_offline(model_dir, processor):
    assert type(processor).__name__ == "Phi4MultimodalProcessor"
    assert type(processor.image_processor).__name__ == "Phi4MultimodalImageProcessor"
    tok = processor.tokenizer
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    assert config.architectures == ["Phi4MultimodalForCausalLM"]
    assert (tok.image_token, tok.audio_token) == ("<|image|>", "<|audio|>")
    assert config.vision_config.image_token_id == tok.image_token_id == tok.convert_tokens_to_ids("<|image|>")
    assert config.audio_config.audio_token_id == tok.audio_token_id == tok.convert_tokens_to_ids("<|audio|>")
    assert (config.vision_config.image_size, config.vision_config.patch_size, config.vision_config.crop_size) == (448, 14, 448)
    assert config.rope_parameters["rope_type"] == "longrope"
    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    assert set(eos) == {tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    # The fact render_chat is for: the processor drops the template, the tokenizer keeps it.
    assert not getattr(processor, "chat_template", None)
    assert AutoTokenizer.from_pretrained(model_dir).chat_template


def test_render_chat(family, processor):
    rendered = _prompt(family, processor, 2, "hi")
    assert rendered == "<|user|><|image|><|image|>hi<|end|><|assistant|>"
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert family.render_chat(processor, system) == "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_token_count_matches_processor(family, processor, size):
    out = processor.image_processor(_images([size]), return_tensors="pt")
    height, width = (int(x) for x in out["image_sizes"][0])
    num_crops = 1 + (height // 448) * (width // 448)
    count = family.num_image_tokens(out["image_attention_mask"][0, :num_crops], out["image_sizes"][0])
    assert count == int(out["num_img_tokens"][0])


def test_adjacent_images_are_cut_from_one_run(family, processor):
    images = _images(SIZES[:2])
    prompt = family.preprocess(processor, _prompt(family, processor, 2), images)
    first, second = prompt.items
    image_id = processor.tokenizer.image_token_id
    assert family.placeholder_runs(prompt.token_ids, image_id) == [(first.offset, first.length + second.length)]
    assert second.offset == first.offset + first.length
    # Each item carries only its own crops: the processor padded the 1-crop image to 2 crops.
    assert first.encoder_inputs["image_pixel_values"].shape[:2] == (1, 3)
    assert second.encoder_inputs["image_pixel_values"].shape[:2] == (1, 2)


def _whole_model_rows(whole, processor, text: str, images) -> tuple[torch.Tensor, torch.Tensor]:
    """What transformers' embedding module writes for the prompt: (token ids [L], embeddings [L, H])."""
    inputs = processor(text=[text], images=images, return_tensors="pt")
    ids = inputs["input_ids"]
    with torch.inference_mode():
        embeds = whole.model.embed_tokens_extend(
            ids, whole.model.embed_tokens(ids),
            image_pixel_values=inputs["image_pixel_values"], image_sizes=inputs["image_sizes"],
            image_attention_mask=inputs["image_attention_mask"])
    return ids[0], embeds[0]


@pytest.fixture(scope="module")
def encoder_model(family, model_dir):
    model = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_encoder(model)
    return model


def test_encoder_rows_equal_whole_model(family, processor, whole, encoder_model):
    """Every image of a mixed prompt (crop counts 3, 2, 2, 5) gets exactly transformers' rows."""
    images = _images(SIZES[:4])
    text = _prompt(family, processor, len(images))
    prompt = family.preprocess(processor, text, images)
    rows = family.encode(encoder_model, IMAGE, [item.encoder_inputs for item in prompt.items])
    ids, expected = _whole_model_rows(whole, processor, text, images)
    assert ids.tolist() == prompt.token_ids
    for item, got in zip(prompt.items, rows):
        assert got.embeddings.shape == (item.length, family.hidden_size)
        assert torch.equal(got.embeddings, expected[item.offset : item.offset + item.length])


def test_llm_prefill_equals_whole_model(family, model_dir, processor, whole, encoder_model):
    images = _images(SIZES[:2])
    text = _prompt(family, processor, len(images))
    prompt = family.preprocess(processor, text, images)
    rows = family.encode(encoder_model, IMAGE, [item.encoder_inputs for item in prompt.items])
    llm = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_llm(llm)
    placed = [PlacedEmbeddings(IMAGE, item.offset, item.length, emb, item.position_inputs)
              for item, emb in zip(prompt.items, rows)]
    token_ids = torch.tensor(prompt.token_ids)
    with torch.inference_mode():
        prefill = family.prefill_inputs(llm, token_ids, placed)
        out = family.language_model(llm)(inputs_embeds=prefill.inputs_embeds, position_ids=prefill.position_ids,
                                         attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                                         past_key_values=family.new_cache(llm), use_cache=True)
        logits = family.lm_head(llm)(out.last_hidden_state[:, -1])
        inputs = processor(text=[text], images=images, return_tensors="pt")
        expected = whole(**inputs, logits_to_keep=1).logits[:, -1]  # the last position, as generate() asks
    assert torch.equal(logits, expected), (logits - expected).abs().max()


def _item(family, processor, size=(160, 120)) -> dict[str, torch.Tensor]:
    prompt = family.preprocess(processor, _prompt(family, processor, 1), _images([size]))
    return dict(prompt.items[0].encoder_inputs)


@pytest.mark.parametrize("damage", ["missing-mask", "sizes-not-crops", "crop-count", "mask-not-rectangle",
                                    "global-mask", "pixels-shape"])
def test_encode_rejects_malformed_inputs(family, processor, encoder_model, damage):
    item = _item(family, processor, (900, 500))
    if damage == "missing-mask":
        del item["image_attention_mask"]
    elif damage == "sizes-not-crops":
        item["image_sizes"] = torch.tensor([[448, 900]])
    elif damage == "crop-count":
        item["image_sizes"] = torch.tensor([[896, 896]])  # 4 crops, the item has 2
    elif damage == "mask-not-rectangle":
        mask = item["image_attention_mask"].clone()
        mask[0, 1, 0, 0] = 0  # a hole in the top-left crop
        item["image_attention_mask"] = mask
    elif damage == "global-mask":
        mask = item["image_attention_mask"].clone()
        mask[0, 0, -1] = 0  # the global view is never padded
        item["image_attention_mask"] = mask
    else:
        item["image_pixel_values"] = item["image_pixel_values"][..., :224]
    family.check_encoder_item(IMAGE, _item(family, processor, (900, 500)), where="item 0")  # the undamaged one fits
    with pytest.raises(InvalidArgument) as err:
        family.check_encoder_item(IMAGE, item, where="item 0")
    assert err.value.reason == "ENCODER_INPUT_INVALID"


# transformers 5.23's vision attention is causal when no patch of the prompt's crop batch is masked
# (see services/models/phi4mm.py). Causal path: every image fits its crop grid exactly; masked path:
# some image of the prompt has padded patches.
ATTENTION_PATHS = {
    "square-448": [(448, 448)],  # causal
    "square-224": [(224, 224)],  # causal: resized to one crop exactly
    "squares-1-and-4-crops": [(448, 448), (896, 896)],  # causal, with padding crops (masks all 1)
    "padded-then-square": [(160, 120), (448, 448)],  # masked
    "square-then-wide": [(448, 448), (900, 500)],  # masked
}


@pytest.mark.parametrize("case", list(ATTENTION_PATHS))
def test_encode_matches_stock_transformers_on_both_attention_paths(family, processor, whole, encoder_model, case):
    """Our encode gives stock transformers' rows on its causal and its masked path, bit for bit."""
    images = _images(ATTENTION_PATHS[case])
    text = _prompt(family, processor, len(images))
    prompt = family.preprocess(processor, text, images)
    rows = family.encode(encoder_model, IMAGE, [item.encoder_inputs for item in prompt.items])
    ids, expected = _whole_model_rows(whole, processor, text, images)
    assert ids.tolist() == prompt.token_ids
    for item, got in zip(prompt.items, rows):
        assert torch.equal(got.embeddings, expected[item.offset : item.offset + item.length])


def test_transformers_attention_paths_differ(family, processor, whole):
    """The power of the test above: in transformers 5.23 a square image's rows depend on its prompt.

    If this fails, transformers has fixed Phi4MultimodalVisionAttention.is_causal: features are then
    per item, and an mm_hash-keyed embedding cache may be shared across requests (see phi4mm.py).
    """
    square = Image.open(io.BytesIO(image_bytes(448, 448, seed=0)))
    padded = Image.open(io.BytesIO(image_bytes(160, 120, seed=1)))
    alone_ids, alone = _whole_model_rows(whole, processor, _prompt(family, processor, 1), [square])
    mixed_ids, mixed = _whole_model_rows(whole, processor, _prompt(family, processor, 2), [padded, square])
    image_id = processor.tokenizer.image_token_id
    (offset, length), = family.placeholder_runs(alone_ids.tolist(), image_id)
    (mixed_offset, mixed_length), = family.placeholder_runs(mixed_ids.tolist(), image_id)
    square_rows = mixed[mixed_offset + mixed_length - length : mixed_offset + mixed_length]  # the second image
    assert not torch.allclose(alone[offset : offset + length], square_rows, atol=1e-3)


def test_rows_fit_the_llm_contract(family, processor, encoder_model):
    item = _item(family, processor)
    rows = family.encode(encoder_model, IMAGE, [item])
    assert isinstance(rows[0], ItemEmbeddings) and rows[0].embeddings.dtype == torch.float32
