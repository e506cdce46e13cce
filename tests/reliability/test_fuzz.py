"""Property-based fuzzing of every request message of every RPC (issue 18, item 2; docs/reliability/fuzz.md).

The services run in this process (tests/inproc.py: real grpc.aio servers on port 0, a tiny checkpoint,
one start for the module). For each RPC found in the contract's descriptors:
- random messages derived from the request's descriptor (tests/reliability/protofuzz.py);
- near-valid ones: a request that succeeds, with one or two fields mutated anywhere in its tree.
Every call must end within its deadline with success or a clean status (never UNKNOWN, never INTERNAL
unless out of memory; an ErrorInfo reason of the contract), with no error or traceback in the logs.
After the run the services hold no more than before: RSS, threads, fds, event-loop tasks, the engine's
requests and the encoder's queue (test_no_growth, which runs last), and the engine never restarted.

TRIPTYCH_FUZZ=nightly runs the long form (>= 10,000 examples, random seeds); the default is CI's short,
derandomized form. TRIPTYCH_FUZZ_FAMILY picks the tiny checkpoint (default qwen2_vl).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import grpc
import pytest
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2
from tests.checkpoints import tiny_checkpoint
from tests.inproc import InProcessServices
from tests.media import video_bytes
from tests.reliability import protofuzz
from tests.reliability.fuzz_target import RPC_BY_ID, RPCS, ErrorLog, FuzzTarget, build_seeds, rpc_id

PROFILE = os.environ.get("TRIPTYCH_FUZZ", "ci")
FAMILY = os.environ.get("TRIPTYCH_FUZZ_FAMILY", "qwen2_vl")
# An empty request (GetModelInfo, GetStats) has nothing to mutate.
NEAR_VALID_RPCS = [name for name, (_, method) in RPC_BY_ID.items() if method.input_type.fields]

_common = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck), "print_blob": True}
# CI: the same examples every run (derandomized, no example database), about 400 calls in all.
settings.register_profile("triptych-fuzz-ci-random", max_examples=10, derandomize=True, **_common)
settings.register_profile("triptych-fuzz-ci-near-valid", max_examples=40, derandomize=True, **_common)
# Nightly: new examples every run (a failure prints the blob that reproduces it), >= 10,000 in all.
_nightly = int(os.environ.get("TRIPTYCH_FUZZ_EXAMPLES", "850"))
settings.register_profile("triptych-fuzz-nightly-random", max_examples=_nightly // 2, **_common)
settings.register_profile("triptych-fuzz-nightly-near-valid", max_examples=_nightly, **_common)


def _profile(kind: str) -> settings:
    return settings(settings.get_profile(f"triptych-fuzz-{PROFILE}-{kind}"))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    media_dir = tmp_path_factory.mktemp("fuzz-media")
    services = InProcessServices(tiny_checkpoint(FAMILY), allowed_media_dirs=(media_dir,))
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    previous_hook, threading.excepthook = threading.excepthook, errors.thread_hook
    fuzz = FuzzTarget(services, media_dir, errors)
    try:
        build_seeds(fuzz)
        assert not errors.take()
        fuzz.baseline = fuzz.snapshot()  # after the warm-up that seeding was
        fuzz.started_s = time.monotonic()
        yield fuzz
    finally:
        threading.excepthook = previous_hook
        logging.getLogger().removeHandler(errors)
        fuzz.close()
        services.stop()


@pytest.mark.parametrize("rpc", list(RPC_BY_ID))
@_profile("random")
@given(data=st.data())
def test_random_messages(target, rpc, data):
    service, method = RPC_BY_ID[rpc]
    if method.client_streaming:
        request = data.draw(protofuzz.stream_of(method.input_type, target.words), label="stream")
    else:
        request = data.draw(protofuzz.messages(method.input_type, target.words), label="request")
    target.check(service, method, request)


@pytest.mark.parametrize("rpc", NEAR_VALID_RPCS)
@_profile("near-valid")
@given(data=st.data())
def test_near_valid_messages(target, rpc, data):
    service, method = RPC_BY_ID[rpc]
    seeds = target.seeds[method.input_type.full_name]
    if method.client_streaming:
        request = data.draw(protofuzz.near_valid_stream(seeds, target.words), label="stream")
    else:
        request = data.draw(protofuzz.near_valid(seeds, target.words), label="request")
    target.check(service, method, request)


def _image_url(url: str) -> processor_pb2.GenerateRequest:
    return processor_pb2.GenerateRequest(
        messages=[processor_pb2.ChatMessage(role="user", content=[
            processor_pb2.ContentPart(image=processor_pb2.Media(url=url)), processor_pb2.ContentPart(text="Say.")])],
        sampling=generation_pb2.SamplingParams(max_new_tokens=3))


def _video_max_frames(max_frames: int) -> processor_pb2.StreamGenerateRequest:
    media = processor_pb2.Media(data=video_bytes(seconds=1.0, fps=4, width=64, height=48),
                                video_options=processor_pb2.VideoOptions(max_frames=max_frames))
    return processor_pb2.StreamGenerateRequest(
        messages=[processor_pb2.ChatMessage(role="user", content=[
            processor_pb2.ContentPart(video=media), processor_pb2.ContentPart(text="Say.")])],
        sampling=generation_pb2.SamplingParams(max_new_tokens=3))


# What the fuzzer found, kept as it found it: (RPC, the request given the allowed media folder, the status
# now expected, or the set of them).
FINDINGS = {
    # urlparse raised ValueError ("Invalid IPv6 URL"): INTERNAL, a traceback (services/processor/media.py).
    "url-unclosed-ipv6": ("processor.Generate", lambda _: _image_url("A://["), grpc.StatusCode.INVALID_ARGUMENT),
    # The refusal quoted the 20 KB URL: trailers over gRPC's 16 KiB limit, so the client saw its own
    # RESOURCE_EXHAUSTED without ErrorInfo (services/common/errors.py now bounds what a status quotes).
    "url-20kb-quoted": ("processor.Generate", lambda _: _image_url("a" * 20_000), grpc.StatusCode.INVALID_ARGUMENT),
    # From the dictionary's "file:///x%00y" and a long path in the allowed folder: realpath's ValueError
    # ("embedded null byte") and stat's OSError (ENAMETOOLONG) escaped as INTERNAL (processor/media.py).
    "url-nul": ("processor.Generate", lambda _: _image_url("file:///x%00y"), grpc.StatusCode.INVALID_ARGUMENT),
    # video_options.max_frames 1: Qwen2-VL's frame sampler rounds it to 0 frames and divides by zero
    # (services/processor/servicer.py now refuses it as PROCESSOR_REJECTED). Nightly run, near-valid.
    # A family whose sampler takes one frame answers it.
    "video-max-frames-1": ("processor.StreamGenerate", lambda _: _video_max_frames(1),
                           {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK}),
    "url-path-too-long": ("processor.Generate", lambda folder: _image_url((folder / ("a" * 5000)).as_uri()),
                          grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("finding", list(FINDINGS))
def test_fuzzer_findings(target, finding):
    rpc, request, codes = FINDINGS[finding]
    codes = codes if isinstance(codes, set) else {codes}
    assert target.check(*RPC_BY_ID[rpc], request(target.media_dir)).code in codes


def test_still_serving(target):
    """After the fuzzing a valid request of every RPC still succeeds."""
    for service, method in RPCS:
        seeds = target.seeds.get(method.input_type.full_name) or [message_factory.GetMessageClass(method.input_type)()]
        outcome = target.call(service, method, seeds[0])
        assert outcome.code == grpc.StatusCode.OK, (rpc_id((service, method)), outcome)


def test_no_growth(target):
    """Runs last: once in-flight work has drained, the services hold what they held after the warm-up."""
    deadline = time.monotonic() + 30
    while True:  # cancelled calls free their work asynchronously: wait for the queues to drain
        after = target.snapshot()
        drained = not (after["engine_requests"] or after["engine_client_requests"] or after["encoder_queued_items"])
        drained = drained and after["shm_fds"] == after["shm_regions"]
        if drained and after["tasks"] <= target.baseline["tasks"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    before = target.baseline
    calls = sum(target.outcomes.values())
    summary = {"profile": PROFILE, "family": FAMILY, "calls": calls, "seconds": round(time.monotonic() - target.started_s),
               "before": before, "after": after, "rss_mib_every_500_calls": target.rss_trend,
               "outcomes": {" ".join(k): v for k, v in sorted(target.outcomes.items())}}
    print(json.dumps(summary, indent=1))
    if os.environ.get("TRIPTYCH_FUZZ_REPORT"):
        with open(os.environ["TRIPTYCH_FUZZ_REPORT"], "w") as report:
            json.dump(summary, report, indent=1)
    assert after["engine_pid"] == before["engine_pid"], "the engine process restarted during the fuzzing"
    assert (after["engine_requests"], after["engine_client_requests"], after["encoder_queued_items"]) == (0, 0, 0)
    assert after["tasks"] <= before["tasks"], (before, after)
    assert after["threads"] <= before["threads"] + 4, (before, after)  # pools may start a worker they lacked
    assert after["fds"] <= before["fds"] + 8, (before, after)
    assert after["shm_fds"] == after["shm_regions"], "a shared-memory fd that no region owns (never freed)"
    # What the encoder's embedding cache holds (bounded by its capacity) is not growth; the rest may rise
    # by the allocators' high-water marks.
    cached_mib = after["encoder_cache_mib"] - before["encoder_cache_mib"]
    assert after["rss_mib"] - cached_mib <= before["rss_mib"] * 1.25 + 128, (before, after)
    assert after["engine_rss_mib"] <= before["engine_rss_mib"] * 1.25 + 128, (before, after)
