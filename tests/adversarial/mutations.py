"""Hypothesis strategies that turn a valid encoding into what a hostile peer would send.

Two kinds of mutation, as fuzzers of binary protocols do:

* byte-level: flip, truncate, extend or splice the bytes (framing and msgpack errors);
* structure-level: decode the msgpack, replace one node anywhere in it with a hostile value
  (extreme integers, NaN, mixed-type map keys, deep nesting, huge shapes...), drop or add a
  map key, and encode it again (schema errors, which byte flips rarely reach).
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
from hypothesis import strategies as st

HOSTILE_SCALARS = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        2**31,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        float("nan"),
        float("inf"),
        -float("inf"),
        1e308,
        -0.0,
        "",
        "x" * 300,
        "member",
        b"",
        b"\x00" * 32,
        b"\xff" * 64,
    ]
)

HOSTILE_VALUES = st.recursive(
    HOSTILE_SCALARS
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6), children, max_size=3)
        # a map whose keys mix str and bytes: sorting its keys raises TypeError
        | st.fixed_dictionaries({"a": children, b"b": children})  # type: ignore[dict-item]
        | st.just([[[[[[[[[[0]]]]]]]]]])
        | st.just([0, 2**40])  # a tensor shape with a huge dimension next to a zero
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, list):
        return [_replace(v, rest, new) if i == head else v for i, v in enumerate(value)]
    return {k: (_replace(v, rest, new) if k == head else v) for k, v in value.items()}


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


@st.composite
def restructured(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` (msgpack) with one node replaced, a map key dropped or one added."""
    value = msgpack.unpackb(valid, raw=False, strict_map_key=False)
    path = draw(st.sampled_from(_paths(value)))
    action = draw(st.sampled_from(["replace", "drop-key", "add-key"]))
    target = value
    for step in path:
        target = target[step]
    if action == "drop-key" and isinstance(target, dict) and target:
        key = draw(st.sampled_from(sorted(target, key=repr)))
        new = {k: v for k, v in target.items() if k != key}
    elif action == "add-key" and isinstance(target, dict):
        new = {**target, draw(st.sampled_from(["extra", "t", "op", b"k"])): draw(HOSTILE_VALUES)}
    else:
        new = draw(HOSTILE_VALUES)
    return _pack(_replace(value, path, new))


@st.composite
def bytewise(draw: st.DrawFn, valid: bytes) -> bytes:
    data = bytearray(valid)
    action = draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if action == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    elif action == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    elif action == "extend":
        data += draw(st.binary(min_size=1, max_size=20))
    else:
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=20))
    return bytes(data)


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(bytewise(valid), restructured(valid), st.binary(max_size=200))


@st.composite
def restructured_safetensors(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` (safetensors) with one node of its JSON header replaced, a key dropped or
    one added; the header length is rewritten so the library parses the mutated header."""
    length = int.from_bytes(valid[:8], "little")
    header = json.loads(valid[8 : 8 + length])
    path = draw(st.sampled_from(_paths(header)))
    target = header
    for step in path:
        target = target[step]
    action = draw(st.sampled_from(["replace", "drop-key", "add-key"]))
    if action == "drop-key" and isinstance(target, dict) and target:
        key = draw(st.sampled_from(sorted(target)))
        new = {k: v for k, v in target.items() if k != key}
    elif action == "add-key" and isinstance(target, dict):
        new = {**target, draw(st.sampled_from(["extra", "dtype", "__metadata__"])): 0}
    else:
        new = draw(HOSTILE_JSON)
    raw = json.dumps(_replace(header, path, new)).encode()
    return len(raw).to_bytes(8, "little") + raw + valid[8 + length :]


HOSTILE_JSON = st.recursive(
    st.sampled_from([None, True, 0, -1, 2**64, 2**80, 1e308, "", "F32", "BF16", "x" * 300])
    | st.integers(-(2**70), 2**70),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def mutated_safetensors(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(bytewise(valid), restructured_safetensors(valid), st.binary(max_size=200))


def mutated_value(valid: Any) -> st.SearchStrategy[Any]:
    """A decoded value with one node replaced (for decoders that take decoded values)."""
    return restructured(_pack(valid)).map(
        lambda data: msgpack.unpackb(data, raw=False, strict_map_key=False)
    )
