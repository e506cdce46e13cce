"""Sampling: one request's settings (`SamplingSpec`) and its per-row state (`RowSampler`).

The engine owns the forward passes; for every row of a step it hands that row's next-token
logits to the row's sampler, which applies penalties, temperature and truncation in
transformers' order and draws with the request's own seeded generator. A row's tokens
therefore depend only on its own logits and its own seed, never on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling settings of one request."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class SampledToken:
    """One generated token, as the engine emits it."""

    token_id: int
    logprob: float | None = None  # log-probability under the row's distribution, when asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the most likely, when asked for


class RowSampler:
    """One request's sampling state: its settings, the tokens seen so far, its seeded generator."""

    def __init__(self, spec: SamplingSpec, prompt_ids: torch.Tensor, device: torch.device | str = "cpu"):
        self.spec = spec
        self.seen = prompt_ids.to(device=device, dtype=torch.long)  # [L + generated], for penalties
        self.generator = (torch.Generator(device=device).manual_seed(spec.seed)
                          if spec.seed is not None else None)

    def sample(self, logits: torch.Tensor) -> SampledToken:
        """The next token from one row's logits [vocab]; records it as seen."""
        token = self.choose(logits)
        self.seen = torch.cat([self.seen, self.seen.new_tensor([token])])
        return SampledToken(token)

    def choose(self, logits: torch.Tensor) -> int:
        """One draw from the row's distribution over `logits` [vocab], recording nothing."""
        s, scores = self.spec, logits.float()
        if s.repetition_penalty != 1.0:  # as transformers' RepetitionPenaltyLogitsProcessor
            prior = scores.gather(0, self.seen)
            prior = torch.where(prior < 0, prior * s.repetition_penalty, prior / s.repetition_penalty)
            scores = scores.scatter(0, self.seen, prior)
        if s.temperature == 0.0:
            return int(scores.argmax())
        scores = scores / s.temperature
        if s.top_k > 0:
            kth = torch.topk(scores, min(s.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if 0.0 < s.top_p < 1.0:
            sorted_scores, order = scores.sort(descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_scores.softmax(-1) >= s.top_p  # keep the token that crosses top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = scores.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
