"""Precomputed embeddings through the processor (MediaEmbeddings instead of the image's bytes).

- The stand-in: for every family, a blank image of the original size gives the same prompt ids,
  placeholder runs and position inputs as the real image (what lets the processor expand an
  image it never sees).
- Parity: embeddings made by transformers' own tower for an image give the same tokens as the
  image itself, and transformers' run whole (Qwen2-VL; Qwen3-VL with deepstack made to matter;
  LLaVA, a fixed-size tower); no Encode call reaches the encoder for them.
- Refusals: every mismatch with the model is INVALID_ARGUMENT naming the field and the problem.
"""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import pytest
import torch
from PIL import Image

from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.common.tensors import from_proto, to_proto
from services.models.base import IMAGE as IMAGE_MODALITY
from services.models.checkpoint import Checkpoint
from services.processor.embeds import EmbeddingSpec, read_embeddings
from services.tiny_checkpoints import TINY_FAMILIES
from tests.checkpoints import scaled_deepstack, tiny_checkpoint
from tests.inproc import CountingEncoder, InProcessServices
from tests.media import image_bytes
from tests.reference import hf_generate, hf_image_embeddings

MAX_NEW_TOKENS = 10
IMAGE = image_bytes(160, 120, seed=1)
OTHER = image_bytes(96, 200, seed=2, kind="gradient")
PROMPT = "Describe this image."


# ---- the stand-in image -------------------------------------------------------------------------
def _rgba(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(width, height, seed=9))).convert("RGBA").save(buf, format="PNG")
    return buf.getvalue()


SIZES = [(160, 120), (96, 200), (700, 300), (33, 517)]


# Stand-in images are for image parts only: every tiny family but the audio-only one.
IMAGE_FAMILIES = [family for family in TINY_FAMILIES if family != "qwen2_audio"]


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_placeholders_depend_on_the_image_size_only(family):
    checkpoint = Checkpoint(tiny_checkpoint(family))
    fam = checkpoint.family
    assert IMAGE_MODALITY in fam.modalities, f"{family} takes no images: leave it out of IMAGE_FAMILIES"
    processor = fam.load_processor(checkpoint.path)
    spec = EmbeddingSpec(fam.name, fam.hidden_size, torch.float32, fam.num_deepstack_layers, "f", 10**8)
    text = fam.render_chat(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
    for index, (width, height) in enumerate(SIZES):
        data = [image_bytes(width, height, seed=index), image_bytes(width, height, kind="gradient"),
                _rgba(width, height)][index % 3]
        real = fam.preprocess(processor, text, [Image.open(io.BytesIO(data))])
        media = processor_pb2.Media(embeddings=processor_pb2.MediaEmbeddings(
            embeddings=to_proto(torch.zeros(3, fam.hidden_size)),
            deepstack_embeddings=[to_proto(torch.zeros(3, fam.hidden_size))] * fam.num_deepstack_layers,
            width_px=width, height_px=height))
        stand_in, _ = read_embeddings(media, spec, "image")
        blank = fam.preprocess(processor, text, [stand_in])
        assert blank.token_ids == real.token_ids, (width, height)
        (a,), (b,) = real.items, blank.items
        assert (a.offset, a.length, a.placeholder_runs) == (b.offset, b.length, b.placeholder_runs)
        assert a.position_inputs.keys() == b.position_inputs.keys()
        for name, tensor in a.position_inputs.items():
            assert torch.equal(tensor, b.position_inputs[name]), (name, width, height)


# ---- through the services -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_boosted(tmp_path_factory) -> Path:
    return scaled_deepstack(tiny_checkpoint("qwen3_vl"), tmp_path_factory.mktemp("qwen3_vl") / "deepstack-x30", 30.0)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl-x30", "llava"])
def served(request):
    """(model folder, in-process services whose encoder counts its calls)."""
    model_dir = request.getfixturevalue("qwen3_boosted") if request.param == "qwen3_vl-x30" else tiny_checkpoint(
        request.param)
    services = InProcessServices(model_dir, encoder_cls=CountingEncoder)
    yield model_dir, services
    services.stop()


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def embeddings_media(model_dir: Path, data: bytes, uuid: str = "") -> processor_pb2.Media:
    """The image as its embeddings, computed by transformers' tower on it alone."""
    ref = hf_image_embeddings(model_dir, PROMPT, [data])
    width, height = _size(data)
    return processor_pb2.Media(uuid=uuid, embeddings=processor_pb2.MediaEmbeddings(
        embeddings=to_proto(ref.embeddings[0]), deepstack_embeddings=[to_proto(d) for d in ref.deepstack[0]],
        width_px=width, height_px=height))


def _message(*parts: processor_pb2.Media | str) -> list[processor_pb2.ChatMessage]:
    content = [processor_pb2.ContentPart(text=p) if isinstance(p, str) else processor_pb2.ContentPart(image=p)
               for p in parts]
    return [processor_pb2.ChatMessage(role="user", content=content)]


def _generate(services, messages) -> processor_pb2.Completion:
    with grpc.insecure_channel(services.address) as channel:
        request = processor_pb2.GenerateRequest(messages=messages, sampling=generation_pb2.SamplingParams(
            max_new_tokens=MAX_NEW_TOKENS))
        return processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=300).completion


