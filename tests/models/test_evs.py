"""EVS (services/models/evs.py): vLLM's retained count, the dissimilarity rule on the real (tiny)
Qwen2-VL tower, the processor's placeholder cut, the encoder's pruning and cache, and the LLM's
positions against transformers' own get_rope_index on the unpruned prompt."""

from __future__ import annotations

from functools import lru_cache

import grpc
import pytest
import torch

from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.errors import InvalidArgument, error_info
from services.common.tensors import from_proto, to_named
from services.common.video import VideoLimits, decode_video
from services.encoder.towers import load_towers
from services.models import evs
from services.models.base import VIDEO, ItemEmbeddings, PlacedEmbeddings, ProcessedItem, ProcessedPrompt
from services.models.checkpoint import Checkpoint
from tests.checkpoints import tiny_checkpoint
from tests.encoder.helpers import EncoderHarness, item_inputs
from tests.media import video_bytes

LIMITS = VideoLimits(max_frame_pixels=50_000_000, max_seconds=3600, max_frames=32, max_total_pixels=1 << 27)


# ---- the count -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("per_frame", "frames", "rate", "kept"), [
    (4, 2, 0.0, 8), (4, 2, 0.9, 4), (5, 2, 0.25, 7), (16, 1, 0.99, 16), (6, 4, 0.5, 12), (6, 4, 0.75, 6),
    (6, 4, 0.3, 16),  # int(24 * 0.7) = 16 (rounds down, as vLLM's int())
])
def test_retained_count_is_vllms_formula(per_frame, frames, rate, kept):
    assert evs.retained_count(per_frame, frames, rate) == kept


@pytest.mark.parametrize("rate", [1.0, -0.01, 1.5, float("nan"), float("inf")])
def test_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(InvalidArgument) as caught:
        evs.check_rate(rate, "video_options.pruning_rate")
    assert caught.value.reason == "VIDEO_PRUNING_RATE_INVALID" and "video_options.pruning_rate" in caught.value.message


# ---- the rule on synthetic rows ------------------------------------------------------------------
def test_kept_tokens_are_those_that_change_most():
    torch.manual_seed(0)
    frames = torch.randn(1, 4, 8).repeat(3, 1, 1)  # 3 identical frames of 4 tokens
    frames[1, 2] = torch.randn(8)  # token 2 changes in frame 1 ...
    frames[2, 2] = torch.randn(8)  # ... and again in frame 2
    rows = frames.reshape(12, 8)
    kept = evs.kept_indexes(rows, 3, rate=0.5)  # 6 of 12: frame 0 whole and the two changed tokens
    assert kept.tolist() == [0, 1, 2, 3, 6, 10]
    scores = evs.dissimilarity(rows, 3)
    assert (scores[0] == evs.FIRST_FRAME_SCORE).all()
    assert scores[1, 2] > 0.1 and scores[1, [0, 1, 3]].abs().max() < 1e-6


def test_rate_zero_keeps_everything_untouched():
    emb = ItemEmbeddings(embeddings=torch.randn(12, 8))
    assert evs.prune(emb, 3, 0.0) is emb
    assert evs.kept_indexes(emb.embeddings, 3, 0.0).tolist() == list(range(12))


# ---- the real tower --------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _qwen2_vl():
    checkpoint = Checkpoint(tiny_checkpoint("qwen2_vl"))
    family = checkpoint.family
    return family, family.load_processor(checkpoint.path), load_towers(checkpoint, "cpu")


def _video_item(motion: bool, seed: int = 1) -> ProcessedItem:
    family, processor, _ = _qwen2_vl()
    clip = decode_video(video_bytes(seconds=4, motion=motion, seed=seed), LIMITS, where="video",
                        choose=lambda meta: family.video_frame_indices(processor, meta, 2.0, 32))
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": VIDEO}, {"type": "text", "text": "?"}]}])
    (item,) = family.preprocess(processor, text, [], videos=[clip]).items
    return item


def _tower(item: ProcessedItem) -> ItemEmbeddings:
    family, _, model = _qwen2_vl()
    (emb,) = family.encode(model, VIDEO, [item.encoder_inputs])
    return emb


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75, 0.9])
def test_pruned_rows_are_the_unpruned_rows_at_the_kept_indexes(rate):
    family = _qwen2_vl()[0]
    item = _video_item(motion=True)
    frames, per_frame = family.video_token_grid(item.encoder_inputs)
    assert (frames, per_frame) == (4, 6) and item.length == 24
    full = _tower(item)
    pruned = evs.prune(full, frames, rate)
    assert pruned.embeddings.shape[0] == evs.retained_count(per_frame, frames, rate) == pruned.kept.shape[0]
    assert torch.equal(pruned.embeddings, full.embeddings[pruned.kept])  # bit-identical, in order
    assert pruned.kept.tolist() == sorted(set(pruned.kept.tolist()))
    assert pruned.kept[:per_frame].tolist() == list(range(per_frame))  # the first frame group, whole


