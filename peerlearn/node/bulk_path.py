"""A fast, encrypted path for blob bodies: AES-GCM records over a direct TCP connection,
keyed through the blob exchange that invites it, so bound to the peers' libp2p identities.

py-libp2p moves a stream's bytes through Noise and yamux in Python, one 64 KiB message at a
time. Here the body is sealed in C (``cryptography``'s AES-GCM), 256 KiB a call, and written
with plain blocking sockets. So a large blob's body may travel beside its libp2p stream
(``blob`` decides when):

- the receiver accepts the signed offer over the libp2p stream (Noise, bound to the peer ID)
  and replies with an invitation: its bulk port, a one-time 32-byte token and a one-time
  128-bit AES-GCM key, which only that peer reads;
- the sender connects to the IP its libp2p connection reaches the receiver at, sends the
  token (so the receiver knows which offer the connection carries), then the body as sealed
  records: record ``i`` holds body bytes ``[i * RECORD, (i + 1) * RECORD)`` plus a 16-byte
  tag, its nonce is ``i`` and a flag for the last record. A record that does not
  authenticate was not sealed by the invited peer or was changed on the way: the body is
  refused. The key is used for one body only, so a nonce never repeats under it;
- the sha256 in the signed offer still checks every byte of the body.

This replaces TLS 1.3 (Python's ``ssl``), which passes every 16 KiB record through a
separate call: a bare TLS socket moved 0.76 GB/s on loopback here, records sealed 1 MiB at a
time 1.5-1.9 GB/s (256 KiB at a time as fast). Sockets are blocking and run in worker
threads, so the event loop never waits on a byte. A peer that connects to the bulk port
must present a token within ``HANDSHAKE_TIMEOUT`` seconds, at most ``MAX_HANDSHAKES`` at a
time; anything else is closed and counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from peerlearn.buffers import Body, FillingDigest, allocate, even_chunks
from peerlearn.errors import NetworkError, RemoteProtocolError, TransferTooSlowError
from peerlearn.node.framing import Pace

logger = logging.getLogger(__name__)

TOKEN_BYTES = 32
KEY_BYTES = 16  # AES-128-GCM
TAG_BYTES = 16
RECORD = 1 << 18  # body bytes per sealed record, and per socket call (as fast as 1 MiB
# records, and a quarter of the buffers: a peer of 8 averaging moves 14 bodies at once)
CONNECT_TIMEOUT = 3.0  # seconds for the TCP connect to a peer's bulk port
HANDSHAKE_TIMEOUT = 10.0  # seconds for a connection to present its token
MAX_HANDSHAKES = 64  # connections without a token yet; beyond, the longest waiting is closed
MAX_HANDSHAKES_PER_IP = 8  # the same from one address
MAX_TRANSFERS = 32  # bodies moving at once (each holds a worker thread)
CONNECT_RETRY_AFTER = 300.0  # seconds before retrying a peer whose bulk port did not answer
PACE_CHECK = 0.1  # seconds: a receiver checks its pace at least this often (and every RECORD)
_NO_LOWAT = struct.pack("I", 0xFFFFFFFF)  # Linux's default: no limit on unsent bytes
THREAD_EXIT_WAIT = 5.0  # seconds to wait for a worker whose socket was shut on cancellation

T = TypeVar("T")


@dataclass(frozen=True)
class Invitation:
    """Where and how the sender may deliver one body: the bulk port, the token that names
    the offer, and the key that seals the body."""

    port: int
    token: bytes
    key: bytes = dataclasses.field(repr=False)

    def encode(self) -> dict[str, Any]:
        return {"port": self.port, "token": self.token, "key": self.key}

    @classmethod
    def decode(cls, value: Any) -> Invitation:
        if (
            not isinstance(value, dict)
            or value.keys() != {"port", "token", "key"}
            or not isinstance(value["port"], int)
            or isinstance(value["port"], bool)
            or not 0 < value["port"] < 65536
            or not isinstance(value["token"], bytes)
            or len(value["token"]) != TOKEN_BYTES
            or not isinstance(value["key"], bytes)
            or len(value["key"]) != KEY_BYTES
        ):
            raise RemoteProtocolError("malformed bulk invitation")
        return cls(value["port"], value["token"], value["key"])


def nonce(index: int, last: bool) -> bytes:
    """The nonce of record ``index``: the index in 11 bytes, then 1 for the last record."""
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _shutdown(fd: int) -> None:
    """Shut the socket ``fd`` down for both directions: blocked calls on it return at once
    (whichever object owns the descriptor)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


def close_connection(sock: socket.socket) -> None:
    """Shut down and close ``sock``."""
    if sock.fileno() >= 0:
        _shutdown(sock.fileno())
    sock.close()


async def _in_thread(work: Callable[[], T], fd: int, limiter: trio.CapacityLimiter) -> T:
    """Run blocking ``work`` on socket ``fd`` in a worker thread. Cancellation shuts the
    socket down, which ends ``work`` at once, and waits (briefly) for the thread to end."""
    finished = threading.Event()

    def run() -> T:
        try:
            return work()
        finally:
            finished.set()

    try:
        return await trio.to_thread.run_sync(  # type: ignore[call-arg]  # mypy misreads trio
            run, abandon_on_cancel=True, limiter=limiter
        )
    except trio.Cancelled:
        _shutdown(fd)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(finished.wait, THREAD_EXIT_WAIT)
        raise


