"""Attacks on an open swarm's logic, aimed at real daemons on the in-memory network in
virtual time (``tests.virtual``), with what they cost the honest nodes measured.

``Flooder`` is a member that hands out self-signed fake members: on every pull from it (an
honest node syncs with each peer it connects to, and with a few at random every
``ANTI_ENTROPY_INTERVAL``) and over gossip. ``measure_membership_attack`` runs an honest
gossip swarm, lets it settle, measures the models each honest node receives per round, then
floods it and measures again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from peerlearn.gossip import sync
from peerlearn.gossip.crdt import Entry, clock_at, entries_to_wire, sign_entry
from peerlearn.identity import Identity
from peerlearn.node.config import NodeConfig
from peerlearn.node.daemon import Daemon
from peerlearn.node.framing import receive_frame, send_frame
from peerlearn.node.host_api import OpenGate, Stream, StreamHandler
from peerlearn.node.swarm import topic
from tests.memory_host import WALL_CLOCK_EPOCH, MemoryHost, MemoryNetwork
from tests.virtual import Swarm, swarm, until

GOSSIP_BATCH = 100  # fake records per gossip message (about 16 KiB)


class Flooder:
    """A swarm member (a real host on the network) whose state holds ``count`` fake
    members, each a fresh self-signed identity with no address, dated ``ahead`` seconds
    past the wall clock and signed again every ``resign_every`` seconds (0: never). It
    hands them out on every pull, and over gossip too if ``gossip``."""

    def __init__(
        self,
        swarm_name: str,
        count: int,
        *,
        ahead: float = 0.0,
        resign_every: float = 0.0,
        gossip: bool = False,
    ) -> None:
        self.swarm_name = swarm_name
        self.gossip = gossip
        self.identity = Identity.from_seed(b"flooder".ljust(32, b"\0"))
        self.fakes = [Identity.from_seed(i.to_bytes(32, "big")) for i in range(1, count + 1)]
        self.ahead = ahead
        self.resign_every = resign_every
        self.entries: list[Entry] = []
        self.member: Entry | None = None
        self.pulls_served = 0

    def _sign_all(self) -> None:
        clock = clock_at(WALL_CLOCK_EPOCH + trio.current_time() + self.ahead)
        self.entries = [
            sign_entry(fake, self.swarm_name, "member", clock, {"addrs": []}) for fake in self.fakes
        ]
        now = clock_at(WALL_CLOCK_EPOCH + trio.current_time())
        self.member = sign_entry(self.identity, self.swarm_name, "member", now, {"addrs": []})

    async def _serve(self, stream: Stream) -> None:
        await receive_frame(stream, sync.MAX_SYNC_FRAME)  # their hello
        assert self.member is not None
        await send_frame(stream, sync.encode_hello(self.member))
        while True:
            want = sync.decode_frame(await receive_frame(stream, sync.MAX_SYNC_FRAME))
            if not isinstance(want, sync.Want):
                return
            for data in sync.encode_entries(self.entries):
                await send_frame(stream, data)
            self.pulls_served += 1
            if want.page.hi is None:
                return

    async def run(self, host: MemoryHost, targets: Sequence[Daemon]) -> None:
        """Connect to every target, then keep the fakes fresh and gossiped until cancelled."""
        self._sign_all()
        host.set_handler(sync.SYNC_PROTOCOL, self._serve)
        for daemon in targets:
            await host.connect(daemon.addrs()[0])
        while True:
            for start in range(0, len(self.entries) if self.gossip else 0, GOSSIP_BATCH):
                batch = self.entries[start : start + GOSSIP_BATCH]
                await host.publish(topic(self.swarm_name), entries_to_wire(batch))
            if not self.resign_every:
                await trio.sleep_forever()
            await trio.sleep(self.resign_every)
            self._sign_all()


def serve_member(swarm_name: str, host: MemoryHost) -> tuple[str, StreamHandler]:
    """The sync protocol and a handler that answers every pull with ``host``'s member
    record and nothing else: an honest node that connects to ``host`` syncs with it and
    so admits it as a member (open admission)."""
    member = sign_entry(
        host.identity, swarm_name, "member", clock_at(WALL_CLOCK_EPOCH), {"addrs": []}
    )

    async def serve(stream: Stream) -> None:
        await receive_frame(stream, sync.MAX_SYNC_FRAME)
        await send_frame(stream, sync.encode_hello(member))
        while True:
            want = sync.decode_frame(await receive_frame(stream, sync.MAX_SYNC_FRAME))
            if not isinstance(want, sync.Want):
                return
            for data in sync.encode_entries([]):
                await send_frame(stream, data)
            if want.page.hi is None:
                return

    return sync.SYNC_PROTOCOL, serve


@dataclass(frozen=True)
class Window:
    """What the honest nodes did in a span of virtual time."""

    rounds: int  # rounds completed, all honest nodes together
    models: int  # models received, all honest nodes together
    members_min: int  # the fewest honest members any honest node still held at the end

    @property
    def per_round(self) -> float:
        return self.models / self.rounds if self.rounds else 0.0


def _counts(daemons: Sequence[Daemon]) -> tuple[int, int]:
    rounds = models = 0
    for daemon in daemons:
        assert daemon.learner is not None
        rounds += daemon.learner.current_round()
        models += daemon.learner.transport.models_received
    return rounds, models


def _honest_members(daemons: Sequence[Daemon]) -> int:
    keys = [d.identity.public_key for d in daemons]
    least = len(keys)
    for daemon in daemons:
        assert daemon.swarm is not None
        least = min(least, sum(daemon.swarm.state.is_member(k) for k in keys))
    return least


async def measure(daemons: Sequence[Daemon], seconds: float) -> Window:
    rounds, models = _counts(daemons)
    await trio.sleep(seconds)
    rounds_after, models_after = _counts(daemons)
    return Window(rounds_after - rounds, models_after - models, _honest_members(daemons))


@dataclass(frozen=True)
class AttackResult:
    before: Window
    during: Window
    after: Window  # once the attacker has left
    fakes_held: int  # the most fake members any honest node held during the attack
    evicted: int  # owners evicted by honest nodes, all together
    banned_by: int  # honest nodes that banned the attacker


def swarm_config(name: str, nodes: int, **settings: Any) -> NodeConfig:
    return NodeConfig(
        swarm=name, mdns=False, algo="gossip", min_members=nodes, round_interval=1.0, **settings
    )


async def measure_membership_attack(
    root: Path,
    *,
    nodes: int,
    flooder: Callable[[], Flooder],
    window: float = 40.0,
    **settings: Any,
) -> AttackResult:
    """An honest swarm of ``nodes`` settles, runs ``window`` virtual seconds, is flooded for
    ``window`` seconds, then runs ``window`` seconds after the flooder left."""
    attacker = flooder()
    base = swarm_config(attacker.swarm_name, nodes, **settings)
    async with swarm(root) as s, AsyncExitStack() as stack:
        await s.start_all(nodes, base)
        daemons = list(s.daemons.values())
        await until(lambda: all(_round(d) >= 3 for d in daemons), 300)
        before = await measure(daemons, window)
        host = await stack.enter_async_context(_hostile_host(s, attacker.identity))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attacker.run, host, daemons)
            held = 0

            async def watch() -> None:
                nonlocal held
                while True:
                    held = max(held, max(_fakes_held(d, attacker) for d in daemons))
                    await trio.sleep(1.0)

            nursery.start_soon(watch)
            during = await measure(daemons, window)
            nursery.cancel_scope.cancel()
        flooder_id = attacker.identity.peer_id
        banned_by = sum(d.boundary.conduct.banned(flooder_id, trio.current_time()) for d in daemons)
        await stack.aclose()  # the attacker leaves
        after = await measure(daemons, window)
        evicted = sum(d.swarm.state.evicted_owners for d in daemons if d.swarm is not None)
        return AttackResult(before, during, after, held, evicted, banned_by)


def _round(daemon: Daemon) -> int:
    assert daemon.learner is not None
    return daemon.learner.current_round()


def _fakes_held(daemon: Daemon, attacker: Flooder) -> int:
    assert daemon.swarm is not None
    state = daemon.swarm.state
    return sum(state.is_member(fake.public_key) for fake in attacker.fakes)


def _hostile_host(s: Swarm, identity: Identity) -> Any:
    network: MemoryNetwork = s.network
    return network._open(identity, OpenGate(), swarm_services=True)
