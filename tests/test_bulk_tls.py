"""The TLS bulk path for blob bodies, between real libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import pytest
import trio

from peerlearn.errors import NetworkError, Offence, RemoteProtocolError, TransferTooSlowError
from peerlearn.identity import Identity
from peerlearn.node import blob, bulk_tls
from peerlearn.node.bulk_tls import BulkPath
from peerlearn.node.framing import Pace
from peerlearn.node.host import P2PHost, open_host
from tests.memory_host import RecordingGate

pytestmark = pytest.mark.integration
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
TEST_TIMEOUT = 60  # seconds per test
BIG = 3 << 20  # bytes: invited onto the bulk path


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


def test_a_large_blob_travels_over_tls_and_small_ones_over_the_stream() -> None:
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
        assert (a_bulk.bodies_sent, b_bulk.bodies_received) == (1, 1)  # it came over TLS

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


def test_a_bulk_port_with_another_certificate_gets_nothing() -> None:
    async def main() -> None:
        received: list[bytes] = []
        async with two_peers(received) as (a, b, a_bulk, b_bulk):
            b_bulk.cert_sha256 = bytes(32)  # invites with a pin its port does not match
            with pytest.raises(NetworkError, match="certificate is not the one"):
                await push(a, b, a_bulk, os.urandom(BIG))
        assert received == []
        assert a_bulk.bodies_sent == 0

    run(main)


def _tls_to(port: int) -> ssl.SSLSocket:
    """A TLS connection to a bulk port on 127.0.0.1, as any peer could open (no pin)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))


def _tls_client(port: int, first: bytes) -> None:
    """Connect to a bulk port over TLS, send ``first`` and wait for the port to close."""
    with _tls_to(port) as tls:
        tls.sendall(first)
        with suppress(ssl.SSLError, ConnectionError):
            assert tls.recv(1) == b""


def _plain_client(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with suppress(ConnectionError):
            raw.recv(1)


def test_the_bulk_port_closes_connections_without_an_awaited_token() -> None:
    async def main() -> None:
        bulk = BulkPath("127.0.0.1")
        async with trio.open_nursery() as nursery:
            await nursery.start(bulk.serve)
            await trio.to_thread.run_sync(_tls_client, bulk.port, os.urandom(32))
            await trio.to_thread.run_sync(_plain_client, bulk.port)
            with trio.fail_after(10):
                while bulk.refused < 2:  # noqa: ASYNC110 (a counter, not an event)
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_sender_that_stalls_on_the_bulk_path_is_cut_off_in_seconds() -> None:
    async def main() -> None:
        bulk = BulkPath("127.0.0.1")
        invitation = bulk.invite()
        pace = Pace(idle_timeout=1.0, min_rate=1.0, grace=10.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(bulk.serve)
            with bulk.expecting(invitation) as connection:
                stalled = trio.Event()

                def stalling_sender() -> None:  # token, half the body, then silence
                    with _tls_to(bulk.port) as tls:
                        tls.sendall(invitation.token + bytes(1000))
                        trio.from_thread.run_sync(stalled.set)
                        tls.recv(1)  # until the receiver gives up

                nursery.start_soon(trio.to_thread.run_sync, stalling_sender)
                started = trio.current_time()
                with pytest.raises(TransferTooSlowError, match="no data for 1 s"):
                    await bulk.receive_body(connection, 2000, pace)
                assert stalled.is_set()
                assert trio.current_time() - started < 5
            nursery.cancel_scope.cancel()

    run(main)


def test_a_sender_that_trickles_on_the_bulk_path_is_cut_off_by_the_rate() -> None:
    async def main() -> None:
        bulk = BulkPath("127.0.0.1")
        invitation = bulk.invite()
        pace = Pace(idle_timeout=5.0, min_rate=100_000.0, grace=0.5)
        async with trio.open_nursery() as nursery:
            await nursery.start(bulk.serve)
            with bulk.expecting(invitation) as connection:
                gave_up = trio.Event()

                def trickling_sender() -> None:  # token, then a byte every 0.1 s
                    with _tls_to(bulk.port) as tls, suppress(OSError):
                        tls.sendall(invitation.token)
                        while not trio.from_thread.run_sync(gave_up.is_set):
                            tls.sendall(b"x")
                            time.sleep(0.1)

                nursery.start_soon(trio.to_thread.run_sync, trickling_sender)
                started = trio.current_time()
                with pytest.raises(TransferTooSlowError, match="below the minimum"):
                    await bulk.receive_body(connection, 10_000, pace)
                gave_up.set()
                assert trio.current_time() - started < 3
            nursery.cancel_scope.cancel()

    run(main)


def test_invitations_decode_only_when_well_formed() -> None:
    bulk = BulkPath("127.0.0.1")
    bulk.stop_listening()
    good = bulk.invite()
    assert bulk_tls.Invitation.decode(good.encode()) == good
    for bad in (
        {**good.encode(), "port": 0},
        {**good.encode(), "port": True},
        {**good.encode(), "cert": b"x"},
        {**good.encode(), "token": "t" * 32},
        {"port": 1},
        [1, 2, 3],
    ):
        with pytest.raises(RemoteProtocolError):
            bulk_tls.Invitation.decode(bad)
