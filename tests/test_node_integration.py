"""Real libp2p hosts and daemons on 127.0.0.1, in one trio run per test."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import multiaddr
import pytest
import safetensors.torch
import torch
import trio
import trio.testing
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from peerlearn import wire
from peerlearn.errors import NetworkError
from peerlearn.identity import Identity
from peerlearn.node import blob
from peerlearn.node.config import NodeConfig
from peerlearn.node.daemon import Daemon, run_daemon
from peerlearn.node.framing import Pace, receive_frame, send_frame
from peerlearn.node.host import P2PHost, WholeFrameYamux, open_host
from peerlearn.node.host_api import Stream
from peerlearn.node.learning_transport import LearningTransport
from peerlearn.node.offload import inline
from peerlearn.tensors import state_dict_from_bytes, state_dict_to_bytes

pytestmark = pytest.mark.integration
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
TEST_TIMEOUT = 60  # seconds per test


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with trio.fail_after(TEST_TIMEOUT):
            await test()

    trio.run(bounded)


def model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return model.state_dict()


def _serve_blobs(host: P2PHost, received: list[bytes]) -> None:
    async def accept(item: blob.ReceivedBlob) -> None:
        received.append(item.data)

    blob.serve_every_blob(host, 2**24, accept)


async def _push(src: P2PHost, dst: P2PHost, seq: int, data: bytes) -> None:
    """``data`` from ``src`` to ``dst`` over the blob protocol, in 1 MiB chunks."""
    await blob.push_blob(
        lambda: src.open_stream(dst.peer_id, blob.PROTOCOL),
        src.identity,
        seq,
        data,
        kind="model_update",
        meta={},
        chunk_size=1 << 20,
    )


def test_three_hosts_exchange_a_bit_identical_state_dict() -> None:
    state = model_state()
    data = state_dict_to_bytes(state)

    async def main() -> None:
        received: dict[str, list[bytes]] = {}

        identities = [Identity.generate() for _ in range(3)]
        async with (
            open_host(identities[0], LOOPBACK) as a,
            open_host(identities[1], LOOPBACK) as b,
            open_host(identities[2], LOOPBACK) as c,
        ):
            for receiver in (b, c):
                _serve_blobs(receiver, received.setdefault(receiver.peer_id, []))
                assert await a.connect(receiver.addrs()[0]) == receiver.peer_id
            assert {p.peer_id for p in a.connected_peers()} == {b.peer_id, c.peer_id}
            assert await a.ping(b.peer_id) >= 0
            for seq, receiver in enumerate((b, c)):
                await blob.push_blob(
                    lambda r=receiver: a.open_stream(r.peer_id, blob.PROTOCOL),
                    a.identity,
                    seq,
                    data,
                    kind="model_update",
                    meta={},
                    chunk_size=4096,
                )
        for peer in (identities[1].peer_id, identities[2].peer_id):
            [model_bytes] = received[peer]
            decoded = state_dict_from_bytes(model_bytes, max_size=2**24)
            for name, tensor in state.items():
                assert decoded[name].numpy().tobytes() == tensor.numpy().tobytes()

    run(main)


def test_plaintext_dialer_is_refused() -> None:
    async def main() -> None:
        key_pair = create_new_key_pair()
        plaintext = new_host(
            key_pair=key_pair,
            sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
            listen_addrs=[multiaddr.Multiaddr(LOOPBACK[0])],
        )
        async with (
            open_host(Identity.generate(), LOOPBACK) as ours,
            plaintext.run([multiaddr.Multiaddr(LOOPBACK[0])]),
        ):
            info = info_from_p2p_addr(multiaddr.Multiaddr(ours.addrs()[0]))
            with pytest.raises(Exception, match=r"unable to connect|negotiate"):
                await plaintext.connect(info)
            assert ours.connected_peers() == []

    run(main)


def test_pushes_cut_off_mid_write_leave_the_connection_working() -> None:
    """Timeouts that cancel pushes while their frames are being written (4 at a time, 40
    in all) must not break the connection: a cancelled frame write used to leave Noise's
    nonces out of step, and every later stream on the connection stalled."""
    data = bytes(4 << 20)

    async def main() -> None:
        received: list[bytes] = []
        rng = random.Random(7)
        async with (
            open_host(Identity.generate(), LOOPBACK) as a,
            open_host(Identity.generate(), LOOPBACK) as b,
        ):
            _serve_blobs(b, received)
            await a.connect(b.addrs()[0])
            seq = iter(range(1, 10**6))

            async def push() -> None:
                await _push(a, b, next(seq), data)

            async def cut_off_push(after: float) -> None:
                with trio.move_on_after(after):
                    await push()

            for _ in range(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(cut_off_push, rng.uniform(0.005, 0.15))
            with trio.fail_after(20):  # a healthy connection does this in well under 1 s
                await push()
            assert received[-1] == data
            assert [p.peer_id for p in a.connected_peers()] == [b.peer_id]

    run(main)


class _UnbufferedConn:
    """One end of a secured connection whose writes wait until the peer has read them, as
    a socket with full buffers does."""

    def __init__(self, send: trio.abc.SendStream, receive: trio.abc.ReceiveStream) -> None:
        self.send, self.receive = send, receive

    async def write(self, data: bytes) -> None:
        await self.send.send_all(data)

    async def read(self, n: int | None = None) -> bytes:
        return await self.receive.receive_some(n)

    async def close(self) -> None:
        await self.send.aclose()


def test_two_muxers_sending_each_other_streams_at_once_keep_reading() -> None:
    """Both sides open streams and send 1 MiB on each at the same time over a connection
    with no buffer. The library's yamux froze here (its reader waited for the write lock
    to acknowledge the peer's new stream, while the writer holding it waited for the peer,
    whose reader waited in the same way); WholeFrameYamux's reader queues its replies."""
    from libp2p.peer.id import ID
    from libp2p.stream_muxer.exceptions import MuxedStreamEOF

    size, streams = 1 << 20, 10

    async def main() -> None:
        a_send, b_receive = trio.testing.lockstep_stream_one_way_pair()
        b_send, a_receive = trio.testing.lockstep_stream_one_way_pair()
        peer = ID(b"peer")
        a = WholeFrameYamux(_UnbufferedConn(a_send, a_receive), peer, is_initiator=True)
        b = WholeFrameYamux(_UnbufferedConn(b_send, b_receive), peer, is_initiator=False)
        received = {"a": 0, "b": 0}

        async def send(conn: WholeFrameYamux) -> None:
            for _ in range(streams):
                stream = await conn.open_stream()
                await stream.write(bytes(size))
                await stream.close()

        async def receive(conn: WholeFrameYamux, name: str) -> None:
            for _ in range(streams):
                stream = await conn.accept_stream()
                with contextlib.suppress(MuxedStreamEOF):  # the library's end of a stream
                    while chunk := await stream.read(1 << 16):
                        received[name] += len(chunk)

        async with trio.open_nursery() as connections:
            connections.start_soon(a.start)
            connections.start_soon(b.start)
            await a.event_started.wait()
            await b.event_started.wait()
            with trio.fail_after(20):  # about 1 s when nothing freezes
                async with trio.open_nursery() as nursery:
                    for conn, name in ((a, "a"), (b, "b")):
                        nursery.start_soon(send, conn)
                        nursery.start_soon(receive, conn, name)
            connections.cancel_scope.cancel()
        assert received == {"a": size * streams, "b": size * streams}

    run(main)