def test_a_static_clip_is_near_duplicate_frames_and_loses_nothing_a_moving_one_would():
    """Same rate, same count (the count is the rate's); what is dropped differs: the still clip's later
    frame groups are copies of the first (dissimilarity ~0), so nothing is lost; the moving clip's
    dropped tokens are the least changed, and those kept changed most."""
    family = _qwen2_vl()[0]
    still, moving = _video_item(motion=False), _video_item(motion=True)
    still_rows, moving_rows = _tower(still).embeddings, _tower(moving).embeddings
    still_scores, moving_scores = evs.dissimilarity(still_rows, 4)[1:], evs.dissimilarity(moving_rows, 4)[1:]
    assert still_scores.abs().max() < 1e-4  # near-duplicates
    assert moving_scores.max() > 0.1 and moving_scores.mean() > 100 * still_scores.abs().mean()
    still_kept, moving_kept = evs.kept_indexes(still_rows, 4, 0.5), evs.kept_indexes(moving_rows, 4, 0.5)
    assert still_kept.shape == moving_kept.shape  # 12 of 24 each
    assert still_kept.tolist() != moving_kept.tolist()  # but other tokens
    flat = moving_scores.flatten()
    later_kept = moving_kept[moving_kept >= 6] - 6
    dropped = torch.ones_like(flat, dtype=torch.bool)
    dropped[later_kept] = False
    assert flat[later_kept].min() >= flat[dropped].max()  # the moving clip keeps what changed most
    assert evs.dissimilarity(still_rows, 4)[1:].flatten()[dropped].abs().max() < 1e-4  # the still one drops copies


# ---- the processor's placeholder cut ---------------------------------------------------------------
def test_prune_prompt_cuts_the_run_and_shifts_what_follows():
    v, i = 7, 9  # placeholder ids
    ids = [1, 2, v, v, v, v, v, v, 3, i, i, 4]
    video = ProcessedItem(modality=VIDEO, offset=2, length=6, encoder_inputs={})
    image = ProcessedItem(modality="image", offset=9, length=2, encoder_inputs={})
    pruning = evs.VideoPruning(rate=0.5, frames=2, unpruned_length=6)
    out = evs.prune_prompt(ProcessedPrompt(ids, [video, image]), {0: (pruning, (3,))})
    assert out.token_ids == [1, 2, v, v, v, 3, i, i, 4]
    assert (out.items[0].offset, out.items[0].length, out.items[0].pruning) == (2, 3, pruning)
    assert (out.items[1].offset, out.items[1].length, out.items[1].pruning) == (6, 2, None)


def test_prune_prompt_can_move_tokens_between_runs():
    """A family whose video has a run per frame may lump the kept count into the first (vLLM's Qwen3-VL)."""
    v = 7
    ids = [1, v, v, 5, v, v, 5, v, v, 6]
    video = ProcessedItem(modality=VIDEO, offset=1, length=6, encoder_inputs={}, runs=((1, 2), (4, 2), (7, 2)))
    pruning = evs.VideoPruning(rate=0.5, frames=3, unpruned_length=6)
    out = evs.prune_prompt(ProcessedPrompt(ids, [video]), {0: (pruning, (3, 0, 0))})
    assert out.token_ids == [1, v, v, v, 5, 5, 6]
    assert out.items[0].placeholder_runs == ((1, 3),) and out.items[0].length == 3


def test_unpruned_layout_restores_the_prompt():
    ids = torch.tensor([1, 2, 7, 7, 7, 3])
    full, present = evs.unpruned_layout(ids, [(2, 3, 6, torch.tensor([0, 2, 5]))], fill=7)
    assert full.tolist() == [1, 2, 7, 7, 7, 7, 7, 7, 3]
    assert present.tolist() == [True, True, True, False, True, False, False, True, True]
    assert torch.equal(full[present], ids)


