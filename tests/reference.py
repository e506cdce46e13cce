"""The whole model run in transformers, independently of Triptych's code: the parity reference."""

from __future__ import annotations

import io
import tempfile
import wave
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor
from transformers.video_utils import load_video


@lru_cache(maxsize=4)
def _load(model_dir: Path, auto_class: str):
    model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


@dataclass(frozen=True)
class OtherMedia:
    """A request's video and audio parts (after its images, before the prompt), and how transformers
    samples the videos: `do_sample_frames=True` at `video_fps` (the processor service's --video-fps)."""

    videos: tuple[bytes, ...] = ()
    audios: tuple[bytes, ...] = ()  # 16-bit PCM wav at the feature extractor's rate
    video_fps: float = 2.0
    # Where a processor labels frames with times from the metadata it is given (Nemotron-H Omni), the
    # loader samples instead: transformers' pyav loader keeps the frames the video processor's own
    # sample_frames picks at video_fps, and the processor gets them with do_sample_frames=False and
    # that metadata, one VideoMetadata per video. (With do_sample_frames=True, transformers 5.23's
    # Nemotron-H Omni processor samples a copy of the metadata and labels the sampled frames with the
    # times of the clip's first frames.)
    sample_in_loader: bool = False


NO_MEDIA = OtherMedia()


def _inputs(model_dir: Path, prompt: str, images: list[bytes], auto_class: str, other: OtherMedia = NO_MEDIA):
    model, processor = _load(model_dir, auto_class)
    pil_images = [Image.open(io.BytesIO(data)) for data in images]
    content = ([{"type": "image"} for _ in images] + [{"type": "video"} for _ in other.videos]
               + [{"type": "audio"} for _ in other.audios] + [{"type": "text", "text": prompt}])
    messages = [{"role": "user", "content": content}]
    # Some processors (Phi-4-MM) leave the chat template on the tokenizer.
    templater = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    text = templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {}
    if other.videos and other.sample_in_loader:
        sample = partial(processor.video_processor.sample_frames, fps=other.video_fps)
        loaded = [_load_video(data, sample) for data in other.videos]
        metadata = [meta for _, meta in loaded]
        kwargs.update(videos=[frames for frames, _ in loaded], do_sample_frames=False,
                      video_metadata=metadata[0] if len(metadata) == 1 else metadata)
    elif other.videos:  # transformers' own pyav loader decodes every frame; its video processor samples them
        loaded = [_load_video(data) for data in other.videos]
        kwargs.update(videos=[frames for frames, _ in loaded], video_metadata=[meta for _, meta in loaded],
                      do_sample_frames=True, fps=other.video_fps)
    if other.audios:
        kwargs["audio"] = [_read_wav(data) for data in other.audios]
    # Floating inputs in the model's dtype, as transformers' model cards do (`.to(model.device, dtype)`): Llama 4's
    # image processor returns bfloat16 pixels whatever the model's dtype. Integer tensors stay as they are.
    return model, processor(text=[text], images=pil_images or None, return_tensors="pt", **kwargs).to(model.dtype)


def _load_video(data: bytes, sample_indices_fn=None):
    with tempfile.NamedTemporaryFile(suffix=".video") as file:
        file.write(data)
        file.flush()
        return load_video(file.name, backend="pyav", sample_indices_fn=sample_indices_fn)


def _read_wav(data: bytes) -> np.ndarray:
    """A 16-bit PCM wav's samples as float32 in [-1, 1] (the standard library's reader, not av)."""
    with wave.open(io.BytesIO(data)) as clip:
        assert clip.getsampwidth() == 2 and clip.getnchannels() == 1, "reference clips are 16-bit mono"
        return np.frombuffer(clip.readframes(clip.getnframes()), np.int16).astype(np.float32) / 32768


def hf_generate(model_dir: Path, prompt: str, images: list[bytes], max_new_tokens: int,
                auto_class: str = "AutoModelForImageTextToText", other: OtherMedia = NO_MEDIA) -> list[int]:
    """Greedy tokens of one user message (images, videos, audios, then the prompt), as transformers generates them."""
    model, inputs = _inputs(model_dir, prompt, images, auto_class, other)
    with torch.inference_mode():
        out = model.generate(**_video_rows_as_sequence(model, inputs), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_generate_top(model_dir: Path, prompt: str, images: list[bytes], max_new_tokens: int, top_k: int,
                    auto_class: str = "AutoModelForImageTextToText") -> tuple[list[int], list[list[int]]]:
    """hf_generate's greedy tokens, and per step the `top_k` most likely token ids (for the near-tie rule
    that judges a batched run, DESIGN §4.6)."""
    model, inputs = _inputs(model_dir, prompt, images, auto_class)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, [step[0].topk(top_k).indices.tolist() for step in out.logits]


# Architectures whose get_video_features returns pooler_output as one tensor while their forward
# torch.cat()s it as a sequence of tensors (transformers 5.23: a TypeError on any video).
_VIDEO_FORWARD_WANTS_A_SEQUENCE = frozenset({"NemotronH_Omni_Reasoning_V3"})


def _video_rows_as_sequence(model, inputs):
    """The inputs for generate(). For an architecture of _VIDEO_FORWARD_WANTS_A_SEQUENCE, the video is
    encoded by the model's own get_video_features and handed to generate() as mm_encoder_outputs, its rows
    as the sequence the forward expects; the forward merges them itself. Any other model: as they are."""
    if "pixel_values_videos" not in inputs or type(model).__name__ not in _VIDEO_FORWARD_WANTS_A_SEQUENCE:
        return inputs
    with torch.inference_mode():
        video = model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
    video.pooler_output = tuple(video.pooler_output)  # [groups, tokens, hidden] -> groups x [tokens, hidden]
    rest = {key: value for key, value in inputs.items() if key != "pixel_values_videos"}
    return {**rest, "mm_encoder_outputs": {"video": video}}


def hf_prompt_tokens(model_dir: Path, prompt: str, images: list[bytes],
                     auto_class: str = "AutoModelForImageTextToText", other: OtherMedia = NO_MEDIA) -> int:
    return _inputs(model_dir, prompt, images, auto_class, other)[1]["input_ids"].shape[1]


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
