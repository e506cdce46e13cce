"""The LLM engine's sampling: each setting against transformers' own logits processors, then the
engine on a tiny checkpoint for what spans steps (seeds, stop ids, max_new_tokens)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.llm.engine import Engine, Finished
from services.llm.sampling import RowSampler, SamplingSpec
from services.models.checkpoint import Checkpoint

# Eight tokens with distinct probabilities, none negligible, one negative logit.
LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.1, -0.3, -0.8])
PROMPT = torch.tensor([3, 6, 3])  # ids of LOGITS already seen, for the repetition penalty
NUM_DRAWS = 4000  # a token's frequency is within 0.03 of its probability by > 3.5 standard errors


@pytest.fixture(scope="module")
def engine(qwen2_vl_dir):
    checkpoint = Checkpoint(qwen2_vl_dir)
    family = checkpoint.family
    model = family.load_model(checkpoint.path, checkpoint.dtype, "cpu")
    family.strip_for_llm(model)
    engine = Engine(family, model, max_running=4, max_waiting=4)
    yield engine
    engine.stop()


def sample(engine: Engine, spec: SamplingSpec, generator: torch.Generator | None = None,
           generated: list[int] | None = None) -> int:
    """One draw of the engine's sampler for the next token after PROMPT + generated."""
    sampler = RowSampler(spec, torch.cat([PROMPT, torch.tensor(generated or [], dtype=torch.long)]))
    if generator is not None:
        sampler.generator = generator  # many draws from one stream, as a request's steps draw
    return sampler.choose(LOGITS)


def frequencies(engine: Engine, spec: SamplingSpec, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(LOGITS))
    for _ in range(NUM_DRAWS):
        counts[sample(engine, spec, generator)] += 1
    return counts / NUM_DRAWS


def transformers_probabilities(spec: SamplingSpec) -> torch.Tensor:
    """What transformers' generate() samples from for the same settings, in its order."""
    processors = LogitsProcessorList()
    if spec.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(spec.repetition_penalty))
    processors.append(TemperatureLogitsWarper(spec.temperature))
    if spec.top_k > 0:
        processors.append(TopKLogitsWarper(spec.top_k))
    if spec.top_p < 1.0:
        processors.append(TopPLogitsWarper(spec.top_p))
    return processors(PROMPT[None], LOGITS[None].clone())[0].softmax(-1)


def test_greedy_takes_the_most_likely_token_whatever_else_is_set(engine):
    for spec in (SamplingSpec(max_new_tokens=1),
                 SamplingSpec(max_new_tokens=1, top_k=3, top_p=0.5, seed=1)):
        assert {sample(engine, spec, torch.Generator().manual_seed(s)) for s in range(20)} == {0}


def test_greedy_after_the_repetition_penalty(engine):
    # Token 0 leads by 0.5; seen in the prompt, a penalty of 2 halves it to 1.0, below token 1's 1.5.
    seen = torch.tensor([0, 6])
    spec = SamplingSpec(max_new_tokens=1, repetition_penalty=2.0)
    assert RowSampler(spec, seen).choose(LOGITS) == 1
    # A generated token counts as seen too.
    assert sample(engine, spec, generated=[0]) == 1


@pytest.mark.parametrize("spec", [
    SamplingSpec(max_new_tokens=1, temperature=1.0),
    SamplingSpec(max_new_tokens=1, temperature=0.5),
    SamplingSpec(max_new_tokens=1, temperature=2.0),
    SamplingSpec(max_new_tokens=1, temperature=1.0, top_k=3),
    SamplingSpec(max_new_tokens=1, temperature=0.7, top_k=1),
    SamplingSpec(max_new_tokens=1, temperature=1.0, top_p=0.6),
    SamplingSpec(max_new_tokens=1, temperature=1.0, top_p=0.9),
    SamplingSpec(max_new_tokens=1, temperature=1.5, top_k=5, top_p=0.8),
    SamplingSpec(max_new_tokens=1, temperature=1.0, repetition_penalty=1.8),
    SamplingSpec(max_new_tokens=1, temperature=1.0, repetition_penalty=0.5),
], ids=lambda s: f"t{s.temperature}-k{s.top_k}-p{s.top_p}-rp{s.repetition_penalty}")
def test_distribution_matches_transformers(engine, spec):
    expected = transformers_probabilities(spec)
    got = frequencies(engine, spec)
    assert torch.allclose(got, expected, atol=0.03), f"sampled {got.tolist()}, transformers {expected.tolist()}"
    assert (got[expected == 0] == 0).all(), "a token top-k/top-p removed was sampled"


