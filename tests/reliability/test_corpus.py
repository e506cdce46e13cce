"""The bad-input corpus (corpus.py) against the three services as separate processes, started once.

Each entry goes to the service that would receive it (the processor, or the encoder / the LLM called
directly as an external router calls them) and must get its exact status code and ErrorInfo reason
within a deadline (a hang fails as DEADLINE_EXCEEDED); an OK entry's tokens must equal transformers'.
Then a good request to the same service must be answered with transformers' tokens: nothing a bad
request does outlives it. After the corpus, no process died and each stayed within its memory budget.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc
import pytest

from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes
from tests.procs import (
    Proc,
    engine_pid,
    start_encoder,
    start_llm,
    start_processor,
    stop_all,
    wait_listening,
    wait_serving,
)
from tests.reference import hf_generate
from tests.reliability import corpus
from tests.reliability.corpus import ENTRIES, GOOD, MAX_NEW_TOKENS, Context, Entry, Reference

pytestmark = pytest.mark.e2e

FAMILY = "nemotron_h_omni"  # image, video and audio in one tiny checkpoint
TIMEOUT_S = 30  # per call: a bad request that hangs a service fails here as DEADLINE_EXCEEDED
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
# What the corpus may add to each process's peak resident memory (VmHWM) over its peak after the
# warm-up (one good request through all three). Absolute peaks differ between machines by 200+ MiB
# (this 2-core machine: processor 839, encoder 799, LLM service 747, engine 774 MiB; CI once saw the LLM
# service at 985) while what the corpus adds stays small (here: processor +69, encoder +27, LLM +10,
# engine +22). A decoded 400 Mpx bomb alone would add 0.4-1.2 GiB; the 1 MiB prompt, tokenized, added
# 350 MiB to the processor before it was refused early.
MAX_PEAK_GROWTH_MIB = 256


@dataclass
class Services:
    procs: dict[str, Proc]
    media_dir: Path  # the processor's --allowed-media-dir
    engine_pid: int
    stubs: dict[str, object]
    channels: list[grpc.Channel]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_checkpoint(FAMILY)


@pytest.fixture(scope="module")
def services(model_dir, tmp_path_factory):
    media_dir = tmp_path_factory.mktemp("allowed")
    encoder, llm = start_encoder(model_dir, *corpus.ENCODER_FLAGS), start_llm(model_dir, *corpus.LLM_FLAGS)
    processor = start_processor(model_dir, wait_listening(encoder), wait_listening(llm), media_dir,
                                *corpus.PROCESSOR_FLAGS)
    procs = {"processor": processor, "encoder": encoder, "llm": llm}
    try:
        wait_listening(processor)
        for proc in procs.values():
            wait_serving(proc.address)
        channels = {name: grpc.insecure_channel(proc.address, options=_CHANNEL_OPTIONS) for name, proc in procs.items()}
        stubs = {"processor": processor_pb2_grpc.ProcessorServiceStub(channels["processor"]),
                 "encoder": encoder_pb2_grpc.EncoderServiceStub(channels["encoder"]),
                 "llm": llm_pb2_grpc.LlmServiceStub(channels["llm"])}
        yield Services(procs, media_dir, engine_pid(llm.popen.pid), stubs, list(channels.values()))
        for channel in channels.values():
            channel.close()
    finally:
        stop_all(*procs.values())


@cache
def _reference_tokens(model_dir: Path, ref: Reference) -> list[int]:
    return hf_generate(model_dir, ref.prompt, list(ref.images), MAX_NEW_TOKENS, other=ref.other)[: ref.num_tokens]


@pytest.fixture(scope="module")
def ctx(services, model_dir, tmp_path_factory) -> Context:
    """The router's view of GOOD (Preprocess, then Encode), the model's sizes and transformers' tokens."""
    stubs = services.stubs
    good = corpus.ask(GOOD)(None)
    pre = stubs["processor"].Preprocess(processor_pb2.PreprocessRequest(messages=good.messages, sampling=good.sampling),
                                        timeout=60)
    encoded = stubs["encoder"].Encode(pre.encode_request, timeout=60)  # cached under the items' mm_hash
    other = stubs["processor"].Preprocess(processor_pb2.PreprocessRequest(
        messages=corpus.chat(corpus.part(data=image_bytes(96, 64, seed=12)), corpus.text("x")).messages), timeout=60)
    config = json.loads((model_dir / "config.json").read_text())["text_config"]
    info = stubs["llm"].GetModelInfo(llm_pb2.GetModelInfoRequest(), timeout=30).model_info
    return Context(media_dir=services.media_dir, outside_dir=tmp_path_factory.mktemp("outside"), fingerprint=info.fingerprint,
                   vocab_size=config["vocab_size"], max_context_tokens=config["max_position_embeddings"],
                   hidden_size=info.hidden_size, encode_request=pre.encode_request,
                   llm_request=_with_embeddings(pre.llm_request, encoded), other_image_item=other.encode_request.items[0],
                   good_tokens=_reference_tokens(model_dir, GOOD))


