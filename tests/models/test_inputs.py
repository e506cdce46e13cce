"""Typed family inputs (services/models/inputs.py): schemas, their checks, and cutting a batch into items.

The mechanism on small hand-made schemas first, then every family: what its preprocess makes fits
its own schema, and what a hostile caller could claim is refused from shapes and a few integers.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from services.common.errors import InvalidArgument
from services.models.inputs import FLOAT, INT, ItemSchema, Split, TensorSpec, split_items, validate
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes

GRID = ItemSchema(
    tensors=(TensorSpec("pixels", ("t*h*w", 6)), TensorSpec("grid", (1, 3), INT, values=("t", "h", "w"))),
    patches="t*h*w",
    derive=lambda item, b: {"tokens": b["t"] * b["h"] * b["w"] // 4},
)
TILES = ItemSchema(tensors=(TensorSpec("pixels", ("tiles", 3, 8, 8)), TensorSpec("mask", (1, "tiles"), INT)),
                   patches="tiles*4")


def _check(schema: ItemSchema, item: dict[str, torch.Tensor], max_patches: int | None = None) -> dict[str, int]:
    return validate(schema, item, where="items[0]", reason="ENCODER_INPUT_INVALID", max_patches=max_patches)


def _refused(schema: ItemSchema, item: dict[str, torch.Tensor], max_patches: int | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        _check(schema, item, max_patches)
    return caught.value


def test_values_bind_symbols_that_size_other_tensors():
    item = {"pixels": torch.zeros(16, 6), "grid": torch.tensor([[1, 4, 4]])}
    assert _check(GRID, item, max_patches=16) == {"t": 1, "h": 4, "w": 4, "tokens": 4}


def test_a_claimed_grid_is_refused_by_the_shape_it_implies():
    """The encoder defect: a grid of 10^8 patches beside 16 rows. Checked from shapes, nothing allocated."""
    err = _refused(GRID, {"pixels": torch.zeros(16, 6), "grid": torch.tensor([[1, 10000, 10000]])})
    assert err.reason == "ENCODER_INPUT_INVALID"
    assert err.message == "items[0]: pixels dim 0 is 16, expected 100000000 (t*h*w with t=1, h=10000, w=10000)"


def test_the_budget_caps_patches_per_item():
    item = {"pixels": torch.zeros(16, 6), "grid": torch.tensor([[1, 4, 4]])}
    err = _refused(GRID, item, max_patches=15)
    assert err.reason == "ITEM_TOO_LARGE" and err.metadata == {"maxItemPatches": "15"}
    assert "16 patches (t*h*w)" in err.message
    assert _check(TILES, {"pixels": torch.zeros(3, 3, 8, 8), "mask": torch.ones(1, 3, dtype=torch.long)},
                  max_patches=12)["tiles"] == 3


@pytest.mark.parametrize(("item", "message"), [
    ({"pixels": torch.zeros(16, 6)}, "expected tensors ['pixels', 'grid']; missing ['grid'], unexpected []"),
    ({"pixels": torch.zeros(16, 6), "grid": torch.tensor([[1, 4, 4]]), "extra": torch.zeros(1)},
     "unexpected ['extra']"),
    ({"pixels": torch.zeros(16, 6), "grid": torch.tensor([[1.0, 4, 4]])},
     "grid is torch.float32, expected an integer tensor"),
    ({"pixels": torch.zeros(16, 6, dtype=torch.long), "grid": torch.tensor([[1, 4, 4]])},
     "pixels is torch.int64, expected a floating-point tensor"),
    ({"pixels": torch.zeros(16, 6), "grid": torch.tensor([1, 4, 4])}, "grid has shape [3], expected 2 dims [1, 3]"),
    ({"pixels": torch.zeros(16, 5), "grid": torch.tensor([[1, 4, 4]])}, "pixels dim 1 is 5, expected 6"),
    ({"pixels": torch.zeros(0, 6), "grid": torch.tensor([[1, 0, 4]])}, "grid value h is 0, expected at least 1"),
    ({"pixels": torch.zeros(16, 6), "grid": torch.tensor([[-1, -4, 4]])}, "grid value t is -1, expected at least 1"),
], ids=["missing", "unexpected", "float-grid", "int-pixels", "rank", "fixed-dim", "zero-value", "negative-value"])
def test_refusals_name_the_tensor_and_the_dim(item, message):
    err = _refused(GRID, item)
    assert err.reason == "ENCODER_INPUT_INVALID" and err.message.startswith("items[0]: ") and message in err.message


def test_free_symbols_tie_tensors_and_must_be_positive():
    assert "mask dim 1 is 2, expected 3 (tiles with tiles=3)" in _refused(
        TILES, {"pixels": torch.zeros(3, 3, 8, 8), "mask": torch.ones(1, 2, dtype=torch.long)}).message
    assert "pixels dim 0 (tiles) is 0, expected at least 1" in _refused(
        TILES, {"pixels": torch.zeros(0, 3, 8, 8), "mask": torch.ones(1, 0, dtype=torch.long)}).message


def test_a_family_rule_becomes_invalid_argument():
    def even(item, bindings):
        if bindings["h"] % 2:
            raise ValueError(f"h {bindings['h']} is odd")
        return {}

    schema = ItemSchema(tensors=(TensorSpec("grid", (1, 2), INT, values=("h", "w")),), derive=even)
    with pytest.raises(InvalidArgument) as caught:
        validate(schema, {"grid": torch.tensor([[3, 2]])}, where="position_inputs", reason="POSITION_INPUT_INVALID")
    assert caught.value.reason == "POSITION_INPUT_INVALID" and caught.value.message == "position_inputs: h 3 is odd"


# ---- splitting ---------------------------------------------------------------------------------
def test_split_items_batched_flat_and_padded():
    outputs = {
        "grid": torch.tensor([[1, 2, 2], [1, 2, 4]]),  # [images, 3]
        "patches": torch.arange(12).reshape(12, 1),  # [4 + 8 patches, 1]
        "crops": torch.arange(2 * 3).reshape(2, 3),  # [images, most crops], padded
        "one_batch": torch.arange(2).reshape(1, 2),  # [1, images]
    }
    splits = {"grid": Split.batched(), "patches": Split.flat("patches"), "crops": Split.padded("crops"),
              "one_batch": Split.batched(1)}
    items = split_items(outputs, splits, 2, sizes={"patches": [4, 8], "crops": [3, 1]})
    assert items[0]["grid"].tolist() == [[1, 2, 2]] and items[1]["patches"].reshape(-1).tolist() == list(range(4, 12))
    assert items[0]["crops"].tolist() == [[0, 1, 2]] and items[1]["crops"].tolist() == [[3]]
    assert items[1]["one_batch"].tolist() == [[1]]
    unbatched = split_items(outputs, {"crops": Split.padded("crops", keepdim=False)}, 2, sizes={"crops": [2, 3]})
    assert [item["crops"].tolist() for item in unbatched] == [[0, 1], [3, 4, 5]]


@pytest.mark.parametrize(("split", "sizes"), [
    (Split.flat("n"), [4, 7]),  # 11 rows asked of 12
    (Split.padded("n"), [4, 13]),  # more than the padding holds
    (Split.batched(), []),
], ids=["flat-sum", "padded-past-the-end", "batched-count"])
def test_split_items_refuses_counts_the_outputs_do_not_hold(split, sizes):
    with pytest.raises(ValueError, match="processor output x of shape"):
        split_items({"x": torch.zeros(12, 12)}, {"x": split}, 3 if split.how == "batched" else 2, sizes={"n": sizes})


# ---- every family ------------------------------------------------------------------------------
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "internvl", "gemma3", "phi4mm",
            "nemotron_h_omni", "idefics3", "aya_vision", "mistral3", "llava_onevision", "llava_next_video"]


def _processed(name: str):
    model_dir = tiny_checkpoint(name)
    family = family_for(model_dir)
    processor = family.load_processor(model_dir)
    images = [Image.open(io.BytesIO(image_bytes(w, h, seed=5))).convert("RGB") for w, h in ((64, 48), (300, 200))]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "Compare them."}]
    text = family.render_chat(processor, [{"role": "user", "content": content}])
    return family, family.preprocess(processor, text, images)


@pytest.mark.parametrize("name", FAMILIES)
def test_preprocessed_items_fit_the_familys_schemas(name):
    """What the processor service sends is what the encoder and the LLM accept: the tower inputs and
    nothing else, within the default budget, with the tokens the placeholder run holds."""
    family, prompt = _processed(name)
    assert len(prompt.items) == 2
    for index, item in enumerate(prompt.items):
        bindings = family.check_encoder_item(item.modality, item.encoder_inputs, where=f"items[{index}]",
                                             max_patches=65536)
        assert bindings.get("tokens", item.length) == item.length
        family.check_position_inputs(item.modality, item.position_inputs, item.length, where=f"items[{index}]")


@pytest.mark.parametrize("name", ["qwen2_vl", "nemotron_h_omni", "llava_next", "phi4mm"])
def test_size_tensors_claiming_more_than_the_pixels_are_refused(name):
    """Each family whose sizes come from values: a claim 100x larger on every side never reaches torch."""
    family, prompt = _processed(name)
    item = dict(prompt.items[0].encoder_inputs)
    sizes = next(spec for spec in family.encoder_schema("image").tensors if spec.values)
    item[sizes.name] = item[sizes.name] * 100
    with pytest.raises(InvalidArgument) as caught:
        family.check_encoder_item("image", item, where="items[0]", max_patches=10**12)
    assert caught.value.reason == "ENCODER_INPUT_INVALID"
    assert caught.value.message.startswith("items[0]: ")


def test_qwen_position_inputs_are_checked_against_the_placeholder_length():
    family, prompt = _processed("qwen2_vl")
    item = prompt.items[0]
    family.check_position_inputs("image", item.position_inputs, item.length, where="multimodal_inputs[0]")
    bad = [
        ({"image_grid_thw": torch.tensor([[1, 10000, 10000]])}, "mean 25000000 tokens, the placeholder range has"),
        ({"image_grid_thw": torch.tensor([[1, 3, 4]])}, "multiples of the 2x2 merge"),
        ({"image_grid_thw": torch.tensor([[1.0, 4, 4]])}, "image_grid_thw is torch.float32"),
        ({}, "missing ['image_grid_thw']"),
        ({**item.position_inputs, "video_grid_thw": torch.tensor([[1, 2, 2]])}, "unexpected ['video_grid_thw']"),
    ]
    for tensors, message in bad:
        with pytest.raises(InvalidArgument) as caught:
            family.check_position_inputs("image", tensors, item.length, where="multimodal_inputs[0]")
        assert caught.value.reason == "POSITION_INPUT_INVALID" and message in caught.value.message, caught.value.message


def test_families_without_position_inputs_refuse_any():
    family, prompt = _processed("llava")
    with pytest.raises(InvalidArgument) as caught:
        family.check_position_inputs("image", {"image_grid_thw": torch.tensor([[1, 2, 2]])}, 36, where="x")
    assert caught.value.reason == "POSITION_INPUT_INVALID"


def test_bool_is_not_an_integer_kind():
    bools = ItemSchema(tensors=(TensorSpec("mask", (2,), INT), TensorSpec("x", (2,), FLOAT)))
    with pytest.raises(InvalidArgument, match="mask is torch.bool"):
        validate(bools, {"mask": torch.ones(2, dtype=torch.bool), "x": torch.zeros(2)}, where="x", reason="R")


def test_value_specs_must_be_small_fixed_integer_tensors():
    """Values are read with .tolist(): a spec whose size a caller chooses could make that large."""
    with pytest.raises(TypeError):
        TensorSpec("grid", ("n", 3), INT, values=("t", "h", "w"))
    with pytest.raises(TypeError):
        TensorSpec("grid", (1, 3), FLOAT, values=("t", "h", "w"))
