"""The generic family's gate: which checkpoints it serves, which it refuses loudly and why.

The parity of what it serves is tests/e2e/test_generic_parity.py. Here: checkpoints it must refuse
because the generic path would give other tokens than transformers (a refusal names its reason),
checkpoints that are not its business (quietly not served), the encoder's input checks, and how
images that own several placeholder runs (tiles, rows) are assigned their runs and tower rows.
Refusals need only config.json (and the processor files for the processor probe): nothing here
loads weights of a refused model.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from services.common.errors import FailedPrecondition, InvalidArgument
from services.models.base import ServeVerdict
from services.models.generic import Generic
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.parity import CASES

_SMALL_TEXT = dict(vocab_size=1088, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


def _config_only(tmp_path: Path, config) -> Path:
    out = tmp_path / config.model_type
    config.save_pretrained(out)
    return out


def _refusal(model_dir: Path) -> str:
    verdict = Generic.can_serve(model_dir)
    assert not verdict.serves and verdict.refusal, verdict
    return verdict.refusal


@pytest.mark.parametrize("family", ["idefics3", "aya_vision", "mistral3"])
def test_serves_the_verified_tiny_checkpoints(family):
    model_dir = tiny_checkpoint(family)
    assert Generic.can_serve(model_dir) == ServeVerdict(serves=True)
    served = family_for(model_dir)
    assert served.name == "generic" and isinstance(served, Generic)


def test_a_text_only_checkpoint_is_not_its_business(tmp_path):
    from transformers import LlamaConfig

    model_dir = _config_only(tmp_path, LlamaConfig(**_SMALL_TEXT, architectures=["LlamaForCausalLM"]))
    assert Generic.can_serve(model_dir) == ServeVerdict(serves=False)  # no refusal: not its business
    with pytest.raises(FailedPrecondition) as caught:
        family_for(model_dir)
    assert caught.value.reason == "MODEL_UNSUPPORTED" and "not supported" in caught.value.message


def test_refuses_prefix_lm_masks(tmp_path):
    """PaliGemma attends bidirectionally over image + prefix (token_type_ids): not a plain causal decoder."""
    from transformers import PaliGemmaConfig

    config = PaliGemmaConfig(text_config=dict(model_type="gemma", **_SMALL_TEXT, head_dim=16),
                             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=28, patch_size=14),
                             architectures=["PaliGemmaForConditionalGeneration"])
    assert "token type ids" in _refusal(_config_only(tmp_path, config))


def test_refuses_mrope_positions(tmp_path):
    """GLM-4V computes 3-D positions with get_rope_index; the generic path uses 0..L-1."""
    from transformers import Glm4vConfig

    config = Glm4vConfig(text_config=dict(**_SMALL_TEXT, rope_parameters={"rope_type": "default",
                                                                           "mrope_section": [2, 3, 3]}),
                         vision_config=dict(hidden_size=32, intermediate_size=64, depth=1, num_heads=2,
                                            out_hidden_size=64),
                         architectures=["Glm4vForConditionalGeneration"])
    message = _refusal(_config_only(tmp_path, config))
    assert "position ids" in message and "get_rope_index" in message


def _two_image_prompt(family: str):
    """The generic family, processor, images and ProcessedPrompt of the parity harness's two-image case."""
    model_dir = tiny_checkpoint(family)
    generic = family_for(model_dir)
    processor = generic.load_processor(model_dir)
    prompt, images = CASES["two-images"]
    pil_images = [Image.open(io.BytesIO(data)) for data in images]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = generic.render_chat(processor, [{"role": "user", "content": content}])
    return generic, processor, text, pil_images, generic.preprocess(processor, text, pil_images)