def test_kept_indexes_checks():
    evs.check_kept(torch.tensor([0, 3, 4]), 3, "x")
    for bad, length in ((torch.tensor([0, 3, 3]), 3), (torch.tensor([2, 1, 4]), 3), (torch.tensor([-1, 2]), 2),
                        (torch.tensor([0, 1]), 3)):
        with pytest.raises(InvalidArgument) as caught:
            evs.check_kept(bad, length, "x")
        assert caught.value.reason == "VIDEO_KEPT_TOKENS_INVALID"
    family = _qwen2_vl()[0]
    grid = {"video_grid_thw": torch.tensor([[4, 4, 6]])}  # 24 tokens unpruned
    family.check_position_inputs(VIDEO, grid, 3, where="x", kept=torch.tensor([0, 5, 23]))
    with pytest.raises(InvalidArgument) as caught:
        family.check_position_inputs(VIDEO, grid, 3, where="x", kept=torch.tensor([0, 5, 24]))
    assert caught.value.reason == "VIDEO_KEPT_TOKENS_INVALID"


# ---- the LLM's positions ---------------------------------------------------------------------------
def test_llm_positions_are_the_unpruned_prompts_without_the_dropped_tokens():
    """Our Qwen2-VL prefill on a pruned prompt against transformers' get_rope_index on the unpruned one,
    the dropped tokens' columns removed here; decode positions continue the unpruned prompt's."""
    from transformers import Qwen2VLForConditionalGeneration

    family, processor, _ = _qwen2_vl()
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint("qwen2_vl"), dtype=torch.float32).eval()
    item = _video_item(motion=True)
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": VIDEO}, {"type": "text", "text": "?"}]}])
    clip = decode_video(video_bytes(seconds=4, motion=True, seed=1), LIMITS, where="video",
                        choose=lambda meta: family.video_frame_indices(processor, meta, 2.0, 32))
    unpruned = family.preprocess(processor, text, [], videos=[clip])
    ids = torch.tensor(unpruned.token_ids)
    grid = item.encoder_inputs["video_grid_thw"]
    with torch.inference_mode():
        full_positions, full_delta = model.model.get_rope_index(
            ids[None], mm_token_type_ids=(ids == model.config.video_token_id).long()[None] * 2, video_grid_thw=grid)
    emb = evs.prune(_tower(item), 4, 0.5)
    pruned = evs.prune_prompt(unpruned, {0: evs.pruning_plan(family, item, 0.5)})
    (video,) = pruned.items
    placed = [PlacedEmbeddings(modality=VIDEO, offset=video.offset, length=video.length, embeddings=emb,
                               position_inputs={"video_grid_thw": grid}, kept=emb.kept)]
    with torch.inference_mode():
        prefill = family.prefill_inputs(model, torch.tensor(pruned.token_ids), placed)
    keep = torch.ones(len(ids), dtype=torch.bool)
    run = torch.arange(item.offset, item.offset + item.length)
    keep[run] = False
    keep[run[emb.kept]] = True
    assert torch.equal(prefill.position_ids, full_positions[:, :, keep])
    assert prefill.rope_delta == int(full_delta) + 12
    assert torch.equal(prefill.inputs_embeds[0, video.offset:video.offset + 12], emb.embeddings)


# ---- the encoder service ---------------------------------------------------------------------------
def _video_media_item(mm_hash: str, tensors, rate: float | None, retained: int = 0) -> encoder_pb2.MediaItem:
    item = encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_VIDEO, mm_hash=mm_hash,
                                 tensors=to_named(tensors) if tensors is not None else [])
    if rate is not None:
        item.video_pruning.CopyFrom(encoder_pb2.VideoPruning(rate=rate, retained_tokens=retained))
    return item


@pytest.fixture(scope="module")
def encoder():
    harness = EncoderHarness(tiny_checkpoint("qwen2_vl"))
    yield harness
    harness.close()


def test_encoder_prunes_after_the_tower_and_caches_the_pruned_rows(encoder):
    tensors = _video_item(motion=True).encoder_inputs
    (full,) = encoder.encode(_video_media_item("plain", tensors, None)).items
    (pruned,) = encoder.encode(_video_media_item("evs-0.5", tensors, 0.5, 12)).items
    full_rows, rows = from_proto(full.embeddings, "e"), from_proto(pruned.embeddings, "e")
    kept = list(pruned.kept_token_indexes)
    assert not full.kept_token_indexes and full_rows.shape[0] == 24
    assert len(kept) == 12 and torch.equal(rows, full_rows[kept])
    (again,) = encoder.encode(_video_media_item("evs-0.5", None, 0.5, 12)).items  # a cache reference
    assert again.cache_hit and list(again.kept_token_indexes) == kept
    assert torch.equal(from_proto(again.embeddings, "e"), rows)


