"""Qwen3.5 (Qwen3_5ForConditionalGeneration): Qwen3-VL's processor, placeholders, tower and mRoPE, without
deepstack, over a hybrid language model.

The processor is Qwen3-VL's (timestamped video runs included) and `get_rope_index` follows the same
rules, so the split is Qwen3-VL's (qwen3_vl.py) with no deepstack rows: the tower returns the merged
rows only, and the language model takes `inputs_embeds` with 3-axis mRoPE `position_ids`.

The language model mixes Gated DeltaNet linear-attention layers with full-attention ones
(`layer_types`). The cache transformers makes for it (base.new_cache: DynamicCache from the text
config) holds a conv + recurrent state layer for each linear layer and a KV layer for each attention
layer, as Nemotron-H's does for its Mamba blocks; the engine batches both kinds (batch_cache.py). The
linear layers mask left padding only in multi-token forwards, which the engine runs one request at a
time (prefill), so a decode row's state never sees another row's padding.
"""

from __future__ import annotations

from services.models.base import IMAGE, VIDEO
from services.models.qwen3_vl import Qwen3VL


class Qwen3_5(Qwen3VL):
    name = "qwen3_5"
    hf_architectures = ("Qwen3_5ForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)

    @property
    def num_deepstack_layers(self) -> int:
        return 0  # the tower has no deepstack mergers
