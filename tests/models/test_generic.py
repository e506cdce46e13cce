"""The generic family's gate: which checkpoints it serves, which it refuses loudly and why.

The parity of what it serves is tests/e2e/test_generic_parity.py. Here: checkpoints it must refuse
because the generic path would give other tokens than transformers (a refusal names its reason),
checkpoints that are not its business (quietly not served), and the encoder's input checks.
Refusals need only config.json (and the processor files for the processor probe): nothing here
loads weights of a refused model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.common.errors import FailedPrecondition, InvalidArgument
from services.models.generic import NUM_TOKENS_KEY, Generic
from services.models.registry import family_for
from services.models.tiny import make_model
from services.models.tiny.common import train_bpe_tokenizer
from tests.checkpoints import tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
_SMALL_TEXT = dict(vocab_size=1088, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


def _config_only(tmp_path: Path, config) -> Path:
    out = tmp_path / config.model_type
    config.save_pretrained(out)
    return out


def _refusal(model_dir: Path) -> str:
    with pytest.raises(FailedPrecondition) as caught:
        Generic.can_serve(model_dir)
    assert caught.value.reason == "MODEL_UNSUPPORTED"
    return caught.value.message


@pytest.mark.parametrize("family", ["idefics3", "aya_vision"])
def test_serves_the_verified_tiny_checkpoints(family):
    model_dir = tiny_checkpoint(family)
    assert Generic.can_serve(model_dir)
    served = family_for(model_dir)
    assert served.name == "generic" and isinstance(served, Generic)


def test_a_text_only_checkpoint_is_not_its_business(tmp_path):
    from transformers import LlamaConfig

    model_dir = _config_only(tmp_path, LlamaConfig(**_SMALL_TEXT, architectures=["LlamaForCausalLM"]))
    assert Generic.can_serve(model_dir) is False
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


def _tiny_mistral3(tmp_path: Path) -> Path:
    """Config and processor (no weights) of a Mistral3/Pixtral model: rows of [IMG] split by [IMG_BREAK]."""
    from transformers import Mistral3Config, PixtralImageProcessor, PixtralProcessor

    special = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]")
    tokenizer = train_bpe_tokenizer(0, special, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path / "mistral3"
    Mistral3Config(text_config=dict(model_type="mistral", **_SMALL_TEXT),
                   vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=64, patch_size=16),
                   image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1,
                   architectures=["Mistral3ForConditionalGeneration"]).save_pretrained(out)
    template = ("{{ bos_token }}{% for m in messages %}[INST]{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}[IMG]{% else %}{{ c['text'] }}{% endif %}{% endfor %}[/INST]{% endfor %}")
    PixtralProcessor(image_processor=PixtralImageProcessor(size={"longest_edge": 64}, patch_size=16),
                     tokenizer=tokenizer, patch_size=16, spatial_merge_size=1, chat_template=template).save_pretrained(out)
    return out


def test_refuses_images_split_into_rows(tmp_path):
    """Pixtral puts [IMG_BREAK] after every row of [IMG]: one image is several placeholder runs."""
    message = _refusal(_tiny_mistral3(tmp_path))
    assert "one contiguous run per image" in message


def test_refuses_image_splitting(tmp_path):
    """Idefics3 as released splits big images into tiles, each its own run of <image>."""
    model_dir = tmp_path / "idefics3-splitting"
    shutil.copytree(tiny_checkpoint("idefics3"), model_dir)
    config_path = model_dir / "processor_config.json"
    processor_config = json.loads(config_path.read_text())
    # As HuggingFaceM4/Idefics3-8B-Llama3: resize to 4 tiles' side, then split into tiles.
    processor_config["image_processor"].update(do_image_splitting=True, size={"longest_edge": 4 * 112})
    config_path.write_text(json.dumps(processor_config))
    message = _refusal(model_dir)
    assert "2 images but" in message and "one contiguous run per image" in message
    with pytest.raises(FailedPrecondition):  # the services refuse to start, not answer wrongly
        family_for(model_dir)


@pytest.fixture(scope="module")
def idefics3_encoder():
    model_dir = tiny_checkpoint("idefics3")
    family = family_for(model_dir)
    model = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_encoder(model)
    return family, model


def _item(num_tokens) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.zeros(1, 1, 3, 112, 112) + 0.5,
            "pixel_attention_mask": torch.ones(1, 1, 112, 112, dtype=torch.long),
            NUM_TOKENS_KEY: torch.tensor([num_tokens])}


def test_encoder_splits_rows_by_placeholder_count(idefics3_encoder):
    family, model = idefics3_encoder
    out = family.encode(model, "image", [_item(16), _item(16)])
    assert [tuple(e.embeddings.shape) for e in out] == [(16, 64), (16, 64)]
    assert torch.equal(out[0].embeddings, out[1].embeddings)  # same pixels, same rows


@pytest.mark.parametrize("bad", [
    {NUM_TOKENS_KEY: None},  # count missing
    {NUM_TOKENS_KEY: torch.tensor([0])},
    {"input_ids": torch.tensor([1])},  # not a tower input
], ids=["no-count", "zero-count", "unknown-input"])
def test_encoder_rejects_malformed_items(idefics3_encoder, bad):
    family, model = idefics3_encoder
    item = {k: v for k, v in {**_item(16), **bad}.items() if v is not None}
    with pytest.raises(InvalidArgument) as caught:
        family.encode(model, "image", [item])
    assert caught.value.reason == "ENCODER_INPUT_INVALID"


def test_encoder_rejects_a_count_the_tower_does_not_give(idefics3_encoder):
    family, model = idefics3_encoder
    with pytest.raises(InvalidArgument, match="the tower gave 16 rows for items of \\[15\\]"):
        family.encode(model, "image", [_item(15)])


@pytest.mark.parametrize("family", ["idefics3", "aya_vision"])
def test_tiny_builders_are_deterministic(family, tmp_path):
    """Same seed, another process and hash seed: byte-identical files; another seed: other weights."""

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    again = tmp_path / "again"
    code = f"from services.models.tiny import make_model; make_model({family!r}, {str(again)!r}, seed=0)"
    env = {**os.environ, "PYTHONHASHSEED": "123", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    first = tiny_checkpoint(family)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json", "chat_template.jinja"):
        assert digest(again / name) == digest(first / name), name
    other = make_model(family, tmp_path / "other", seed=1)
    assert digest(other / "model.safetensors") != digest(first / "model.safetensors")
