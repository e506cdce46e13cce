"""Batched decoding is each request alone (DESIGN §4.6), for every family, with the rows really mixed.

Per family: 16 different requests (text-only and images of several sizes, prompts of different
lengths, different max_new_tokens) are first run one at a time through the engine (batch 1, which
the e2e parity tests pin to generate()), then all together with staggered starts, so rows join and
leave a running batch. Per request the two runs must agree under the standard of vLLM's
check_logprobs_close: tokens equal until a first mismatch where each side's token is in the other's
top-5, and max |Δlogit| <= 1e-3 (fp32) on every step before it. Logits are captured by wrapping
RowSampler.sample. A last test permutes the rows of the batch cache at a merge and shows the check
catches it.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from services.llm.engine import Engine, Finished
from services.llm.engine import batch as batch_module
from services.llm.engine.batch_cache import BatchCache
from services.llm.sampling import RowSampler, SamplingSpec
from services.models.base import PlacedEmbeddings
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes

FAMILIES = ["mllama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "internvl", "gemma3", "phi4mm",
            "nemotron_h_omni", "idefics3", "aya_vision", "mistral3", "qwen3_vl_moe", "glm4v", "qwen3_5",
            "paligemma", "gemma4"]
CAUSAL_LM = {"phi4mm"}  # loaded with AutoModelForCausalLM (DESIGN §4.3b)
IMAGE_REQUIRED = {"paligemma"}  # its processor refuses a prompt without an image: each request gets one
NUM_REQUESTS = 16
MAX_LOGIT_DIFF = 1e-3
TOP_K = 5

TEXTS = ["Tell me a story about the sea.", "What is two plus two?", "Describe this.",
         "List three colours and explain why each one matters to painters of the northern coast.",
         "Hi", "Write a short poem about autumn leaves falling on a quiet river bank at dusk, please."]
IMAGES = [(160, 120, 1, "noise"), (96, 200, 2, "gradient"), (96, 96, 5, "noise"), (128, 64, 6, "gradient"),
          (200, 150, 7, "noise")]


@dataclass(frozen=True)
class Request:
    token_ids: torch.Tensor  # [L]
    placed: list[PlacedEmbeddings]
    max_new_tokens: int


@lru_cache(maxsize=1)
def _loaded(name: str):
    """The family, its requests (embeddings from the family's encode) and the stripped LLM model."""
    model_dir = tiny_checkpoint(name)
    family = family_for(model_dir)
    auto = AutoModelForCausalLM if name in CAUSAL_LM else AutoModelForImageTextToText
    model = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    requests = []
    for i in range(NUM_REQUESTS):
        num_images = (0, 1, 1, 2)[i % 4] if i % 7 else 0
        if name in IMAGE_REQUIRED:
            num_images = max(num_images, 1)
        images = [_image(*IMAGES[(i + k) % len(IMAGES)]) for k in range(num_images)]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": f"{TEXTS[i % len(TEXTS)]} ({i})"}]
        text = family.render_chat(processor, [{"role": "user", "content": content}])
        processed = family.preprocess(processor, text, images)
        placed = []
        for item in processed.items:
            (rows,) = family.encode(model, item.modality, [item.encoder_inputs])
            placed.append(PlacedEmbeddings(item.modality, item.offset, item.length, rows, item.position_inputs))
        token_ids = torch.tensor(processed.token_ids)
        if i == 14 and not placed:  # a prompt shorter than Gemma 3's tiny sliding window (16), passing it while batched
            token_ids = token_ids[:6]
        requests.append(Request(token_ids, placed, max_new_tokens=8 + (i * 5) % 9))
    family.strip_for_llm(model)
    return family, model, requests


def _image(width: int, height: int, seed: int, kind: str) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes(width, height, seed=seed, kind=kind)))


class Capture:
    """Wraps RowSampler so that every sampled row's logits are kept, by prompt."""

    def __init__(self, monkeypatch):
        self.logits: dict[tuple[int, ...], list[torch.Tensor]] = {}
        sample = RowSampler.sample

        def recording(sampler, logits):
            key = tuple(sampler.prompt_ids.tolist())
            self.logits.setdefault(key, []).append(logits.detach().float().clone())
            return sample(sampler, logits)

        monkeypatch.setattr(RowSampler, "sample", recording)

    def take(self, request: Request) -> list[torch.Tensor]:
        return self.logits.pop(tuple(request.token_ids.tolist()))


def _spec(request: Request) -> SamplingSpec:
    return SamplingSpec(max_new_tokens=request.max_new_tokens)  # greedy, no stop ids: lengths are fixed


