"""The generic family's video path: LLaVA-NeXT-Video, which no family file claims, served token-exact
through the three services (separate processes) for images and for video.

The model has `get_video_features` and its config a video token, so the generic family takes video:
the processor service decodes the frames the model's video processor samples at 2 fps, the processor
expands each `<video>` to frames x pooled-patches tokens (one run per video), the encoder runs
`get_video_features` on the item's [1, frames, 3, H, W] pixel_values_videos, the LLM writes its rows
over the run. Images take LLaVA-NeXT's anyres path through get_image_features (the same checkpoint's
image parity). A generic checkpoint without video refuses it: tests/models/test_generic.py.
"""

from __future__ import annotations

from tests.e2e.test_generic_parity import served_by_generic_test
from tests.parity import VIDEO_CASES, family_services, media_parity_tests, model_info_test, parity_tests

services = family_services("llava_next_video")
test_parity = parity_tests("llava_next_video")
test_video_parity = media_parity_tests("llava_next_video", VIDEO_CASES)
test_model_info = model_info_test("llava_next_video")
test_generic = served_by_generic_test("LlavaNextVideoForConditionalGeneration", "<image>")


def test_model_info_names_the_video_placeholder(services):
    """All three services list video among the checkpoint's modalities, with its own placeholder."""
    from services.common.api.triptych.common.v1 import tensor_pb2
    from tests.e2e.test_generic_parity import _model_infos

    for info in _model_infos(services):
        assert tensor_pb2.MODALITY_VIDEO in info.modalities
        assert info.placeholder_tokens["video"] == "<video>"