async def _blocking_socket(stream: trio.SocketStream) -> socket.socket:
    """The stdlib socket behind a trio TCP stream, in blocking mode, owned by the caller
    (no checkpoint once it exists: a cancellation cannot leave it unowned)."""
    await trio.lowlevel.checkpoint()
    trio_socket = stream.socket
    sock = socket.socket(trio_socket.family, trio_socket.type, fileno=trio_socket.detach())
    sock.setblocking(True)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):  # trio keeps 16 KiB unsent at most: for latency,
        # which costs a bulk sender a wake-up per 16 KiB (half its speed); back to no limit
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _NO_LOWAT)
    return sock


def _peer_ip(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"


def _keep_pace(pace: Pace, started: float, done: int, total: int, what: str) -> None:
    """``TransferTooSlowError`` if ``done`` bytes by now fall behind ``pace``'s rate (a
    silent peer is caught by the socket's timeout, ``pace.idle_timeout``)."""
    now = time.monotonic()
    if now >= pace.deadline(started, done, now):
        raise TransferTooSlowError(
            f"{what} after {done} of {total} bytes: {pace.why(started, done, now, now)}"
        )


class BulkPath:
    """One node's bulk path: a listener for bodies sent to us, a client for ours."""

    def __init__(self, bind_host: str, port: int = 0) -> None:
        self._listen_socket = socket.create_server((bind_host, port), backlog=64)
        self.port: int = self._listen_socket.getsockname()[1]
        self._waiting: dict[bytes, trio.MemorySendChannel[socket.socket]] = {}
        # connections without a token yet, oldest first: (their address, their vetting)
        self._vetting: OrderedDict[int, tuple[str, trio.CancelScope]] = OrderedDict()
        self._arrivals = itertools.count()
        self._threads = trio.CapacityLimiter(MAX_TRANSFERS)
        self._unreachable: dict[str, float] = {}  # peer id -> when its port did not answer
        self.refused = 0  # connections closed: no token in time, or a token nobody awaits
        self.bodies_sent = 0
        self.bodies_received = 0
        self.fallbacks = 0  # bodies we sent over the libp2p stream after the bulk path failed

    # -- receiving -------------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections to the bulk port until cancelled."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._listen_socket))
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                ip = _peer_ip(stream)
                self._make_room(ip)
                scope = trio.CancelScope(deadline=trio.current_time() + HANDSHAKE_TIMEOUT)
                arrival = next(self._arrivals)
                self._vetting[arrival] = (ip, scope)
                nursery.start_soon(self._vet, stream, arrival, scope)

    def _make_room(self, ip: str) -> None:
        """Close the longest waiting connection without a token from ``ip`` if it has
        ``MAX_HANDSHAKES_PER_IP``, and the longest waiting of all if there are
        ``MAX_HANDSHAKES``."""
        same = [a for a, (source, _) in self._vetting.items() if source == ip]
        if len(same) >= MAX_HANDSHAKES_PER_IP:
            self._vetting.pop(same[0])[1].cancel()
        if len(self._vetting) >= MAX_HANDSHAKES:
            self._vetting.popitem(last=False)[1][1].cancel()

    async def _vet(self, stream: trio.SocketStream, arrival: int, scope: trio.CancelScope) -> None:
        """Read the connection's token (never a byte more) and hand the connection to the
        transfer that awaits it."""
        token = b""
        try:
            with scope:
                while len(token) < TOKEN_BYTES:
                    part = await stream.receive_some(TOKEN_BYTES - len(token))
                    if not part:
                        break
                    token += part
        except trio.BrokenResourceError as exc:
            logger.debug("bulk connection broke before its token: %s", exc)
        finally:
            self._vetting.pop(arrival, None)
            if len(token) < TOKEN_BYTES:  # closed at once, even when we are cancelled
                stream.socket.close()
        if len(token) < TOKEN_BYTES:
            self.refused += 1
            return
        sock = await _blocking_socket(stream)
        waiter = self._waiting.pop(token, None)  # no checkpoint from here to the send
        if waiter is None:
            self.refused += 1
            close_connection(sock)
            return
        waiter.send_nowait(sock)

    def status(self) -> dict[str, int]:
        return {
            "port": self.port,
            "bodies_sent": self.bodies_sent,
            "bodies_received": self.bodies_received,
            "fallbacks_to_stream": self.fallbacks,
            "connections_refused": self.refused,
        }

    def stop_listening(self) -> None:
        """Close the bulk port (``serve`` closes it when it ends)."""
        self._listen_socket.close()

    def invite(self) -> Invitation:
        return Invitation(
            self.port, secrets.token_bytes(TOKEN_BYTES), secrets.token_bytes(KEY_BYTES)
        )

    @contextmanager
    def expecting(self, invitation: Invitation) -> Iterator[trio.MemoryReceiveChannel[Any]]:
        """Wait for the connection that presents ``invitation``'s token (a channel that
        yields it); a connection that arrives after the block is closed."""
        send, receive = trio.open_memory_channel[socket.socket](1)
        self._waiting[invitation.token] = send
        try:
            yield receive
        finally:
            self._waiting.pop(invitation.token, None)
            send.close()
            while True:
                try:
                    close_connection(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break

    async def receive_body(
        self,
        connection: trio.MemoryReceiveChannel[Any],
        invitation: Invitation,
        size: int,
        pace: Pace,
    ) -> tuple[memoryview, bytes]:
        """The ``size``-byte body from the invited connection, opened with the invitation's
        key (its receive buffer, which tensors can view without a copy), and its sha256."""
        wait = min(HANDSHAKE_TIMEOUT + pace.idle_timeout, pace.start_timeout)
        with trio.move_on_after(wait) as scope:
            sock: socket.socket = await connection.receive()
        if scope.cancelled_caught:
            raise NetworkError("the sender said it connected to the bulk port but did not")
        aead = AESGCM(invitation.key)

        def receive() -> tuple[memoryview, bytes]:
            sock.settimeout(pace.idle_timeout)
            view, sealed = allocate(size), memoryview(bytearray(RECORD + TAG_BYTES))
            done, started = 0, time.monotonic()
            checked = started
            with FillingDigest(view) as digest:  # hashed in a second thread, as it comes
                for index, start in enumerate(range(0, size, RECORD)):
                    length = min(RECORD, size - start)
                    got = 0
                    while got < length + TAG_BYTES:
                        count = sock.recv_into(sealed[got:], length + TAG_BYTES - got)
                        if not count:
                            raise NetworkError(
                                f"bulk connection ended after {done + got} of {size} bytes"
                            )
                        got += count
                        now = time.monotonic()
                        if now - checked >= PACE_CHECK:
                            checked = now
                            _keep_pace(pace, started, done + got, size, "bulk body")
                    last = start + length == size
                    try:
                        aead.decrypt_into(
                            nonce(index, last),
                            sealed[: length + TAG_BYTES],
                            None,
                            view[start : start + length],
                        )
                    except InvalidTag:
                        raise NetworkError(
                            f"bulk record {index} did not authenticate: changed on the way,"
                            " or not sealed with the key this node gave the sender"
                        ) from None
                    done = start + length
                    digest.filled(done)
                    _keep_pace(pace, started, done, size, "bulk body")
                return view, digest.digest()

        try:
            data, digest = await _in_thread(receive, sock.fileno(), self._threads)
        except TimeoutError as exc:
            raise TransferTooSlowError(f"bulk body: no data for {pace.idle_timeout:.0f} s") from exc
        except OSError as exc:
            raise NetworkError(f"bulk connection failed: {exc}") from exc
        finally:
            close_connection(sock)
        self.bodies_received += 1
        return data, digest

    # -- sending ---------------------------------------------------------------------------

    def reachable(self, peer_id: str, now: float) -> bool:
        """Whether to try ``peer_id``'s bulk port (not if it failed in the last while)."""
        failed = self._unreachable.get(peer_id)
        if failed is not None and now - failed < CONNECT_RETRY_AFTER:
            return False
        self._unreachable = {
            p: t for p, t in self._unreachable.items() if now - t < CONNECT_RETRY_AFTER
        }
        return True

    async def connect(
        self, peer_id: str, ip: str, invitation: Invitation, now: float
    ) -> socket.socket | None:
        """A connection to the invited port that has presented the token; None (and the
        peer remembered as unreachable for a while) if the port does not answer."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(ip, invitation.port)
                await stream.send_all(invitation.token)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            logger.info(
                "bulk port %s:%d of %s did not answer (%s)", ip, invitation.port, peer_id, exc
            )
            self._unreachable[peer_id] = now
            return None
        try:
            return await _blocking_socket(stream)
        except BaseException:
            stream.socket.close()
            raise

    async def send_body(
        self, sock: socket.socket, invitation: Invitation, data: Body, pace: Pace
    ) -> None:
        """Write ``data`` sealed with the invitation's key; ``TransferTooSlowError`` if the
        peer stops reading. The caller closes the connection once the peer has judged the
        blob."""
        aead, size = AESGCM(invitation.key), len(data)

        def send() -> None:
            sock.settimeout(pace.idle_timeout)
            sealed = memoryview(bytearray(RECORD + TAG_BYTES))
            started, done = time.monotonic(), 0
            for index, record in enumerate(even_chunks(data, RECORD)):
                done += len(record)
                out = sealed[: len(record) + TAG_BYTES]
                aead.encrypt_into(nonce(index, done == size), record, None, out)
                sock.sendall(out)
                _keep_pace(pace, started, done, size, "peer reading the bulk body")

        try:
            await _in_thread(send, sock.fileno(), self._threads)
        except TimeoutError as exc:
            raise TransferTooSlowError(
                f"peer stopped reading the bulk body for {pace.idle_timeout:.0f} s"
            ) from exc
        except OSError as exc:
            raise NetworkError(f"bulk connection failed: {exc}") from exc
        self.bodies_sent += 1