@pytest.mark.parametrize("family", ["idefics3", "aya_vision", "mistral3"])
def test_an_image_owns_several_runs(family):
    """The parity harness's two-image case really takes the multi-run path: items own several runs,
    which cover exactly the image tokens, in prompt order, and sum to the item's rows."""
    generic, _, _, _, prompt = _two_image_prompt(family)
    token = generic.image_token_id
    assert len(prompt.items) == 2
    assert max(len(item.placeholder_runs) for item in prompt.items) > 1
    if family != "aya_vision":  # Aya Vision's 96 x 96 image fits one tile: one run
        assert all(len(item.runs) > 1 for item in prompt.items)
    covered = []
    for item in prompt.items:
        runs = item.placeholder_runs
        assert item.offset == runs[0][0] and item.length == sum(n for _, n in runs)
        generic.check_encoder_item("image", item.encoder_inputs, where="item")  # tower inputs only: no bookkeeping
        assert list(runs) == sorted(runs)
        covered += [i for offset, n in runs for i in range(offset, offset + n)]
    assert covered == [i for i, t in enumerate(prompt.token_ids) if t == token]
    # The first image's runs all come before the second's (each image is one contiguous expansion).
    first, second = prompt.items
    assert sum(first.placeholder_runs[-1]) <= second.offset