def test_embeddings_give_the_image_tokens_without_the_encoder(served):
    model_dir, services = served
    expected = hf_generate(model_dir, PROMPT, [IMAGE], MAX_NEW_TOKENS)
    calls = services.encoder.num_calls
    assert list(_generate(services, _message(processor_pb2.Media(data=IMAGE), PROMPT)).token_ids) == expected
    assert services.encoder.num_calls == calls + 1
    completion = _generate(services, _message(embeddings_media(model_dir, IMAGE), PROMPT))
    assert list(completion.token_ids) == expected
    assert services.encoder.num_calls == calls + 1  # no Encode for embeddings
    assert completion.prompt_tokens == len(hf_image_embeddings(model_dir, PROMPT, [IMAGE]).input_ids)


def test_embeddings_beside_an_image(served):
    """One item sent as embeddings, one as bytes: only the bytes reach the encoder; tokens as transformers'."""
    model_dir, services = served
    items = services.encoder.num_items
    messages = _message(embeddings_media(model_dir, IMAGE), processor_pb2.Media(data=OTHER), "Compare them.")
    expected = hf_generate(model_dir, "Compare them.", [IMAGE, OTHER], MAX_NEW_TOKENS)
    assert list(_generate(services, messages).token_ids) == expected
    assert services.encoder.num_items == items + 1


def test_preprocess_carries_the_callers_embeddings(served):
    model_dir, services = served
    media = embeddings_media(model_dir, IMAGE, uuid="my-image-1")
    with grpc.insecure_channel(services.address) as channel:
        pre = processor_pb2_grpc.ProcessorServiceStub(channel).Preprocess(processor_pb2.PreprocessRequest(
            messages=_message(media, processor_pb2.Media(data=OTHER), "x")), timeout=60)
    assert len(pre.encode_request.items) == 1  # the image only
    first, second = pre.llm_request.prompt.multimodal_inputs[0], pre.llm_request.prompt.multimodal_inputs[-1]
    assert first.placeholder.mm_hash == "my-image-1"  # the caller's uuid
    assert torch.equal(from_proto(first.embeddings), from_proto(media.embeddings.embeddings))
    assert [from_proto(d).shape for d in first.deepstack_embeddings] == [
        from_proto(d).shape for d in media.embeddings.deepstack_embeddings]
    assert not second.HasField("embeddings") and second.placeholder.mm_hash == pre.encode_request.items[0].mm_hash


