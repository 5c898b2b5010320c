"""A hostile peer (a real libp2p host on 127.0.0.1) against daemons: every class of attack
that used to crash, freeze, poison or fill a node, as a regression test."""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import time
from pathlib import Path

import pytest
import torch
import trio

from peerlearn import wire
from peerlearn.errors import ConfigError, NetworkError
from peerlearn.gossip import sync
from peerlearn.gossip.admission import issue_invite
from peerlearn.gossip.crdt import MAX_CLOCK, clock_at, sign_entry
from peerlearn.identity import Identity
from peerlearn.learning.choices import Compression
from peerlearn.learning.compression import ErrorFeedback
from peerlearn.learning.tasks.digits import DigitsNet
from peerlearn.node import blob
from peerlearn.node.daemon import run_daemon
from peerlearn.node.framing import send_frame
from peerlearn.node.host import MAX_INBOUND_STREAMS_PER_PEER, open_host
from peerlearn.tensors import state_dict_to_bytes
from tests.adversarial.hostile import (
    LOOPBACK,
    SWARM,
    daemon,
    eventually,
    hostile,
    introduce,
    member_entry,
    node_config,
    offer,
    rejected,
    run,
    serve_entries,
)

pytestmark = pytest.mark.integration


def model_offer(data: bytes, kind: str = "model", size: int | None = None) -> dict[str, object]:
    return {
        "sha256": hashlib.sha256(data).digest(),
        "size": len(data) if size is None else size,
        "kind": kind,
        "meta": {"round": 1},
    }


def digits_model(value: float) -> bytes:
    model = DigitsNet("mlp", 32, torch.Generator().manual_seed(0)).state_dict()
    return state_dict_to_bytes({n: torch.full_like(t, value) for n, t in model.items()})


def test_unusable_member_addresses_fail_alone_and_survive_a_restart(tmp_path: Path) -> None:
    """A member record whose addresses cannot be dialled (malformed, a relay address on a
    node without relay support) used to end the daemon, and every restart after."""
    config = node_config(tmp_path, "d", algo="gossip-vca", round_interval=0.2, max_rounds=3)
    bad = [
        "garbage",
        "/ip4/999.1.1.1/tcp/1",
        f"/ip4/127.0.0.1/tcp/9/p2p/{Identity.generate().peer_id}/p2p-circuit/p2p/x",
        "/dns4/nowhere.invalid/tcp/1",
    ]
    attacker = Identity.generate()

    async def main() -> None:
        async with daemon(config, learn=True) as node, hostile(attacker) as host:
            await host.connect(node.host.addrs()[0])
            answer = await introduce(host, node.identity.peer_id, member_entry(attacker, addrs=bad))
            assert isinstance(answer, sync.Hello)
            await eventually(lambda: node.swarm and node.swarm.is_member(attacker.peer_id))
            await host.disconnect(node.identity.peer_id)
            await eventually(lambda: node.learner and node.learner.round >= 3, 30)
            assert node.phase == "running"
        # The record is in the checkpoint now: the node must start again, and dial again.
        async with daemon(config, learn=True) as node:
            assert node.swarm is not None
            assert node.swarm.is_member(attacker.peer_id)
            await trio.sleep(1.0)  # discovery dials the bad addresses
            assert node.phase == "running"

    run(main)


def test_mixed_key_maps_are_declared_errors_not_crashes(tmp_path: Path) -> None:
    async def main() -> None:
        async with daemon(node_config(tmp_path, "d", swarm="")) as node, hostile() as host:
            await host.connect(node.host.addrs()[0])
            body = {"sha256": b"\x00" * 32, "size": 1, "kind": "x", b"meta": {}}
            reply, _ = await offer(host, node.identity.peer_id, body=body, seq=1)
            assert reply["ok"] is False
            assert "blob_offer" in str(reply["reason"])
            # the control socket too
            stream = await trio.open_unix_socket(str(node.data_dir.control_socket))
            await send_frame(stream, wire.pack({"op": "status", b"args": {}}))
            assert await stream.receive_some(1) == b""  # closed on us, daemon fine
            await stream.aclose()
            assert rejected(node)["malformed"] >= 1
            assert node.status()["phase"] == "running"

    run(main)


