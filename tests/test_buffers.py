"""Buffers for model-sized data: copies, and the digest hashed while a buffer fills."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.buffers import (
    FillingDigest,
    Segments,
    allocate,
    even_chunks,
    gather,
    gather_and_digest,
)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the digest thread did not get there"
        time.sleep(0.0005)


def digest_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "peerlearn-digest"]


@settings(max_examples=60, deadline=None)
@given(
    final=st.binary(max_size=5000),
    step=st.integers(1, 700),
    cuts=st.lists(st.integers(0, 5000), max_size=12),
)
def test_the_digest_covers_the_final_bytes_however_the_buffer_fills(
    final: bytes, step: int, cuts: list[int]
) -> None:
    size = len(final)
    buffer = allocate(size)
    buffer[:] = b"\xff" * size  # not yet final: hashing any of it would change the digest
    with FillingDigest(buffer, step) as digest:
        done = 0
        for end in [*sorted({cut for cut in cuts if cut < size}), size]:
            buffer[done:end] = final[done:end]
            # the thread hashes all that is filled once a step has come, and nothing more
            expected = end if end - digest.hashed >= step else digest.hashed
            digest.filled(end)
            wait_for(lambda expected=expected: digest.hashed >= expected)
            assert digest.hashed == expected
            done = end
        assert digest.digest() == hashlib.sha256(final).digest()
    assert not digest_threads()


def test_asking_for_the_digest_of_a_buffer_not_yet_filled_is_our_error() -> None:
    buffer = allocate(3 << 20)
    with FillingDigest(buffer) as digest:
        digest.filled(2 << 20)
        with pytest.raises(RuntimeError, match=f"{2 << 20} of {3 << 20} bytes"):
            digest.digest()
    assert not digest_threads()


def test_leaving_early_stops_the_hashing_thread() -> None:
    buffer = allocate(8 << 20)

    def receive() -> None:
        with FillingDigest(buffer) as digest:
            digest.filled(1 << 20)
            raise ConnectionError("the sender went away")

    with pytest.raises(ConnectionError):
        receive()
    assert not digest_threads()


def test_gathered_segments_are_one_copy_with_its_digest() -> None:
    parts = [b"header", os.urandom(3 << 20), b"", bytearray(os.urandom(12345))]
    joined = b"".join(parts)
    copy = gather(Segments(parts))
    assert copy.tobytes() == joined
    assert not copy.readonly
    copy, digest = gather_and_digest(Segments(parts))
    assert copy.tobytes() == joined
    assert digest == hashlib.sha256(joined).digest()
    assert gather_and_digest(b"") == (memoryview(b""), hashlib.sha256(b"").digest())


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8),
    size=st.integers(min_value=1, max_value=16),
)
def test_even_chunks_cut_a_body_at_fixed_offsets_wherever_its_segments_end(
    lengths: list[int], size: int
) -> None:
    parts = [os.urandom(n) for n in lengths]
    pieces = [bytes(chunk) for chunk in even_chunks(Segments(parts), size)]
    assert b"".join(pieces) == b"".join(parts)
    assert all(len(piece) == size for piece in pieces[:-1])
    assert len(pieces) == -(-sum(lengths) // size)
