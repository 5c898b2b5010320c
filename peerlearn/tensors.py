"""torch state_dicts <-> safetensors bytes, the format models travel and rest in.

safetensors is a plain header (JSON: name -> dtype, shape, byte range) followed by raw
little-endian tensor bytes; any safetensors reader opens what peerlearn sends or saves, and
nothing in it is executable (no pickle). Every float dtype (float16, bfloat16, float32,
float64) and the integer/bool dtypes of buffers are allowed.

Both directions are written here, for the sizes models travel at. Encoding writes the
header and copies each tensor once into one buffer (the same bytes as the safetensors
library's ``save``, which copies every tensor twice; a test compares them). Decoding checks
the header (size, tensor count, names, dtypes, shapes, and byte ranges that tile the data
exactly, each aligned to its dtype), then makes each tensor a view of the received buffer:
the library's loader would copy every tensor out of a ``bytes`` object, and a received
model would be held twice or three times (buffer, ``bytes``, tensors). Any failure is one
``RemoteProtocolError``.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peerlearn.buffers import Bytes, Segments, gather, gather_and_digest, writable
from peerlearn.errors import LocalProtocolError, RemoteProtocolError

StateDict = dict[str, torch.Tensor]
MAX_TENSORS = 10_000  # per state_dict
MAX_NAME_LENGTH = 256  # characters
MAX_HEADER_BYTES = 4 * 2**20  # 10,000 tensors with long names fit in well under 4 MiB
DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_DIMENSIONS = 16
MAX_DIMENSION_SIZE = 2**40  # elements along one dimension (torch's sizes are int64)
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The order the safetensors library writes dtypes in, so that our bytes are its bytes; the
# widest come first, so every tensor starts aligned to its own width.
_WRITE_ORDER = {
    name: rank
    for rank, name in enumerate(
        ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")
    )
}
_METADATA = "__metadata__"
_HEADER_LENGTH_BYTES = 8


def dtype_name(dtype: torch.dtype) -> str:
    """``dtype``'s safetensors name (``F32``...); ``LocalProtocolError`` if it has none."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise LocalProtocolError(f"unsupported dtype {dtype}")
    return name