def test_a_far_future_clock_cannot_freeze_the_swarm_state(tmp_path: Path) -> None:
    """One signed entry at clock 2**63-1 used to freeze every replica for good."""
    attacker = Identity.generate()
    frozen = [
        sign_entry(attacker, SWARM, "round", MAX_CLOCK, {"round": 1}),
        sign_entry(attacker, SWARM, "heartbeat", clock_at(time.time() + 7200), {"t": 1.0}),
    ]

    async def main() -> None:
        async with (
            daemon(node_config(tmp_path, "a")) as a,
            daemon(node_config(tmp_path, "b", bootstrap=(a.host.addrs()[0],))) as b,
            hostile(attacker) as host,
        ):
            serve_entries(host, member_entry(attacker, clock=clock_at(time.time())), lambda: frozen)
            await host.connect(a.host.addrs()[0])
            assert a.swarm is not None
            assert b.swarm is not None
            await eventually(lambda: rejected(a).get("replayed", 0) >= 1)
            limit = clock_at(time.time() + a.swarm.state.max_skew)
            assert all(e.clock <= limit for e in a.swarm.state.entries.values())
            a.swarm.write("round", {"round": 42})  # writes go on, and reach the other node
            me = a.identity.public_key
            await eventually(lambda: b.swarm.state.get(me, "round") == {"round": 42}, 30)

    run(main)


def test_a_nan_model_is_refused_from_non_members_and_members(tmp_path: Path) -> None:
    """A NaN model from a peer that was not even a member took every node to 0.11."""
    config = node_config(tmp_path, "d", algo="gossip-vca", round_interval=0.2)
    poison = digits_model(float("nan"))

    async def main() -> None:
        async with daemon(config, learn=True) as node, hostile() as outsider, hostile() as member:
            peer = node.identity.peer_id
            for host in (outsider, member):
                await host.connect(node.host.addrs()[0])
            # A non-member's stream is reset before the offer is read.
            with pytest.raises(Exception, match=r"stream|reset|broke|closed"):
                await offer(outsider, peer, body=model_offer(poison), seq=1, payload=poison)
            assert rejected(node)["not a member"] >= 1
            # A member's NaN model is refused after its bytes are checked, before any merge.
            await introduce(member, peer, member_entry(member.identity))
            reply, stream = await offer(
                member, peer, body=model_offer(poison), seq=2, payload=poison
            )
            assert reply["ok"] is True  # the offer was fine
            verdict = wire.unpack(await _next(stream))
            assert verdict["ok"] is False
            assert "NaN" in str(verdict["reason"])
            # Counted right after the refusal is sent.
            await eventually(lambda: rejected(node).get("bad model", 0) >= 1)
            assert rejected(node)["bad model"] == 1
            assert node.learner is not None
            assert node.learner.transport.models_received == 0
            # Early rounds of lone training can score anywhere, so check the model itself.
            assert all(bool(torch.isfinite(t).all()) for t in node.learner.model.values())

    run(main)


async def _next(stream: blob.Stream) -> bytes:
    from peerlearn.node.framing import receive_frame

    return await receive_frame(stream, blob.MAX_CONTROL_FRAME)


