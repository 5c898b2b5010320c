"""Fewer bytes per model: block-wise 8-bit and 4-bit quantization and top-k sparsification,
each with error feedback.

A sender compresses ``model - reference`` (the reference is a model both sides hold:
MoDeST's shared start, the global model in the simulator's FedAvg, zeros otherwise) plus
what earlier compressions left out (the residual), and keeps what this one leaves out for
the next. Whatever a single message
loses, the following ones make up for, so no bias builds up over rounds.

On the wire a compressed model is a plain state_dict (safetensors) of small tensors:

* ``int8``: ``name/q`` int8 in [-127, 127] and ``name/scale`` float32, one scale per
  block of ``BLOCK`` values (the block's largest magnitude / 127);
* ``int4``: ``name/q`` uint8, two values per byte (low nibble first), each in [1, 15]
  meaning -7..7, and ``name/scale`` as for int8 (largest magnitude / 7);
* ``topk:F``: ``name/index`` int32 (int64 for tensors of 2**31 values or more), strictly
  increasing, and ``name/value`` float32: the ``ceil(F * size)`` entries of largest
  magnitude;

and integer or bool tensors (step counters, masks) under their own name, as they are.
The safetensors header's metadata names the model's layout (``layout``: every tensor's
name, dtype and shape, in order).

``decode`` rebuilds a model only in a layout the receiver chose: that of a model it holds
(the learners), or the sender's stated layout within a byte limit (``like_from_layout``,
the embedding API, which holds no model of its own), so a peer cannot make us allocate
more; anything else is a ``RemoteProtocolError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from peerlearn.buffers import MAP_MIN_SIZE, allocate
from peerlearn.errors import LocalProtocolError, Offence, RemoteProtocolError
from peerlearn.learning.choices import Codec, Compression
from peerlearn.tensors import (
    DTYPES,
    MAX_NAME_LENGTH,
    MAX_TENSORS,
    dtype_name,
    parse_shape,
    state_dict_to_bytes,
)

StateDict = dict[str, torch.Tensor]
BLOCK = 256  # values sharing one scale
_LEVELS = {8: 127, 4: 7}
_Q_DTYPES = {8: torch.int8, 4: torch.uint8}
CHUNK = 1 << 20  # values quantized at a time (a multiple of BLOCK)
LAYOUT_KEY = "peerlearn.layout"  # in the safetensors metadata: {name: [dtype, shape]}


def _compressible(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.numel() > 0


def _quantize(flat: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    levels = _LEVELS[bits]
    blocks = math.ceil(flat.numel() / BLOCK)
    padded = torch.zeros(blocks * BLOCK, dtype=torch.float32)
    padded[: flat.numel()] = flat
    grid = padded.view(blocks, BLOCK)
    scale = grid.abs().amax(dim=1) / levels
    steps = grid / torch.where(scale > 0, scale, 1.0).unsqueeze(1)
    q = steps.round_().clamp_(-levels, levels).to(torch.int8).view(-1)
    if bits == 4:
        nibbles = (q + 8).to(torch.uint8)
        q = nibbles[0::2] | (nibbles[1::2] << 4)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, size: int) -> torch.Tensor:
    values = q if bits == 8 else torch.stack((q & 0x0F, q >> 4), dim=1).view(-1).to(torch.int8) - 8
    grid = values.view(-1, BLOCK).to(torch.float32) * scale.unsqueeze(1)
    return grid.view(-1)[:size]


def _index_dtype(size: int) -> torch.dtype:
    return torch.int32 if size < 2**31 else torch.int64


def _top_k(flat: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = flat.abs().topk(count, sorted=False).indices.sort().values
    return index.to(_index_dtype(flat.numel())), flat[index].to(torch.float32)


def _float32_vector(size: int) -> torch.Tensor:
    """An uninitialized float32 vector; a memory map when large (``buffers.allocate``), so
    that it goes back to the kernel when freed, whichever thread frees it."""
    if size * 4 < MAP_MIN_SIZE:
        return torch.empty(size, dtype=torch.float32)
    return torch.frombuffer(allocate(size * 4), dtype=torch.float32)


def _target(
    flat: torch.Tensor, base: torch.Tensor | None, kept: torch.Tensor | None, start: int, end: int
) -> torch.Tensor:
    """What values ``start:end`` of a tensor must deliver: the values, less the reference,
    plus what earlier messages left out (a float32 copy)."""
    target = flat[start:end].to(torch.float32, copy=True)
    if base is not None:
        target -= base[start:end]
    if kept is not None:
        target += kept[start:end]
    return target


def _top_k_with_feedback(
    name: str,
    flat: torch.Tensor,
    base: torch.Tensor | None,
    kept: torch.Tensor | None,
    compression: Compression,
) -> tuple[StateDict, torch.Tensor, torch.Tensor]:
    """Top-k of the whole tensor: its wire tensors, the new residual and what the receiver
    rebuilds."""
    target = _target(flat, base, kept, 0, flat.numel())
    index, value = _top_k(target, compression.kept(flat.numel()))
    parts = {f"{name}/index": index, f"{name}/value": value}
    sent = _expand(name, parts, flat.numel(), compression)
    residual = target.sub_(sent)
    if base is not None:
        sent += base
    return parts, residual, sent


def _quantize_with_feedback(
    name: str,
    flat: torch.Tensor,
    base: torch.Tensor | None,
    kept: torch.Tensor | None,
    bits: int,
    rebuild: bool,
) -> tuple[StateDict, torch.Tensor, torch.Tensor | None]:
    """Block-wise quantization, ``CHUNK`` values at a time (so temporaries stay small
    whatever the tensor's size): its wire tensors, the new residual (written over ``kept``
    when there is one) and, if ``rebuild``, what the receiver rebuilds."""
    size = flat.numel()
    q = torch.empty(math.ceil(size / BLOCK) * BLOCK * bits // 8, dtype=_Q_DTYPES[bits])
    scale = torch.empty(math.ceil(size / BLOCK), dtype=torch.float32)
    residual = kept if kept is not None else _float32_vector(size)
    sent_all = _float32_vector(size) if rebuild else None
    for start in range(0, size, CHUNK):
        end = min(start + CHUNK, size)
        target = _target(flat, base, kept, start, end)
        chunk_q, chunk_scale = _quantize(target, bits)
        q[start * bits // 8 : start * bits // 8 + chunk_q.numel()] = chunk_q
        scale[start // BLOCK : start // BLOCK + chunk_scale.numel()] = chunk_scale
        sent = _dequantize(chunk_q, chunk_scale, bits, end - start)
        torch.sub(target, sent, out=residual[start:end])
        if sent_all is not None:
            if base is not None:
                sent += base[start:end]
            sent_all[start:end] = sent
    return {f"{name}/q": q, f"{name}/scale": scale}, residual, sent_all


def _expand(name: str, wire: StateDict, size: int, compression: Compression) -> torch.Tensor:
    """The flat float32 values of tensor ``name`` (``size`` of them) from its wire tensors."""
    if compression.codec is Codec.TOPK:
        flat = torch.zeros(size, dtype=torch.float32)
        flat[wire[f"{name}/index"].long()] = wire[f"{name}/value"]
        return flat
    bits = 8 if compression.codec is Codec.INT8 else 4
    q, scale = wire[f"{name}/q"], wire[f"{name}/scale"]
    flat = _float32_vector(size)
    for start in range(0, size, CHUNK):  # temporaries of CHUNK values, whatever the size
        end = min(start + CHUNK, size)
        blocks = math.ceil((end - start) / BLOCK)
        first_q = start * bits // 8
        flat[start:end] = _dequantize(
            q[first_q : first_q + blocks * BLOCK * bits // 8],
            scale[start // BLOCK : start // BLOCK + blocks],
            bits,
            end - start,
        )
    return flat


def _check(name: str, wire: StateDict, size: int, compression: Compression) -> None:
    """``RemoteProtocolError`` unless ``name``'s wire tensors are what the codec sends for
    ``size`` values."""
    label = repr(name[:40])
    if compression.codec is Codec.TOPK:
        count = compression.kept(size)
        index = _expect(wire, f"{name}/index", _index_dtype(size), count)
        _expect_finite(_expect(wire, f"{name}/value", torch.float32, count), label)
        if count and (int(index[0]) < 0 or int(index[-1]) >= size):
            raise RemoteProtocolError(f"{label}: top-k index out of range")
        if count > 1 and not bool((index[1:] > index[:-1]).all()):
            raise RemoteProtocolError(f"{label}: top-k indexes not strictly increasing")
        return
    bits = 8 if compression.codec is Codec.INT8 else 4
    blocks = math.ceil(size / BLOCK)
    q = _expect(
        wire, f"{name}/q", torch.int8 if bits == 8 else torch.uint8, blocks * BLOCK * bits // 8
    )
    scale = _expect(wire, f"{name}/scale", torch.float32, blocks)
    _expect_finite(scale, label)
    if bool((scale < 0).any()):
        raise RemoteProtocolError(f"{label}: negative scale")
    if bits == 8 and bool((q == -128).any()):
        raise RemoteProtocolError(f"{label}: int8 value -128 (the range is -127..127)")
    if bits == 4 and bool(((q & 0x0F) == 0).any() | ((q >> 4) == 0).any()):
        raise RemoteProtocolError(f"{label}: int4 value 0 (the range is 1..15)")


def _expect(wire: StateDict, key: str, dtype: torch.dtype, count: int) -> torch.Tensor:
    tensor = wire.get(key)
    if tensor is None:
        raise RemoteProtocolError(f"compressed model lacks {key[:60]!r}")
    if tensor.dtype != dtype or tensor.dim() != 1 or tensor.numel() != count:
        raise RemoteProtocolError(
            f"{key[:60]!r}: {tensor.dtype} of shape {list(tensor.shape)}, "
            f"expected {dtype} of [{count}]"
        )
    return tensor


def _expect_finite(tensor: torch.Tensor, label: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise RemoteProtocolError(f"{label}: non-finite values")


def layout(model: StateDict) -> dict[str, str]:
    """The safetensors metadata a compressed ``model`` travels with: its tensors' names,
    dtypes and shapes, in order."""
    entries = {name: [dtype_name(t.dtype), list(t.shape)] for name, t in model.items()}
    return {LAYOUT_KEY: json.dumps(entries, separators=(",", ":"))}


def like_from_layout(metadata: Mapping[str, str], max_bytes: int) -> StateDict:
    """Tensors without memory (torch's ``meta`` device) in the layout a compressed model's
    metadata states, for ``decode``; ``RemoteProtocolError`` if the layout is missing or
    malformed, or its model takes more than ``max_bytes``."""
    text = metadata.get(LAYOUT_KEY)
    if text is None:
        raise RemoteProtocolError("compressed model without its layout")
    try:
        entries = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError("compressed model layout is not JSON") from exc
    if not isinstance(entries, dict) or len(entries) > MAX_TENSORS:
        raise RemoteProtocolError("compressed model layout is not a map of tensors")
    like: StateDict = {}
    total = 0
    for name, entry in entries.items():
        label = repr(name[:40])
        if (
            not 0 < len(name) <= MAX_NAME_LENGTH
            or not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or entry[0] not in DTYPES
        ):
            raise RemoteProtocolError(f"compressed model layout: {label} is malformed")
        dtype, shape = DTYPES[entry[0]], parse_shape(entry[1], label)
        total += math.prod(shape) * dtype.itemsize
        if total > max_bytes:
            raise RemoteProtocolError(
                f"compressed model decodes to more than {max_bytes} bytes", Offence.OVERSIZED
            )
        like[name] = torch.empty(shape, dtype=dtype, device="meta")
    return like


def decode(
    wire: StateDict,
    like: StateDict,
    compression: Compression,
    reference: StateDict | None = None,
) -> StateDict:
    """The model a peer compressed into ``wire``, in the layout of ``like`` (a model we
    hold), plus ``reference``; ``RemoteProtocolError`` if ``wire`` is anything else."""
    if not compression.enabled:
        raise LocalProtocolError("decode needs a codec; an uncompressed model is the wire")
    model: StateDict = {}
    expected = 0
    for name, tensor in like.items():
        if not _compressible(tensor):
            kept = wire.get(name)
            if kept is None or kept.dtype != tensor.dtype or kept.shape != tensor.shape:
                raise RemoteProtocolError(f"{name[:40]!r}: missing, or not as we hold it")
            model[name] = kept
            expected += 1
            continue
        _check(name, wire, tensor.numel(), compression)
        flat = _expand(name, wire, tensor.numel(), compression)
        if reference is not None:
            flat += reference[name].reshape(-1)
        model[name] = flat.view(tensor.shape).to(tensor.dtype)
        expected += 2
    if len(wire) != expected:
        raise RemoteProtocolError(f"compressed model has {len(wire)} tensors, expected {expected}")
    return model


def decode_from_peer(
    wire: StateDict, like: StateDict, codec: object, reference: StateDict | None = None
) -> StateDict:
    """``decode`` of what a peer sent with the codec its offer names (``codec``, unchecked
    until here); top-k sends changes, so it needs the ``reference`` both sides hold."""
    compression = Compression.from_peer(codec)
    if compression.codec is Codec.TOPK and reference is None:
        raise RemoteProtocolError(f"a {compression} model: changes from a start we do not share")
    return decode(wire, like, compression, reference)


class ErrorFeedback:
    """A sender's compression state: what its earlier messages have not yet delivered."""

    def __init__(self, compression: Compression) -> None:
        if not compression.enabled:
            raise LocalProtocolError("error feedback needs a codec")
        self.compression = compression
        self.residual: StateDict = {}

    def encode(
        self, model: StateDict, reference: StateDict | None = None
    ) -> tuple[StateDict, StateDict]:
        """``model`` compressed against ``reference`` (zeros when None): the wire tensors,
        and the model a receiver rebuilds from them (what it will see of ours)."""
        return self._encode(model, reference, rebuild=True)

    def _encode(
        self, model: StateDict, reference: StateDict | None, *, rebuild: bool
    ) -> tuple[StateDict, StateDict]:
        wire: StateDict = {}
        rebuilt: StateDict = {}
        for name, tensor in model.items():
            if not _compressible(tensor):
                if name in wire:
                    raise LocalProtocolError(f"tensor name {name[:40]!r} clashes with a part")
                wire[name] = rebuilt[name] = tensor.detach()
                continue
            flat = tensor.detach().reshape(-1)
            base = None if reference is None else reference[name].reshape(-1)
            kept = self.residual.pop(name, None)
            if kept is not None and kept.numel() != flat.numel():
                kept = None
            codec = self.compression.codec
            sent: torch.Tensor | None
            if codec is Codec.TOPK:
                parts, residual, sent = _top_k_with_feedback(
                    name, flat, base, kept, self.compression
                )
            else:
                bits = 8 if codec is Codec.INT8 else 4
                parts, residual, sent = _quantize_with_feedback(
                    name, flat, base, kept, bits, rebuild
                )
            if bool(torch.isfinite(residual.sum())):
                self.residual[name] = residual
            # else: a non-finite model must not poison every message after it
            if any(key in model or key in wire for key in parts):
                raise LocalProtocolError(f"tensor names clash with {name[:40]!r}'s parts")
            wire.update(parts)
            if sent is not None:
                rebuilt[name] = sent.view(tensor.shape).to(tensor.dtype)
        return wire, rebuilt

    def encode_bytes(
        self,
        model: StateDict,
        reference: StateDict | None = None,
        *,
        beside: Mapping[str, torch.Tensor] | None = None,
    ) -> memoryview:
        """``encode``'s wire tensors as the safetensors bytes peers get, with ``model``'s
        layout in the metadata; ``beside``: tensors sent as they are, outside the layout."""
        wire = self._encode(model, reference, rebuild=False)[0]
        for name in beside or {}:
            if name in wire:
                raise LocalProtocolError(f"tensor name {name[:40]!r} is taken by the model")
        return state_dict_to_bytes({**wire, **(beside or {})}, layout(model))
