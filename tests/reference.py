"""The whole model run in transformers, independently of Triptych's code: the parity reference."""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


@lru_cache(maxsize=4)
def _load(model_dir: Path):
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def hf_generate(model_dir: Path, prompt: str, images: list[bytes], max_new_tokens: int) -> list[int]:
    """Greedy tokens of one user message (images first, then the prompt), as transformers generates them."""
    model, processor = _load(model_dir)
    pil_images = [Image.open(io.BytesIO(data)) for data in images]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=[text], images=pil_images or None, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_prompt_tokens(model_dir: Path, prompt: str, images: list[bytes]) -> int:
    model, processor = _load(model_dir)
    pil_images = [Image.open(io.BytesIO(data)) for data in images]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return processor(text=[text], images=pil_images or None, return_tensors="pt")["input_ids"].shape[1]
