from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import mmap
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from peerlearn.buffers import MAP_MIN_SIZE
from peerlearn.errors import LocalProtocolError, RemoteProtocolError
from peerlearn.learning.hygiene import check_layout
from peerlearn.tensors import (
    load_state_dict_file,
    state_dict_and_metadata,
    state_dict_from_bytes,
    state_dict_to_bytes,
    state_dict_to_bytes_and_digest,
)


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
    assert set(decoded) == set(state)
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_float_dtype_round_trips(dtype: torch.dtype) -> None:
    state = {"w": torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).to(dtype)}
    decoded = state_dict_from_bytes(state_dict_to_bytes(state), max_size=2**20)
    assert decoded["w"].dtype == dtype
    assert torch.equal(decoded["w"], state["w"])


def test_the_payload_is_a_plain_safetensors_file(tmp_path: Path) -> None:
    state = small_model().state_dict()
    path = tmp_path / "model.safetensors"
    path.write_bytes(state_dict_to_bytes(state))
    loaded = safetensors.torch.load_file(str(path))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


def test_tied_weights_are_written_once_each() -> None:
    shared = torch.ones(4)
    decoded = state_dict_from_bytes(state_dict_to_bytes({"a": shared, "b": shared}), 2**20)
    assert torch.equal(decoded["a"], decoded["b"])


def _with_header(header: dict[str, object], body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # padded as safetensors pads it, so the data is aligned
    return len(raw).to_bytes(8, "little") + raw + body


def test_header_checks_and_size_limit() -> None:
    with pytest.raises(RemoteProtocolError, match="dtype"):
        state_dict_from_bytes(
            _with_header({"w": {"dtype": "F8_E5M2", "shape": [1], "data_offsets": [0, 1]}}, b"x"),
            max_size=1000,
        )
    with pytest.raises(RemoteProtocolError, match="header"):
        state_dict_from_bytes((10**9).to_bytes(8, "little") + b"{}", max_size=1000)
    with pytest.raises(RemoteProtocolError, match="4 bytes for shape"):
        state_dict_from_bytes(
            _with_header(
                {"w": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 4]}}, b"abcd"
            ),
            max_size=1000,
        )
    with pytest.raises(LocalProtocolError, match="name"):
        state_dict_to_bytes({"": torch.zeros(1)})
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        state_dict_from_bytes(state_dict_to_bytes(small_model().state_dict()), max_size=100)


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_remote_protocol_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        state_dict_from_bytes(data, max_size=10_000)


