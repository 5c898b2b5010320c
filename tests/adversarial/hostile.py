"""A hostile peer: a real libp2p host on 127.0.0.1 that writes whatever a test tells it to,
and in-process daemons to aim it at."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from peerlearn import wire
from peerlearn.gossip import sync
from peerlearn.gossip.crdt import DigestPage, Entry, clock_at, sign_entry
from peerlearn.identity import Identity
from peerlearn.node import blob
from peerlearn.node.config import NodeConfig
from peerlearn.node.daemon import Daemon, run_daemon
from peerlearn.node.framing import receive_frame, send_frame
from peerlearn.node.host import P2PHost, open_host
from peerlearn.node.host_api import Stream

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
SWARM = "adversarial"
T = TypeVar("T")


def run(test: Callable[[], Awaitable[None]], timeout: float = 90) -> None:
    async def bounded() -> None:
        with trio.fail_after(timeout):
            await test()

    trio.run(bounded)


async def eventually(probe: Callable[[], T | None], within: float = 20.0) -> T:
    """Poll ``probe`` (every 50 ms) until it is truthy; fail after ``within`` seconds."""
    with trio.fail_after(within):
        value = probe()
        while not value:
            await trio.sleep(0.05)
            value = probe()
    return value


def node_config(root: Path, name: str, **settings: Any) -> NodeConfig:
    values: dict[str, Any] = {
        "data_dir": root / name,
        "listen": LOOPBACK,
        "swarm": SWARM,
        "mdns": False,
        "shutdown_timeout": 5.0,
    }
    values.update(settings)
    return NodeConfig(**values)


@asynccontextmanager
async def daemon(config: NodeConfig, *, learn: bool = False) -> AsyncIterator[Daemon]:
    """A daemon in this trio run; stopped (gracefully) when the block ends."""
    async with trio.open_nursery() as nursery:
        node: Daemon = await nursery.start(
            lambda task_status: run_daemon(
                config, handle_signals=False, learn=learn, task_status=task_status
            )
        )
        try:
            yield node
        finally:
            node.stop.set()


@asynccontextmanager
async def hostile(identity: Identity | None = None) -> AsyncIterator[P2PHost]:
    async with open_host(identity or Identity.generate(), LOOPBACK) as host:
        yield host


def member_entry(
    identity: Identity,
    *,
    addrs: Sequence[str] = (),
    clock: int | None = None,
    invite: bytes | None = None,
) -> Entry:
    value: dict[str, Any] = {"addrs": list(addrs)}
    if invite is not None:
        value["invite"] = invite
    return sign_entry(identity, SWARM, "member", clock or clock_at(1_700_000_000), value)


async def introduce(host: P2PHost, peer_id: str, member: Entry) -> sync.Frame:
    """Pull from ``peer_id`` with ``member`` as our hello; returns its answer to the hello
    (its hello, or a refusal). Its member record then knows us, if it admitted us."""
    stream = await host.open_stream(peer_id, sync.SYNC_PROTOCOL)
    try:
        await send_frame(stream, sync.encode_hello(member))
        answer = sync.decode_frame(await receive_frame(stream, sync.MAX_SYNC_FRAME))
        if isinstance(answer, sync.Hello):
            await send_frame(stream, sync.encode_want(DigestPage(None, None, [])))
            more = True
            while more:
                frame = sync.decode_frame(await receive_frame(stream, sync.MAX_SYNC_FRAME))
                assert isinstance(frame, sync.Entries)
                more = frame.more
        return answer
    finally:
        await stream.close()


def serve_entries(host: P2PHost, member: Entry, entries: Callable[[], list[Entry]]) -> None:
    """Answer every pull with ``member`` as our hello and ``entries()`` as the state."""

    async def handler(stream: Stream) -> None:
        await receive_frame(stream, sync.MAX_SYNC_FRAME)  # their hello
        await send_frame(stream, sync.encode_hello(member))
        while True:
            want = sync.decode_frame(await receive_frame(stream, sync.MAX_SYNC_FRAME))
            assert isinstance(want, sync.Want)
            for data in sync.encode_entries(entries()):
                await send_frame(stream, data)
            if want.page.hi is None:
                return

    host.set_handler(sync.SYNC_PROTOCOL, handler)


async def offer(
    host: P2PHost,
    peer_id: str,
    *,
    body: Any,
    seq: int,
    payload: bytes | None = None,
) -> tuple[dict[str, Any], Stream]:
    """Send a blob offer with any ``body`` (signed by us) and return the reply to it, and the
    stream (to send a body on, or not). ``payload`` goes on the stream (after saying so
    when the peer invited us onto its bulk path)."""
    stream = await host.open_stream(peer_id, blob.PROTOCOL)
    envelope = wire.seal(host.identity, blob.OFFER_TYPE, body, seq=seq, timestamp=time.time())
    await send_frame(stream, envelope)
    reply = wire.unpack(await receive_frame(stream, blob.MAX_CONTROL_FRAME))
    if payload is not None and reply.get("ok"):
        if "bulk" in reply:
            await send_frame(stream, blob.encode_via(bulk=False))
        await stream.send_all(payload)
    return reply, stream


def rejected(node: Daemon) -> dict[str, int]:
    counts: dict[str, int] = node.boundary.status()["rejected"]
    return counts
