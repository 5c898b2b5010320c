"""The daemon's MoDeST driver in virtual time (trio's MockClock): ten nodes learn, eight die,
the last two go on. No network and no torch: a perfect in-process transport and numbers for
models, so what is tested is the driver and the core together, in seconds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing

from peerlearn.gossip.crdt import Entry
from peerlearn.node.config import NodeConfig
from peerlearn.node.modest_driver import ModestDriver
from peerlearn.node.offload import inline

NODES = 10
ROUND_TIME = 1.0  # virtual seconds of training per round


@dataclass
class _Swarm:
    listeners: list[Any] = field(default_factory=list)
    entries: dict[Any, Entry] = field(default_factory=dict)

    @property
    def state(self) -> _Swarm:
        return self


class _Net:
    """Delivers between the drivers of live nodes after a small virtual delay."""

    def __init__(self) -> None:
        self.drivers: dict[bytes, ModestDriver] = {}
        self.alive: set[bytes] = set()

    def up(self, pk: bytes) -> bool:
        return pk in self.alive

    def broadcast_round(self, owner: bytes, round_: int) -> None:
        """A round record reaching every live node, as the swarm state's gossip would."""
        entry = Entry(owner, "round", round_, {"round": round_}, b"")
        for pk, driver in self.drivers.items():
            if pk != owner and self.up(pk):
                driver._on_crdt_change([entry])


class _Transport:
    def __init__(self, net: _Net, me: bytes) -> None:
        self.net, self.me = net, me
        self.on_message: Any = None

    async def push_model(self, dst: bytes, model: Any, kind: str, meta: Any) -> bool:
        await trio.sleep(0.05)
        if not (self.net.up(dst) and self.net.up(self.me)):
            return False
        self.net.drivers[dst].receive_model(self.me, kind, meta, model)
        return True

    async def send_message(self, dst: bytes, body: Any) -> bool:
        await trio.sleep(0.01)
        if not (self.net.up(dst) and self.net.up(self.me)):
            return False
        self.net.drivers[dst].receive_small(self.me, body)
        return True

    async def close_message_streams(self) -> None:
        pass


class _Learner:
    """What ``ModestDriver`` asks of the daemon's learner."""

    def __init__(self, net: _Net, me: bytes, members: list[bytes], config: NodeConfig) -> None:
        self.net, self.me, self.members, self.config = net, me, members, config
        self.swarm = _Swarm()
        self.transport = _Transport(net, me)
        self.model: Any = 0.0
        self.round = 0
        self.resumed = None
        self.rounds: list[int] = []
        self.offload = inline

    def members_pk(self) -> list[bytes]:
        return self.members

    def rule(self, own: Any, models: list[Any]) -> Any:
        return sum(models) / len(models)

    async def train(self, model: Any) -> Any:
        await trio.sleep(ROUND_TIME)
        return model + 1.0

    async def finish_round(self, round_: int, model: Any) -> None:
        if round_ <= self.round:
            return
        self.round, self.model = round_, model
        self.rounds.append(round_)
        self.net.broadcast_round(self.me, round_)

    def done(self) -> bool:
        return False


def test_modest_driver_keeps_rounds_going_after_most_of_the_swarm_dies(tmp_path: Path) -> None:
    members = [hashlib.sha256(bytes([i])).digest() for i in range(NODES)]
    config = NodeConfig(
        data_dir=tmp_path, algo="modest", sample_size=4, min_members=NODES, round_interval=1.0
    )
    net = _Net()
    learners = {pk: _Learner(net, pk, members, config) for pk in members}
    net.alive = set(members)

    def highest() -> int:
        return max(lr.round for pk, lr in learners.items() if net.up(pk))

    async def until(condition: Any) -> None:
        while True:
            if condition():
                return
            await trio.sleep(1)

    async def run(driver: ModestDriver, scope: trio.CancelScope) -> None:
        with scope:
            await driver.run()

    async def main() -> None:
        for pk, learner in learners.items():
            net.drivers[pk] = ModestDriver(learner)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            scopes = {pk: trio.CancelScope() for pk in members}
            for pk, driver in net.drivers.items():
                nursery.start_soon(run, driver, scopes[pk])
            with trio.fail_after(600):  # virtual seconds
                await until(lambda: highest() >= 10)
            before_kill = trio.current_time()
            for pk in members[2:]:  # 8 of 10 die at once, whoever they are
                net.alive.discard(pk)
                scopes[pk].cancel()
            reached = highest()
            with trio.fail_after(1200):
                await until(lambda: highest() >= reached + 5)
            after_kill = trio.current_time() - before_kill
            nursery.cancel_scope.cancel()
        survivors = [learners[pk] for pk in members[:2]]
        assert all(lr.rounds == sorted(set(lr.rounds)) for lr in survivors)
        # the survivors agree on where the swarm is and went 5 rounds past the kill
        assert max(lr.round for lr in survivors) >= reached + 5
        assert after_kill < 600, after_kill

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