def test_blob_offers_are_judged_before_any_body_byte(tmp_path: Path) -> None:
    """Bodies were buffered whole (up to 1 GiB) before their kind or size was checked, with
    no cap on concurrent blobs: 4 x 256 MiB took a daemon from 377 MB to 1.6 GB."""
    mib = 2**20
    config = node_config(
        tmp_path,
        "d",
        swarm="",
        max_blob_size=2 * mib,
        blob_memory_per_peer=2 * mib,
        blob_memory=3 * mib,
        stream_idle_timeout=1.0,
    )

    async def main() -> None:
        async with daemon(config) as node, hostile() as a, hostile() as b:
            peer = node.identity.peer_id
            for host in (a, b):
                await host.connect(node.host.addrs()[0])
            data = b"\x01" * (2 * mib)
            body = model_offer(data, kind="model_update")
            reply, held = await offer(a, peer, body=body, seq=1, payload=data[: mib // 2])
            assert reply["ok"] is True
            assert node.blob_budget.held == 2 * mib  # reserved from the offer
            again, _ = await offer(a, peer, body=model_offer(b"x" * 10, "model_update"), seq=2)
            assert again["ok"] is False
            assert "busy" in str(again["reason"])
            other, _ = await offer(b, peer, body=body, seq=3)
            assert other["ok"] is False
            assert "busy" in str(other["reason"])
            big, _ = await offer(b, peer, body=model_offer(data, size=3 * mib), seq=4)
            assert "exceeds" in str(big["reason"])
            # The stalled transfer is cut off within the idle timeout, its memory is freed and
            # the peer is scored for it (in that order: the stream is closed in between).
            await eventually(
                lambda: node.blob_budget.held == 0 and rejected(node).get("too slow", 0) >= 1, 10
            )
            await held.reset()

    run(main)


def test_silent_trickling_and_surplus_streams_are_cut_off(tmp_path: Path) -> None:
    """Idle or 1-byte/s streams lived for blob_timeout (300 s)."""
    config = node_config(tmp_path, "d", stream_idle_timeout=1.0)

    async def main() -> None:
        async with daemon(config) as node, hostile() as host:
            peer = node.identity.peer_id
            await host.connect(node.host.addrs()[0])
            started = trio.current_time()
            silent = await host.open_stream(peer, sync.SYNC_PROTOCOL)
            await eventually(lambda: rejected(node).get("too slow", 0) >= 1, 10)
            trickle = await host.open_stream(peer, sync.SYNC_PROTOCOL)  # one session at a time
            for byte in b"\x00\x00\x10\x00":  # a 4 KiB frame, two bytes a second
                # A write to a reset stream fails, or (py-libp2p) never returns.
                with trio.move_on_after(0.5), contextlib.suppress(NetworkError):
                    await trickle.send_all(bytes([byte]))
                    await trio.sleep(0.5)
            await eventually(lambda: rejected(node).get("too slow", 0) >= 2, 10)
            assert trio.current_time() - started < 8
            for stream in (silent, trickle):
                await stream.reset()

    run(main)


def test_a_peer_cannot_hold_more_than_its_share_of_streams(tmp_path: Path) -> None:
    config = node_config(tmp_path, "d", swarm="", stream_idle_timeout=20.0)

    async def main() -> None:
        async with daemon(config) as node, hostile() as host:
            peer = node.identity.peer_id
            await host.connect(node.host.addrs()[0])
            streams: list[blob.Stream] = []

            async def hold() -> None:
                with contextlib.suppress(NetworkError):
                    streams.append(await host.open_stream(peer, blob.PROTOCOL))

            async with trio.open_nursery() as nursery:
                for _ in range(MAX_INBOUND_STREAMS_PER_PEER + 8):
                    nursery.start_soon(hold)
            await eventually(lambda: rejected(node).get("oversized", 0) >= 1, 10)
            assert len(streams) <= MAX_INBOUND_STREAMS_PER_PEER + 8
            for stream in streams:
                await stream.reset()
            assert node.phase == "running"

    run(main)


def test_a_gossip_rpc_the_library_cannot_parse_does_not_end_the_daemon(tmp_path: Path) -> None:
    """py-libp2p's gossipsub reader raised protobuf DecodeError into the daemon's nursery."""

    async def main() -> None:
        async with (
            daemon(node_config(tmp_path, "a")) as a,
            daemon(node_config(tmp_path, "b", bootstrap=(a.host.addrs()[0],))) as b,
            hostile() as host,
        ):
            await host.connect(a.host.addrs()[0])
            for _ in range(3):
                stream = await host.open_stream(a.identity.peer_id, "/meshsub/1.1.0")
                await stream.send_all(b"\x08" + b"\xff\xff\xff\xff\xff\xff\xff\xff")
                await trio.sleep(0.2)
            await eventually(lambda: rejected(a).get("library error", 0) >= 1)
            assert a.phase == "running"
            assert a.swarm is not None
            assert b.swarm is not None
            a.swarm.write("round", {"round": 7})
            key = a.identity.public_key
            await eventually(lambda: b.swarm.state.get(key, "round") == {"round": 7}, 30)

    run(main)


@pytest.mark.parametrize("mode", ["token", "allowlist"])
def test_only_admitted_peers_join(tmp_path: Path, mode: str) -> None:
    """Any key's self-signed member record used to make it a member."""
    authority = Identity.generate()
    keys = [Identity.generate(), Identity.generate()]
    allowlist = tmp_path / "allow.txt"
    allowlist.write_text("".join(f"{k.peer_id}  # node\n" for k in keys))
    for i, key in enumerate(keys):
        (tmp_path / f"n{i}").mkdir(mode=0o700)
        from cryptography.hazmat.primitives import serialization

        from peerlearn.identity import KEY_FILE_NAME
        from peerlearn.node.datadir import atomic_write_bytes

        pem = key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(tmp_path / f"n{i}" / KEY_FILE_NAME, pem)
        (tmp_path / f"n{i}" / KEY_FILE_NAME).chmod(0o600)

    def settings(i: int) -> dict[str, object]:
        if mode == "allowlist":
            return {"admission": "allowlist", "allowlist_file": str(allowlist)}
        invite = issue_invite(authority, SWARM, keys[i].public_key)
        return {"admission": "token", "swarm_authority": authority.peer_id, "invite": invite.token}

    intruder = Identity.generate()

    async def main() -> None:
        async with daemon(node_config(tmp_path, "n0", **settings(0))) as a:
            boot = (a.host.addrs()[0],)
            async with (
                daemon(node_config(tmp_path, "n1", bootstrap=boot, **settings(1))) as b,
                hostile(intruder) as host,
            ):
                assert a.swarm is not None
                assert b.swarm is not None
                await eventually(lambda: a.swarm.is_member(b.identity.peer_id), 30)
                await host.connect(a.host.addrs()[0])
                answer = await introduce(host, a.identity.peer_id, member_entry(intruder))
                assert isinstance(answer, sync.Refused)
                assert not a.swarm.is_member(intruder.peer_id)
                assert rejected(a)["not a member"] >= 1
                with pytest.raises(Exception, match=r"stream|reset|broke|closed"):
                    await offer(host, a.identity.peer_id, body=model_offer(b"x"), seq=1)
                assert sorted(a.swarm.members()) == sorted(k.peer_id for k in keys)

    run(main)


def test_a_second_daemon_on_a_taken_port_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with daemon(node_config(tmp_path, "a", swarm="")) as a:
            port = a.host.listen_ports()[0]
            taken = node_config(tmp_path, "b", swarm="", listen=(f"/ip4/127.0.0.1/tcp/{port}",))
            with pytest.raises(ConfigError, match=f"port {port} .* already in use"):
                await run_daemon(taken, handle_signals=False)

    run(main)


def test_peers_that_do_not_speak_peerlearn_are_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain libp2p peer triggered a multi-line ERROR log every 10 s."""

    async def main() -> None:
        async with (
            daemon(node_config(tmp_path, "d")) as node,
            open_host(Identity.generate(), LOOPBACK) as plain,
        ):
            await plain.connect(node.host.addrs()[0])
            assert node.swarm is not None
            await eventually(lambda: plain.peer_id in node.swarm.foreign_peers)
            await node.swarm.sync_with(plain.peer_id)  # asked again: left alone
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) <= 1, [r.getMessage()[:200] for r in errors]

    run(main)


def test_compressed_models_are_rebuilt_only_when_well_formed(tmp_path: Path) -> None:
    """A member's int8 model is accepted; an unknown codec and non-finite scales are offences."""
    config = node_config(tmp_path, "d", algo="gossip-vca", round_interval=0.2)
    model = DigitsNet("mlp", 32, torch.Generator().manual_seed(0)).state_dict()
    wire_model, _ = ErrorFeedback(Compression.parse("int8")).encode(model)
    good = state_dict_to_bytes(wire_model)
    bad_scales = state_dict_to_bytes(
        {
            n: torch.full_like(t, math.inf) if n.endswith("/scale") else t
            for n, t in wire_model.items()
        }
    )

    def compressed(data: bytes, codec: str) -> dict[str, object]:
        body = model_offer(data)
        body["meta"] = {"round": 1, "compression": codec}
        return body

    async def main() -> None:
        async with daemon(config, learn=True) as node, hostile() as member:
            peer = node.identity.peer_id
            await member.connect(node.host.addrs()[0])
            await introduce(member, peer, member_entry(member.identity))
            cases = [
                (good, "zip", "not a codec|compression must be"),
                (bad_scales, "int8", "non-finite"),
            ]
            for seq, (data, codec, reason) in enumerate(cases, start=2):
                _, stream = await offer(
                    member, peer, body=compressed(data, codec), seq=seq, payload=data
                )
                verdict = wire.unpack(await _next(stream))
                assert verdict["ok"] is False
                assert re.search(reason, str(verdict["reason"])), verdict
            assert node.learner is not None
            assert node.learner.transport.models_received == 0
            _, stream = await offer(
                member, peer, body=compressed(good, "int8"), seq=9, payload=good
            )
            assert wire.unpack(await _next(stream))["ok"] is True
            await eventually(
                lambda: node.learner is not None and node.learner.transport.models_received == 1
            )

    run(main)
