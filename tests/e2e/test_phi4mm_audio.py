"""Phi-4-multimodal audio through the three services (separate processes) against transformers run whole.

The cases run in order against one set of services with the encoder's cache on: "audio-and-image" sends
the clip of "audio" again, now beside an image, where transformers projects it with its vision-speech
layers. Its parity fails if a cache serves the first request's (speech) rows for it, so it guards the
item's hash_context too. "two-audios": the shorter clip is padded to the longer's frames, with a mask.
"""

from __future__ import annotations

from tests.media import audio_bytes, image_bytes
from tests.parity import family_services, media_parity_tests
from tests.reference import OtherMedia

CLIP = audio_bytes(seed=1)
CASES = {
    "audio": ("What do you hear?", [], OtherMedia(audios=(CLIP,))),
    "audio-other": ("What do you hear?", [], OtherMedia(audios=(audio_bytes(seconds=2.5, seed=2),))),
    "audio-and-image": ("What do you hear and see?", [image_bytes(160, 120, seed=1)], OtherMedia(audios=(CLIP,))),
    "two-audios": ("Compare the two sounds.", [], OtherMedia(audios=(CLIP, audio_bytes(seconds=1.7, seed=3)))),
    "same-clip-twice": ("Are they the same?", [], OtherMedia(audios=(CLIP, CLIP))),  # two items, not deduplicated
    "two-images-two-audios": ("Describe all of it.", [image_bytes(96, 96, seed=5), image_bytes(900, 500, seed=7)],
                              OtherMedia(audios=(audio_bytes(seconds=0.6, seed=4), CLIP))),
}

services = family_services("phi4mm")
test_audio_parity = media_parity_tests("phi4mm", CASES, auto_class="AutoModelForCausalLM")
