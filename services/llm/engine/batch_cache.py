"""One cache for all the rows of a decode batch, merged from per-request caches by layer type.

The rows share one timeline of `width` positions; each row's real tokens sit at its right end and
`mask` [B, width] marks them (1) against the left padding (0). By layer type (DESIGN §4.6):
- full attention (`DynamicLayer`): keys/values [B, heads, width, head_dim], left-padded with zeros;
- sliding window (`DynamicSlidingWindowLayer`): the last min(width, window - 1) positions of the same
  timeline, left-padded likewise, and `cumulative_length` = width: the mask functions place the
  window by it (a wrong value shifts every row's window);
- Mamba conv/SSM state (`LinearAttentionLayer`): one state per row, concatenated on dim 0; decode
  steps use no mask for them;
- no cache (`DummyLayer`, MoE blocks): nothing;
- fixed layers (the family's `fixed_cache_layers`: Mllama's cross-attention K/V of a row's images, written
  once at prefill): not on the text timeline; right-padded with zeros to the longest row (the family's
  decode mask excludes the padding) and never trimmed with the text, only down to the longest row left.
Once a batch has two rows its full-attention layers become `GrowingLayer`s: the same keys/values
with room for the next tokens, written in place, where `DynamicLayer` copies the whole cache into a
new tensor every step (`torch.cat`: 17 % of a batch-16 step on the bench model). A request decoded
alone keeps its own cache untouched, so batch 1 stays bitwise equal to generate().
Any other layer type (quantized, indexed, mixed linear + attention) is not merged: `can_merge` says
so and the engine decodes such a model one request per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Cache
from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

_MERGEABLE = (DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer, DummyLayer)


class GrowingLayer(DynamicLayer):
    """A full-attention layer whose keys/values are views of larger buffers: a step writes its token
    into the spare room instead of concatenating. Anything that replaces `keys` (row selection,
    trimming, merging) is noticed at the next update and the buffers are rebuilt around it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = keys, values
        self._key_buffer = self._value_buffer = None

    def _owns_views(self) -> bool:
        """Whether keys/values are still the leading positions of our buffers."""
        buf = self._key_buffer
        return (buf is not None and self.keys._base is buf and self.values._base is self._value_buffer
                and self.keys.data_ptr() == buf.data_ptr() and self.keys.shape[0] == buf.shape[0])

    def _rebuild(self, room: int) -> None:
        """Copies keys/values into new buffers with `room` spare positions plus a margin."""
        used = self.keys.shape[-2]
        capacity = used + max(room, 64, used // 2)  # amortised: one copy per ~half the length grown
        self._key_buffer, self._value_buffer = _with_room(self.keys, capacity), _with_room(self.values, capacity)
        self.keys, self.values = self._key_buffer[..., :used, :], self._value_buffer[..., :used, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        used, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._owns_views() or used + new > self._key_buffer.shape[-2]:
            self._rebuild(new)
        self._key_buffer[..., used : used + new, :] = key_states
        self._value_buffer[..., used : used + new, :] = value_states
        self.keys = self._key_buffer[..., : used + new, :]
        self.values = self._value_buffer[..., : used + new, :]
        return self.keys, self.values


def _with_room(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    """[..., T, D] copied into the first T positions of a new [..., capacity, D] buffer."""
    buffer = tensor.new_empty(*tensor.shape[:-2], capacity, tensor.shape[-1])
    buffer[..., : tensor.shape[-2], :] = tensor
    return buffer


def can_merge(cache: Cache) -> bool:
    """Whether every layer of a fresh `cache` is of a type this module merges (exact type: subclasses
    differ). A cache that makes its layers only when written says nothing: no."""
    return bool(cache.layers) and all(type(layer) in _MERGEABLE for layer in cache.layers)


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[B, heads, T, D] -> [B, heads, length, D], zeros on the left."""
    return F.pad(tensor, (0, 0, length - tensor.shape[-2], 0))


def _pad_right(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[B, heads, T, D] -> [B, heads, length, D], zeros on the right."""
    return F.pad(tensor, (0, 0, 0, length - tensor.shape[-2]))


def _linear_states(layer: LinearAttentionLayer) -> list[tuple[dict, int]]:
    return [(states, i) for states in (layer.conv_states, layer.recurrent_states)
            for i, state in states.items() if state is not None]


class BatchCache:
    """A batch's cache and its padding mask. Starts as one request's own cache, unchanged, so a request
    decoded alone runs exactly as generate() does (no padding, no copy)."""

    def __init__(self, cache: Cache, length: int, device: torch.device, fixed_layers: frozenset[int] = frozenset()):
        self.cache = cache
        self.mask = torch.ones(1, length, dtype=torch.long, device=device)  # [B, width]
        self.fixed_layers = fixed_layers
        self.fixed_lengths = [self._fixed_length(cache)]  # per row: positions its fixed layers really hold

    def _fixed_length(self, cache: Cache) -> int:
        layers = [cache.layers[i] for i in sorted(self.fixed_layers)]
        return next((layer.keys.shape[-2] for layer in layers if layer.keys is not None), 0)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def append(self, cache: Cache, length: int) -> None:
        """Adds one request's prefilled cache (batch 1, `length` tokens) as the last row."""
        width = max(self.width, length)
        self.fixed_lengths.append(self._fixed_length(cache))
        for index, (mine, theirs) in enumerate(zip(self.cache.layers, cache.layers, strict=True)):
            if isinstance(mine, DummyLayer) or getattr(mine, "keys", 0) is None:  # no cache, or never written
                continue
            if index in self.fixed_layers:
                fixed = max(self.fixed_lengths)
                mine.keys = torch.cat([_pad_right(mine.keys, fixed), _pad_right(theirs.keys, fixed)])
                mine.values = torch.cat([_pad_right(mine.values, fixed), _pad_right(theirs.values, fixed)])
                continue
            if isinstance(mine, LinearAttentionLayer):
                for (states, i), (other, _) in zip(_linear_states(mine), _linear_states(theirs), strict=True):
                    states[i] = torch.cat([states[i], other[i]])
                continue
            stored = min(width, mine.sliding_window - 1) if isinstance(mine, DynamicSlidingWindowLayer) else width
            mine.keys = torch.cat([_pad_left(mine.keys, stored), _pad_left(theirs.keys, stored)])
            mine.values = torch.cat([_pad_left(mine.values, stored), _pad_left(theirs.values, stored)])
            if isinstance(mine, DynamicSlidingWindowLayer):
                mine.cumulative_length = width
        layers = self.cache.layers
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer and layer.keys is not None and i not in self.fixed_layers:
                layers[i] = GrowingLayer(layer.keys, layer.values)
        row = torch.zeros(1, width, dtype=self.mask.dtype, device=self.mask.device)
        row[:, width - length :] = 1
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), row])

    def step_mask(self) -> torch.Tensor:
        """The attention mask of the next decode step: [B, width + 1]."""
        return F.pad(self.mask, (0, 1), value=1)

    def advance(self) -> None:
        """Records that a decode step appended one real token to every row."""
        self.mask = self.step_mask()

    def select(self, keep: list[int]) -> None:
        """Keeps rows `keep` (in that order), then drops the left padding they all share."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.reorder_cache(index)  # batch_select_indices raises on linear-attention layers
        self.mask = self.mask.index_select(0, index)
        self.fixed_lengths = [self.fixed_lengths[i] for i in keep]
        fixed = max(self.fixed_lengths)
        for i in self.fixed_layers:  # down to the longest row left
            layer = self.cache.layers[i]
            if layer.keys is not None and layer.keys.shape[-2] > fixed:
                layer.keys, layer.values = layer.keys[:, :, :fixed], layer.values[:, :, :fixed]
        trim = int(self.mask.any(dim=0).long().argmax())  # first position some row really holds
        if trim == 0:
            return
        self.mask = self.mask[:, trim:]
        for index, layer in enumerate(self.cache.layers):
            if index in self.fixed_layers:
                continue
            if type(layer) in (DynamicLayer, GrowingLayer):
                layer.keys, layer.values = layer.keys[:, :, trim:], layer.values[:, :, trim:]
            elif type(layer) is DynamicSlidingWindowLayer:
                stored = min(self.width, layer.sliding_window - 1)
                layer.keys, layer.values = layer.keys[:, :, -stored:], layer.values[:, :, -stored:]
                layer.cumulative_length = self.width

