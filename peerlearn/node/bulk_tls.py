"""A fast, encrypted path for blob bodies: TLS 1.3 over a direct TCP connection, bound to the
peers' libp2p identities by the blob exchange that invites it.

py-libp2p moves a stream's bytes through Noise and yamux in Python, one 64 KiB message at a
time; Python's ssl module encrypts whole buffers in C. So a large blob's body may travel
beside its libp2p stream (``blob`` decides when):

- the receiver accepts the signed offer over the libp2p stream (Noise, bound to the peer ID)
  and replies with an invitation: its bulk port, the sha256 of its TLS certificate and a
  one-time 32-byte token;
- the sender connects to the IP its libp2p connection reaches the receiver at, completes
  TLS 1.3 and checks the certificate against that sha256, so it talks to the peer it
  offered to; it then sends the token, which only that sender has seen, so the receiver
  knows who is on the other end; then the body;
- the sha256 in the signed offer still checks every byte of the body.

The certificate is self-signed and made fresh at every start: it means nothing beyond its
pin. Sockets are blocking and run in worker threads, so the event loop never waits on a
byte (trio's ``SSLStream`` would pass every 16 KiB TLS record through Python). A peer that
connects to the bulk port must complete TLS and present a token within
``HANDSHAKE_TIMEOUT`` seconds, at most ``MAX_HANDSHAKES`` at a time; anything else is
closed and counted.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import secrets
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from peerlearn.buffers import Body, FillingDigest, allocate, chunks
from peerlearn.errors import NetworkError, Offence, RemoteProtocolError, TransferTooSlowError
from peerlearn.node.framing import Pace

logger = logging.getLogger(__name__)

TOKEN_BYTES = 32
CONNECT_TIMEOUT = 3.0  # seconds for the TCP connect to a peer's bulk port
HANDSHAKE_TIMEOUT = 10.0  # seconds for the TLS handshake + token
MAX_HANDSHAKES = 8  # connections to the bulk port being vetted at once
MAX_TRANSFERS = 32  # bodies moving at once (each holds a worker thread)
CONNECT_RETRY_AFTER = 300.0  # seconds before retrying a peer whose bulk port did not answer
IO_SIZE = 1 << 20  # bytes per socket call
PACE_CHECK = 0.1  # seconds: a receiver checks its pace at least this often (and every IO_SIZE)
_NO_LOWAT = struct.pack("I", 0xFFFFFFFF)  # Linux's default: no limit on unsent bytes
THREAD_EXIT_WAIT = 5.0  # seconds to wait for a worker whose socket was shut on cancellation

T = TypeVar("T")


@dataclass(frozen=True)
class Invitation:
    """Where and how the sender may deliver one body over TLS."""

    port: int
    cert_sha256: bytes
    token: bytes

    def encode(self) -> dict[str, Any]:
        return {"port": self.port, "cert": self.cert_sha256, "token": self.token}

    @classmethod
    def decode(cls, value: Any) -> Invitation:
        if (
            not isinstance(value, dict)
            or value.keys() != {"port", "cert", "token"}
            or not isinstance(value["port"], int)
            or isinstance(value["port"], bool)
            or not 0 < value["port"] < 65536
            or not isinstance(value["cert"], bytes)
            or len(value["cert"]) != 32
            or not isinstance(value["token"], bytes)
            or len(value["token"]) != TOKEN_BYTES
        ):
            raise RemoteProtocolError("malformed bulk invitation")
        return cls(value["port"], value["cert"], value["token"])


def self_signed_server_context() -> tuple[ssl.SSLContext, bytes]:
    """A TLS 1.3 server context with a fresh P-256 key and certificate, and the sha256 of
    the certificate (DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peerlearn bulk")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.num_tickets = 0  # no session resumption: nothing for the sender to read
    with tempfile.TemporaryDirectory() as folder:  # ssl loads keys from files only
        cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        context.load_cert_chain(cert_path, key_path)
    return context, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def pinned_client_context() -> ssl.SSLContext:
    """TLS 1.3; the server's certificate is checked against its pin, not a CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _shutdown(fd: int) -> None:
    """Shut the socket ``fd`` down for both directions: blocked calls on it return at once
    (whichever object, plain or TLS, owns the descriptor)."""
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
    """The stdlib socket behind a trio TCP stream, in blocking mode, owned by the caller."""
    trio_socket = stream.socket
    sock = socket.socket(trio_socket.family, trio_socket.type, fileno=trio_socket.detach())
    sock.setblocking(True)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):  # trio keeps 16 KiB unsent at most: for latency,
        # which costs a bulk sender a wake-up per 16 KiB (half its speed); back to no limit
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _NO_LOWAT)
    await trio.lowlevel.checkpoint()
    return sock


def _keep_pace(pace: Pace, started: float, done: int, total: int, what: str) -> None:
    """``TransferTooSlowError`` if ``done`` bytes by now fall behind ``pace``'s rate (a
    silent peer is caught by the socket's timeout, ``pace.idle_timeout``)."""
    now = time.monotonic()
    if now >= pace.deadline(started, done, now):
        raise TransferTooSlowError(
            f"{what} after {done} of {total} bytes: {pace.why(started, done, now, now)}"
        )


class BulkPath:
    """One node's TLS bulk path: a listener for bodies sent to us, a client for ours."""

    def __init__(self, bind_host: str, port: int = 0) -> None:
        self._server_context, self.cert_sha256 = self_signed_server_context()
        self._client_context = pinned_client_context()
        self._listen_socket = socket.create_server((bind_host, port), backlog=64)
        self.port: int = self._listen_socket.getsockname()[1]
        self._waiting: dict[bytes, trio.MemorySendChannel[ssl.SSLSocket]] = {}
        self._handshakes = trio.CapacityLimiter(MAX_HANDSHAKES)
        self._threads = trio.CapacityLimiter(MAX_HANDSHAKES + MAX_TRANSFERS)
        self._unreachable: dict[str, float] = {}  # peer id -> when its port did not answer
        self.refused = 0  # connections closed: failed TLS, no token, or a token nobody awaits
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
                if self._handshakes.available_tokens < 1:
                    self.refused += 1
                    await stream.aclose()
                    continue
                nursery.start_soon(self._vet, stream)

    async def _vet(self, stream: trio.SocketStream) -> None:
        async with self._handshakes:
            sock = await _blocking_socket(stream)

            def handshake() -> tuple[ssl.SSLSocket, bytes]:
                deadline = time.monotonic() + HANDSHAKE_TIMEOUT
                sock.settimeout(HANDSHAKE_TIMEOUT)
                tls = self._server_context.wrap_socket(sock, server_side=True)
                token = b""
                try:
                    while len(token) < TOKEN_BYTES:
                        tls.settimeout(max(deadline - time.monotonic(), 0.001))
                        part = tls.recv(TOKEN_BYTES - len(token))
                        if not part:
                            raise ConnectionError("closed before its token")
                        token += part
                except BaseException:
                    tls.close()
                    raise
                return tls, token

            try:
                tls, token = await _in_thread(handshake, sock.fileno(), self._threads)
            except OSError as exc:
                self.refused += 1
                logger.debug("bulk connection refused: %s", exc)
                close_connection(sock)
                return
            waiter = self._waiting.pop(token, None)
            if waiter is None:
                self.refused += 1
                close_connection(tls)
                return
            waiter.send_nowait(tls)

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
        return Invitation(self.port, self.cert_sha256, secrets.token_bytes(TOKEN_BYTES))

    @contextmanager
    def expecting(self, invitation: Invitation) -> Iterator[trio.MemoryReceiveChannel[Any]]:
        """Wait for the connection that presents ``invitation``'s token (a channel that
        yields it); a connection that arrives after the block is closed."""
        send, receive = trio.open_memory_channel[ssl.SSLSocket](1)
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
        self, connection: trio.MemoryReceiveChannel[Any], size: int, pace: Pace
    ) -> tuple[memoryview, bytes]:
        """The ``size``-byte body from the invited connection (its receive buffer, which
        tensors can view without a copy), and its sha256."""
        with trio.move_on_after(HANDSHAKE_TIMEOUT + pace.idle_timeout) as scope:
            tls: ssl.SSLSocket = await connection.receive()
        if scope.cancelled_caught:
            raise NetworkError("the sender said it connected to the bulk port but did not")

        def receive() -> tuple[memoryview, bytes]:
            tls.settimeout(pace.idle_timeout)
            view, done, told, started = allocate(size), 0, 0, time.monotonic()
            told_at = started
            with FillingDigest(view) as digest:  # hashed in a second thread, as it comes
                while done < size:  # TLS hands over one record (<= 16 KiB) per call
                    count = tls.recv_into(view[done:], size - done)
                    if not count:
                        raise NetworkError(f"bulk connection ended after {done} of {size} bytes")
                    done, now = done + count, time.monotonic()
                    # not per record: these two calls took a quarter of this thread's time
                    if done - told >= IO_SIZE or done == size or now - told_at >= PACE_CHECK:
                        told, told_at = done, now
                        digest.filled(done)
                        _keep_pace(pace, started, done, size, "bulk body")
                return view, digest.digest()

        try:
            data, digest = await _in_thread(receive, tls.fileno(), self._threads)
        except TimeoutError as exc:
            raise TransferTooSlowError(f"bulk body: no data for {pace.idle_timeout:.0f} s") from exc
        except OSError as exc:
            raise NetworkError(f"bulk connection failed: {exc}") from exc
        finally:
            close_connection(tls)
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
    ) -> ssl.SSLSocket | None:
        """A TLS connection to the invited port, the certificate checked against its pin
        and the token sent; None (and the peer remembered as unreachable for a while) if
        the port does not answer. ``RemoteProtocolError`` if the certificate is not the
        one the peer named."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(ip, invitation.port)
        except (OSError, trio.TooSlowError) as exc:
            logger.info(
                "bulk port %s:%d of %s did not answer (%s)", ip, invitation.port, peer_id, exc
            )
            self._unreachable[peer_id] = now
            return None
        sock = await _blocking_socket(stream)

        def handshake() -> tuple[ssl.SSLSocket, bytes]:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            tls = self._client_context.wrap_socket(sock)
            return tls, tls.getpeercert(binary_form=True) or b""

        try:
            tls, cert = await _in_thread(handshake, sock.fileno(), self._threads)
        except OSError as exc:
            close_connection(sock)
            logger.info("bulk TLS handshake with %s failed (%s)", peer_id, exc)
            self._unreachable[peer_id] = now
            return None
        if hashlib.sha256(cert).digest() != invitation.cert_sha256:
            close_connection(tls)
            raise RemoteProtocolError(
                "the bulk port's certificate is not the one the peer invited us to",
                Offence.FORGED,
            )
        try:
            await _in_thread(lambda: tls.sendall(invitation.token), tls.fileno(), self._threads)
        except OSError as exc:
            close_connection(tls)
            logger.info("bulk connection to %s failed (%s)", peer_id, exc)
            return None
        return tls

    async def send_body(self, tls: ssl.SSLSocket, data: Body, pace: Pace) -> None:
        """Write ``data``; ``TransferTooSlowError`` if the peer stops reading. The caller
        closes the connection once the peer has judged the blob."""

        def send() -> None:
            tls.settimeout(pace.idle_timeout)
            started, done = time.monotonic(), 0
            for chunk in chunks(data, IO_SIZE):
                tls.sendall(chunk)
                done += len(chunk)
                _keep_pace(pace, started, done, len(data), "peer reading the bulk body")

        try:
            await _in_thread(send, tls.fileno(), self._threads)
        except TimeoutError as exc:
            raise TransferTooSlowError(
                f"peer stopped reading the bulk body for {pace.idle_timeout:.0f} s"
            ) from exc
        except OSError as exc:
            raise NetworkError(f"bulk connection failed: {exc}") from exc
        self.bodies_sent += 1