def state_dict_segments(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Segments:
    """The safetensors encoding of ``state`` (and ``metadata``, the header's string map):
    its header, then views of its tensors' memory (copied only if not contiguous). The
    tensors must not change until it is sent. Tensors sharing storage (tied weights) are
    written once each."""
    if len(state) > MAX_TENSORS:
        raise LocalProtocolError(f"state_dict has {len(state)} tensors (limit {MAX_TENSORS})")
    tensors: StateDict = {}
    for name, tensor in state.items():
        if not name or len(name) > MAX_NAME_LENGTH:
            raise LocalProtocolError(f"tensor name {name[:40]!r} is empty or too long")
        if tensor.dtype not in _DTYPE_NAMES:
            raise LocalProtocolError(f"tensor {name[:40]!r} has unsupported dtype {tensor.dtype}")
        tensors[name] = tensor.detach()
    order = sorted(
        tensors, key=lambda name: (_WRITE_ORDER[_DTYPE_NAMES[tensors[name].dtype]], name)
    )
    entries: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise LocalProtocolError("safetensors metadata maps strings to strings")
        entries[_METADATA] = dict(metadata)
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    prefix = len(header).to_bytes(_HEADER_LENGTH_BYTES, "little") + header
    parts: list[Bytes] = [prefix]
    for name in order:
        if tensors[name].numel():
            parts.append(
                tensors[name].cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data
            )
    return Segments(parts)


def state_dict_to_bytes(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> memoryview:
    """Encode a state_dict (and ``metadata``) as safetensors in one ``buffers.allocate``
    buffer, each tensor copied once."""
    return gather(state_dict_segments(state, metadata))


def state_dict_to_bytes_and_digest(state: Mapping[str, torch.Tensor]) -> tuple[memoryview, bytes]:
    """``state_dict_to_bytes(state)`` and its sha256, hashed while the tensors are copied."""
    return gather_and_digest(state_dict_segments(state))


def _header(data: Bytes, max_size: int) -> tuple[dict[str, Any], dict[str, str], int]:
    """The parsed header's tensor entries, its metadata and where the tensor data starts."""
    if len(data) > max_size:
        raise RemoteProtocolError(f"tensor payload of {len(data)} bytes exceeds {max_size}")
    if len(data) < _HEADER_LENGTH_BYTES:
        raise RemoteProtocolError("tensor payload shorter than its header length")
    length = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    if length > min(MAX_HEADER_BYTES, len(data) - _HEADER_LENGTH_BYTES):
        raise RemoteProtocolError(f"tensor header of {length} bytes is too long")
    try:
        header = json.loads(bytes(data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length]))
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError("tensor header is not JSON") from exc
    if not isinstance(header, dict):
        raise RemoteProtocolError("tensor header is not a map")
    metadata = header.pop(_METADATA, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise RemoteProtocolError("tensor header metadata is not a map of strings")
    if len(header) > MAX_TENSORS:
        raise RemoteProtocolError(f"{len(header)} tensors (limit {MAX_TENSORS})")
    return header, metadata, _HEADER_LENGTH_BYTES + length


def parse_shape(value: Any, label: str) -> list[int]:
    """``value`` if it is a tensor shape (a list of at most ``MAX_DIMENSIONS`` sizes), else
    ``RemoteProtocolError``."""
    if (
        not isinstance(value, list)
        or len(value) > MAX_DIMENSIONS
        or not all(type(d) is int and 0 <= d <= MAX_DIMENSION_SIZE for d in value)
    ):
        raise RemoteProtocolError(f"{label}: invalid shape")
    return value


def _span(name: str, info: Any, data_size: int) -> tuple[int, int, torch.dtype, list[int]]:
    """A header entry's byte range, dtype and shape, checked against each other."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise RemoteProtocolError(f"invalid tensor name {name[:40]!r}")
    label = repr(name[:40])
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise RemoteProtocolError(f"{label}: unsupported or missing dtype")
    if info["dtype"] not in DTYPES:
        raise RemoteProtocolError(f"{label}: unsupported or missing dtype")
    dtype = DTYPES[info["dtype"]]
    shape, offsets = parse_shape(info.get("shape"), label), info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise RemoteProtocolError(f"{label}: invalid byte range")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        raise RemoteProtocolError(f"{label}: {offsets[1] - offsets[0]} bytes for shape {shape}")
    return offsets[0], offsets[1], dtype, shape


def state_dict_from_bytes(data: Bytes, max_size: int) -> StateDict:
    """Decode and validate safetensors bytes; every failure is a ``RemoteProtocolError``.
    The tensors are views of ``data`` when it is writable (else of one copy of it)."""
    return state_dict_and_metadata(data, max_size)[0]


def state_dict_and_metadata(data: Bytes, max_size: int) -> tuple[StateDict, dict[str, str]]:
    """``state_dict_from_bytes``, and the header's metadata (a map of strings, maybe empty)."""
    header, metadata, start = _header(data, max_size)
    buffer = data if writable(data) else bytearray(data)
    body = memoryview(buffer)[start:]
    spans = sorted(
        ((*_span(name, info, len(body)), name) for name, info in header.items()),
        key=lambda span: (span[0], span[1]),
    )
    end = 0
    for begin, stop, dtype, _, name in spans:
        if begin != end:
            raise RemoteProtocolError(f"{name[:40]!r}: byte ranges overlap or leave a gap")
        if (start + begin) % torch.empty((), dtype=dtype).element_size():
            raise RemoteProtocolError(f"{name[:40]!r}: data not aligned to its dtype")
        end = stop
    if end != len(body):
        raise RemoteProtocolError(f"{len(body) - end} bytes after the last tensor")
    state = {
        name: (
            torch.frombuffer(body[begin:stop], dtype=dtype).reshape(shape)
            if stop > begin
            else torch.empty(shape, dtype=dtype)
        )
        for begin, stop, dtype, shape, name in spans
    }
    return state, metadata


_SAVE_HINT = "save model.state_dict() with torch.save, or a .safetensors file"


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file or a ``torch.save``d state_dict; one-line errors otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LocalProtocolError(f"cannot read {path}: {exc.strerror}") from exc
    if path.suffix == ".safetensors":
        try:
            return state_dict_from_bytes(data, len(data))
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"{path} is not a valid .safetensors file ({exc})") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LocalProtocolError(
            f"{path} holds pickled objects, not only tensors (a whole module?): {_SAVE_HINT}"
        ) from exc
    except Exception as exc:  # torch's unpickler raises many types on other files (IndexError...)
        raise LocalProtocolError(f"{path} is not a torch state_dict file: {_SAVE_HINT}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LocalProtocolError(f"{path} does not hold a state_dict of tensors: {_SAVE_HINT}")
    return state
