"""Each family's `encoder_batching` claim, checked on its tiny checkpoint with real images of several
sizes: every item encoded in one call with the others vs alone is bitwise equal ("exact") or within
`encoder_batch_tolerance` ("tolerance"). Phi-4-MM claims "alone", and this shows why: batched with
others an image's features change. Families served by the generic adapter keep the default, "alone"
(unknown towers are not batched across calls)."""

from __future__ import annotations

import pytest
import torch

from services.models.base import AUDIO, IMAGE
from services.models.checkpoint import Checkpoint
from services.tiny_checkpoints import TINY_FAMILIES
from tests.checkpoints import tiny_checkpoint
from tests.encoder.helpers import audio_item_inputs, item_inputs

# Sizes that give variable-size families different patch/tile counts; Phi-4-MM's crops are 448 px.
SIZES = [(112, 112), (160, 96), (96, 224), (200, 140)]
PHI_SIZES = [(448, 448), (640, 320), (500, 300)]

EXPECTED = {"qwen2_vl": "tolerance", "qwen2_5_vl": "tolerance", "qwen3_vl": "tolerance", "qwen3_vl_moe": "tolerance",
            "qwen3_5": "tolerance", "qwen3_5_moe": "tolerance", "glm4v": "tolerance", "glm46v": "tolerance",
            "glm4v_moe": "tolerance", "glm_ocr": "tolerance", "paddleocr_vl": "tolerance", "llava": "exact", "llava_next": "exact", "gemma3": "exact", "internvl": "exact",
            "nemotron_h_omni": "tolerance", "phi4mm": "alone", "llava_onevision": "exact", "qwen2_audio": "tolerance",
            "qwen2_5_omni_thinker": "tolerance",
            "mllama": "exact", "paligemma": "exact", "gemma4": "exact", "llama4": "exact"}
# Clips of these (seconds, seed): the items of audio-only families, and the audio check of the others.
CLIPS = [(1.0, 1), (2.5, 2), (0.4, 3)]
AUDIO_FAMILIES = ("phi4mm", "qwen2_5_omni_thinker")  # audio-only families are checked on clips above


def _family_and_items(name: str, modality: str | None = None):
    path = tiny_checkpoint(name)
    checkpoint = Checkpoint(path)
    family = checkpoint.family
    model = family.load_model(path, checkpoint.dtype, "cpu")
    family.strip_for_encoder(model)
    processor = family.load_processor(path)
    if modality == AUDIO or IMAGE not in family.modalities:
        return family, model, AUDIO, [audio_item_inputs(family, processor, s, seed) for s, seed in CLIPS]
    sizes = PHI_SIZES if family.encoder_batching == "alone" else SIZES
    return family, model, IMAGE, [item_inputs(family, processor, w, h, seed) for seed, (w, h) in enumerate(sizes)]


def _max_diff(batched, alone) -> float:
    diffs = []
    for b, a in zip(batched, alone):
        for x, y in zip((b.embeddings, *b.deepstack), (a.embeddings, *a.deepstack), strict=True):
            assert x.shape == y.shape
            diffs.append(float((x - y).abs().max()))
    return max(diffs)


def test_every_tiny_family_is_covered():
    generic = {name for name in TINY_FAMILIES if Checkpoint(tiny_checkpoint(name)).family.name == "generic"}
    assert set(TINY_FAMILIES) - generic == set(EXPECTED)
    for name in generic:
        assert Checkpoint(tiny_checkpoint(name)).family.encoder_batching == "alone"


@pytest.mark.parametrize(("name", "modality"), [*((name, None) for name in sorted(EXPECTED)),
                                                  *((name, AUDIO) for name in AUDIO_FAMILIES)])
def test_batched_items_match_alone_as_claimed(name, modality):
    """One claim per family holds for all its modalities: images (clips for audio-only families), and
    clips for the families that also take audio."""
    family, model, modality, items = _family_and_items(name, modality)
    assert family.encoder_batching == EXPECTED[name]
    alone = [family.encode(model, modality, [item])[0] for item in items]
    batched = family.encode(model, modality, items)
    reversed_batch = family.encode(model, modality, items[::-1])[::-1]  # another position in the batch
    if family.encoder_batching == "exact":
        for out in (batched, reversed_batch):
            assert all(torch.equal(b.embeddings, a.embeddings) for b, a in zip(out, alone))
            assert _max_diff(out, alone) == 0
    elif family.encoder_batching == "tolerance":
        assert _max_diff(batched, alone) <= family.encoder_batch_tolerance
        assert _max_diff(reversed_batch, alone) <= family.encoder_batch_tolerance
    else:  # "alone": the claim is that the batch matters, so it must never be mixed across calls
        assert _max_diff(batched, alone) > 1e-3
