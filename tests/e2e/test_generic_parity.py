"""The generic family: three model types without a family file, served token-exact.

Every one gives an image several placeholder runs (ProcessedItem.runs), so the harness's image
cases go through the multi-run path (tests/models/test_generic.py checks that they do):
Idefics3 with image splitting (Llama decoder; one prompt's tiles reach the tower as [1, tiles, ...]
with a pixel attention mask, its pooler_output is one tensor per prompt; each tile and the global
image is a run of `<image>` after a `<row_i_col_j>` / `<global-img>` tag), Aya Vision with up to 4
tiles + a thumbnail (Cohere2 decoder with a sliding-window layer and tied embeddings; [tiles, ...]
pixels, one [tiles, tokens, hidden] pooler_output; runs after `TILE_i` / `TILE_GLOBAL`) and Mistral3
(Pixtral tower taking image_sizes, 2 x 2 patch merge, Mistral decoder; one run of `[IMG]` per row,
between `[IMG_BREAK]`s and closed by `[IMG_END]`). In the two-image case both images own several runs
(Aya Vision: only the second; the square one fits one tile).

The harness names the tiny checkpoint by the builder's FAMILY ("idefics3", "aya_vision", "mistral3"); the family
that serves it is "generic", which every service reports. Each model type gets its own class, whose
`services` fixture (the one the harness's test asks for) is that type's module-scoped service set.
"""

from __future__ import annotations

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.media import video_bytes
from tests.parity import family_services, model_info_test, parity_tests

idefics3_services = family_services("idefics3")
aya_vision_services = family_services("aya_vision")
mistral3_services = family_services("mistral3")


def _model_infos(services) -> list:
    """GetModelInfo of the processor, the encoder and the LLM."""
    calls = [
        (services.address, processor_pb2_grpc.ProcessorServiceStub, processor_pb2.GetModelInfoRequest),
        (services.encoder.address, encoder_pb2_grpc.EncoderServiceStub, encoder_pb2.GetModelInfoRequest),
        (services.llm.address, llm_pb2_grpc.LlmServiceStub, llm_pb2.GetModelInfoRequest),
    ]
    infos = []
    for address, stub, request in calls:
        with grpc.insecure_channel(address) as channel:
            infos.append(stub(channel).GetModelInfo(request(), timeout=30).model_info)
    return infos


def served_by_generic_test(architecture: str, placeholder: str):
    """Test: all three services serve the checkpoint through the generic family."""

    @pytest.mark.e2e
    def test_served_by_the_generic_family(services):
        for info in _model_infos(services):
            assert info.family == "generic"
            assert info.architecture == architecture
            assert info.placeholder_tokens["image"] == placeholder

    return test_served_by_the_generic_family


class TestIdefics3:
    @pytest.fixture(scope="class")
    @classmethod
    def services(cls, idefics3_services):
        return idefics3_services

    test_parity = staticmethod(parity_tests("idefics3"))
    test_model_info = staticmethod(model_info_test("idefics3"))
    test_generic = staticmethod(served_by_generic_test("Idefics3ForConditionalGeneration", "<image>"))

    @pytest.mark.e2e
    def test_a_video_is_refused_with_the_reason(self, services):
        """Idefics3 has no get_video_features: a video part is refused before any decoding, naming why."""
        with grpc.insecure_channel(services.address) as channel:
            request = processor_pb2.GenerateRequest(
                messages=build_messages("Describe this video.", media=[("video", video_bytes(seed=1))]),
                sampling=generation_pb2.SamplingParams(max_new_tokens=4))
            with pytest.raises(grpc.RpcError) as caught:
                processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "MODALITY_UNSUPPORTED"
        assert "get_video_features" in caught.value.details()


class TestAyaVision:
    @pytest.fixture(scope="class")
    @classmethod
    def services(cls, aya_vision_services):
        return aya_vision_services

    test_parity = staticmethod(parity_tests("aya_vision"))
    test_model_info = staticmethod(model_info_test("aya_vision"))
    test_generic = staticmethod(served_by_generic_test("AyaVisionForConditionalGeneration", "<|IMG_PATCH|>"))


class TestMistral3:
    @pytest.fixture(scope="class")
    @classmethod
    def services(cls, mistral3_services):
        return mistral3_services

    test_parity = staticmethod(parity_tests("mistral3"))
    test_model_info = staticmethod(model_info_test("mistral3"))
    test_generic = staticmethod(served_by_generic_test("Mistral3ForConditionalGeneration", "[IMG]"))
