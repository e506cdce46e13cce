"""The LLM engine's sampling: each setting against transformers' own logits processors, then the
engine on a tiny checkpoint for what spans steps (seeds, stop ids, max_new_tokens)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
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
    """One draw of the engine's sampler for the next token after PROMPT, then `generated`."""
    sampler = RowSampler(spec, PROMPT)
    for token in generated or []:
        sampler.record(token)
    if generator is not None:
        sampler.generator = generator  # many draws from one stream, as a request's steps draw
    return sampler.choose(LOGITS)


def frequencies(engine: Engine, spec: SamplingSpec, seed: int = 0, generated: list[int] | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(LOGITS))
    for _ in range(NUM_DRAWS):
        counts[sample(engine, spec, generator, generated)] += 1
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
    if spec.min_p > 0.0:
        processors.append(MinPLogitsWarper(spec.min_p))
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
    SamplingSpec(max_new_tokens=1, temperature=1.0, min_p=0.3),
    SamplingSpec(max_new_tokens=1, temperature=0.5, min_p=0.1),
    SamplingSpec(max_new_tokens=1, temperature=2.0, min_p=0.5),
    SamplingSpec(max_new_tokens=1, temperature=1.0, top_k=6, top_p=0.9, min_p=0.35),
    SamplingSpec(max_new_tokens=1, temperature=1.0, top_p=0.7, min_p=0.5, repetition_penalty=1.3),
], ids=lambda s: f"t{s.temperature}-k{s.top_k}-p{s.top_p}-minp{s.min_p}-rp{s.repetition_penalty}")
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


# ---- presence / frequency penalties (vLLM's definition), min-p, logprobs, seeds ---------------------

GENERATED = [0, 0, 2, 5, 0]  # token 0 three times, 2 and 5 once; PROMPT's 3 and 6 not generated


def vllm_penalized(logits: torch.Tensor, prompt: list[int], output: list[int], repetition: float,
                   frequency: float, presence: float) -> torch.Tensor:
    """vLLM's apply_penalties written out token by token: repetition over prompt + output, then frequency
    and presence over the output only (the OpenAI API's definition)."""
    result = logits.clone()
    for token in range(len(result)):
        if token in prompt or token in output:
            result[token] = result[token] / repetition if result[token] > 0 else result[token] * repetition
        count = output.count(token)
        result[token] -= frequency * count + presence * (count > 0)
    return result


@pytest.mark.parametrize("penalties", [(1.0, 0.4, 0.0), (1.0, 0.0, 0.7), (1.0, -0.3, 0.5), (1.5, 0.2, 0.3),
                                       (1.0, 0.0, -1.0)], ids=lambda p: f"rp{p[0]}-freq{p[1]}-pres{p[2]}")
def test_penalties_distribution_matches_vllms_formula(engine, penalties):
    repetition, frequency, presence = penalties
    spec = SamplingSpec(max_new_tokens=1, temperature=1.0, repetition_penalty=repetition,
                        frequency_penalty=frequency, presence_penalty=presence)
    expected = vllm_penalized(LOGITS, PROMPT.tolist(), GENERATED, repetition, frequency, presence).softmax(-1)
    got = frequencies(engine, spec, generated=GENERATED)
    assert torch.allclose(got, expected, atol=0.03), f"sampled {got.tolist()}, vLLM's formula {expected.tolist()}"


def test_presence_and_frequency_ignore_the_prompt():
    # Token 0 leads by 0.5. In the prompt only, neither penalty touches it; generated once, a
    # presence or frequency penalty of 0.6 takes it below token 1.
    prompt_has_0 = torch.tensor([0, 0, 0, 4])
    for spec in (SamplingSpec(max_new_tokens=1, presence_penalty=0.6),
                 SamplingSpec(max_new_tokens=1, frequency_penalty=0.6)):
        assert RowSampler(spec, prompt_has_0).choose(LOGITS) == 0
        sampler = RowSampler(spec, prompt_has_0)
        sampler.record(0)
        assert sampler.choose(LOGITS) == 1


def test_frequency_counts_repeats_presence_does_not(engine):
    # Generated 3 times: frequency 0.2 subtracts 0.6 (> the 0.5 lead); presence 0.2 only 0.2.
    assert sample(engine, SamplingSpec(max_new_tokens=1, frequency_penalty=0.2), generated=GENERATED) == 1
    assert sample(engine, SamplingSpec(max_new_tokens=1, presence_penalty=0.2), generated=GENERATED) == 0


def test_penalties_apply_to_tokens_recorded_by_sample():
    # sample() records its token: the next step's penalties count it, as the engine's steps do.
    sampler = RowSampler(SamplingSpec(max_new_tokens=2, presence_penalty=0.6), torch.tensor([7]))
    assert sampler.sample(LOGITS).token_id == 0
    assert sampler.sample(LOGITS).token_id == 1


def test_min_p_keeps_tokens_within_the_ratio_of_the_most_likely(engine):
    # p_i >= 0.5 p_max  <=>  logit_i >= 2.0 + ln 0.5 = 1.307: tokens 0 and 1.
    spec = SamplingSpec(max_new_tokens=1, temperature=1.0, min_p=0.5)
    assert set(frequencies(engine, spec).nonzero().flatten().tolist()) == {0, 1}


@pytest.mark.parametrize("spec", [
    SamplingSpec(max_new_tokens=1, logprobs=True, top_logprobs=5),
    SamplingSpec(max_new_tokens=1, temperature=0.3, top_k=2, repetition_penalty=1.7, presence_penalty=1.0,
                 logprobs=True, top_logprobs=3, seed=5),
], ids=["greedy", "penalized-sampled"])
def test_logprobs_are_the_raw_log_softmax_sorted(spec):
    """Logprobs of the model's raw distribution (vLLM's raw_logprobs): not changed by any sampling setting."""
    raw = torch.log_softmax(LOGITS, -1)
    sampler = RowSampler(spec, PROMPT)
    for _ in range(3):
        token = sampler.sample(LOGITS)
        assert token.logprob == pytest.approx(float(raw[token.token_id]), abs=1e-6)
        ids = [t for t, _ in token.top_logprobs]
        values = [v for _, v in token.top_logprobs]
        assert len(ids) == spec.top_logprobs
        assert ids == raw.argsort(descending=True)[:spec.top_logprobs].tolist()
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(raw[ids].tolist(), abs=1e-6)
    greedy = RowSampler(SamplingSpec(max_new_tokens=1, logprobs=True, top_logprobs=5), PROMPT).sample(LOGITS)
    assert greedy.logprob == greedy.top_logprobs[0][1]  # the greedy token is the most likely


def test_logprobs_only_when_asked():
    assert RowSampler(SamplingSpec(max_new_tokens=1), PROMPT).sample(LOGITS).logprob is None
    only = RowSampler(SamplingSpec(max_new_tokens=1, logprobs=True), PROMPT).sample(LOGITS)
    assert only.logprob is not None and only.top_logprobs == ()


def test_seeded_sampler_is_reproducible_with_every_setting():
    spec = SamplingSpec(max_new_tokens=30, temperature=1.3, top_k=6, top_p=0.95, min_p=0.05, seed=42,
                        repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.1)
    logits = torch.randn(30, 50, generator=torch.Generator().manual_seed(0))

    def run(seed_spec: SamplingSpec) -> list[int]:
        sampler = RowSampler(seed_spec, torch.tensor([1, 2, 3]))
        return [sampler.sample(row).token_id for row in logits]

    assert run(spec) == run(spec)
    assert run(spec) != run(SamplingSpec(**{**spec.__dict__, "seed": 43}))
