"""The tiny checkpoint factory, on Qwen2-VL: loads offline and its outputs carry signal.

test_builders.py pins that every builder's output is byte-identical per seed.

A random model whose greedy output ignores the prompt or the image would make every parity test
pass vacuously (DESIGN 4.3a), so the variation checks here are the point of the file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from services.tiny_checkpoints import TINY_FAMILIES, make_model

MAX_NEW_TOKENS = 8


def gradient(width: int, height: int) -> Image.Image:
    """Red to blue, left to right."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    return Image.fromarray(np.stack([x, np.zeros_like(x), 255 - x], axis=-1).astype(np.uint8))


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    return make_model("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl-seed0", seed=0)


@pytest.fixture(scope="module")
def loaded(qwen2_vl):
    processor = AutoProcessor.from_pretrained(qwen2_vl)
    model = AutoModelForImageTextToText.from_pretrained(qwen2_vl, dtype=torch.float32).eval()
    return processor, model


def process(processor, text: str, images: list[Image.Image]):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=[prompt], images=images or None, return_tensors="pt")


def greedy(loaded, text: str, images: list[Image.Image] = ()) -> list[int]:
    processor, model = loaded
    inputs = process(processor, text, list(images))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_families():
    assert "qwen2_vl" in TINY_FAMILIES


def test_unknown_family_or_size(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        make_model("nope", tmp_path / "m")
    with pytest.raises(ValueError, match="unknown size"):
        make_model("qwen2_vl", tmp_path / "m", size="huge")


def test_checkpoint_files(qwen2_vl):
    names = {p.name for p in qwen2_vl.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "processor_config.json"} <= names  # fmt: skip
    assert not [p for p in qwen2_vl.parent.iterdir() if p.name.startswith(".")], "scratch folder left behind"


def test_loads_offline_with_auto_classes(loaded):
    processor, model = loaded
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"  # torchvision backend
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    tok, config = processor.tokenizer, model.config
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.vocab_size >= len(tok)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    gen = model.generation_config
    assert set(gen.eos_token_id) == {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert not gen.do_sample
    section = config.text_config.rope_parameters["mrope_section"]
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(section) == head_dim // 2


def test_chat_template(loaded):
    processor, _ = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "hi"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert "helpful assistant" not in processor.apply_chat_template(with_system)


@pytest.mark.parametrize(("size", "tokens"), [(64, 4), (224, 64), (448, 64)])
def test_tokens_per_image(loaded, size, tokens):
    processor, model = loaded
    inputs = process(processor, "x", [noise(size, size)])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens


def test_outputs_vary_with_prompt(loaded):
    outputs = [greedy(loaded, t) for t in ("Describe this image.", "What is the capital of France?", "hello")]
    assert len({tuple(o) for o in outputs}) == len(outputs), outputs
    for out in outputs:
        assert len(set(out)) > 1, f"one token repeated: {out}"


def test_outputs_vary_with_image(loaded):
    text = "Describe this image."
    outputs = {
        "none": greedy(loaded, text),
        "gradient": greedy(loaded, text, [gradient(224, 224)]),
        "noise": greedy(loaded, text, [noise(300, 200)]),
        "small gradient": greedy(loaded, text, [gradient(64, 64)]),
    }
    assert len({tuple(o) for o in outputs.values()}) == len(outputs), outputs
    for out in outputs.values():
        assert len(set(out)) > 1, f"one token repeated: {out}"


def test_image_features_one_row_per_placeholder(loaded):
    """DESIGN 4.3: the encoder half of the split gives one embedding row per <|image_pad|>."""
    processor, model = loaded
    inputs = process(processor, "Compare these.", [noise(300, 200), gradient(100, 180)])
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    per_image = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    assert [f.shape[0] for f in out.pooler_output] == per_image
    feats = torch.cat(out.pooler_output)
    num_placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert feats.shape == (num_placeholders, model.config.text_config.hidden_size)
    # Image rows at the scale of token embeddings, or images would not move the logits.
    assert feats.std() > 0.3 * model.get_input_embeddings().weight.std()


def test_bench_size(tmp_path):
    out = make_model("qwen2_vl", tmp_path / "bench", seed=0, size="bench")
    assert (out / "model.safetensors").stat().st_size < 100 * 2**20
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert model.config.text_config.hidden_size > 64
    inputs = process(processor, "x", [noise(448, 448)])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 256
