"""Qwen2.5-Omni's thinker: the three services, as separate processes, give transformers' greedy tokens for
the shared image cases, clips (the power check: another clip changes the answer), two clips, and images
and clips in one prompt (mRoPE positions over both)."""

from __future__ import annotations

from tests.media import audio_bytes, image_bytes
from tests.parity import AUDIO_CASES, family_services, media_parity_tests, model_info_test, parity_tests
from tests.reference import OtherMedia

CASES = {
    **AUDIO_CASES,
    "two-audios": ("Compare the two sounds.", [], OtherMedia(audios=(audio_bytes(seed=1), audio_bytes(seconds=1.7, seed=3)))),
    "image-and-audio": ("What do you see and hear?", [image_bytes(160, 120, seed=1)], OtherMedia(audios=(audio_bytes(seed=1),))),
    "two-images-and-audio": ("Describe all of it.", [image_bytes(96, 96, seed=5), image_bytes(128, 64, seed=6)],
                             OtherMedia(audios=(audio_bytes(seconds=0.6, seed=4),))),
}

services = family_services("qwen2_5_omni_thinker")
test_parity = parity_tests("qwen2_5_omni_thinker")
test_audio_parity = media_parity_tests("qwen2_5_omni_thinker", CASES)
test_model_info = model_info_test("qwen2_5_omni_thinker")
