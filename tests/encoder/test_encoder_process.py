"""The encoder as its own process (`triptych serve encoder`, flags as a user passes them): concurrent calls
share a forward (GetStats says so), each reply equal to the item encoded alone by transformers' tower in
this process; a repeated item and a cache reference are hits; an unknown reference is NOT_FOUND."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.errors import error_info
from services.common.tensors import from_proto
from services.models.checkpoint import Checkpoint
from tests.encoder.helpers import CHANNEL_OPTIONS, item_inputs, media_item
from tests.procs import start_encoder, wait_listening, wait_serving

pytestmark = pytest.mark.e2e


def test_batching_and_cache_in_a_separate_process(qwen2_vl_dir):
    checkpoint = Checkpoint(qwen2_vl_dir)
    family = checkpoint.family
    processor = family.load_processor(qwen2_vl_dir)
    inputs = [item_inputs(family, processor, 112 + 28 * (i % 2), 112, seed=i) for i in range(4)]
    model = family.load_model(qwen2_vl_dir, checkpoint.dtype, "cpu")
    alone = [family.encode(model, "image", [tensors])[0].embeddings for tensors in inputs]

    # A long wait that 4 items end early: the four calls share one forward however slow the machine is.
    proc = start_encoder(qwen2_vl_dir, "--batching", "always", "--batch-wait-ms", "5000", "--max-batch-items", "4",
                         "--cache-mib", "16")
    try:
        address = wait_listening(proc)
        wait_serving(address)
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)

            def encode(*items):
                return stub.Encode(encoder_pb2.EncodeRequest(model_fingerprint=checkpoint.fingerprint, items=items),
                                   timeout=120)

            with ThreadPoolExecutor(4) as pool:
                replies = list(pool.map(lambda i: encode(media_item(f"p{i}", inputs[i])), range(4)))
            for reply, expected in zip(replies, alone):
                assert not reply.items[0].cache_hit
                assert torch.allclose(from_proto(reply.items[0].embeddings), expected,
                                      rtol=0, atol=family.encoder_batch_tolerance)
            batching = stub.GetStats(encoder_pb2.GetStatsRequest(), timeout=30).batching
            assert (batching.forwards, batching.items, batching.max_items_per_forward) == (1, 4, 4)

            again = encode(media_item("p0", inputs[0]), media_item("p1", None))
            assert [item.cache_hit for item in again.items] == [True, True]
            assert torch.equal(from_proto(again.items[1].embeddings), from_proto(replies[1].items[0].embeddings))
            with pytest.raises(grpc.RpcError) as caught:
                encode(media_item("p2", None), media_item("never-sent", None))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            info = error_info(caught.value)
            assert info.reason == "EMBEDDING_NOT_CACHED" and dict(info.metadata) == {"mmHashes": "never-sent"}

            cache = stub.GetStats(encoder_pb2.GetStatsRequest(), timeout=30).cache
            assert (cache.hits, cache.misses, cache.entries, cache.reference_misses) == (3, 4, 4, 1)
            assert cache.capacity_bytes == 16 << 20 and cache.used_bytes > 0
            assert stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=30).model_info.fingerprint \
                == checkpoint.fingerprint
    finally:
        assert proc.stop() == 0, proc.output()
