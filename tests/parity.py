"""The per-family parity check: the three services (separate processes) against transformers run whole.

A family's test file needs only:

    services = family_services("gemma3")          # module-scoped fixture, one start-up per family
    test_parity = parity_tests("gemma3")          # single image, two images, text-only + power check
    test_model_info = model_info_test("gemma3")   # the three services' GetModelInfo agree
"""

from __future__ import annotations

import json

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.models.checkpoint import modality_to_proto
from tests.checkpoints import tiny_checkpoint
from tests.media import audio_bytes, image_bytes, video_bytes
from tests.procs import start_services
from tests.reference import NO_MEDIA, OtherMedia, hf_generate, hf_prompt_tokens

MAX_NEW_TOKENS = 10

CASES = {
    "text-only": ("Tell me a story about the sea.", []),
    "one-image": ("Describe this image.", [image_bytes(160, 120, seed=1)]),
    "one-image-other": ("Describe this image.", [image_bytes(96, 200, seed=2, kind="gradient")]),
    "two-images": ("Compare the two pictures.", [image_bytes(96, 96, seed=5), image_bytes(128, 64, seed=6,
                                                                                        kind="gradient")]),
}


def family_services(family: str, seed: int = 0):
    """A module-scoped fixture: the family's tiny checkpoint served by three processes."""

    @pytest.fixture(scope="module")
    def services():
        started = start_services(tiny_checkpoint(family, seed))
        yield started
        started.stop()

    return services


def parity_tests(family: str, auto_class: str = "AutoModelForImageTextToText", seed: int = 0,
                 cases: tuple[str, ...] = tuple(CASES)):
    """Parametrized test: every case's greedy tokens equal transformers', token by token (`cases`: a
    model that takes no text-only prompt, PaliGemma, leaves that one out)."""

    @pytest.mark.e2e
    @pytest.mark.parametrize("case", cases)
    def test_parity(services, case):
        model_dir = tiny_checkpoint(family, seed)
        prompt, images = CASES[case]
        expected = hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS, auto_class)
        with grpc.insecure_channel(services.address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            request = processor_pb2.GenerateRequest(
                messages=build_messages(prompt, images),
                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
            completion = stub.Generate(request, timeout=300).completion
        assert list(completion.token_ids) == expected
        assert completion.prompt_tokens == hf_prompt_tokens(model_dir, prompt, images, auto_class)
        if case == "one-image-other":  # the parity above has power only if the image matters
            assert expected != hf_generate(model_dir, *CASES["one-image"], MAX_NEW_TOKENS, auto_class)
            if "text-only" in cases:
                assert expected != hf_generate(model_dir, *CASES["text-only"], MAX_NEW_TOKENS, auto_class)

    return test_parity


# Video and audio cases: (prompt, images, other media). The first two of a modality differ only in the
# media, so their parity has power only if the outputs differ (checked in media_parity_tests).
VIDEO_CASES = {
    "video": ("Describe this video.", [], OtherMedia(videos=(video_bytes(seed=1),))),
    "video-other": ("Describe this video.", [], OtherMedia(videos=(video_bytes(seed=2, width=64, height=96),))),
    "image-and-video": ("Compare them.", [image_bytes(96, 96, seed=5)], OtherMedia(videos=(video_bytes(seed=3),))),
}
AUDIO_CASES = {
    "audio": ("What do you hear?", [], OtherMedia(audios=(audio_bytes(seed=1),))),
    "audio-other": ("What do you hear?", [], OtherMedia(audios=(audio_bytes(seconds=2.5, seed=2),))),
}


def media_parity_tests(family: str, cases: dict[str, tuple[str, list[bytes], OtherMedia]],
                       auto_class: str = "AutoModelForImageTextToText", seed: int = 0):
    """Parametrized test: each video/audio case's greedy tokens equal transformers' (which decodes every
    frame with its own pyav loader and samples them with do_sample_frames=True), token by token."""

    @pytest.mark.e2e
    @pytest.mark.parametrize("case", list(cases))
    def test_media_parity(services, case):
        model_dir = tiny_checkpoint(family, seed)
        prompt, images, other = cases[case]
        expected = hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS, auto_class, other)
        media = [*(("video", v) for v in other.videos), *(("audio", a) for a in other.audios)]
        with grpc.insecure_channel(services.address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            request = processor_pb2.GenerateRequest(
                messages=build_messages(prompt, images, media=media),
                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
            completion = stub.Generate(request, timeout=300).completion
        assert list(completion.token_ids) == expected
        assert completion.prompt_tokens == hf_prompt_tokens(model_dir, prompt, images, auto_class, other)
        first, second = list(cases)[:2]
        if case == second:  # power: the media change the answer, and the answer is not the text-only one
            assert expected != hf_generate(model_dir, *cases[first][:2], MAX_NEW_TOKENS, auto_class, cases[first][2])
            assert expected != hf_generate(model_dir, prompt, [], MAX_NEW_TOKENS, auto_class, NO_MEDIA)

    return test_media_parity


def model_info_test(family: str, seed: int = 0, modality: str = "image"):
    """Test: GetModelInfo of the three services agree and match the checkpoint folder (which takes
    `modality`, with its placeholder token)."""

    @pytest.mark.e2e
    def test_model_info_agrees(services):
        """All three services describe the same model, as its checkpoint folder says."""
        model_dir = tiny_checkpoint(family, seed)
        infos = []
        for proc, stub_class, request in ((services.processor, processor_pb2_grpc.ProcessorServiceStub,
                                           processor_pb2.GetModelInfoRequest()),
                                          (services.encoder, encoder_pb2_grpc.EncoderServiceStub,
                                           encoder_pb2.GetModelInfoRequest()),
                                          (services.llm, llm_pb2_grpc.LlmServiceStub, llm_pb2.GetModelInfoRequest())):
            with grpc.insecure_channel(proc.address) as channel:
                infos.append(stub_class(channel).GetModelInfo(request, timeout=30).model_info)
        assert infos[0] == infos[1] == infos[2]
        info = infos[0]
        config = json.loads((model_dir / "config.json").read_text())
        text_config = config.get("text_config") or config.get("llm_config") or config
        assert info.hidden_size == text_config["hidden_size"]
        assert info.embedding_dtype == tensor_pb2.DATA_TYPE_FLOAT32
        assert info.architecture == config["architectures"][0]
        assert modality_to_proto(modality) in info.modalities and info.placeholder_tokens[modality]
        assert len(info.fingerprint) == 16

    return test_model_info_agrees
