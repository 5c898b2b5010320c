"""Attacks 4 and 5 of the open swarm: holding a node's memory and its bulk port without
sending a byte.

4. Before: two identities each sent a signed offer of a 512 MiB ``model_update`` and never
   sent the body. The whole 1 GiB blob budget stayed reserved for about 20 s (until the
   stream's pace ran out) and honest models were refused as busy; the attacker repeated.
   Now a body must start within ``BODY_START_TIMEOUT`` (5 s) of its acceptance, and bodies
   nobody asked for may hold half the budget at most: models to learn from are never
   refused for them.
5. Before: 16 connections that connect to the bulk port and wait took its 8 vetting slots,
   and an invited sender waited until it timed out. Now the connection without a token
   that has waited longest is closed for a new one.
"""

from __future__ import annotations

import hashlib
import os
import socket
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from peerlearn import wire
from peerlearn.identity import Identity
from peerlearn.node import blob
from peerlearn.node.bulk_path import MAX_HANDSHAKES_PER_IP
from peerlearn.node.daemon import MODEL_UPDATE_KIND, Daemon
from peerlearn.node.framing import receive_frame, send_frame
from peerlearn.node.host_api import OpenGate
from tests.adversarial.open_swarm import measure, serve_member, swarm_config
from tests.memory_host import WALL_CLOCK_EPOCH, MemoryHost
from tests.test_bulk_path import BIG, push, run, two_peers
from tests.virtual import Swarm, swarm, until, virtual

NODES = 4


async def _hold_without_body(host: MemoryHost, victim: Daemon, size: int) -> str:
    """Offer ``size`` bytes of model_update, then send nothing; returns how it ended."""
    stream = await host.open_stream(victim.identity.peer_id, blob.PROTOCOL)
    body = {
        "sha256": hashlib.sha256(b"x").digest(),
        "size": size,
        "kind": MODEL_UPDATE_KIND,
        "meta": {},
    }
    now = WALL_CLOCK_EPOCH + trio.current_time()
    seq = int(now * 1000)
    envelope = wire.seal(host.identity, blob.OFFER_TYPE, body, seq=seq, timestamp=now)
    await send_frame(stream, envelope)
    reply = wire.unpack(await receive_frame(stream, blob.MAX_CONTROL_FRAME))
    if not reply["ok"]:
        return f"refused: {reply['reason']}"
    try:
        verdict = wire.unpack(await receive_frame(stream, blob.MAX_CONTROL_FRAME))
    except Exception as exc:  # the stream was cut
        return f"cut off: {exc}"
    return f"told: {verdict['reason']}"


@pytest.mark.usefixtures("one_torch_thread")
def test_offers_whose_bodies_never_come_do_not_keep_models_out(tmp_path: Path) -> None:
    outcomes: list[str] = []

    async def main() -> None:
        async with swarm(tmp_path) as s:
            await s.start_all(NODES, swarm_config("budget", NODES))
            daemons = list(s.daemons.values())
            await until(lambda: all(_round(d) >= 3 for d in daemons), 300)
            before = await measure(daemons, 30)
            victim = daemons[0]
            half = victim.config.blob_memory // 2
            async with trio.open_nursery() as nursery:
                for n in range(2):  # two identities, each offering as much as a blob may be
                    identity = Identity.from_seed(bytes([n + 1]) * 32)
                    await nursery.start(_attacker, s, identity, victim, half, outcomes)
                during = await measure(daemons, 30)
                nursery.cancel_scope.cancel()
            await trio.sleep(blob.BODY_START_TIMEOUT + 1)
            held = victim.blob_budget.unsolicited_held
        cut = sum(o.startswith("cut off") for o in outcomes)
        busy = sum("busy" in o for o in outcomes)
        print(f"{before} -> {during}; {cut} offers cut off, {busy} refused as busy")
        assert during.per_round >= 0.9 * before.per_round, (before, during)
        assert cut >= 3  # each held its reservation 5 s at most
        assert busy > 0  # the second identity found the unsolicited half taken
        assert held == 0

    virtual(main)


def _round(daemon: Daemon) -> int:
    assert daemon.learner is not None
    return daemon.learner.current_round()


async def _attacker(
    s: Swarm,
    identity: Identity,
    victim: Daemon,
    size: int,
    outcomes: list[str],
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    async with s.network._open(identity, OpenGate(), swarm_services=True) as host:
        assert isinstance(host, MemoryHost)
        host.set_handler(*serve_member("budget", host))
        await host.connect(victim.addrs()[0])
        swarm_state = victim.swarm
        assert swarm_state is not None
        await until(lambda: swarm_state.is_member(identity.peer_id), 30)
        task_status.started()
        while True:  # offer again as soon as the last one ended
            outcomes.append(await _hold_without_body(host, victim, size))
            await trio.sleep(0.1)


def _idle_connections(port: int, count: int) -> ExitStack:
    stack = ExitStack()
    for _ in range(count):
        stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
    return stack


@pytest.mark.integration
def test_idle_connections_to_the_bulk_port_cannot_keep_an_invited_sender_out() -> None:
    received: list[bytes] = []
    body = os.urandom(BIG)

    async def main() -> None:
        async with two_peers(received) as (a, b, a_bulk, b_bulk):
            count = 2 * MAX_HANDSHAKES_PER_IP
            idle = await trio.to_thread.run_sync(_idle_connections, b_bulk.port, count)
            try:
                started = trio.current_time()
                with trio.fail_after(5):
                    await push(a, b, a_bulk, body)
                took = trio.current_time() - started
            finally:
                idle.close()
            assert bytes(received[0]) == body
            assert a_bulk.bodies_sent == 1  # on the bulk path, not the stream fallback
            assert b_bulk.refused >= MAX_HANDSHAKES_PER_IP  # the idle ones made room
            print(f"pushed past {2 * MAX_HANDSHAKES_PER_IP} idle connections in {took:.2f} s")

    run(main)