@pytest.fixture(scope="module")
def warm_peaks(services, ctx) -> dict[str, int]:
    """Each process's peak RSS (MiB) after the warm-up (`ctx`), before the first corpus entry."""
    return _peaks_mib(services)


def _with_embeddings(llm_request: llm_pb2.GenerateRequest, encoded: encoder_pb2.EncodeResponse) -> llm_pb2.GenerateRequest:
    """What a router sends the LLM: each range with its item's embeddings (one run per item here)."""
    request = llm_pb2.GenerateRequest()
    request.CopyFrom(llm_request)
    by_hash = {item.mm_hash: item for item in encoded.items}
    for mm in request.prompt.multimodal_inputs:
        mm.embeddings.CopyFrom(by_hash[mm.placeholder.mm_hash].embeddings)
    return request


def _call(services: Services, entry: Entry, request):
    rpc = entry.rpc or ("Encode" if entry.target == "encoder" else "Generate")
    method = getattr(services.stubs[entry.target], rpc)
    if rpc == "ChunkedStreamGenerate":
        return list(method(iter(request), timeout=TIMEOUT_S))
    if rpc.startswith("Stream"):
        return list(method(request, timeout=TIMEOUT_S))
    return method(request, timeout=TIMEOUT_S)


def _tokens(reply) -> list[int]:
    if isinstance(reply, list):  # a stream's replies
        return [t for r in reply for t in (r.response.token_ids if hasattr(r, "response") else r.token_ids)]
    return list(reply.completion.token_ids if hasattr(reply, "completion") else reply.token_ids)


def _good_request_answered(services: Services, ctx: Context, target: str) -> None:
    """A good request to `target` gets transformers' tokens (the encoder's: through the LLM)."""
    stubs = services.stubs
    if target == "processor":
        reply = stubs["processor"].Generate(corpus.ask(GOOD)(ctx), timeout=TIMEOUT_S)
        assert list(reply.completion.token_ids) == ctx.good_tokens
        return
    if target == "encoder":
        request = encoder_pb2.EncodeRequest()
        request.CopyFrom(ctx.encode_request)
        for item in request.items:  # no mm_hash: encoded now, not answered from the cache
            item.mm_hash = ""
        encoded = stubs["encoder"].Encode(request, timeout=TIMEOUT_S)
        for item, original in zip(encoded.items, ctx.encode_request.items, strict=True):
            item.mm_hash = original.mm_hash
        llm_request = _with_embeddings(ctx.llm_request, encoded)
    else:
        llm_request = ctx.llm_request
    assert list(stubs["llm"].Generate(llm_request, timeout=TIMEOUT_S).token_ids) == ctx.good_tokens


@pytest.mark.usefixtures("warm_peaks")  # taken before the first entry
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda entry: entry.name)
def test_corpus_entry(services, ctx, model_dir, entry):
    request = entry.build(ctx)
    if entry.code == "OK":
        reply = _call(services, entry, request)
        if entry.reference is not None:
            assert _tokens(reply) == _reference_tokens(model_dir, entry.reference)
    else:
        with pytest.raises(grpc.RpcError) as caught:
            _call(services, entry, request)
        err, info = caught.value, error_info(caught.value)
        assert (err.code().name, info.reason if info else "") == (entry.code, entry.reason), err.details()
        if info is not None:
            assert info.domain.startswith("triptych."), info
    _good_request_answered(services, ctx, entry.target)


def _peaks_mib(services: Services) -> dict[str, int]:
    pids = {name: proc.popen.pid for name, proc in services.procs.items()} | {"engine": services.engine_pid}
    return {name: _vm_hwm_kib(pid) >> 10 for name, pid in pids.items()}


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def test_every_service_survived_within_its_memory_budget(services, warm_peaks):
    """Runs after the corpus (file order): every process is the one started, alive, and the corpus
    raised none's peak memory by more than its allowance."""
    for name, proc in services.procs.items():
        assert proc.popen.poll() is None, f"{name} died:\n{proc.output()}"
    assert engine_pid(services.procs["llm"].popen.pid) == services.engine_pid, "the LLM's engine process was restarted"
    peaks = _peaks_mib(services)
    growth = {name: peaks[name] - warm_peaks[name] for name in peaks}
    print(f"peak RSS (MiB) after the warm-up: {warm_peaks}; after {len(ENTRIES)} corpus entries: {peaks}")
    over = {name: grown for name, grown in growth.items() if grown > MAX_PEAK_GROWTH_MIB}
    assert not over, f"the corpus raised peak RSS by more than {MAX_PEAK_GROWTH_MIB} MiB: {over}"
