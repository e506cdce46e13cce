"""Hypothesis strategies for any protobuf message, derived from its descriptor alone.

Two kinds, both generic (a field added to a .proto is fuzzed with no change here):
- `messages(descriptor)`: a message built field by field from the descriptor: every scalar type at
  its edges (0, -1, the type's min/max, NaN/Inf for floats), bytes and strings from a dictionary of
  interesting values (media files, corrupt media, path-escaping URLs, reserved tokens), enums with
  numbers the contract does not define, at most one member per oneof, nested messages to a depth.
- `near_valid(seeds)`: a valid request with one (sometimes two) fields mutated, anywhere in its tree:
  set to a fresh value, cleared, nudged (a number off by one, doubled, negated; bytes truncated or a
  byte flipped; a repeated field with an element dropped, duplicated or the list made very long).
  Random messages stop at the first check; these get past it and reach the deep code.
Client-streaming RPCs take a list of messages: `stream_of` and `near_valid_stream`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import note
from hypothesis import strategies as st

FD = FieldDescriptor
_I32, _I64, _U32, _U64 = (-2**31, 2**31 - 1), (-2**63, 2**63 - 1), (0, 2**32 - 1), (0, 2**64 - 1)
INT_RANGES = {
    FD.TYPE_INT32: _I32, FD.TYPE_SINT32: _I32, FD.TYPE_SFIXED32: _I32,
    FD.TYPE_INT64: _I64, FD.TYPE_SINT64: _I64, FD.TYPE_SFIXED64: _I64,
    FD.TYPE_UINT32: _U32, FD.TYPE_FIXED32: _U32, FD.TYPE_UINT64: _U64, FD.TYPE_FIXED64: _U64,
}
FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, 1e30, math.nan, math.inf, -math.inf)


@dataclass(frozen=True, repr=False)
class Dictionary:
    """Values worth trying beside random ones: what a service might choke on (the caller adds its own)."""

    strings: tuple[str, ...] = ()
    blobs: tuple[bytes, ...] = ()
    max_repeated: int = 3  # elements of a generated repeated field
    long_lengths: tuple[int, ...] = (64, 4096, 40_000)  # a repeated field made this long by a mutation
    # ...but its elements at most this many bytes together (300 chats of 300 images made a 432 MB request:
    # the fuzzer's own memory, not the service's, was then what the run measured).
    max_long_bytes: int = 4 << 20
    default_strings: tuple[str, ...] = field(default=(
        "", " ", "\x00", "user", "system", "assistant", "tool", "USER", "é" * 40, "\ud7ff\ue000", "a" * 20_000,
        "file:///etc/passwd", "file:///proc/self/mem", "file:///dev/zero", "file:///tmp/../etc/shadow",
        "file://host/x.png", "file:///x%00y", "file:///%2e%2e/etc/passwd", "file:", "http://[", "https://[::1",
        "http://127.0.0.1:1/x.png", "data:image/png;base64,iVBORw0KGgo=", "ftp://x/y", "//x", "\\\\server\\share",
    ))


def _integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (0, 1, -1, 2, 3, lo, hi, lo + 1, hi - 1, 2**31 - 1, -2**31, 2**31, 2**32, 2**53 + 1,
                                2**63 - 1, -2**63) if lo <= v <= hi})
    return st.one_of(st.integers(max(lo, -4), min(hi, 64)), st.sampled_from(edges), st.integers(lo, hi))


def _floats(width: int) -> st.SearchStrategy[float]:
    edges = [v for v in FLOAT_EDGES if width == 64 or not math.isfinite(v) or abs(v) < 3e38]
    return st.one_of(st.floats(-4, 4, width=width), st.sampled_from(edges), st.floats(width=width))


def _enum_numbers(field_: FieldDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in field_.enum_type.values]
    if getattr(field_.enum_type, "is_closed", False):  # a proto2 enum takes only its values
        return st.sampled_from(known)
    unknown = sorted({max(known) + 1, max(known) + 100, -1, 2**31 - 1, -2**31} - set(known))
    return st.one_of(st.sampled_from(known), st.sampled_from(unknown))  # proto3 enums are open


def scalars(field_: FieldDescriptor, words: Dictionary) -> st.SearchStrategy:
    """One value of a non-message field."""
    kind = field_.type
    if kind in INT_RANGES:
        return _integers(*INT_RANGES[kind])
    if kind in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return _floats(32 if kind == FD.TYPE_FLOAT else 64)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_ENUM:
        return _enum_numbers(field_)
    if kind == FD.TYPE_STRING:
        return st.one_of(st.text(max_size=24), st.sampled_from(words.default_strings + words.strings))
    if kind == FD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=32), st.sampled_from(words.blobs or (b"",)))
    raise TypeError(f"no strategy for field {field_.full_name} of type {kind}")


def _is_map(field_: FieldDescriptor) -> bool:
    return field_.type == FD.TYPE_MESSAGE and field_.message_type.GetOptions().map_entry


def values(field_: FieldDescriptor, words: Dictionary, depth: int) -> st.SearchStrategy:
    """A value for the field as it is set: a list for a repeated field, a dict for a map, else one value."""
    if _is_map(field_):
        entry = field_.message_type
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return st.dictionaries(scalars(key, words), _single(value, words, depth - 1), max_size=words.max_repeated)
    one = _single(field_, words, depth)
    if field_.is_repeated:
        return st.lists(one, max_size=words.max_repeated if field_.type == FD.TYPE_MESSAGE else 8)
    return one


def _single(field_: FieldDescriptor, words: Dictionary, depth: int) -> st.SearchStrategy:
    if field_.type == FD.TYPE_MESSAGE:
        return messages(field_.message_type, words, depth - 1)
    return scalars(field_, words)


def set_value(msg: Message, field_: FieldDescriptor, value) -> None:
    """Sets a field to a value as `values` makes it (a list replaces a repeated field's elements)."""
    if _is_map(field_):
        target = getattr(msg, field_.name)
        target.clear()
        for k, v in value.items():
            if field_.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field_.is_repeated:
        target = getattr(msg, field_.name)
        del target[:]
        if field_.type == FD.TYPE_MESSAGE:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif field_.type == FD.TYPE_MESSAGE:
        getattr(msg, field_.name).CopyFrom(value)
    else:
        setattr(msg, field_.name, value)


def messages(descriptor: Descriptor, words: Dictionary = Dictionary(), depth: int = 4) -> st.SearchStrategy[Message]:
    """Messages of the type: each field set or not, one member (or none) of each oneof; at `depth` 0 the
    message fields stay unset (recursive types end)."""
    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw) -> Message:
        msg = cls()
        for oneof in descriptor.oneofs:  # proto3 `optional` fields are synthetic oneofs of one: set or not
            members = [f for f in oneof.fields if depth > 0 or f.type != FD.TYPE_MESSAGE]
            chosen = draw(st.sampled_from([None, *members]))
            if chosen is not None:
                set_value(msg, chosen, draw(values(chosen, words, depth)))
        for field_ in descriptor.fields:
            if field_.containing_oneof is not None or (depth <= 0 and field_.type == FD.TYPE_MESSAGE):
                continue
            if draw(st.booleans()):
                set_value(msg, field_, draw(values(field_, words, depth)))
        return msg

    return build()