def test_share_files_safetensors_and_state_dicts_load_modules_are_refused(tmp_path: Path) -> None:
    state = small_model().state_dict()
    (tmp_path / "m.safetensors").write_bytes(state_dict_to_bytes(state))
    torch.save(state, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        loaded = load_state_dict_file(tmp_path / name)
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save(small_model(), tmp_path / "module.pt")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad.safetensors").write_text("hello")
    for name, words in [
        ("module.pt", "pickled objects"),
        ("notes.txt", "not a torch state_dict"),
        ("bad.safetensors", "not a valid .safetensors"),
    ]:
        with pytest.raises(LocalProtocolError, match=words) as info:
            load_state_dict_file(tmp_path / name)
        assert "\n" not in str(info.value)


def f32(offsets: list[int], shape: list[int] | None = None) -> dict[str, object]:
    return {"dtype": "F32", "shape": shape or [(offsets[1] - offsets[0]) // 4],
            "data_offsets": offsets}  # fmt: skip


@pytest.mark.parametrize(
    ("header", "body", "error"),
    [
        ({"a": f32([0, 8]), "b": f32([4, 12])}, 12, "overlap or leave a gap"),
        ({"a": f32([0, 4]), "b": f32([8, 12])}, 12, "overlap or leave a gap"),
        ({"a": f32([0, 4])}, 8, "4 bytes after the last tensor"),
        ({"a": f32([0, 4], [-1])}, 4, "invalid shape"),
        ({"a": f32([0, 0], [0, 2**70])}, 0, "invalid shape"),
        ({"a": f32([0, 8])}, 4, "invalid byte range"),
        (
            {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "b": f32([1, 5])},
            5,
            "not aligned",
        ),
    ],
)
def test_byte_ranges_must_tile_the_data_exactly(
    header: dict[str, object], body: int, error: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=error):
        state_dict_from_bytes(_with_header(header, bytes(body)), max_size=1000)


def test_tensors_view_a_received_bytearray_and_copy_read_only_bytes() -> None:
    encoded = state_dict_to_bytes({"w": torch.arange(6.0).reshape(2, 3), "e": torch.zeros(0)})
    buffer = bytearray(encoded)
    viewed = state_dict_from_bytes(buffer, 2**20)
    assert torch.equal(viewed["w"], torch.arange(6.0).reshape(2, 3))
    assert viewed["e"].shape == (0,)
    buffer[-4:] = bytes(4)  # the last float of w, in place: no copy was made
    assert float(viewed["w"][1, 2]) == 0.0
    copied = state_dict_from_bytes(encoded, 2**20)  # bytes are read-only: one copy, writable
    copied["w"].add_(1)
    assert float(copied["w"][0, 0]) == 1.0


def test_encoding_writes_the_safetensors_librarys_bytes() -> None:
    generator = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(3, 5, generator=generator),
        "transposed": torch.randn(4, 3, generator=generator).t(),
        "half": torch.randn(7, generator=generator).half(),
        "bf": torch.ones(5, dtype=torch.bfloat16),
        "double": torch.ones(2, dtype=torch.float64),
        "steps": torch.arange(3),
        "i32": torch.ones(3, dtype=torch.int32),
        "i16": torch.ones(3, dtype=torch.int16),
        "i8": torch.ones(3, dtype=torch.int8),
        "u8": torch.ones(3, dtype=torch.uint8),
        "flag": torch.tensor(True),
        "empty": torch.zeros(0, 4),
    }
    encoded = state_dict_to_bytes(state)
    expected = safetensors.torch.save({k: v.contiguous() for k, v in state.items()})
    assert bytes(encoded) == expected
    decoded = state_dict_from_bytes(encoded, 2**20)
    assert all(torch.equal(decoded[name], tensor) for name, tensor in state.items())
    encoded, digest = state_dict_to_bytes_and_digest(state)
    assert (bytes(encoded), digest) == (expected, hashlib.sha256(expected).digest())


def test_metadata_travels_in_the_header_as_the_safetensors_library_writes_it() -> None:
    state = {"w": torch.ones(2, 3), "steps": torch.arange(2)}
    encoded = state_dict_to_bytes(state, {"note": "hi"})
    assert bytes(encoded) == safetensors.torch.save(state, metadata={"note": "hi"})
    decoded, metadata = state_dict_and_metadata(encoded, 2**20)
    assert metadata == {"note": "hi"}
    assert torch.equal(decoded["w"], state["w"])
    assert state_dict_and_metadata(state_dict_to_bytes(state), 2**20)[1] == {}
    with pytest.raises(LocalProtocolError, match="strings to strings"):
        state_dict_to_bytes(state, {"n": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize("metadata", [[], "x", {"n": 1}, {"n": ["x"]}])
def test_metadata_that_is_not_a_map_of_strings_is_a_remote_error(metadata: object) -> None:
    header = json.dumps({"__metadata__": metadata}).encode()
    with pytest.raises(RemoteProtocolError, match="metadata"):
        state_dict_and_metadata(struct.pack("<Q", len(header)) + header, 2**20)


def test_encoding_refuses_a_dtype_safetensors_cannot_hold() -> None:
    with pytest.raises(LocalProtocolError, match="unsupported dtype"):
        state_dict_to_bytes({"z": torch.zeros(2, dtype=torch.complex64)})


def test_a_large_encoding_is_a_memory_map_that_its_decoded_tensors_keep_alive() -> None:
    count = MAP_MIN_SIZE // 4
    encoded = state_dict_to_bytes({"w": torch.ones(count)})
    assert isinstance(encoded.obj, mmap.mmap)  # its pages go back to the kernel when freed
    assert isinstance(state_dict_to_bytes({"w": torch.ones(4)}).obj, bytearray)
    decoded = state_dict_from_bytes(encoded, 2**24)  # views the map: nothing copied
    decoded["w"][-1] = 5.0
    assert bytes(encoded[-4:]) == struct.pack("<f", 5.0)
    del encoded
    gc.collect()
    assert float(decoded["w"].sum()) == count + 4.0
