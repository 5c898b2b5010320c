"""torch state_dicts <-> wire bytes (raw little-endian tensors with dtype and shape)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from peerlearn import wire
from peerlearn.errors import LocalProtocolError, RemoteProtocolError

StateDict = dict[str, torch.Tensor]
MAX_TENSORS = 10_000  # per state_dict
MAX_NAME_LENGTH = 256  # characters


def state_dict_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Encode a state_dict as msgpack ``[[name, tensor], ...]`` in iteration order."""
    if len(state) > MAX_TENSORS:
        raise LocalProtocolError(f"state_dict has {len(state)} tensors (limit {MAX_TENSORS})")
    entries = []
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            raise LocalProtocolError(f"{name}: bfloat16 cannot be sent; convert to float32")
        entries.append([name, wire.encode_array(tensor.detach().cpu().contiguous().numpy())])
    return wire.pack(entries)


def state_dict_from_bytes(data: bytes, max_size: int) -> StateDict:
    """Decode and validate; every failure is a ``RemoteProtocolError``."""
    limits = wire.Limits(max_message_size=max_size, max_array_len=MAX_TENSORS)
    entries = wire.expect(wire.unpack(data, limits), list, "state_dict")
    state: StateDict = {}
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2:
            raise RemoteProtocolError("state_dict entries must be [name, tensor] pairs")
        name = wire.expect(entry[0], str, "tensor name")
        if not name or len(name) > MAX_NAME_LENGTH or name in state:
            raise RemoteProtocolError(f"invalid or duplicate tensor name {name[:40]!r}")
        array = wire.decode_array(entry[1], limits)
        state[name] = torch.from_numpy(np.array(array, copy=True))
    return state