def test_two_hosts_pushing_16_mib_to_each_other_at_once_repeatedly() -> None:
    data = bytes(16 << 20)

    async def main() -> None:
        received: dict[str, list[bytes]] = {"a": [], "b": []}
        async with (
            open_host(Identity.generate(), LOOPBACK) as a,
            open_host(Identity.generate(), LOOPBACK) as b,
        ):
            _serve_blobs(a, received["a"])
            _serve_blobs(b, received["b"])
            await a.connect(b.addrs()[0])
            seq = iter(range(1, 10**6))

            async def push(src: P2PHost, dst: P2PHost) -> None:
                await _push(src, dst, next(seq), data)

            for _ in range(4):
                with trio.fail_after(30):  # about 1 s when nothing freezes
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(push, a, b)
                        nursery.start_soon(push, b, a)
            assert [len(r) for r in received.values()] == [4, 4]
            assert received["a"][-1] == data == received["b"][-1]

    run(main)


def test_small_messages_to_a_peer_share_one_stream_and_survive_its_loss() -> None:
    """MoDeST's small messages to one peer go over one stream, in order; when that stream
    breaks, the next message opens a new one; an unused stream is closed by its sender."""

    def transport(host: P2PHost) -> LearningTransport:
        return LearningTransport(
            NodeConfig(), host, Pace(), wire.SequenceCounter(time.time()),
            wire.ReplayGuard(), lambda sent, got: None, time.time, inline,
        )  # fmt: skip

    async def main() -> None:
        async with (
            open_host(Identity.generate(), LOOPBACK) as a,
            open_host(Identity.generate(), LOOPBACK) as b,
        ):
            sender, receiver = transport(a), transport(b)
            got: list[int] = []
            arrived = {50: trio.Event(), 51: trio.Event()}

            def on_message(src: bytes, body: dict[str, int]) -> None:
                got.append(body["n"])
                if len(got) in arrived:
                    arrived[len(got)].set()

            receiver.on_message = on_message
            await a.connect(b.addrs()[0])
            for n in range(50):
                assert await sender.send_message(b.identity.public_key, {"n": n})
            with trio.fail_after(10):
                await arrived[50].wait()
            assert got == list(range(50))
            assert b.open_streams() == 1  # one stream carried them all
            stream = sender._outboxes[b.peer_id].stream
            assert stream is not None
            await stream.reset()  # the stream breaks
            assert await sender.send_message(b.identity.public_key, {"n": 50})
            with trio.fail_after(10):
                await arrived[51].wait()
            await sender.close_message_streams()
            assert not sender._outboxes

    run(main)