def test_encoder_refuses_a_wrong_count_a_bad_rate_and_pruning_an_image(encoder):
    tensors = _video_item(motion=True).encoder_inputs
    cases = [(_video_media_item("a", tensors, 0.5, 13), "VIDEO_RETAINED_COUNT_MISMATCH"),
             (_video_media_item("b", tensors, 1.0, 6), "VIDEO_PRUNING_RATE_INVALID")]
    family, processor, _ = _qwen2_vl()
    image = encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE, mm_hash="c",
                                  tensors=to_named(item_inputs(family, processor, 112, 112, seed=1)),
                                  video_pruning=encoder_pb2.VideoPruning(rate=0.5, retained_tokens=8))
    cases.append((image, "VIDEO_PRUNING_UNSUPPORTED"))
    for item, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            encoder.encode(item)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, item.mm_hash
        assert error_info(caught.value).reason == reason


def test_the_processors_local_encoder_prunes_as_the_encoder_does(encoder):
    """--local-encode-max-patches: a small pruned video encoded in the processor gets the same rows and
    indexes as from the encoder service."""
    from services.processor.local_encoder import LocalEncoder

    family = _qwen2_vl()[0]
    item = _video_item(motion=True)
    pruned = evs.prune_prompt(ProcessedPrompt(list(range(item.offset)) + [0] * item.length, [item]),
                              {0: evs.pruning_plan(family, item, 0.5)}).items[0]
    local = LocalEncoder(Checkpoint(tiny_checkpoint("qwen2_vl")), max_patches=10_000)
    try:
        mine = local._encode({"h": pruned})["h"]
    finally:
        local.close()
    (theirs,) = encoder.encode(_video_media_item("local-0.5", item.encoder_inputs, 0.5, 12)).items
    assert list(mine.kept_token_indexes) == list(theirs.kept_token_indexes) and len(mine.kept_token_indexes) == 12
    assert torch.equal(from_proto(mine.embeddings, "e"), from_proto(theirs.embeddings, "e"))


def test_frame_runs_follow_the_kept_tokens_and_keep_the_prompts_length():
    """A video of one run per frame group (Qwen3-VL's timestamps, Nemotron's frame labels between them):
    lumped into the first run before encoding (vLLM's), then each group's kept tokens in its own run."""
    v = 7
    ids = [1, v, v, 5, v, v, 5, v, v, 6]  # three groups of two tokens, text between
    video = ProcessedItem(modality=VIDEO, offset=1, length=6, encoder_inputs={}, runs=((1, 2), (4, 2), (7, 2)))
    pruning = evs.VideoPruning(rate=0.5, frames=3, unpruned_length=6)
    family = _qwen2_vl()[0]
    lumped = evs.prune_prompt(ProcessedPrompt(ids, [video]), {0: (pruning, family.pruned_placeholder_runs(video, 3))})
    lengths = evs.frame_runs(pruning, [0, 1, 5], 3)
    assert lengths == (2, 0, 1)
    final = evs.prune_prompt(ProcessedPrompt(ids, [video]), {0: (pruning, lengths)})
    assert final.token_ids == [1, v, v, 5, 5, v, 6] and len(final.token_ids) == len(lumped.token_ids)
    assert final.items[0].placeholder_runs == ((1, 2), (5, 1))
    assert evs.frame_runs(evs.VideoPruning(rate=0.5, frames=4, unpruned_length=24), [0, 1], 1) is None


