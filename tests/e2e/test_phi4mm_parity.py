"""Phi-4-multimodal: the three services, as separate processes, give transformers' greedy tokens.

Images: beyond the shared cases (one 448 px crop per image), images of several crops, and two images of
different crop counts in one prompt (the processor pads the smaller to the larger's crop count; the
encoder gets only each image's own crops). And prompts where no patch is padded: transformers 5.23 runs
the vision tower causally then (Phi4MultimodalVisionAttention.is_causal), and Triptych matches it.

Audio: the cases run in order against the same services with the encoder's cache on: "audio-and-image"
sends the clip of "audio" again, now beside an image, where transformers projects it with its
vision-speech layers. Its parity fails if a cache serves the first request's (speech) rows for it, so
it guards the item's hash_context too. "two-audios": the shorter clip is padded to the longer's
frames, with a mask.
"""

from __future__ import annotations

import io

import grpc
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.checkpoints import tiny_checkpoint
from tests.media import audio_bytes, image_bytes
from tests.parity import MAX_NEW_TOKENS, family_services, media_parity_tests, model_info_test, parity_tests
from tests.reference import OtherMedia, hf_generate

AUTO_CLASS = "AutoModelForCausalLM"
CLIP = audio_bytes(seed=1)
AUDIO_CASES = {
    "audio": ("What do you hear?", [], OtherMedia(audios=(CLIP,))),
    "audio-other": ("What do you hear?", [], OtherMedia(audios=(audio_bytes(seconds=2.5, seed=2),))),
    "audio-and-image": ("What do you hear and see?", [image_bytes(160, 120, seed=1)], OtherMedia(audios=(CLIP,))),
    "two-audios": ("Compare the two sounds.", [], OtherMedia(audios=(CLIP, audio_bytes(seconds=1.7, seed=3)))),
    "same-clip-twice": ("Are they the same?", [], OtherMedia(audios=(CLIP, CLIP))),  # two items, not deduplicated
    "two-images-two-audios": ("Describe all of it.", [image_bytes(96, 96, seed=5), image_bytes(900, 500, seed=7)],
                              OtherMedia(audios=(audio_bytes(seconds=0.6, seed=4), CLIP))),
}

services = family_services("phi4mm")
test_parity = parity_tests("phi4mm", auto_class=AUTO_CLASS)
test_model_info = model_info_test("phi4mm")
test_audio_parity = media_parity_tests("phi4mm", AUDIO_CASES, auto_class=AUTO_CLASS)

WIDE = image_bytes(900, 500, seed=7)  # 2x1 crops + the global view, right columns padded
CROP_CASES = {
    "two-crops": ("Describe this image.", [WIDE]),
    "mixed-crop-counts": ("Compare the two pictures.", [WIDE, image_bytes(160, 120, seed=1)]),
    "small-then-tall": ("What changed?", [image_bytes(120, 90, seed=3, kind="gradient"),
                                          image_bytes(300, 700, seed=4)]),  # 1x2 crops
    # No padded patch in the prompt's crop batch: transformers' causal vision path.
    "square-448": ("Describe this image.", [image_bytes(448, 448, seed=5)]),
    "square-224": ("Describe this image.", [image_bytes(224, 224, seed=6)]),
    "squares-1-and-4-crops": ("Compare the two pictures.", [image_bytes(448, 448, seed=5),
                                                            image_bytes(896, 896, seed=8)]),
    # A square beside a padded image: the masked (bidirectional) path.
    "square-then-wide": ("Compare the two pictures.", [image_bytes(448, 448, seed=5), WIDE]),
}
SQUARE = image_bytes(96, 96, seed=5)  # resized to exactly one crop: no padded patch anywhere


def _generate(address: str, prompt: str, images: list[bytes]) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        request = processor_pb2.GenerateRequest(
            messages=build_messages(prompt, images),
            sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
        return list(stub.Generate(request, timeout=300).completion.token_ids)


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CROP_CASES))
def test_multi_crop_parity(services, case):
    prompt, images = CROP_CASES[case]
    expected = hf_generate(tiny_checkpoint("phi4mm"), prompt, images, MAX_NEW_TOKENS, AUTO_CLASS)
    assert _generate(services.address, prompt, images) == expected


def _hf_generate_bidirectional(prompt: str, images: list[bytes]) -> list[int]:
    """transformers run whole, with the vision tower's attention bidirectional (its own model copy)."""
    model_dir = tiny_checkpoint("phi4mm")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for module in model.modules():
        if type(module).__name__ == "Phi4MultimodalVisionAttention":
            module.is_causal = False
    processor = AutoProcessor.from_pretrained(model_dir)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(io.BytesIO(b)) for b in images], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.e2e
def test_unpadded_image_takes_transformers_causal_path(services):
    """A square image alone: Triptych gives stock transformers' tokens, causal vision attention included.

    If the second assertion fails, transformers has fixed Phi4MultimodalVisionAttention.is_causal (the
    case no longer tells the two paths apart); see services/models/phi4mm.py for what that allows.
    """
    prompt = "Describe this image."
    expected = hf_generate(tiny_checkpoint("phi4mm"), prompt, [SQUARE], MAX_NEW_TOKENS, AUTO_CLASS)
    assert _generate(services.address, prompt, [SQUARE]) == expected
    assert _hf_generate_bidirectional(prompt, [SQUARE]) != expected
