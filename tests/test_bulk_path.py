"""The sealed bulk path for blob bodies, between real libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import pytest
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from peerlearn.errors import NetworkError, Offence, RemoteProtocolError, TransferTooSlowError
from peerlearn.identity import Identity
from peerlearn.node import blob, bulk_path
from peerlearn.node.bulk_path import BulkPath, Invitation
from peerlearn.node.framing import Pace
from peerlearn.node.host import P2PHost, open_host
from tests.memory_host import RecordingGate

pytestmark = pytest.mark.integration
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
TEST_TIMEOUT = 60  # seconds per test
BIG = (3 << 20) + 4321  # bytes: invited onto the bulk path; the last record is short


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with trio.fail_after(TEST_TIMEOUT):
            await test()

    trio.run(bounded)


@asynccontextmanager
async def two_peers(
    received: list[bytes], *, serve_bulk: bool = True
) -> AsyncIterator[tuple[P2PHost, P2PHost, BulkPath, BulkPath]]:
    """Sender a and receiver b, connected, b taking every blob, each with a bulk path
    (b's listening unless ``serve_bulk`` is false)."""

    async def accept(item: blob.ReceivedBlob) -> None:
        received.append(item.data)

    async with (
        open_host(Identity.generate(), LOOPBACK) as a,
        open_host(Identity.generate(), LOOPBACK) as b,
        trio.open_nursery() as nursery,
    ):
        a_bulk, b_bulk = BulkPath("127.0.0.1"), BulkPath("127.0.0.1")
        a_bulk.stop_listening()  # a only sends
        if serve_bulk:
            await nursery.start(b_bulk.serve)
        else:
            b_bulk.stop_listening()
        blob.serve_every_blob(b, 2**26, accept, bulk=b_bulk)
        await a.connect(b.addrs()[0])
        yield a, b, a_bulk, b_bulk
        nursery.cancel_scope.cancel()


async def push(a: P2PHost, b: P2PHost, bulk: BulkPath, data: bytes, seq: int = 0) -> None:
    await blob.push_blob(
        lambda: a.open_stream(b.peer_id, blob.PROTOCOL),
        a.identity,
        seq,
        data,
        kind="model_update",
        meta={},
        bulk=bulk,
    )


def test_a_large_blob_travels_over_the_bulk_path_and_small_ones_over_the_stream() -> None:
    big, small = os.urandom(BIG), os.urandom(4096)

    async def main() -> None:
        received: list[bytes] = []
        async with two_peers(received) as (a, b, a_bulk, b_bulk):
            await push(a, b, a_bulk, big, seq=0)
            await push(a, b, a_bulk, small, seq=1)
        assert received == [big, small]
        assert (a_bulk.bodies_sent, b_bulk.bodies_received) == (1, 1)
        assert b_bulk.refused == 0

    run(main)


def test_a_body_that_is_not_the_signed_digest_is_refused_as_forged() -> None:
    big, other = os.urandom(BIG), os.urandom(BIG)

    async def main() -> None:
        received: list[bytes] = []
        async with two_peers(received) as (a, b, a_bulk, b_bulk):
            offences = RecordingGate()
            b.gate = offences
            with pytest.raises(blob.BlobRejected, match="does not match the offer"):
                await blob.push_blob(
                    lambda: a.open_stream(b.peer_id, blob.PROTOCOL),
                    a.identity,
                    0,
                    big,
                    kind="model_update",
                    meta={},
                    bulk=a_bulk,
                    sha256=hashlib.sha256(other).digest(),
                )
            await offences.got(a.peer_id, Offence.FORGED, "does not match the offer")
        assert received == []
        assert (a_bulk.bodies_sent, b_bulk.bodies_received) == (1, 1)  # it came over the bulk path

    run(main)


def test_a_bulk_port_that_does_not_answer_falls_back_to_the_stream() -> None:
    big = os.urandom(BIG)

    async def main() -> None:
        received: list[bytes] = []
        async with two_peers(received, serve_bulk=False) as (a, b, a_bulk, b_bulk):
            await push(a, b, a_bulk, big, seq=0)
            await push(a, b, a_bulk, big, seq=1)  # not tried again for a while
        assert received == [big, big]
        assert (a_bulk.fallbacks, a_bulk.bodies_sent, b_bulk.bodies_received) == (1, 0, 0)

    run(main)


BODY = os.urandom(2 * bulk_path.RECORD + 500)  # three records


def sealed(
    key: bytes, body: bytes, order: list[int] | None = None, *, mark_last: bool = True
) -> bytes:
    """``body`` as the bulk path's records under ``key``, sent in ``order`` if given."""
    aead, size = AESGCM(key), bulk_path.RECORD
    records = [
        aead.encrypt(
            bulk_path.nonce(i, mark_last and start + size >= len(body)),
            body[start : start + size],
            None,
        )
        for i, start in enumerate(range(0, len(body), size))
    ]
    return b"".join(records[i] for i in (order if order is not None else range(len(records))))


PATIENT = Pace(idle_timeout=5.0, min_rate=1.0, grace=10.0)


async def receive_raw(
    payload: Callable[[Invitation], bytes],
    size: int,
    pace: Pace = PATIENT,
    *,
    then: Callable[[socket.socket], None] = lambda raw: None,
) -> tuple[memoryview, bytes]:
    """What an invited bulk port makes of a ``size``-byte body from a connection that sends
    ``payload(invitation)``, then does ``then`` and waits."""
    bulk = BulkPath("127.0.0.1")
    invitation = bulk.invite()
    error: NetworkError | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(bulk.serve)
        with bulk.expecting(invitation) as connection:

            def sender() -> None:
                with (
                    socket.create_connection(("127.0.0.1", bulk.port), timeout=10) as raw,
                    suppress(OSError),
                ):
                    raw.sendall(payload(invitation))
                    then(raw)
                    raw.recv(1)  # until the receiver is done

            nursery.start_soon(trio.to_thread.run_sync, sender)
            try:
                received = await bulk.receive_body(connection, invitation, size, pace)
            except NetworkError as exc:
                error = exc  # raised outside the nursery, which would wrap it in a group
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return received


def test_a_body_sealed_in_records_under_the_invitations_key_is_received_with_its_digest() -> None:
    body = os.urandom(bulk_path.RECORD + 12345)

    async def main() -> None:
        data, digest = await receive_raw(lambda inv: inv.token + sealed(inv.key, body), len(body))
        assert bytes(data) == body
        assert digest == hashlib.sha256(body).digest()

    run(main)


@pytest.mark.parametrize(
    ("case", "payload"),
    [
        ("another key", lambda inv: inv.token + sealed(bytes(16), BODY)),
        ("records swapped", lambda inv: inv.token + sealed(inv.key, BODY, order=[1, 0, 2])),
        ("last record not marked", lambda inv: inv.token + sealed(inv.key, BODY, mark_last=False)),
        ("a flipped bit", lambda inv: inv.token + _flip(sealed(inv.key, BODY), 1500)),
        ("plain bytes", lambda inv: inv.token + BODY + bytes(3 * bulk_path.TAG_BYTES)),
    ],
)
def test_a_body_not_sealed_by_the_invited_sender_is_refused(
    case: str, payload: Callable[[Invitation], bytes]
) -> None:
    async def main() -> None:
        with pytest.raises(NetworkError, match="did not authenticate"):
            await receive_raw(payload, len(BODY))

    run(main)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def _plain_client(port: int, first: bytes) -> None:
    """Connect to a bulk port, send ``first``, end our side and wait for the port to close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(first)
        raw.shutdown(socket.SHUT_WR)
        with suppress(ConnectionError):
            assert raw.recv(1) == b""


def test_the_bulk_port_closes_connections_without_an_awaited_token() -> None:
    async def main() -> None:
        bulk = BulkPath("127.0.0.1")
        async with trio.open_nursery() as nursery:
            await nursery.start(bulk.serve)
            await trio.to_thread.run_sync(_plain_client, bulk.port, os.urandom(32))
            await trio.to_thread.run_sync(_plain_client, bulk.port, b"GET / HTTP/1.1\r\n\r\n")
            with trio.fail_after(10):
                while bulk.refused < 2:  # noqa: ASYNC110 (a counter, not an event)
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_sender_that_stalls_on_the_bulk_path_is_cut_off_in_seconds() -> None:
    async def main() -> None:
        pace = Pace(idle_timeout=1.0, min_rate=1.0, grace=10.0)
        started = trio.current_time()
        with pytest.raises(TransferTooSlowError, match="no data for 1 s"):
            # the token and part of the first record, then silence
            await receive_raw(lambda inv: inv.token + bytes(1000), 2000, pace)
        assert trio.current_time() - started < 5

    run(main)


def test_a_sender_that_trickles_on_the_bulk_path_is_cut_off_by_the_rate() -> None:
    def trickle(raw: socket.socket) -> None:  # a byte every 0.1 s, until cut off
        for _ in range(100):
            raw.sendall(b"x")
            time.sleep(0.1)

    async def main() -> None:
        pace = Pace(idle_timeout=5.0, min_rate=100_000.0, grace=0.5)
        started = trio.current_time()
        with pytest.raises(TransferTooSlowError, match="below the minimum"):
            await receive_raw(lambda inv: inv.token, 10_000, pace, then=trickle)
        assert trio.current_time() - started < 3

    run(main)


def test_invitations_decode_only_when_well_formed() -> None:
    bulk = BulkPath("127.0.0.1")
    bulk.stop_listening()
    good = bulk.invite()
    assert bulk_path.Invitation.decode(good.encode()) == good
    for bad in (
        {**good.encode(), "port": 0},
        {**good.encode(), "port": True},
        {**good.encode(), "key": b"x"},
        {**good.encode(), "key": bytes(32)},
        {"port": 1, "token": bytes(32), "cert": bytes(32)},
        {**good.encode(), "token": "t" * 32},
        {"port": 1},
        [1, 2, 3],
    ):
        with pytest.raises(RemoteProtocolError):
            bulk_path.Invitation.decode(bad)