async def _offer(stream: Stream, identity: Identity, seq: int, data: bytes, size: int) -> None:
    body = {
        "sha256": hashlib.sha256(data).digest(),
        "size": size,
        "kind": "model_update",
        "meta": {},
    }
    await send_frame(
        stream, wire.seal(identity, blob.OFFER_TYPE, body, seq=seq, timestamp=time.time())
    )


async def _reply(stream: Stream) -> dict[str, object]:
    reply: dict[str, object] = wire.unpack(await receive_frame(stream, 65536))
    return reply


def test_daemon_rejects_bad_blobs_and_survives_resets(tmp_path: Path) -> None:
    """Tampered, replayed, oversized and reset transfers are refused; a good one still lands."""
    state = model_state()
    good = state_dict_to_bytes(state)
    config = NodeConfig(data_dir=tmp_path / "node", listen=LOOPBACK, max_blob_size=len(good) + 10)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(
                lambda task_status: run_daemon(
                    config, handle_signals=False, task_status=task_status
                )
            )
            sender = Identity.generate()
            async with open_host(sender, LOOPBACK) as host:
                await host.connect(daemon.host.addrs()[0])

                async def stream() -> Stream:
                    return await host.open_stream(daemon.identity.peer_id, blob.PROTOCOL)

                # 1. bytes that do not match the signed sha256
                s = await stream()
                await _offer(s, sender, 1, good, len(good))
                assert (await _reply(s))["ok"] is True
                await s.send_all(b"\x00" * len(good))
                reply = await _reply(s)
                assert reply["ok"] is False
                assert "sha256" in str(reply["reason"])
                # 2. the same offer replayed
                s = await stream()
                await _offer(s, sender, 1, good, len(good))
                reply = await _reply(s)
                assert reply["ok"] is False
                assert "replayed" in str(reply["reason"])
                # 3. larger than max_blob_size
                s = await stream()
                await _offer(s, sender, 2, good, len(good) + 11)
                assert "exceeds" in str((await _reply(s))["reason"])
                # 4. reset half-way through the data
                s = await stream()
                await _offer(s, sender, 3, good, len(good))
                assert (await _reply(s))["ok"] is True
                await s.send_all(good[: len(good) // 2])
                await s.reset()
                # 5. valid bytes that are not a state_dict
                junk = b"\x01" * 100
                s = await stream()
                await _offer(s, sender, 4, junk, len(junk))
                await _reply(s)
                await s.send_all(junk)
                assert "tensor header" in str((await _reply(s))["reason"])
                # 6. a good update after all that
                await blob.push_blob(stream, sender, 5, good, kind="model_update", meta={})
            status = daemon.status()
            assert status["updates_received"] == 1
            assert status["updates_rejected"] == 5
            saved = safetensors.torch.load_file(status["recent_updates"][0]["path"])
            assert all(torch.equal(saved[k], v) for k, v in state.items())
            daemon.stop.set()

    run(main)


def test_two_daemons_share_a_model_file(tmp_path: Path) -> None:
    state = model_state()
    model_file = tmp_path / "model.pt"
    torch.save(state, model_file)

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            def start(name: str, bootstrap: tuple[str, ...] = ()) -> Awaitable[Daemon]:
                config = NodeConfig(data_dir=tmp_path / name, listen=LOOPBACK, bootstrap=bootstrap)
                return nursery.start(  # type: ignore[no-any-return]
                    lambda task_status: run_daemon(
                        config, handle_signals=False, task_status=task_status
                    )
                )

            first = await start("a")
            second = await start("b", (first.host.addrs()[0],))
            results = await second.share_model(model_file)
            assert [r["ok"] for r in results] == [True]
            recent = first.status()["recent_updates"]
            assert recent[0]["from"] == second.identity.peer_id
            saved = safetensors.torch.load_file(recent[0]["path"])
            assert all(torch.equal(saved[k], v) for k, v in state.items())
            first.stop.set()
            second.stop.set()

    run(main)


def test_unreachable_bootstrap_fails_with_a_specific_error(tmp_path: Path) -> None:
    dead = f"/ip4/127.0.0.1/tcp/9/p2p/{Identity.generate().peer_id}"
    config = NodeConfig(
        data_dir=tmp_path / "n", listen=LOOPBACK, bootstrap=(dead,), bootstrap_timeout=1.0
    )

    async def main() -> None:
        started = trio.current_time()
        with pytest.raises(Exception, match="none of the 1 bootstrap peers was reachable") as info:
            await run_daemon(config, handle_signals=False)
        assert dead in str(info.value)
        assert trio.current_time() - started < 10

    run(main)


def test_dial_failures_say_what_went_wrong_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused, a different peer at the address, and a listener that never answers (which
    used to hang the dial forever) each get their own plain reason."""
    from peerlearn.node import host as host_module

    monkeypatch.setattr(host_module, "DIAL_TIMEOUT", 1.0)

    async def main() -> None:
        with socket.socket() as closed, socket.socket() as mute:
            closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
            mute.bind(("127.0.0.1", 0))
            mute.listen(4)  # accepts TCP, never speaks
            async with (
                open_host(Identity.generate(), LOOPBACK) as a,
                open_host(Identity.generate(), LOOPBACK) as b,
            ):
                port = b.listen_ports()[0]
                cases = {
                    f"/ip4/127.0.0.1/tcp/{closed.getsockname()[1]}": "connection refused",
                    f"/ip4/127.0.0.1/tcp/{port}": f"peer ID mismatch: the node at that address "
                    f"is {b.peer_id}",
                    f"/ip4/127.0.0.1/tcp/{mute.getsockname()[1]}": "timed out after 1 s",
                }
                for base, reason in cases.items():
                    address = f"{base}/p2p/{Identity.generate().peer_id}"
                    with pytest.raises(NetworkError) as info:
                        await a.connect(address)
                    message = str(info.value)
                    assert reason in message, message
                    assert message.count(address) == 1, message
                    assert "\n" not in message

    run(main)


class _Unconnected:
    """Just enough of a host for a transport that never talks to anyone."""

    identity = Identity.from_seed(b"d" * 32)

    def set_handler(self, protocol: str, handler: object) -> None:
        del protocol, handler


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_the_announced_digest_is_that_of_the_models_whole_encoding(compression: str) -> None:
    """Announced in the swarm state every round; with compression nothing whole is sent, so
    it is hashed from the tensors in place and no whole encoding is kept."""
    transport = LearningTransport(
        NodeConfig(compression=compression), _Unconnected(), Pace(),  # type: ignore[arg-type]
        wire.SequenceCounter(time.time()), wire.ReplayGuard(), lambda sent, got: None,
        time.time, inline,
    )  # fmt: skip
    model = {
        "w": torch.randn(40, 30, generator=torch.Generator().manual_seed(2)),
        "n": torch.ones(2),
    }
    digest = trio.run(transport.digest, model)
    assert digest == hashlib.sha256(state_dict_to_bytes(model)).digest()
    assert ("whole" in transport._last) is (compression == "none")
