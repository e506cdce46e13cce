"""Nemotron-H Omni through the three services (separate processes) against transformers run whole:
images, video and audio, same prompt tokens (frame times included), same greedy tokens.

Images: the shared cases (tests/parity.py CASES).
Video: the frames the video processor's own sample_frames picks at 2 fps, only those decoded here; the
reference's pyav loader samples the same ones (OtherMedia.sample_in_loader: with do_sample_frames=True
transformers 5.23 labels them with the wrong times), and its forward gets the video rows as a sequence
(tests/reference.py: its own get_video_features, which its forward cannot take as returned).
Audio: the Parakeet tower on the processor's log-mel features, alone, two clips, beside an image.
What this processor would get wrong is refused with a clear reason, and the services go on serving.
"""

from __future__ import annotations

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.media import audio_bytes, image_bytes, video_bytes
from tests.parity import AUDIO_CASES, family_services, media_parity_tests, model_info_test, parity_tests
from tests.reference import OtherMedia

services = family_services("nemotron_h_omni")
test_parity = parity_tests("nemotron_h_omni")
test_model_info = model_info_test("nemotron_h_omni")

VIDEO_CASES = {
    "video": ("Describe this video.", [], OtherMedia(videos=(video_bytes(seed=1),), sample_in_loader=True)),
    "video-other": ("Describe this video.", [],
                    OtherMedia(videos=(video_bytes(seed=2, width=64, height=96),), sample_in_loader=True)),
    # 5 frames at 2 fps: the last temporal patch holds one frame (the tower repeats it)
    "video-odd-frames": ("What happens?", [], OtherMedia(videos=(video_bytes(seconds=2.5, seed=4),),
                                                         sample_in_loader=True)),
    "video-and-audio": ("Do they match?", [], OtherMedia(videos=(video_bytes(seed=3),), audios=(audio_bytes(seed=3),),
                                                         sample_in_loader=True)),
}
MEDIA_AUDIO_CASES = {
    **AUDIO_CASES,
    "image-and-audio": ("Compare them.", [image_bytes(96, 96, seed=5)], OtherMedia(audios=(audio_bytes(seed=4),))),
    # transformers pads the shorter clip to the longer and runs them as one batch; the encoder runs each alone
    "two-audios": ("Which is longer?", [], OtherMedia(audios=(audio_bytes(seed=5), audio_bytes(seconds=1.7, seed=6)))),
}

test_video_parity = media_parity_tests("nemotron_h_omni", VIDEO_CASES)
test_audio_parity = media_parity_tests("nemotron_h_omni", MEDIA_AUDIO_CASES)


@pytest.mark.e2e
@pytest.mark.parametrize(("media", "text", "reason"), [
    ([("video", video_bytes(seed=1)), ("video", video_bytes(seed=2))], "Compare.", "TOO_MANY_MEDIA_ITEMS"),
    ([("video", video_bytes(seed=1))], "What is <video>?", "RESERVED_TOKEN_IN_TEXT"),
    ([("audio", audio_bytes(seconds=0.01, seed=1))], "Hm?", "AUDIO_TOO_SHORT"),  # 160 samples: one mel frame
])
def test_media_the_model_cannot_take_is_refused_and_serving_goes_on(services, media, text, reason):
    with grpc.insecure_channel(services.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)

        def generate(media, text):
            request = processor_pb2.GenerateRequest(messages=build_messages(text, [], media=media),
                                                    sampling=generation_pb2.SamplingParams(max_new_tokens=2))
            return stub.Generate(request, timeout=120)

        with pytest.raises(grpc.RpcError) as caught:
            generate(media, text)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert error_info(caught.value).reason == reason, caught.value.details()
        assert generate([("audio", audio_bytes(seed=1))], "And now?").completion.completion_tokens == 2
