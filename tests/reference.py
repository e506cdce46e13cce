"""The whole model run in transformers, independently of Triptych's code: the parity reference."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor


@lru_cache(maxsize=4)
def _load(model_dir: Path, auto_class: str):
    model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def _inputs(model_dir: Path, prompt: str, images: list[bytes], auto_class: str):
    model, processor = _load(model_dir, auto_class)
    pil_images = [Image.open(io.BytesIO(data)) for data in images]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    # Some processors (Phi-4-MM) leave the chat template on the tokenizer.
    templater = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    text = templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return model, processor(text=[text], images=pil_images or None, return_tensors="pt")


def hf_generate(model_dir: Path, prompt: str, images: list[bytes], max_new_tokens: int,
                auto_class: str = "AutoModelForImageTextToText") -> list[int]:
    """Greedy tokens of one user message (images first, then the prompt), as transformers generates them."""
    model, inputs = _inputs(model_dir, prompt, images, auto_class)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_prompt_tokens(model_dir: Path, prompt: str, images: list[bytes],
                     auto_class: str = "AutoModelForImageTextToText") -> int:
    return _inputs(model_dir, prompt, images, auto_class)[1]["input_ids"].shape[1]


@dataclass(frozen=True)
class HfImageEmbeddings:
    """One user message as transformers' own processor and tower see it, per image in prompt order."""

    input_ids: list[int]
    embeddings: list[torch.Tensor]  # [tokens_i, hidden]
    deepstack: list[list[torch.Tensor]]  # per image, one [tokens_i, hidden] per deepstack layer (Qwen3-VL)
    position_inputs: list[dict[str, torch.Tensor]]  # per image, e.g. {"image_grid_thw": [1, 3]}


def hf_image_embeddings(model_dir: Path, prompt: str, images: list[bytes],
                        auto_class: str = "AutoModelForImageTextToText") -> HfImageEmbeddings:
    """The images' embeddings as the whole model's get_image_features makes them inside generate()."""
    model, inputs = _inputs(model_dir, prompt, images, auto_class)
    grid = inputs.get("image_grid_thw")
    kwargs = {"image_grid_thw": grid} if grid is not None else {}
    with torch.inference_mode():
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], **kwargs)
    rows = [r.clone() for r in out.pooler_output]
    layers = getattr(out, "deepstack_features", None) or []  # per layer, one tensor per image
    deepstack = [[layer[i].clone() for layer in layers] for i in range(len(rows))]
    positions = [{"image_grid_thw": grid[i : i + 1]} if grid is not None else {} for i in range(len(rows))]
    return HfImageEmbeddings(inputs["input_ids"][0].tolist(), rows, deepstack, positions)