def test_without_uuid_the_hash_is_the_embeddings_content(served):
    model_dir, services = served
    media = embeddings_media(model_dir, IMAGE)
    with grpc.insecure_channel(services.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        hashes = [mm.placeholder.mm_hash for mm in stub.Preprocess(processor_pb2.PreprocessRequest(
            messages=_message(media, media, "x")), timeout=60).llm_request.prompt.multimodal_inputs]
        changed = processor_pb2.Media()
        changed.CopyFrom(media)
        rows = from_proto(media.embeddings.embeddings)
        rows[0, 0] += 1
        changed.embeddings.embeddings.CopyFrom(to_proto(rows))
        other = stub.Preprocess(processor_pb2.PreprocessRequest(messages=_message(changed, "x")),
                                timeout=60).llm_request.prompt.multimodal_inputs[0].placeholder.mm_hash
    assert hashes[0] == hashes[-1] and len(hashes[0]) == 64
    assert other != hashes[0]


# ---- refusals: (mutation of the MediaEmbeddings, reason, text of the message) ----------------------
def _rows(source, num_rows: int, width: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(num_rows, width, dtype=dtype)


def _one_row_more(s):
    s.embeddings.CopyFrom(to_proto(_rows(s, s.embeddings.shape[0] + 1, s.embeddings.shape[1])))
    for d in s.deepstack_embeddings:
        d.CopyFrom(s.embeddings)


def _narrower(s):
    s.embeddings.CopyFrom(to_proto(_rows(s, s.embeddings.shape[0], s.embeddings.shape[1] - 1)))


def _float16(s):
    s.embeddings.CopyFrom(to_proto(_rows(s, *s.embeddings.shape, dtype=torch.float16)))


def _unset(s):
    s.ClearField("embeddings")


def _no_size(s):
    s.width_px = 0


def _inf(s):
    rows = from_proto(s.embeddings)
    rows[1, 2] = float("inf")
    s.embeddings.CopyFrom(to_proto(rows))


def _truncated(s):
    s.embeddings.data = s.embeddings.data[:-4]


def _drop_deepstack(s):
    del s.deepstack_embeddings[0]


def _add_deepstack(s):
    s.deepstack_embeddings.append(s.embeddings)


def _short_deepstack(s):
    s.deepstack_embeddings[1].CopyFrom(to_proto(_rows(s, s.embeddings.shape[0] - 1, s.embeddings.shape[1])))


WHERE = "messages[0].content[0].image.embeddings"
ROWS_MISMATCH = f"{WHERE}.embeddings has {{rows_plus_1}} rows; an image of 160x120 takes {{rows}} placeholder tokens"
COMMON = [
    (_one_row_more, "EMBEDDING_SHAPE_MISMATCH", ROWS_MISMATCH),
    (_narrower, "EMBEDDING_SHAPE_MISMATCH", f"{WHERE}.embeddings is of shape"),
    (_float16, "EMBEDDING_DTYPE_MISMATCH", f"{WHERE}.embeddings are DATA_TYPE_FLOAT16, the model runs in DATA_TYPE_FL"),
    (_unset, "EMBEDDING_SHAPE_MISMATCH", f"{WHERE}.embeddings is unset"),
    (_no_size, "EMBEDDINGS_IMAGE_SIZE_MISSING", f"{WHERE}: width_px x height_px is 0x120"),
    (_inf, "EMBEDDING_NOT_FINITE", f"{WHERE}.embeddings holds NaN or Inf (first at row 1, column 2)"),
    (_truncated, "TENSOR_SIZE_MISMATCH", f"{WHERE}.embeddings: shape"),
]
DEEPSTACK = {  # Qwen3-VL takes one tensor per deepstack layer (2 in the tiny model), every other family none
    "qwen2_vl": [(_add_deepstack, "DEEPSTACK_COUNT_MISMATCH", f"{WHERE}: 1 deepstack_embeddings; the qwen2_vl model")],
    "llava": [(_add_deepstack, "DEEPSTACK_COUNT_MISMATCH", f"{WHERE}: 1 deepstack_embeddings; the llava model")],
    "qwen3_vl-x30": [
        (_drop_deepstack, "DEEPSTACK_COUNT_MISMATCH", f"{WHERE}: 1 deepstack_embeddings; the qwen3_vl model takes 2"),
        (_short_deepstack, "EMBEDDING_SHAPE_MISMATCH", f"{WHERE}.deepstack_embeddings[1] has shape"),
    ],
}


def test_mismatched_embeddings_are_invalid_argument(served, request):
    model_dir, services = served
    good = embeddings_media(model_dir, IMAGE)
    rows = good.embeddings.embeddings.shape[0]
    calls = services.encoder.num_calls
    with grpc.insecure_channel(services.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        for mutate, reason, text in COMMON + DEEPSTACK[request.node.callspec.params["served"]]:
            bad = processor_pb2.Media()
            bad.CopyFrom(good)
            mutate(bad.embeddings)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(processor_pb2.GenerateRequest(messages=_message(bad, PROMPT)), timeout=60)
            err = caught.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (mutate.__name__, err.details())
            assert error_info(err).reason == reason and error_info(err).domain == "triptych.processor", (
                mutate.__name__, err.details())
            assert err.details().startswith(text.format(rows=rows, rows_plus_1=rows + 1)), (mutate.__name__,
                                                                                             err.details())
    assert services.encoder.num_calls == calls
    assert list(_generate(services, _message(good, PROMPT)).token_ids)  # still serving
