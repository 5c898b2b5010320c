"""Local control API: msgpack request/response frames over a Unix socket in the data dir.

Request ``{"op": str, "args": map}``; response ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": str}``. The server is trio; the client is plain blocking
sockets so the CLI stays synchronous.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from peerlearn import wire
from peerlearn.errors import ControlError, PeerlearnError, RemoteProtocolError
from peerlearn.node.framing import Pace, receive_frame, send_frame

logger = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # bytes
MAX_RESPONSE = 64 * 2**20  # bytes
MAX_CONNECTIONS = 16  # control connections served at once
REQUEST_TIMEOUT = 10.0  # seconds for a client to send its whole request
_REQUEST_LIMITS = wire.Limits(max_message_size=MAX_REQUEST, max_array_len=64, max_map_len=64)
_RESPONSE_LIMITS = wire.Limits(
    max_message_size=MAX_RESPONSE, max_array_len=1_000_000, max_map_len=100_000
)
_HEADER = struct.Struct(">I")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def decode_request(data: bytes) -> tuple[str, dict[str, Any]]:
    """(op, args) of a request frame's payload; ``RemoteProtocolError`` otherwise."""
    request = wire.expect_map(wire.unpack(data, _REQUEST_LIMITS), {"op", "args"}, "control request")
    op = wire.expect(request["op"], str, "op")
    return op, wire.expect(request["args"], dict, "args")


async def _serve_connection(
    stream: trio.SocketStream,
    handlers: Mapping[str, Handler],
    request_timeout: float,
    reading: trio.CancelScope,
    on_request: Callable[[], None],
) -> None:
    """Read one request (within ``reading``, which may be cancelled to make room for a
    newer connection), tell ``on_request``, run its handler and answer."""
    async with stream:
        with reading:
            try:
                pace = Pace(idle_timeout=request_timeout, min_rate=1024, grace=request_timeout)
                with trio.fail_after(request_timeout):
                    op, args = decode_request(await receive_frame(stream, MAX_REQUEST, pace))
            except (PeerlearnError, trio.TooSlowError) as exc:
                logger.warning("bad control request: %s", exc or "too slow")
                return
        if reading.cancelled_caught:
            logger.debug("closed an idle control connection to make room for a new one")
            return
        on_request()
        handler = handlers.get(op)
        if handler is None:
            response = {
                "ok": False,
                "error": f"unknown operation {op!r}; known: {sorted(handlers)}",
            }
        else:
            try:
                response = {"ok": True, "result": await handler(args)}
            except PeerlearnError as exc:
                response = {"ok": False, "error": str(exc)}
            except Exception as exc:
                logger.exception("control operation %s failed", op)
                response = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        try:
            await send_frame(stream, wire.pack(response))
        except trio.BrokenResourceError:
            logger.debug("control client went away before the %s response", op)


async def serve_control(
    path: Path,
    handlers: Mapping[str, Handler],
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    task_status: Any = trio.TASK_STATUS_IGNORED,  # trio.TaskStatus; trio-stubs hide it
) -> None:
    """Listen on ``path`` until cancelled; the socket file is removed afterwards. A client
    has ``request_timeout`` seconds to send its request (at most ``MAX_REQUEST`` bytes);
    at most ``MAX_CONNECTIONS`` are served at once. When they are all taken, the one that
    has waited longest without a whole request is closed for the newcomer (200 idle
    connections used to make ``status`` fail until they timed out)."""
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        path.chmod(0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        reading: dict[int, trio.CancelScope] = {}  # connections without a request, oldest first
        running: set[int] = set()  # connections whose request is being answered
        numbers = itertools.count()

        async def serve(stream: trio.SocketStream, number: int, scope: trio.CancelScope) -> None:
            def answering() -> None:
                reading.pop(number, None)
                running.add(number)

            try:
                await _serve_connection(stream, handlers, request_timeout, scope, answering)
            finally:
                reading.pop(number, None)
                running.discard(number)

        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                if len(reading) + len(running) >= MAX_CONNECTIONS and reading:
                    reading.pop(next(iter(reading))).cancel()  # the longest idle makes room
                if len(running) >= MAX_CONNECTIONS:
                    logger.warning("control socket busy: %d requests running", MAX_CONNECTIONS)
                    await stream.aclose()
                    continue
                number = next(numbers)
                scope = reading[number] = trio.CancelScope()
                nursery.start_soon(serve, stream, number, scope)
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def call(socket_path: Path, op: str, timeout: float = 30.0, **args: Any) -> Any:
    """Send one request to the daemon owning ``socket_path`` and return its result."""
    if not socket_path.exists():
        raise ControlError(f"no peerlearn daemon is running for {socket_path.parent} (no socket)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlError(
                    f"no peerlearn daemon is running for {socket_path.parent} (stale socket)"
                ) from exc
            raise ControlError(f"cannot reach the daemon at {socket_path}: {exc}") from exc
        try:
            payload = wire.pack({"op": op, "args": args})
            sock.sendall(_HEADER.pack(len(payload)) + payload)
            header = _recv_exactly(sock, _HEADER.size)
            (size,) = _HEADER.unpack(header)
            if size > MAX_RESPONSE:
                raise ControlError(f"daemon response of {size} bytes is too large")
            response = wire.unpack(_recv_exactly(sock, size), _RESPONSE_LIMITS)
        except TimeoutError as exc:
            raise ControlError(f"the daemon did not answer {op!r} within {timeout:.0f} s") from exc
        except RemoteProtocolError as exc:
            raise ControlError(f"malformed response from the daemon: {exc}") from exc
    if not isinstance(response, dict) or "ok" not in response:
        raise ControlError("malformed response from the daemon")
    if not response["ok"]:
        raise ControlError(str(response.get("error")))
    return response.get("result")


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    parts = []
    while count:
        chunk = sock.recv(min(count, 1 << 20))
        if not chunk:
            raise ControlError("the daemon closed the control connection early")
        parts.append(chunk)
        count -= len(chunk)
    return b"".join(parts)
