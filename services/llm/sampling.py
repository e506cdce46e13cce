"""Sampling: one request's settings (`SamplingSpec`) and its per-row state (`RowSampler`).

The engine owns the forward passes; for every row of a step it hands that row's next-token
logits to the row's sampler, which draws with the request's own seeded generator. A row's tokens
therefore depend only on its own logits, its own history and its own seed, never on its batch.

Order, on float32 logits (vLLM's and transformers' where they agree):
  1. penalties, as vLLM applies them: repetition (transformers' RepetitionPenaltyLogitsProcessor:
     tokens of the prompt and the output, positive logits divided, others multiplied), then
     frequency (minus frequency_penalty x count in the output), then presence (minus
     presence_penalty once per token in the output). Frequency and presence see GENERATED tokens
     only, as in vLLM and the OpenAI API.
  2. greedy (temperature 0): the argmax of the penalized logits; nothing below applies.
  3. temperature, 4. top-k, 5. top-p, 6. min-p, then one multinomial draw. This is transformers'
     order (TemperatureLogitsWarper, TopK, TopP, MinP); vLLM applies min-p before top-k/top-p.
     The two agree unless min-p and top-p are both set (min-p and top-k commute: both cut a
     tail by logit), and we keep transformers' so a request matches `model.generate`.

Logprobs are those of the model's raw distribution: log_softmax of the logits before any of the
above, as vLLM's default `logprobs_mode="raw_logprobs"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling settings of one request."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off; keep tokens with probability >= min_p x the most likely's
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1: off; over prompt + output
    presence_penalty: float = 0.0  # 0: off; over the output only
    frequency_penalty: float = 0.0  # 0: off; over the output only
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: bool = False  # return the sampled token's logprob
    top_logprobs: int = 0  # and this many most likely alternatives (needs logprobs)


@dataclass(frozen=True)
class SampledToken:
    """One generated token, as the engine emits it."""

    token_id: int
    logprob: float | None = None  # raw log-probability of token_id, when asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first, when asked for


class RowSampler:
    """One request's sampling state: its settings, the tokens seen so far, its seeded generator."""

    def __init__(self, spec: SamplingSpec, prompt_ids: torch.Tensor, device: torch.device | str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.prompt_ids = prompt_ids.to(device=self.device, dtype=torch.long)
        self.output_ids: list[int] = []
        # Built at the first step, when the vocabulary size is known; updated per token in O(1).
        self._seen: torch.Tensor | None = None  # bool [vocab]: in prompt or output, for the repetition penalty
        self._output_counts: torch.Tensor | None = None  # float32 [vocab]: times in the output
        self.generator = (torch.Generator(device=self.device).manual_seed(spec.seed)
                          if spec.seed is not None else None)

    def sample(self, logits: torch.Tensor) -> SampledToken:
        """The next token from one row's logits [vocab]; records it as generated."""
        token = self.choose(logits)
        result = self._with_logprobs(token, logits) if self.spec.logprobs else SampledToken(token)
        self.record(token)
        return result

    def record(self, token_id: int) -> None:
        """Counts `token_id` as generated (for the penalties)."""
        self.output_ids.append(token_id)
        if self._seen is not None:
            self._seen[token_id] = True
        if self._output_counts is not None:
            self._output_counts[token_id] += 1

    def choose(self, logits: torch.Tensor) -> int:
        """One draw from the row's distribution over `logits` [vocab], recording nothing."""
        s, scores = self.spec, self._penalized(logits.float())
        if s.temperature == 0.0:
            return int(scores.argmax())
        scores = scores / s.temperature
        if s.top_k > 0:
            kth = torch.topk(scores, min(s.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if 0.0 < s.top_p < 1.0:
            sorted_scores, order = scores.sort(descending=True)
            sorted_probs = sorted_scores.softmax(-1)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p  # keep the token that crosses top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        if s.min_p > 0.0:
            # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed.
            scores = scores.masked_fill(scores < scores.max() + math.log(s.min_p), float("-inf"))
        probs = scores.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _penalized(self, scores: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.repetition_penalty != 1.0:
            if self._seen is None:
                self._seen = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
                self._seen[self.prompt_ids] = True
                self._seen[torch.tensor(self.output_ids, dtype=torch.long, device=scores.device)] = True
            penalized = torch.where(scores > 0, scores / s.repetition_penalty, scores * s.repetition_penalty)
            scores = torch.where(self._seen, penalized, scores)
        if s.frequency_penalty != 0.0 or s.presence_penalty != 0.0:
            if self._output_counts is None:
                self._output_counts = torch.zeros(scores.shape[-1], dtype=torch.float32, device=scores.device)
                self._output_counts.index_add_(
                    0, torch.tensor(self.output_ids, dtype=torch.long, device=scores.device),
                    torch.ones(len(self.output_ids), device=scores.device))
            scores = scores - s.frequency_penalty * self._output_counts
            scores = scores - s.presence_penalty * (self._output_counts > 0).float()
        return scores

    def _with_logprobs(self, token: int, logits: torch.Tensor) -> SampledToken:
        logprobs = torch.log_softmax(logits.float(), -1)  # the raw distribution, before penalties and warpers
        top: tuple[tuple[int, float], ...] = ()
        if self.spec.top_logprobs > 0:
            values, ids = torch.topk(logprobs, min(self.spec.top_logprobs, logprobs.numel()))  # sorted, largest first
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return SampledToken(token, float(logprobs[token]), top)
