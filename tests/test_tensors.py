from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peerlearn import wire
from peerlearn.errors import LocalProtocolError, RemoteProtocolError
from peerlearn.learning.hygiene import check_layout
from peerlearn.tensors import state_dict_from_bytes, state_dict_to_bytes


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 10),
    )


def test_state_dict_round_trip_is_bit_identical() -> None:
    state = small_model().state_dict()
    decoded = state_dict_from_bytes(state_dict_to_bytes(state), max_size=2**24)
    assert list(decoded) == list(state)
    for name, tensor in state.items():
        assert decoded[name].dtype == tensor.dtype
        assert decoded[name].shape == tensor.shape
        assert decoded[name].numpy().tobytes() == tensor.numpy().tobytes()
    check_layout(decoded, state)
    small_model().load_state_dict(decoded)


def test_incompatible_layout_is_a_remote_error() -> None:
    state = small_model().state_dict()
    other = dict(state)
    other["3.weight"] = torch.zeros(3, 3)
    with pytest.raises(RemoteProtocolError, match=r"3\.weight"):
        check_layout(other, state)


def test_bfloat16_is_refused_locally() -> None:
    with pytest.raises(LocalProtocolError, match="bfloat16"):
        state_dict_to_bytes({"w": torch.zeros(2, dtype=torch.bfloat16)})


def test_duplicate_names_and_size_limit() -> None:
    entry = ["w", wire.encode_array(torch.zeros(2).numpy())]
    with pytest.raises(RemoteProtocolError, match="duplicate"):
        state_dict_from_bytes(wire.pack([entry, entry]), max_size=1000)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        state_dict_from_bytes(state_dict_to_bytes(small_model().state_dict()), max_size=100)


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_remote_protocol_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        state_dict_from_bytes(data, max_size=10_000)