def test_top_p_keeps_the_token_that_crosses_it(engine):
    # p(token 0) = 0.342 < top_p: token 1 (0.207) is needed to reach it, and nothing else.
    spec = SamplingSpec(max_new_tokens=1, temperature=1.0, top_p=0.35)
    assert set(frequencies(engine, spec).nonzero().flatten().tolist()) == {0, 1}


def test_same_seed_same_draws_other_seed_other_draws(engine):
    spec = SamplingSpec(max_new_tokens=1, temperature=2.0)

    def draws(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [sample(engine, spec, generator) for _ in range(10)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


async def _generate(engine: Engine, spec: SamplingSpec, prompt: list[int]) -> tuple[list[int], Finished]:
    tokens: list[int] = []
    async for event in engine.generate(torch.tensor(prompt), [], spec):
        if isinstance(event, Finished):
            return tokens, event
        tokens.append(event.token_id)
    raise AssertionError("no Finished event")


ENGINE_PROMPT = [10, 11, 12, 13, 14]


def test_seeded_request_is_reproducible_even_beside_others(engine):
    spec = SamplingSpec(max_new_tokens=24, temperature=1.0, seed=1234)

    async def scenario():
        alone, _ = await _generate(engine, spec, ENGINE_PROMPT)
        # The same request again, interleaved step by step with unseeded ones: its generator is its own.
        together = await asyncio.gather(
            _generate(engine, spec, ENGINE_PROMPT),
            _generate(engine, SamplingSpec(max_new_tokens=24, temperature=1.0), ENGINE_PROMPT),
            _generate(engine, SamplingSpec(max_new_tokens=24, temperature=1.0, seed=99), ENGINE_PROMPT),
        )
        other_seed, _ = await _generate(engine, SamplingSpec(max_new_tokens=24, temperature=1.0, seed=1235),
                                        ENGINE_PROMPT)
        return alone, together[0][0], other_seed

    alone, together, other_seed = asyncio.run(scenario())
    assert len(alone) == 24
    assert together == alone
    assert other_seed != alone


def test_stop_token_ids_end_generation_with_the_stop_token(engine):
    async def scenario():
        free, finished = await _generate(engine, SamplingSpec(max_new_tokens=12), ENGINE_PROMPT)
        assert (len(free), finished.finish_reason) == (12, "length")
        # Stop at the first token that did not appear earlier in the greedy output.
        index = next(i for i in range(1, len(free)) if free[i] not in free[:i])
        stopped, finished = await _generate(
            engine, SamplingSpec(max_new_tokens=12, stop_token_ids=frozenset({free[index], 999_999})), ENGINE_PROMPT)
        return free, index, stopped, finished

    free, index, stopped, finished = asyncio.run(scenario())
    assert stopped == free[:index + 1]  # greedy is deterministic, and the stop token is returned
    assert (finished.finish_reason, finished.num_generated) == ("stop", index + 1)


def test_max_new_tokens_ends_with_length(engine):
    tokens, finished = asyncio.run(_generate(engine, SamplingSpec(max_new_tokens=3), ENGINE_PROMPT))
    assert len(tokens) == 3
    assert (finished.finish_reason, finished.num_generated) == ("length", 3)
