"""The batched engine's parts: the batch cache's merge and row selection by layer type (full
attention, Gemma 3's sliding window, Nemotron-H's Mamba state), aborted rows leaving a running batch,
and families or rows that must not share a forward being decoded one request per forward."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

from services.llm.engine import Engine, Finished
from services.llm.engine import batch as batch_module
from services.llm.engine.batch_cache import BatchCache
from services.llm.sampling import SamplingSpec
from tests.llm.test_batching import Capture, Request, _alone, _disagreements, _drained, _loaded, _run


def _prefilled(family, model, request: Request):
    """A request's own cache after its prefill through the family's hooks (as the engine's)."""
    with torch.inference_mode():
        prefill = family.prefill_inputs(model, request.token_ids, request.placed)
        cache = family.new_cache(model)
        length = request.token_ids.shape[0]
        kwargs = {"inputs_embeds": prefill.inputs_embeds, "position_ids": prefill.position_ids,
                  "attention_mask": torch.ones(1, length, dtype=torch.long), "past_key_values": cache, "use_cache": True}
        family.language_model(model)(**(kwargs | prefill.layer_kwargs))
    return cache, length


def _state(cache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionLayer):
            out += [s for s in [*layer.conv_states.values(), *layer.recurrent_states.values()] if s is not None]
        elif isinstance(layer, DynamicLayer):
            out += [layer.keys, layer.values]
    return out


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3", "nemotron_h_omni"])
def test_merged_rows_select_back_to_their_own_caches(name):
    """Three caches of different lengths merged into one batch, then each row selected alone: its
    tensors are its own cache's bit for bit (padding trimmed), sliding layers count its own length."""
    family, model, requests = _loaded(name)
    chosen = [requests[14], requests[1], requests[5]]  # 6 tokens (under Gemma 3's window of 16), longer ones
    lengths = [r.token_ids.shape[0] for r in chosen]
    assert len(set(lengths)) == 3
    for row, request in enumerate(chosen):
        own, length = _prefilled(family, model, request)
        batch = BatchCache(*_prefilled(family, model, chosen[0]), torch.device("cpu"))
        for other in chosen[1:]:
            batch.append(*_prefilled(family, model, other))
        assert batch.width == max(lengths) and batch.mask.sum(1).tolist() == lengths
        batch.select([row])
        assert batch.width == length and bool(batch.mask.all())
        for mine, theirs in zip(_state(batch.cache), _state(own), strict=True):
            assert torch.equal(mine, theirs)
        for layer in batch.cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                assert layer.cumulative_length == length
                assert layer.keys.shape[-2] == min(length, layer.sliding_window - 1)


def test_aborted_rows_leave_and_the_others_stay_exact(monkeypatch):
    family, model, requests = _loaded("qwen2_vl")
    requests = requests[:8]
    capture = Capture(monkeypatch)
    engine = Engine(family, model, max_running=8, max_waiting=8)

    async def together():
        async def cut(request):  # reads one token, then goes away: generate() aborts it
            async for event in engine.generate(request.token_ids, request.placed,
                                               SamplingSpec(max_new_tokens=request.max_new_tokens)):
                if not isinstance(event, Finished) and event.token_id is not None:
                    return "cut"
        tasks = [asyncio.create_task(cut(r) if i % 3 == 1 else _run(engine, r)) for i, r in enumerate(requests)]
        results = await asyncio.gather(*tasks)
        await _drained(engine)
        return results

    try:
        alone = [(tokens, capture.take(r)) for tokens, r in zip(asyncio.run(_alone(engine, requests)), requests)]
        batched = asyncio.run(together())
        assert engine.num_in_flight == 0
        for i, (request, tokens) in enumerate(zip(requests, batched)):
            logits = capture.take(request)
            if i % 3 == 1:
                assert tokens == "cut"
            else:
                assert not _disagreements(alone[i], (tokens, logits))
    finally:
        engine.stop()


def test_a_family_that_cannot_batch_decodes_one_request_per_forward(monkeypatch):
    """supports_batching = False: concurrent requests each decode alone, so their tokens are exactly
    those of each request run by itself (batch 1 is bitwise)."""
    family, model, requests = _loaded("qwen2_vl")
    requests = requests[:6]
    sizes = []
    decode = batch_module.Batch.decode
    monkeypatch.setattr(batch_module.Batch, "decode", lambda batch: (sizes.append(len(batch.rows)), decode(batch)))
    monkeypatch.setattr(family, "supports_batching", False)
    engine = Engine(family, model, max_running=6, max_waiting=6)

    async def together():
        return await asyncio.gather(*(_run(engine, r) for r in requests))

    try:
        alone = asyncio.run(_alone(engine, requests))
        assert asyncio.run(together()) == alone
    finally:
        engine.stop()
    assert set(sizes) == {1}


def test_rows_that_may_pass_the_longrope_limit_decode_alone():
    """Phi-4-MM's longrope picks its factors from the largest position in a forward: a row that may
    reach original_max_position_embeddings (4096) must not share one with shorter rows."""
    phi, _, _ = _loaded("phi4mm")
    assert phi.batch_key(100, 200) is not None
    assert phi.batch_key(4000, 96) is not None and phi.batch_key(4000, 97) is None
    qwen, _, _ = _loaded("qwen2_vl")
    assert qwen.batch_key(100_000, 1000) is not None


def test_growing_layer_writes_in_place_and_rebuilds_after_rows_change():
    """A merged batch's full-attention layers append a step's keys into spare room (no new tensor per
    step), and after rows leave (index_select + trim replace `keys`) the next step still appends to
    the rows' own keys: the stored keys always equal plain concatenation."""
    from services.llm.engine.batch_cache import GrowingLayer

    torch.manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    layer, expected_k, expected_v = GrowingLayer(keys, values), keys, values
    buffers = set()
    for _ in range(4):
        step_k, step_v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        got_k, got_v = layer.update(step_k, step_v)
        expected_k, expected_v = torch.cat([expected_k, step_k], -2), torch.cat([expected_v, step_v], -2)
        assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
        buffers.add(got_k.data_ptr())
    assert len(buffers) == 1  # one buffer for all steps: written in place
    index = torch.tensor([2, 0])
    layer.reorder_cache(index)  # rows leave
    layer.keys, layer.values = layer.keys[:, :, 1:], layer.values[:, :, 1:]  # shared padding trimmed
    expected_k, expected_v = expected_k[index][:, :, 1:], expected_v[index][:, :, 1:]
    step_k, step_v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    got_k, got_v = layer.update(step_k, step_v)
    assert torch.equal(got_k, torch.cat([expected_k, step_k], -2))
    assert torch.equal(got_v, torch.cat([expected_v, step_v], -2))
