"""EVS (efficient video sampling): drop the video tokens that barely change from the previous frame.

The rule is vLLM's (vllm/multimodal/evs.py, used by its Qwen2.5-VL, Qwen3-VL and Nano-Nemotron-VL):

- how many: `retained_count` = max(tokens per frame, int(all tokens x (1 - rate))). It depends on
  the rate and the grid only, so the processor expands the prompt with that many placeholders
  before anything is encoded;
- which: each merged token of frame group t > 0 scores 1 - cos(its embedding, the same token of
  group t - 1); group 0 scores 255 (above any dissimilarity, which is at most 2), so it is always
  kept whole. The `retained_count` highest scores are kept (a stable sort: ties keep the earlier
  token), returned in their original order.

The encoder decides (it has the embeddings) and returns the kept rows with their indexes into the
item's unpruned token sequence (`ItemEmbeddings.kept`); the LLM places the rows and gives every token
the mRoPE position it had in the unpruned prompt (`unpruned_layout`). A video of one placeholder run
per frame group (Qwen3-VL's timestamps, Nemotron's frame labels between runs) has its kept count in
its first run until the encoder has chosen, then each group's kept tokens in that group's run
(`frame_runs`): the prompt's length never changes. Scores are computed in float32 whatever the
model's dtype, so the choice does not hang on the device's reduced-precision arithmetic.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from services.common.errors import InvalidArgument
from services.models.base import ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt, VideoPruning

FIRST_FRAME_SCORE = 255.0  # vLLM's: above 1 - cos for any pair, so group 0 is never dropped


def check_rate(rate: float, where: str) -> float:
    """The rate itself if it is a pruning rate in [0, 1); INVALID_ARGUMENT otherwise."""
    if not 0.0 <= rate < 1.0:  # NaN fails too
        raise InvalidArgument(f"{where}: video pruning rate {rate} is outside [0, 1) (0: keep every video token, "
                              "0.75: keep a quarter)", reason="VIDEO_PRUNING_RATE_INVALID")
    return rate


def retained_count(tokens_per_frame: int, frames: int, rate: float) -> int:
    """How many of a video's `frames x tokens_per_frame` tokens EVS keeps at `rate`: never fewer than
    one frame's worth. vLLM's compute_retained_tokens_count."""
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - rate)))


def dissimilarity(embeddings: torch.Tensor, frames: int) -> torch.Tensor:
    """[frames, tokens_per_frame] scores of a video's merged tokens ([frames * tokens_per_frame, hidden],
    frame by frame): 1 - cos with the same token of the previous frame group; FIRST_FRAME_SCORE for group 0."""
    rows = embeddings.float().reshape(frames, -1, embeddings.shape[-1])  # [T, P, H]
    changed = 1 - torch.nn.functional.cosine_similarity(rows[1:], rows[:-1], dim=-1)  # [T-1, P]
    first = torch.full_like(rows[:1, :, 0], FIRST_FRAME_SCORE)  # [1, P]
    return torch.cat([first, changed])


def kept_indexes(embeddings: torch.Tensor, frames: int, rate: float) -> torch.Tensor:
    """Indexes (ascending, int64) of the tokens EVS keeps, into the unpruned sequence."""
    scores = dissimilarity(embeddings, frames).flatten()
    order = torch.argsort(scores, descending=True, stable=True)
    keep = retained_count(scores.numel() // frames, frames, rate)
    return order[:keep].sort().values


def prune(embeddings: ItemEmbeddings, frames: int, rate: float) -> ItemEmbeddings:
    """The item's kept rows (and deepstack rows), in order, with their indexes; bit-identical copies of
    the unpruned rows. Rate 0 keeps everything and returns the embeddings as they are."""
    if rate == 0:
        return embeddings
    kept = kept_indexes(embeddings.embeddings, frames, rate)
    return ItemEmbeddings(embeddings=embeddings.embeddings[kept],
                          deepstack=tuple(layer[kept] for layer in embeddings.deepstack), kept=kept)


# ---- the processor's side: placeholders for the retained count ---------------------------------
def prune_prompt(prompt: ProcessedPrompt, plans: dict[int, tuple[VideoPruning, tuple[int, ...]]]) -> ProcessedPrompt:
    """The prompt with some items' placeholder runs resized: `plans` maps an item's index to its pruning
    and the new length of each of its runs (0: the run goes; the tokens between runs stay). Offsets
    of everything after a resized run shift; items keep their order."""
    ids = prompt.token_ids
    # Every run of every item, with the length it gets, in prompt order.
    resized: list[tuple[int, int, int, int]] = []  # (offset, old length, new length, item index)
    for index, item in enumerate(prompt.items):
        lengths = plans[index][1] if index in plans else tuple(n for _, n in item.placeholder_runs)
        if len(lengths) != len(item.placeholder_runs):
            raise ValueError(f"item {index} has {len(item.placeholder_runs)} runs, the plan gives {len(lengths)}")
        resized += [(offset, old, new, index) for (offset, old), new in zip(item.placeholder_runs, lengths)]
    resized.sort()
    token_ids: list[int] = []
    runs: dict[int, list[tuple[int, int]]] = {index: [] for index in range(len(prompt.items))}
    cursor = 0
    for offset, old, new, index in resized:
        token_ids += ids[cursor:offset]
        if new:
            runs[index].append((len(token_ids), new))
        token_ids += [ids[offset]] * new  # the run's placeholder token
        cursor = offset + old
    token_ids += ids[cursor:]
    items = []
    for index, item in enumerate(prompt.items):
        own = runs[index]
        pruning, per_run = item.pruning, item.run_position_inputs
        if index in plans:  # the runs that stay keep their own position inputs
            pruning = plans[index][0]
            per_run = tuple(inputs for inputs, new in zip(per_run, plans[index][1]) if new)
        items.append(replace(item, offset=own[0][0], length=sum(n for _, n in own),
                             runs=tuple(own) if len(own) > 1 or item.runs else (), run_position_inputs=per_run,
                             pruning=pruning))
    return ProcessedPrompt(token_ids=token_ids, items=items)


def pruning_plan(family: ModelFamily, item: ProcessedItem, rate: float) -> tuple[VideoPruning, tuple[int, ...]]:
    """What EVS at `rate` makes of a video item: its pruning and the new length of each placeholder run."""
    frames, per_frame = family.video_token_grid(item.encoder_inputs)
    retained = retained_count(per_frame, frames, rate)
    pruning = VideoPruning(rate=rate, frames=frames, unpruned_length=frames * per_frame)
    return pruning, family.pruned_placeholder_runs(item, retained)


def frame_runs(pruning: VideoPruning, kept: list[int], runs: int) -> tuple[int, ...] | None:
    """An item of one placeholder run per frame group, once the encoder has kept `kept`: the tokens each
    group's run holds (0: none kept of that group). None for an item of one run (its run is its count)."""
    if runs == 1:
        return None
    if runs != pruning.frames:
        raise ValueError(f"a pruned video of {runs} placeholder runs and {pruning.frames} frame groups")
    per_frame = pruning.unpruned_length // pruning.frames
    counts = [0] * runs
    for index in kept:
        counts[index // per_frame] += 1
    return tuple(counts)


# ---- the LLM's side: the unpruned sequence the positions are computed on ------------------------
def unpruned_layout(token_ids: torch.Tensor, pruned: list[tuple[int, int, int, torch.Tensor]], fill: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt as it was before pruning, and which of its tokens are present in the pruned one.

    `pruned`: (offset, length, unpruned length, kept indexes into it) of each pruned placeholder run, by
    offset (length 0: a run all of whose tokens were dropped, to be put back at `offset`); the tokens
    put back are `fill`. Returns (unpruned token ids [L_full], present [L_full] bool), so that
    token_ids == unpruned[present].
    """
    pieces, present = [], []
    cursor = 0
    for offset, length, full, kept in pruned:
        pieces.append(token_ids[cursor:offset])
        present.append(torch.ones(offset - cursor, dtype=torch.bool))
        pieces.append(torch.full((full,), fill, dtype=token_ids.dtype))
        mask = torch.zeros(full, dtype=torch.bool)
        mask[kept.to(torch.long)] = True
        present.append(mask)
        cursor = offset + length
    pieces.append(token_ids[cursor:])
    present.append(torch.ones(token_ids.shape[0] - cursor, dtype=torch.bool))
    return torch.cat(pieces), torch.cat(present).to(token_ids.device)


def check_kept(kept: torch.Tensor, length: int, where: str) -> None:
    """Kept indexes as the LLM takes them: one per placeholder, strictly ascending, not negative (the
    upper bound, the item's unpruned token count, is the family's check)."""
    if kept.ndim != 1 or kept.shape[0] != length:
        raise InvalidArgument(f"{where}: {kept.shape[0]} kept token indexes for a placeholder range of {length}; "
                              "send one per placeholder token", reason="VIDEO_KEPT_TOKENS_INVALID")
    if length and (int(kept[0]) < 0 or bool((kept[1:] <= kept[:-1]).any())):
        raise InvalidArgument(f"{where}: kept token indexes must be strictly ascending and not negative",
                              reason="VIDEO_KEPT_TOKENS_INVALID")
