"""Typed family inputs: what tensors an item carries, how their dims tie together, how a batch splits.

A family declares, per modality, an `ItemSchema` for what its encoder takes (and one for the
position inputs its LLM takes), as vLLM's `TensorSchema` does, and a `Split` per processor output,
as vLLM's `MultiModalFieldConfig.batched` / `flat_from_sizes` do. Shared code then:

- cuts the processor's batch into items (`split_items`), instead of each family slicing by hand;
- checks every item a service receives (`validate`) before torch sees it, so a caller that claims
  a 10000x10000 grid with a 16-row tensor gets INVALID_ARGUMENT naming the tensor and the dim,
  never an allocation sized by the claim.

Dims are written as ints (exact), symbols ("tiles": bound by the first tensor that has it, >= 1)
or products ("t*h*w", "tiles*1024"). A spec with `values` binds symbols to the values of a small
integer tensor (Qwen2-VL's image_grid_thw [1, 3] binds t, h, w); those tensors are checked first,
then every other tensor, then the schema's `derive` checks family rules and adds symbols (the
item's `tokens`; LLaVA-NeXT's tile count from image_sizes), then the budget (`patches`, the
tower's input rows). All of it reads shapes and a few integers: nothing is sized by a claim.

Worked example (Qwen2-VL, patch_dim 1176, merge 2): an item {pixel_values [64, 1176] float,
image_grid_thw [[1, 8, 8]] int} binds t=1, h=8, w=8; derive gives tokens = 64 / 4 = 16; patches
t*h*w = 64 is within the budget; pixel_values must be [t*h*w, 1176] = [64, 1176]: valid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from services.common.errors import InvalidArgument

Kind = Literal["float", "int", "bool"]
FLOAT: Kind = "float"  # any floating dtype
INT: Kind = "int"  # any integer dtype (bool excluded)
BOOL: Kind = "bool"  # a mask (Aria's pixel_mask)
_KIND_NAMES = {FLOAT: "a floating-point", INT: "an integer", BOOL: "a boolean"}

Dim = int | str
Bindings = dict[str, int]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of an item: dtype kind, one entry per dim, and symbols bound to its values."""

    name: str
    dims: tuple[Dim, ...]
    kind: Kind = FLOAT
    values: tuple[str, ...] = ()  # a small integer tensor whose values (each >= 1) bind these symbols

    def __post_init__(self) -> None:
        if self.values and (self.kind != INT or not all(isinstance(d, int) for d in self.dims)
                            or math.prod(self.dims) != len(self.values)):  # type: ignore[arg-type]
            raise TypeError(f"{self.name}: values need an integer tensor of fixed dims holding {len(self.values)}")


@dataclass(frozen=True)
class ItemSchema:
    """What one item of one modality carries, and how big it may be.

    `derive(item, bindings)` runs once every tensor fits: it checks the family's rules (raising
    ValueError with the message) and returns further symbols, `tokens` (the item's embedding rows)
    where the family knows them. `patches` is the expression the per-item budget caps (the tower's
    input rows, e.g. "t*h*w"); empty: every dim is a received tensor's, bounded by the message size.
    """

    tensors: tuple[TensorSpec, ...]
    patches: str = ""
    derive: Callable[[Mapping[str, torch.Tensor], Bindings], Bindings] | None = None


def evaluate(expression: Dim, bindings: Mapping[str, int]) -> int:
    """The value of a dim: an int, a symbol or a product of symbols and ints ("tiles*1024")."""
    if isinstance(expression, int):
        return expression
    return math.prod(int(f) if f.isdigit() else bindings[f] for f in expression.split("*"))


def _kind_ok(tensor: torch.Tensor, kind: str) -> bool:
    if kind == FLOAT:
        return tensor.is_floating_point()
    if kind == BOOL:
        return tensor.dtype == torch.bool
    return not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool


def validate(schema: ItemSchema, item: Mapping[str, torch.Tensor], *, where: str, reason: str,
             max_patches: int | None = None) -> Bindings:
    """Checks one item against its schema; returns the bound symbols. Raises InvalidArgument that names
    the item (`where`), the tensor and the dim. Reads only shapes and the small `values` tensors."""

    def fail(message: str) -> InvalidArgument:
        return InvalidArgument(f"{where}: {message}", reason=reason)

    names = [spec.name for spec in schema.tensors]
    missing = [name for name in names if name not in item]
    unexpected = sorted(set(item) - set(names))
    if missing or unexpected:
        raise fail(f"expected tensors {names}; missing {missing}, unexpected {unexpected}")
    bindings: Bindings = {}

    def check(spec: TensorSpec) -> None:
        tensor = item[spec.name]
        if not _kind_ok(tensor, spec.kind):
            raise fail(f"{spec.name} is {tensor.dtype}, expected {_KIND_NAMES[spec.kind]} tensor")
        if tensor.ndim != len(spec.dims):
            raise fail(f"{spec.name} has shape {list(tensor.shape)}, expected {len(spec.dims)} dims {list(spec.dims)}")
        for index, (size, dim) in enumerate(zip(tensor.shape, spec.dims)):
            if isinstance(dim, str) and dim.isidentifier() and dim not in bindings:  # a free symbol: bind it
                if size < 1:
                    raise fail(f"{spec.name} dim {index} ({dim}) is {size}, expected at least 1")
                bindings[dim] = size
                continue
            expected = evaluate(dim, bindings)
            if size != expected:
                shown = f" ({dim} with {_shown(dim, bindings)})" if isinstance(dim, str) else ""
                raise fail(f"{spec.name} dim {index} is {size}, expected {expected}{shown}")

    # Value tensors first: the symbols they bind size the others (pixel rows = t*h*w).
    for spec in sorted(schema.tensors, key=lambda spec: not spec.values):
        check(spec)
        if spec.values:
            for symbol, value in zip(spec.values, item[spec.name].reshape(-1).tolist()):
                if value < 1:
                    raise fail(f"{spec.name} value {symbol} is {value}, expected at least 1")
                bindings[symbol] = value
    if schema.derive is not None:
        try:
            bindings.update(schema.derive(item, bindings))
        except ValueError as err:  # a family rule the item breaks
            raise fail(str(err)) from err
    if schema.patches and max_patches is not None:
        patches = evaluate(schema.patches, bindings)
        if patches > max_patches:
            raise InvalidArgument(f"{where}: the item has {patches} patches ({schema.patches}); at most "
                                  f"{max_patches} per item", reason="ITEM_TOO_LARGE",
                                  metadata={"maxItemPatches": str(max_patches)})
    return bindings


def _shown(dim: str, bindings: Mapping[str, int]) -> str:
    return ", ".join(f"{f}={bindings[f]}" for f in dim.split("*") if not f.isdigit())


# ---- splitting a processed batch into items ------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """How one processor output holds its items (vLLM's MultiModalFieldConfig).

    batched: item i is the slice [i:i+1] along `dim` (one entry per item).
    flat:    items lie one after another along `dim`, item i `sizes[i]` long (patches, tiles).
    padded:  batched along 0, then item i keeps its first `sizes[i]` entries along 1 (the processor
             pads every item to the batch's largest); `keepdim=False` drops the leading 1.
    `sizes` names the per-item size list given to `split_items`.
    """

    how: Literal["batched", "flat", "padded"]
    dim: int = 0
    sizes: str = ""
    keepdim: bool = True

    @staticmethod
    def batched(dim: int = 0) -> Split:
        return Split("batched", dim)

    @staticmethod
    def flat(sizes: str, dim: int = 0) -> Split:
        return Split("flat", dim, sizes)

    @staticmethod
    def padded(sizes: str, keepdim: bool = True) -> Split:
        return Split("padded", 0, sizes, keepdim)


def split_items(outputs: Mapping[str, torch.Tensor], splits: Mapping[str, Split], num_items: int,
                sizes: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
    """Each item's slice of the processor outputs named in `splits`, in item order.

    A count that does not match the outputs is a processor the family does not understand: ValueError
    names the output (the processor service reports it as PROCESSOR_REJECTED / INTERNAL).
    """
    items: list[dict[str, torch.Tensor]] = [{} for _ in range(num_items)]
    for name, split in splits.items():
        value = outputs[name]
        if split.how == "batched":
            lengths = [1] * num_items
        else:
            lengths = list((sizes or {})[split.sizes])
        along = 0 if split.how == "padded" else split.dim
        total = num_items if split.how == "padded" else sum(lengths)
        if value.shape[along] != total or split.how == "padded" and lengths and value.shape[1] < max(lengths):
            raise ValueError(f"processor output {name} of shape {list(value.shape)} does not hold {num_items} "
                             f"items of {lengths} entries ({split.how} along dim {along})")
        if split.how == "padded":
            pieces = [value[i : i + 1, :n] if split.keepdim else value[i, :n] for i, n in enumerate(lengths)]
        else:
            pieces = list(value.split(lengths, dim=split.dim))
        for item, piece in zip(items, pieces):
            item[name] = piece.contiguous()
    return items
