"""torch state_dicts <-> safetensors bytes, the format models travel and rest in.

safetensors is a plain header (JSON: name -> dtype, shape, byte range) followed by raw
little-endian tensor bytes; any safetensors reader opens what peerlearn sends or saves, and
nothing in it is executable (no pickle). Every float dtype (float16, bfloat16, float32,
float64) and the integer/bool dtypes of buffers are allowed.

Decoding checks the header's size, tensor count, names and dtypes before the library reads
a byte of tensor data; the library then checks every byte range. Any failure is one
``RemoteProtocolError``.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load
from safetensors.torch import save as _save

from peerlearn.errors import LocalProtocolError, RemoteProtocolError

StateDict = dict[str, torch.Tensor]
MAX_TENSORS = 10_000  # per state_dict
MAX_NAME_LENGTH = 256  # characters
MAX_HEADER_BYTES = 4 * 2**20  # 10,000 tensors with long names fit in well under 4 MiB
DTYPES = frozenset({"F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "BOOL"})
_METADATA = "__metadata__"
_HEADER_LENGTH_BYTES = 8


def state_dict_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Encode a state_dict as safetensors. Tensors sharing storage (tied weights) are
    written once each, as copies."""
    if len(state) > MAX_TENSORS:
        raise LocalProtocolError(f"state_dict has {len(state)} tensors (limit {MAX_TENSORS})")
    seen: set[int] = set()
    tensors: StateDict = {}
    for name, tensor in state.items():
        if not name or len(name) > MAX_NAME_LENGTH:
            raise LocalProtocolError(f"tensor name {name[:40]!r} is empty or too long")
        plain = tensor.detach().cpu().contiguous()
        pointer = plain.untyped_storage().data_ptr()
        if pointer in seen and plain.numel() > 0:
            plain = plain.clone()
        seen.add(pointer)
        tensors[name] = plain
    try:
        return bytes(_save(tensors))
    except (SafetensorError, ValueError, TypeError, KeyError) as exc:
        raise LocalProtocolError(f"cannot encode the state_dict: {exc}") from exc


def _check_header(data: bytes, max_size: int) -> None:
    if len(data) > max_size:
        raise RemoteProtocolError(f"tensor payload of {len(data)} bytes exceeds {max_size}")
    if len(data) < _HEADER_LENGTH_BYTES:
        raise RemoteProtocolError("tensor payload shorter than its header length")
    length = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    if length > min(MAX_HEADER_BYTES, len(data) - _HEADER_LENGTH_BYTES):
        raise RemoteProtocolError(f"tensor header of {length} bytes is too long")
    try:
        header = json.loads(data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length])
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError("tensor header is not JSON") from exc
    if not isinstance(header, dict):
        raise RemoteProtocolError("tensor header is not a map")
    names = [name for name in header if name != _METADATA]
    if len(names) > MAX_TENSORS:
        raise RemoteProtocolError(f"{len(names)} tensors (limit {MAX_TENSORS})")
    for name in names:
        info = header[name]
        if not name or len(name) > MAX_NAME_LENGTH:
            raise RemoteProtocolError(f"invalid tensor name {name[:40]!r}")
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise RemoteProtocolError(f"{name[:40]!r}: unsupported or missing dtype")


def state_dict_from_bytes(data: bytes, max_size: int) -> StateDict:
    """Decode and validate safetensors bytes; every failure is a ``RemoteProtocolError``."""
    _check_header(data, max_size)
    try:
        decoded = _load(data)
    except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError, AssertionError) as exc:
        raise RemoteProtocolError(f"invalid tensor payload: {exc}") from exc
    return decoded


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
    except (RuntimeError, ValueError, KeyError, EOFError, AttributeError, TypeError) as exc:
        raise LocalProtocolError(f"{path} is not a torch state_dict file: {_SAVE_HINT}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LocalProtocolError(f"{path} does not hold a state_dict of tensors: {_SAVE_HINT}")
    return state