async def _run(engine: Engine, request: Request, started: asyncio.Event | None = None) -> list[int]:
    tokens = []
    async for event in engine.generate(request.token_ids, request.placed, _spec(request)):
        if isinstance(event, Finished):
            return tokens
        tokens.append(event.token_id)
        if started is not None and len(tokens) == 2:
            started.set()
    raise AssertionError("no Finished event")


async def _alone(engine: Engine, requests: list[Request]) -> list[list[int]]:
    return [await _run(engine, request) for request in requests]


async def _together(engine: Engine, requests: list[Request]) -> list[list[int]]:
    """Three waves: each starts once the previous wave's first request has two tokens, so rows join a
    running batch; different max_new_tokens make them leave at different steps."""
    tasks = []
    for wave in (requests[:6], requests[6:11], requests[11:]):
        started = asyncio.Event()
        tasks += [asyncio.create_task(_run(engine, r, started if i == 0 else None)) for i, r in enumerate(wave)]
        await started.wait()
    results = list(await asyncio.gather(*tasks))
    await _drained(engine)
    return results


async def _drained(engine: Engine, timeout_s: float = 30.0) -> None:
    """Waits until every request has left the engine (rows leave at the step after their last event)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while engine.num_in_flight:
        assert loop.time() < deadline, f"{engine.num_in_flight} requests still in the engine"
        await asyncio.sleep(0.01)


def _disagreements(alone: tuple[list[int], list[torch.Tensor]], batched: tuple[list[int], list[torch.Tensor]]) -> list[str]:
    """Where a batched run breaks the §4.6 standard against the same request alone (empty: none)."""
    (tokens_a, logits_a), (tokens_b, logits_b) = alone, batched
    for step, (a, b, la, lb) in enumerate(zip(tokens_a, tokens_b, logits_a, logits_b)):
        diff = float((la - lb).abs().max())
        if a != b:
            top_a, top_b = la.topk(TOP_K).indices.tolist(), lb.topk(TOP_K).indices.tolist()
            if a not in top_b or b not in top_a:
                return [f"step {step}: token {a} alone vs {b} batched, not in each other's top-{TOP_K}"]
            return []  # a near tie: stop comparing here, as vLLM's check_logprobs_close
        if diff > MAX_LOGIT_DIFF:
            return [f"step {step}: max |Δlogit| {diff:.2e} > {MAX_LOGIT_DIFF}"]
    if len(tokens_a) != len(tokens_b):
        return [f"{len(tokens_a)} tokens alone, {len(tokens_b)} batched"]
    return []


def _compare(name: str, monkeypatch) -> tuple[list[str], int]:
    """Problems per request, and the largest batch that decoded."""
    family, model, requests = _loaded(name)
    capture = Capture(monkeypatch)
    sizes = []
    decode = batch_module.Batch.decode

    def counting(batch):
        sizes.append(len(batch.rows))
        return decode(batch)

    monkeypatch.setattr(batch_module.Batch, "decode", counting)
    engine = Engine(family, model, max_running=NUM_REQUESTS, max_waiting=NUM_REQUESTS, max_batch_tokens=256)
    try:
        alone_tokens = asyncio.run(_alone(engine, requests))
        alone = [(tokens, capture.take(r)) for tokens, r in zip(alone_tokens, requests)]
        assert max(sizes) == 1
        sizes.clear()
        batched_tokens = asyncio.run(_together(engine, requests))
        batched = [(tokens, capture.take(r)) for tokens, r in zip(batched_tokens, requests)]
    finally:
        engine.stop()
    problems = [f"request {i}: {p}" for i, (a, b) in enumerate(zip(alone, batched)) for p in _disagreements(a, b)]
    return problems, max(sizes)


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_rows_decode_as_each_request_alone(name, monkeypatch):
    _, _, requests = _loaded(name)
    assert len({tuple(r.token_ids.tolist()) for r in requests}) == NUM_REQUESTS
    problems, largest = _compare(name, monkeypatch)
    assert not problems, problems
    assert largest >= NUM_REQUESTS // 2, f"the largest batch decoded {largest} rows: the requests did not overlap"


def test_the_check_catches_rows_mixed_up(monkeypatch):
    """Merging a new row's cache in front of the others (rows of the cache no longer the batch's rows)
    must fail the comparison."""
    append = BatchCache.append

    def swapped(cache, request_cache, length):
        append(cache, request_cache, length)
        order = list(range(cache.mask.shape[0]))
        order[0], order[-1] = order[-1], order[0]
        index = torch.tensor(order)
        cache.cache.reorder_cache(index)
        cache.mask = cache.mask.index_select(0, index)

    monkeypatch.setattr(BatchCache, "append", swapped)
    problems, _ = _compare("qwen2_vl", monkeypatch)
    assert len(problems) >= NUM_REQUESTS // 2, problems
