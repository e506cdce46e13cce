"""The generic family: two model types without a family file, served token-exact.

Idefics3 (Llama decoder; one prompt's images reach the tower as [1, images, ...] with a pixel
attention mask, and its pooler_output is one tensor per prompt) and Aya Vision (Cohere2 decoder with
a sliding-window layer and tied embeddings; [images, ...] pixels, one [images, tokens, hidden]
pooler_output). Both wrap each image's placeholder run in extra tokens that take no tower rows.

The harness names the tiny checkpoint by the builder's FAMILY ("idefics3", "aya_vision"); the family
that serves it is "generic", which every service reports. Each model type gets its own class, whose
`services` fixture (the one the harness's test asks for) is that type's module-scoped service set.
"""

from __future__ import annotations

import grpc
import pytest

from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.parity import family_services, parity_tests

idefics3_services = family_services("idefics3")
aya_vision_services = family_services("aya_vision")


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


class TestIdefics3:
    @pytest.fixture(scope="class")
    @classmethod
    def services(cls, idefics3_services):
        return idefics3_services

    test_parity = staticmethod(parity_tests("idefics3"))

    @staticmethod
    @pytest.mark.e2e
    def test_served_by_the_generic_family(services):
        for info in _model_infos(services):
            assert info.family == "generic"
            assert info.architecture == "Idefics3ForConditionalGeneration"
            assert info.placeholder_tokens["image"] == "<image>"


class TestAyaVision:
    @pytest.fixture(scope="class")
    @classmethod
    def services(cls, aya_vision_services):
        return aya_vision_services

    test_parity = staticmethod(parity_tests("aya_vision"))

    @staticmethod
    @pytest.mark.e2e
    def test_served_by_the_generic_family(services):
        for info in _model_infos(services):
            assert info.family == "generic"
            assert info.architecture == "AyaVisionForConditionalGeneration"
            assert info.placeholder_tokens["image"] == "<|IMG_PATCH|>"
