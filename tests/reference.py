"""The whole model run in transformers, independently of Triptych's code: the parity reference."""

from __future__ import annotations

import io
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