# ---- Qwen3-VL: a placeholder run per timestamped frame group -----------------------------------------
def test_qwen3_vl_positions_with_a_frame_group_dropped_whole():
    """Qwen3-VL with kept tokens in groups 0, 1 and 3 and none of group 2 (whose timestamp and markers
    stay, empty): the processor lays each group's kept tokens in its run, and our prefill positions
    are transformers' get_rope_index on the unpruned prompt with the dropped tokens' columns removed."""
    from transformers import Qwen3VLForConditionalGeneration

    model_dir = tiny_checkpoint("qwen3_vl")
    family = Checkpoint(model_dir).family
    processor = family.load_processor(model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    clip = decode_video(video_bytes(seconds=4, motion=True, seed=1), LIMITS, where="video",
                        choose=lambda meta: family.video_frame_indices(processor, meta, 2.0, 32))
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": VIDEO}, {"type": "text", "text": "?"}]}])
    unpruned = family.preprocess(processor, text, [], videos=[clip])
    (item,) = unpruned.items
    frames, per_frame = family.video_token_grid(item.encoder_inputs)
    assert frames == len(item.placeholder_runs) >= 4  # (the tiny processor's frames are one merged token each)
    kept = [*range(per_frame), per_frame, 4 * per_frame - 1]  # group 0, one of group 1, group 2 none, one of 3
    pruning = evs.VideoPruning(rate=0.5, frames=frames, unpruned_length=frames * per_frame)
    final = evs.prune_prompt(unpruned, {0: (pruning, evs.frame_runs(pruning, kept, frames))})
    (video,) = final.items
    assert len(final.token_ids) == len(unpruned.token_ids) - (item.length - len(kept))
    hidden = family.hidden_size
    rows = torch.randn(len(kept), hidden)
    deep = tuple(torch.randn(len(kept), hidden) for _ in range(family.num_deepstack_layers))
    placed, first = [], 0
    for index, (offset, length) in enumerate(video.placeholder_runs):
        run_kept = torch.tensor(kept[first:first + length]) % per_frame
        placed.append(PlacedEmbeddings(
            modality=VIDEO, offset=offset, length=length, kept=run_kept, position_inputs=video.position_inputs_of_run(index),
            embeddings=ItemEmbeddings(rows[first:first + length], tuple(d[first:first + length] for d in deep))))
        first += length
    with torch.inference_mode():
        prefill = family.prefill_inputs(model, torch.tensor(final.token_ids), placed)
        ids = torch.tensor(unpruned.token_ids)
        video_tokens = ids == model.config.video_token_id
        full_positions, full_delta = model.model.get_rope_index(
            ids[None], mm_token_type_ids=video_tokens.long()[None] * 2, video_grid_thw=item.encoder_inputs["video_grid_thw"])
    present = ~video_tokens
    present[video_tokens.nonzero()[:, 0][kept]] = True
    assert torch.equal(torch.tensor(final.token_ids), ids[present])
    assert torch.equal(prefill.position_ids, full_positions[:, :, present])
    assert prefill.rope_delta == int(full_delta) + int((~present).sum())
    mask = prefill.layer_kwargs["visual_pos_masks"][0]
    assert int(mask.sum()) == len(kept) and torch.equal(prefill.inputs_embeds[0, mask], rows)


# ---- the hook a family of one run per frame group implements (Nemotron-H Omni's labelled chunks) ----------
def test_nemotron_prunes_each_labelled_frame_run():
    """Nemotron-H Omni's video is a labelled run per temporal patch (1-D positions). The family gives EVS
    its grid; the generic path does the rest: the prompt cut to the retained count (lumped, vLLM's), the
    tower's rows pruned, then each group's kept rows in its own run behind its label; the final prompt
    is the unpruned one less the dropped tokens (what transformers' forward builds, which 5.23 cannot
    run: its compute_retention_mask reshapes the concatenated rows wrongly)."""
    checkpoint = Checkpoint(tiny_checkpoint("nemotron_h_omni"))
    family = checkpoint.family
    assert family.supports_video_pruning and family.default_video_pruning_rate == 0.0  # the tiny config's
    family.config.video_pruning_rate = 0.25
    assert family.default_video_pruning_rate == 0.25  # a checkpoint that prunes by itself: the server's default
    processor = family.load_processor(checkpoint.path)
    model = load_towers(checkpoint, "cpu")
    clip = decode_video(video_bytes(seconds=4, motion=True, seed=1), LIMITS, where="video",
                        choose=lambda meta: family.video_frame_indices(processor, meta, 2.0, 32))
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": VIDEO}, {"type": "text", "text": "?"}]}])
    unpruned = family.preprocess(processor, text, [], videos=[clip])
    (item,) = unpruned.items
    plan = evs.pruning_plan(family, item, 0.5)
    frames, per_frame = family.video_token_grid(item.encoder_inputs)
    assert len(item.placeholder_runs) == frames >= 2 and plan[1] == (item.length // 2,) + (0,) * (frames - 1)
    lumped = evs.prune_prompt(unpruned, {0: plan})
    (emb,) = family.encode(model, VIDEO, [item.encoder_inputs])
    pruned = evs.prune(emb, frames, 0.5)
    kept = pruned.kept.tolist()
    final = evs.prune_prompt(unpruned, {0: (plan[0], evs.frame_runs(plan[0], kept, frames))})
    assert len(final.token_ids) == len(lumped.token_ids) == len(unpruned.token_ids) - (item.length - len(kept))
    ids = torch.tensor(unpruned.token_ids)
    present = torch.ones(len(ids), dtype=torch.bool)
    tokens = torch.cat([torch.arange(offset, offset + length) for offset, length in item.placeholder_runs])
    present[tokens] = False
    present[tokens[pruned.kept]] = True
    assert final.token_ids == ids[present].tolist()  # every label stays; each run holds its group's kept tokens
    runs = final.items[0].placeholder_runs
    assert sum(n for _, n in runs) == len(kept) and torch.equal(pruned.embeddings, emb.embeddings[pruned.kept])