def test_pixtral_runs_are_rows_between_breaks():
    """Mistral3: each run is one row of [IMG], followed by [IMG_BREAK], the last by [IMG_END]."""
    _, processor, text, images, prompt = _two_image_prompt("mistral3")
    tokenizer = processor.tokenizer
    breaks, end = tokenizer.convert_tokens_to_ids(["[IMG_BREAK]", "[IMG_END]"])
    for item, size in zip(prompt.items, processor(text=[text], images=images)["image_sizes"]):
        rows, cols = (int(side) // 28 for side in size)  # patch 14, spatial merge 2
        assert [n for _, n in item.runs] == [cols] * rows
        after = [prompt.token_ids[offset + n] for offset, n in item.runs]
        assert after == [breaks] * (rows - 1) + [end]


def test_idefics3_splits_images_into_tiles():
    """Idefics3 with splitting: rows * cols tiles plus the global image, each a run of image_seq_len."""
    _, processor, _, _, prompt = _two_image_prompt("idefics3")
    for item in prompt.items:
        tiles = item.encoder_inputs["pixel_values"].shape[1]
        assert tiles > 1 and [n for _, n in item.runs] == [processor.image_seq_len] * tiles


@pytest.mark.parametrize("family", ["idefics3", "aya_vision", "mistral3"])
def test_encoder_gives_what_get_image_features_gives(family):
    """The items of one prompt, encoded together, are get_image_features on the processor's whole output."""
    generic, processor, text, images, prompt = _two_image_prompt(family)
    model = generic.load_model(tiny_checkpoint(family), torch.float32, "cpu")
    out = processor(text=[text], images=images, return_tensors="pt")
    with torch.inference_mode():
        features = model.get_image_features(**{k: v for k, v in out.items() if k in generic.tower_inputs["image"]})
    pooled = features.pooler_output
    expected = torch.cat([p.reshape(-1, generic.hidden_size) for p in (pooled if isinstance(pooled, (list, tuple))
                                                                      else [pooled])])
    got = generic.encode(model, "image", [item.encoder_inputs for item in prompt.items])
    assert torch.equal(torch.cat([e.embeddings for e in got]), expected)


def test_runs_outside_every_image_are_refused():
    generic = family_for(tiny_checkpoint("idefics3"))
    spans = [(4, 20), (30, 50)]
    with pytest.raises(InvalidArgument) as caught:  # a run straddling the end of the first image
        generic._runs_per_item([(6, 8), (18, 4), (32, 8)], spans, 2)
    assert caught.value.reason == "PLACEHOLDER_COUNT_MISMATCH"
    with pytest.raises(InvalidArgument, match="images \\[1\\] have no"):
        generic._runs_per_item([(6, 8), (12, 8)], spans, 2)
    with pytest.raises(InvalidArgument) as caught:  # no replacement offsets: one run per image
        generic._runs_per_item([(6, 8), (16, 8), (32, 8)], None, 2)
    assert caught.value.reason == "PLACEHOLDER_COUNT_MISMATCH"
    assert generic._runs_per_item([(6, 8), (12, 8), (32, 8)], spans, 2) == [[(6, 8), (12, 8)], [(32, 8)]]


def test_tiles_must_divide_evenly():
    assert Generic._tiles_per_image("pixel_values", 8, [80, 48]) == [5, 3]
    with pytest.raises(InvalidArgument) as caught:
        Generic._tiles_per_image("pixel_values", 8, [70, 58])
    assert caught.value.reason == "PLACEHOLDER_COUNT_MISMATCH"


@pytest.fixture(scope="module")
def idefics3_encoder():
    model_dir = tiny_checkpoint("idefics3")
    family = family_for(model_dir)
    model = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_encoder(model)
    return family, model


def _item(num_tiles: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.zeros(1, num_tiles, 3, 112, 112) + 0.5,
            "pixel_attention_mask": torch.ones(1, num_tiles, 112, 112, dtype=torch.long)}


def test_encoder_splits_rows_by_tiles(idefics3_encoder):
    """No count rides with the item: its rows follow from its tiles (16 rows each for this tower)."""
    family, model = idefics3_encoder
    out = family.encode(model, "image", [_item(1), _item(3), _item(1)])
    assert [tuple(e.embeddings.shape) for e in out] == [(16, 64), (48, 64), (16, 64)]
    assert torch.equal(out[0].embeddings, out[2].embeddings)  # same pixels, same rows


def test_encoder_schema_is_the_processors_layout(idefics3_encoder):
    family, _ = idefics3_encoder
    specs = {spec.name: spec for spec in family.encoder_schema("image").tensors}
    assert set(specs) == {"pixel_values", "pixel_attention_mask"}
    assert specs["pixel_values"].dims[:2] == (1, "units") and specs["pixel_attention_mask"].dims[:2] == (1, "units")


@pytest.mark.parametrize("bad", [
    {"pixel_attention_mask": None},  # an input missing
    {"input_ids": torch.tensor([1])},  # not a tower input
    {"pixel_values": torch.zeros(2, 1, 3, 112, 112)},  # not the batch-of-one layout
    {"pixel_attention_mask": torch.ones(1, 2, 112, 112, dtype=torch.long)},  # 2 tiles of masks, 1 of pixels
    {"pixel_values": torch.zeros(1, 1, 3, 112, 112, dtype=torch.long)},  # integer pixels
], ids=["missing", "unknown-input", "not-batch-of-one", "tiles-disagree", "int-pixels"])
def test_encoder_rejects_malformed_items(idefics3_encoder, bad):
    family, _ = idefics3_encoder
    item = {k: v for k, v in {**_item(1), **bad}.items() if v is not None}
    with pytest.raises(InvalidArgument) as caught:
        family.check_encoder_item("image", item, where="items[0].tensors")
    assert caught.value.reason == "ENCODER_INPUT_INVALID" and caught.value.message.startswith("items[0].tensors: ")



def test_a_model_without_a_video_path_takes_images_only():
    """Idefics3 has no get_video_features: the generic family serves its images and names why a video
    part is refused (the processor service adds it to MODALITY_UNSUPPORTED)."""
    generic = family_for(tiny_checkpoint("idefics3"))
    assert generic.modalities == ("image",)
    assert "get_video_features" in generic.modality_refusal("video")
    assert generic.modality_refusal("image") is None


def test_a_model_with_a_video_path_takes_video():
    """LLaVA-NeXT-Video: get_video_features and a video token; its clip is one item of one run, whose
    tower inputs are the probe's video layout ([1, frames, 3, H, W])."""
    model_dir = tiny_checkpoint("llava_next_video")
    generic = family_for(model_dir)
    assert isinstance(generic, Generic) and generic.modalities == ("image", "video")
    assert Generic.can_serve(model_dir) == ServeVerdict(serves=True)
    assert generic.placeholder_token("video") == "<video>"
    schema = generic.encoder_schema("video")
    assert [spec.name for spec in schema.tensors] == ["pixel_values_videos"]
    with pytest.raises(InvalidArgument):  # two clips in one item: not the probe's one-per-item layout
        generic.check_encoder_item("video", {"pixel_values_videos": torch.zeros(2, 4, 3, 56, 56)}, where="item")
