"""Qwen2-Audio: the three services, as separate processes, give transformers' greedy tokens for audio
prompts (one clip, another clip, two clips of different lengths) and text alone."""

from __future__ import annotations

from tests.media import audio_bytes
from tests.parity import AUDIO_CASES, family_services, media_parity_tests, model_info_test
from tests.reference import NO_MEDIA, OtherMedia

AUTO_CLASS = "AutoModelForMultimodalLM"  # transformers' Auto class that maps Qwen2AudioForConditionalGeneration

CASES = {
    **AUDIO_CASES,  # "audio" and "audio-other" differ in the clip only: the power check
    "two-audios": ("Compare the two sounds.", [], OtherMedia(audios=(audio_bytes(seed=1),
                                                                     audio_bytes(seconds=1.7, seed=3)))),
    "short-clip": ("What do you hear?", [], OtherMedia(audios=(audio_bytes(seconds=0.4, seed=5),))),
    "text-only": ("Tell me a story about the sea.", [], NO_MEDIA),
}

services = family_services("qwen2_audio")
test_audio_parity = media_parity_tests("qwen2_audio", CASES, auto_class=AUTO_CLASS)
test_model_info = model_info_test("qwen2_audio", modality="audio")
