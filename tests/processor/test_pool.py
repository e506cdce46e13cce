"""services/processor/pool.py against real grpc.aio encoder servers whose servicers are stubs.

The servers are the encoder's production builder (health, interceptors, error domain); the stub
servicer answers like an encoder with an embedding cache: an item without tensors is a cache
reference, answered from its cache or refused NOT_FOUND EMBEDDING_NOT_CACHED (the shared contract).
Its "embeddings" name the replica and echo the item's tensor bytes, so a test sees who encoded what.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from grpc_health.v1 import health_pb2

from services.common.api.triptych.common.v1 import model_info_pb2, tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import ServerConfig
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.server import Server
from services.encoder.server import start_server
from services.processor.pool import ENCODER_SERVICE, EncoderPool, Target
from services.processor.ring import LOAD_FACTOR
from services.processor.router import check_embedding_dtypes

FP = "00112233aabbccdd"
F32 = tensor_pb2.DATA_TYPE_FLOAT32


def _info(fingerprint: str = FP, dtype: int = F32) -> model_info_pb2.ModelInfo:
    return model_info_pb2.ModelInfo(fingerprint=fingerprint, embedding_dtype=dtype, model_path="/m",
                                    modalities=[tensor_pb2.MODALITY_IMAGE])


def item(name: str) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE, mm_hash=f"hash-{name}", tensors=[
        tensor_pb2.NamedTensor(name="pixel_values", tensor=tensor_pb2.Tensor(
            dtype=tensor_pb2.DATA_TYPE_UINT8, shape=[len(name)], data=name.encode()))])


def request(*names: str) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(model_fingerprint=FP, items=[item(n) for n in names])


class StubEncoder(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, name: str, info: model_info_pb2.ModelInfo | None = None, takes_references: bool = True):
        self.name, self.info, self.takes_references = name, info or _info(), takes_references
        self.cache: dict[str, encoder_pb2.ItemEmbeddings] = {}
        self.received: list[encoder_pb2.EncodeRequest] = []  # every Encode but the pool's probe
        self.errors: list[Exception] = []  # raised by the next calls, one each
        self.gate: asyncio.Event | None = None  # while set to an unset event, calls wait

    async def GetModelInfo(self, request, context):
        return encoder_pb2.GetModelInfoResponse(model_info=self.info)

    async def Encode(self, request, context):
        references = [i.mm_hash for i in request.items if not i.tensors]
        if references and not self.takes_references:  # an encoder from before cache references
            raise InvalidArgument("items[0].tensors: pixel_values is missing", reason="ENCODER_INPUT_INVALID")
        if [i.mm_hash for i in request.items] != ["triptych-pool-probe"]:
            self.received.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        missing = [h for h in references if h not in self.cache]
        if missing:
            raise NotFound(f"not cached: {missing}", reason="EMBEDDING_NOT_CACHED", metadata={"mmHashes": ",".join(missing)})
        out = []
        for i in request.items:
            if i.tensors:
                self.cache[i.mm_hash] = encoder_pb2.ItemEmbeddings(mm_hash=i.mm_hash, embeddings=tensor_pb2.Tensor(
                    dtype=tensor_pb2.DATA_TYPE_UINT8, data=self.name.encode() + b":" + i.tensors[0].tensor.data))
            out.append(self.cache[i.mm_hash])
        return encoder_pb2.EncodeResponse(items=out)

    def sent(self) -> list[tuple[str, bool]]:
        """(mm_hash, sent as a reference) of every item received, in order."""
        return [(i.mm_hash, not i.tensors) for r in self.received for i in r.items]


async def serve(stub: StubEncoder, host: str = "127.0.0.1", port: int = 0) -> Server:
    server, _ = await start_server(stub, ServerConfig(host=host, port=port))
    return server


async def eventually(condition, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def healthy(pool: EncoderPool) -> set[str]:
    return {s.address for s in pool.stats() if s.healthy}


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 60))


async def _two_replicas(body, **stub_kwargs):
    stubs = [StubEncoder("a", **stub_kwargs), StubEncoder("b", **stub_kwargs)]
    servers = [await serve(s) for s in stubs]
    pool = EncoderPool([s.address for s in servers], FP)
    try:
        await pool.connect(10)
        await eventually(lambda: len(healthy(pool)) == 2)
        await body(pool, stubs, servers)
    finally:
        await pool.close()
        for server in servers:
            await server.stop(0)


def _encoded_by(reply: encoder_pb2.EncodeResponse) -> list[str]:
    return [e.embeddings.data.decode() for e in reply.items]


# ---- routing ------------------------------------------------------------------------------

def test_a_requests_items_spread_over_the_replicas_and_come_back_in_order():
    names = [f"img{i}" for i in range(16)]

    async def body(pool, stubs, servers):
        reply = await pool.encode(request(*names, "img3"), 10)  # img3 twice: encoded once
        by = _encoded_by(reply)
        assert [b.split(":")[1] for b in by] == [*names, "img3"]
        assert [e.mm_hash for e in reply.items] == [f"hash-{n}" for n in [*names, "img3"]]
        counts = [len(s.sent()) for s in stubs]
        assert sum(counts) == 16 and min(counts) > 0  # one call per replica, each its share
        assert max(counts) <= math.ceil(LOAD_FACTOR * 16 / 2)
        assert all(len(s.received) == 1 for s in stubs)
    run(_two_replicas(body))


def test_a_repeated_item_goes_back_to_its_replica_as_a_cache_reference():
    async def body(pool, stubs, servers):
        first = await pool.encode(request("cat"), 10)
        holder = next(s for s in stubs if s.sent())
        again = await pool.encode(request("cat", "dog"), 10)
        assert again.items[0] == first.items[0]
        assert ("hash-cat", True) in holder.sent()  # no tensors the second time
        assert holder.sent().count(("hash-cat", False)) == 1
        stats = {s.address: s for s in pool.stats()}
        assert sum(s.references for s in stats.values()) == 1 and all(s.takes_references for s in stats.values())
    run(_two_replicas(body))


def test_a_reference_the_encoder_no_longer_holds_is_resent_with_its_tensors():
    async def body(pool, stubs, servers):
        await pool.encode(request("cat"), 10)
        holder = next(s for s in stubs if s.sent())
        holder.cache.clear()  # evicted (or the encoder restarted without the pool noticing)
        reply = await pool.encode(request("cat"), 10)
        assert _encoded_by(reply) == [f"{holder.name}:cat"]
        assert holder.sent() == [("hash-cat", False), ("hash-cat", True), ("hash-cat", False)]
        assert sum(s.reference_misses for s in pool.stats()) == 1
    run(_two_replicas(body))


def test_an_encoder_without_cache_references_always_gets_tensors():
    async def body(pool, stubs, servers):
        for _ in range(3):
            await pool.encode(request("cat"), 10)
        assert all(not ref for s in stubs for _, ref in s.sent())
        assert not any(s.takes_references for s in pool.stats())
    run(_two_replicas(body, takes_references=False))


def test_a_hot_item_spreads_over_the_replicas_within_the_load_bound():
    async def body(pool, stubs, servers):
        for stub in stubs:
            stub.gate = asyncio.Event()  # calls stay in flight: loads add up
        calls = []
        for _ in range(8):
            calls.append(asyncio.ensure_future(pool.encode(request("hot"), 10)))
            await asyncio.sleep(0.05)  # each routed after the previous call started
        loads = [s.outstanding_items for s in pool.stats()]
        assert sorted(loads) == [3, 5] and max(loads) <= math.ceil(LOAD_FACTOR * 8 / 2), loads
        for stub in stubs:
            stub.gate.set()
        await asyncio.gather(*calls)
        assert all(s.outstanding_items == 0 for s in pool.stats())
    run(_two_replicas(body))


# ---- failures -----------------------------------------------------------------------------

def test_items_of_a_replica_failing_unavailable_are_retried_on_another_then_it_comes_back():
    names = [f"img{i}" for i in range(8)]

    async def body(pool, stubs, servers):
        stubs[0].errors.append(Unavailable("going away", reason="ENCODER_UNAVAILABLE"))
        reply = await pool.encode(request(*names), 10)
        assert _encoded_by(reply) == [f"b:{n}" for n in names]  # a's share went to b
        a = next(s for s in pool.stats() if s.address == servers[0].address)
        assert a.ejections == 1 and a.failures == 1
        # a's health still says SERVING: it is watched afresh and re-admitted, then gets its share again.
        await eventually(lambda: len(healthy(pool)) == 2)
        await pool.encode(request(*[f"new{i}" for i in range(8)]), 10)
        assert stubs[0].sent()[-1][0].startswith("hash-new")
    run(_two_replicas(body))


def test_other_errors_pass_through_unchanged_and_are_not_retried():
    async def body(pool, stubs, servers):
        for stub in stubs:
            stub.errors.append(InvalidArgument("bad grid", reason="ENCODER_INPUT_INVALID"))
        with pytest.raises(InvalidArgument) as caught:
            await pool.encode(request("cat"), 10)
        assert caught.value.reason == "ENCODER_INPUT_INVALID" and caught.value.domain == "triptych.encoder"
        assert sum(len(s.received) for s in stubs) == 1
        assert len(healthy(pool)) == 2  # the replica is fine: the request was bad
    run(_two_replicas(body))


def test_a_killed_replica_is_ejected_and_readmitted_when_it_serves_again():
    async def body(pool, stubs, servers):
        a_address = servers[0].address
        await servers[0].stop(0)
        await eventually(lambda: healthy(pool) == {servers[1].address})
        reply = await pool.encode(request(*[f"img{i}" for i in range(6)]), 10)
        assert all(b.startswith("b:") for b in _encoded_by(reply))
        servers[0] = await serve(stubs[0], port=int(a_address.rsplit(":", 1)[1]))  # back on the same port
        await eventually(lambda: len(healthy(pool)) == 2)
        before = len(stubs[0].received)
        await pool.encode(request(*[f"new{i}" for i in range(6)]), 10)
        assert len(stubs[0].received) > before
    run(_two_replicas(body))


def test_health_not_serving_ejects_and_serving_readmits():
    async def body(pool, stubs, servers):
        await servers[0].health.set(ENCODER_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await eventually(lambda: healthy(pool) == {servers[1].address})
        state = next(s.state for s in pool.stats() if s.address == servers[0].address)
        assert state == "health NOT_SERVING"
        await pool.encode(request(*[f"img{i}" for i in range(6)]), 10)
        assert stubs[0].received == []
        await servers[0].health.set(ENCODER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await eventually(lambda: len(healthy(pool)) == 2)
    run(_two_replicas(body))


def test_a_replica_back_with_another_model_stays_out():
    async def body(pool, stubs, servers):
        b_port = servers[1].port
        await servers[1].stop(0)
        await eventually(lambda: healthy(pool) == {servers[0].address})
        servers[1] = await serve(StubEncoder("b2", info=_info(fingerprint="ffff000011112222")), port=b_port)
        b = servers[1].address
        await eventually(lambda: next(s.state for s in pool.stats() if s.address == b).startswith("refused"))
        assert healthy(pool) == {servers[0].address}
        reply = await pool.encode(request("x", "y", "z"), 10)
        assert all(e.startswith("a:") for e in _encoded_by(reply))
    run(_two_replicas(body))


def test_no_healthy_replica_is_unavailable_naming_them():
    async def body():
        server = await serve(StubEncoder("a"))
        pool = EncoderPool([server.address], FP)
        try:
            await pool.connect(10)
            await server.stop(0)
            await eventually(lambda: not healthy(pool))
            with pytest.raises(Unavailable) as caught:
                await pool.encode(request("cat"), 10)
            assert caught.value.reason == "ENCODER_UNAVAILABLE" and server.address in caught.value.message
            assert caught.value.retry_delay_s is not None
        finally:
            await pool.close()
    run(body())


# ---- start-up and membership --------------------------------------------------------------

def test_start_up_needs_one_healthy_replica_and_the_others_join_later():
    async def body():
        up = await serve(StubEncoder("a"))
        later = StubEncoder("b")
        placeholder = await serve(later)  # reserve a port, then free it: "b" is down at start
        port = placeholder.port
        await placeholder.stop(0)
        pool = EncoderPool([up.address, f"127.0.0.1:{port}"], FP)
        servers = [up]
        try:
            await pool.connect(10)
            assert healthy(pool) == {up.address}
            servers.append(await serve(later, port=port))
            await eventually(lambda: len(healthy(pool)) == 2)
        finally:
            await pool.close()
            for server in servers:
                await server.stop(0)
    run(body())


def test_start_up_refuses_a_replica_of_another_model_or_dtype():
    async def body(info, check, reason):
        server = await serve(StubEncoder("a", info=info))
        pool = EncoderPool([server.address], FP)
        try:
            with pytest.raises(FailedPrecondition) as caught:
                await pool.connect(10, check=check)
            assert caught.value.reason == reason
        finally:
            await pool.close()
            await server.stop(0)

    run(body(_info(fingerprint="ffff000011112222"), None, "MODEL_FINGERPRINT_MISMATCH"))
    dtype_check = lambda address, info: check_embedding_dtypes(F32, (address, info), ("llm:1", _info()))  # noqa: E731
    run(body(_info(dtype=tensor_pb2.DATA_TYPE_BFLOAT16), dtype_check, "SERVICE_DTYPE_MISMATCH"))


def test_nothing_answering_is_unavailable_after_the_timeout():
    async def body():
        pool = EncoderPool(["127.0.0.1:1"], FP)
        try:
            with pytest.raises(Unavailable) as caught:
                await pool.connect(0.5)
            assert caught.value.reason == "ENCODER_UNAVAILABLE" and "127.0.0.1:1" in caught.value.message
        finally:
            await pool.close()
    run(body())


def test_a_name_is_a_replica_per_address_and_follows_the_resolver():
    async def body():
        a = await serve(StubEncoder("a"), host="127.0.0.1")
        b = await serve(StubEncoder("b"), host="127.0.0.2", port=a.port)  # same port, another loopback address
        answers = {"encoders.test": ["127.0.0.1", "127.0.0.2"]}

        async def resolver(host, port):
            if host not in answers:
                raise OSError("no such host")
            return answers[host]

        pool = EncoderPool([f"encoders.test:{a.port}"], FP, resolve_interval_s=0.1, resolver=resolver)
        try:
            await pool.connect(10)
            await eventually(lambda: healthy(pool) == {a.address, b.address})
            del answers["encoders.test"]  # a failing resolution keeps what was there
            await asyncio.sleep(0.3)
            assert healthy(pool) == {a.address, b.address}
            answers["encoders.test"] = ["127.0.0.2"]  # a left
            await eventually(lambda: [s.address for s in pool.stats()] == [b.address])
            reply = await pool.encode(request("x", "y", "z"), 10)
            assert all(e.startswith("b:") for e in _encoded_by(reply))
        finally:
            await pool.close()
            await a.stop(0)
            await b.stop(0)
    run(body())


@pytest.mark.parametrize("text", ["localhost", "host:", ":50052", "host:port", "host:70000"])
def test_an_address_that_is_not_host_port_is_refused(text):
    with pytest.raises(InvalidArgument) as caught:
        Target.parse(text)
    assert caught.value.reason == "ENCODER_ADDRESS_INVALID"


def test_targets_parse_names_and_ip_literals():
    assert Target.parse("[::1]:50052") == Target("::1", 50052) and not Target.parse("[::1]:1").is_name
    assert str(Target.parse("[::1]:50052")) == "[::1]:50052"
    assert Target.parse("encoder:50052").is_name and not Target.parse("10.0.0.1:5").is_name
    with pytest.raises(InvalidArgument):
        EncoderPool([], FP)