def stream_of(descriptor: Descriptor, words: Dictionary = Dictionary()) -> st.SearchStrategy[list[Message]]:
    """A client stream: 0 to 3 generated messages."""
    return st.lists(messages(descriptor, words), max_size=3)


# ---- near-valid: a valid request, one field mutated ------------------------------------------------
def copy(msg: Message) -> Message:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def sites(msg: Message) -> list[tuple[Message, FieldDescriptor]]:
    """Every (message, field) of the tree, set or not: where a mutation may land (in a fixed order)."""
    found: list[tuple[Message, FieldDescriptor]] = []
    stack = [msg]
    while stack:
        node = stack.pop(0)
        for field_ in node.DESCRIPTOR.fields:
            found.append((node, field_))
            if field_.type != FD.TYPE_MESSAGE or _is_map(field_):
                continue
            if field_.is_repeated:
                stack.extend(getattr(node, field_.name))
            elif node.HasField(field_.name):
                stack.append(getattr(node, field_.name))
    return found


def _nudged(draw, field_: FieldDescriptor, value, words: Dictionary):
    """A value near the current one (or a fresh one)."""
    kind = field_.type
    if kind in INT_RANGES:
        lo, hi = INT_RANGES[kind]
        candidates = [value + 1, value - 1, value * 2, -value, value * 1000, value // 2]
        return draw(st.sampled_from([v for v in candidates if lo <= v <= hi] or [0]))
    if kind in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return draw(st.sampled_from([value * 2, -value, value + 1e-3, value * 1e20, math.nan, math.inf]))
    if kind == FD.TYPE_BYTES and value:
        op = draw(st.sampled_from(["truncate", "flip", "append", "double", "tail"]))
        at = draw(st.integers(0, len(value) - 1))
        if op == "truncate":
            return value[:at]
        if op == "flip":
            return value[:at] + bytes([value[at] ^ 0xFF]) + value[at + 1:]
        if op == "append":
            return value + draw(st.binary(min_size=1, max_size=16))
        return value * 2 if op == "double" else value[at:]
    if kind == FD.TYPE_STRING and value:
        return draw(st.sampled_from([value[: len(value) // 2], value + draw(scalars(field_, words)), value * 2]))
    return draw(scalars(field_, words))


def _append(items, field_: FieldDescriptor, element) -> None:
    if field_.type == FD.TYPE_MESSAGE:
        items.add().CopyFrom(element)
    else:
        items.append(element)


def mutate(draw, msg: Message, words: Dictionary) -> str:
    """Mutates one field of the tree in place; returns what it did (for the failure's report)."""
    node, field_ = draw(st.sampled_from(sites(msg)))
    name = field_.name
    if field_.is_repeated and not _is_map(field_):
        items = getattr(node, name)
        ops = ["clear", "append", "long"] + (["drop", "duplicate", "swap", "nudge"] if len(items) else [])
        op = draw(st.sampled_from(ops))
        if op == "clear":
            del items[:]
        elif op == "append":
            _append(items, field_, draw(_single(field_, words, 2)))
        elif op == "long":  # far past any count limit, but few bytes
            length = draw(st.sampled_from(words.long_lengths))
            if field_.type == FD.TYPE_MESSAGE:
                seed = copy(items[0] if len(items) else items.add())
                del items[:]
                for _ in range(min(length, 300, max(1, words.max_long_bytes // max(1, seed.ByteSize())))):
                    items.add().CopyFrom(seed)
            else:
                seed = list(items) or [draw(scalars(field_, words))]
                items.extend((seed * (length // len(seed) + 1))[:length])
        else:
            at = draw(st.integers(0, len(items) - 1))
            if op == "drop":
                del items[at]
            elif op == "duplicate":
                _append(items, field_, items[at])
            elif op == "swap":
                other = draw(st.integers(0, len(items) - 1))
                if field_.type == FD.TYPE_MESSAGE:
                    a, b = copy(items[at]), copy(items[other])
                    items[at].CopyFrom(b)
                    items[other].CopyFrom(a)
                else:
                    items[at], items[other] = items[other], items[at]
            elif field_.type == FD.TYPE_MESSAGE:
                items[at].CopyFrom(draw(messages(field_.message_type, words, 2)))
            else:
                items[at] = _nudged(draw, field_, items[at], words)
        return f"{node.DESCRIPTOR.name}.{name}: {op}"
    op = draw(st.sampled_from(["clear", "fresh", "nudge"]))
    if op == "clear":
        node.ClearField(name)
    elif op == "fresh" or field_.type == FD.TYPE_MESSAGE:
        set_value(node, field_, draw(values(field_, words, 2)))
    else:
        current = getattr(node, name)
        set_value(node, field_, _nudged(draw, field_, current, words))
    return f"{node.DESCRIPTOR.name}.{name}: {op}"


def near_valid(seeds: Sequence[Message], words: Dictionary = Dictionary()) -> st.SearchStrategy[Message]:
    """One of the valid `seeds` with one or two fields mutated."""

    @st.composite
    def build(draw) -> Message:
        msg = copy(draw(st.sampled_from(list(seeds))))
        for _ in range(draw(st.integers(1, 2))):
            note(f"mutation: {mutate(draw, msg, words)}")  # printed with a failing example
        return msg

    return build()


def near_valid_stream(seeds: Sequence[Sequence[Message]],
                      words: Dictionary = Dictionary()) -> st.SearchStrategy[list[Message]]:
    """A valid client stream with one message mutated, or a message dropped, repeated or moved."""

    @st.composite
    def build(draw) -> list[Message]:
        stream = [copy(m) for m in draw(st.sampled_from(list(seeds)))]
        op = draw(st.sampled_from(["mutate", "mutate", "drop", "repeat", "move", "extra"]))
        at = draw(st.integers(0, len(stream) - 1))
        note(f"stream mutation: {op} at message {at}")
        if op == "mutate":
            note(f"mutation: {mutate(draw, stream[at], words)}")
        elif op == "drop":
            del stream[at]
        elif op == "repeat":
            stream.insert(at, copy(stream[at]))
        elif op == "move":
            stream.append(stream.pop(at))
        else:
            stream.insert(draw(st.integers(0, len(stream))), draw(messages(stream[0].DESCRIPTOR, words, 3)))
        return stream

    return build()
