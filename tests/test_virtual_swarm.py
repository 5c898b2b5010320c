"""Whole swarms of real daemons in one process, in virtual time (trio's MockClock).

Each node is ``run_daemon`` itself: swarm service, discovery, CRDT sync, the learner with its
task, its protocol core's driver and its checkpoints on disk. Only the host is in memory
(``tests.memory_host``) and blocking work runs inline, so that minutes of a swarm's life take
seconds. Identities are seeded; trio still shuffles the order of ready tasks, so runs differ a
little and the thresholds leave room for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing

from peerlearn.identity import KEY_FILE_NAME, Identity, create_identity
from peerlearn.node.config import NodeConfig
from peerlearn.node.daemon import Daemon, run_daemon
from peerlearn.tensors import state_dict_to_bytes
from tests.memory_host import MemoryNetwork

STEP = 0.5  # virtual seconds between looks at the swarm


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    """All nodes train on this one thread in turn: tiny models run fastest without
    intra-op threads, which only contend with each other on a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def virtual(main: Callable[[], Any]) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class Swarm:
    """Daemons on one in-memory network; each can be killed and started again with the same
    data directory."""

    def __init__(self, root: Path, nursery: trio.Nursery, network: MemoryNetwork) -> None:
        self.root, self.nursery, self.network = root, nursery, network
        self.daemons: dict[int, Daemon] = {}
        self.scopes: dict[int, trio.CancelScope] = {}

    def config(self, i: int, base: NodeConfig) -> NodeConfig:
        """Node ``i``'s settings; its identity (and so its seeds) is the same every run."""
        data_dir = self.root / f"node{i}"
        if not data_dir.exists():
            data_dir.mkdir(parents=True, mode=0o700)
            seed = hashlib.sha256(f"node {i}".encode()).digest()
            create_identity(data_dir / KEY_FILE_NAME, Identity.from_seed(seed))
        return dataclasses.replace(base, data_dir=data_dir)

    async def start(self, i: int, config: NodeConfig) -> Daemon:
        scope = trio.CancelScope()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await run_daemon(
                    config,
                    handle_signals=False,
                    runtime=self.network.runtime(),
                    task_status=task_status,
                )

        daemon: Daemon = await self.nursery.start(run)
        self.daemons[i], self.scopes[i] = daemon, scope
        return daemon

    async def start_all(self, nodes: int, base: NodeConfig) -> NodeConfig:
        """Node 0, then nodes 1.. bootstrapped from it; returns the others' settings."""
        first = await self.start(0, self.config(0, base))
        boot = dataclasses.replace(base, bootstrap=(first.addrs()[0],))
        for i in range(1, nodes):
            await self.start(i, self.config(i, boot))
        return boot

    def kill(self, i: int) -> None:
        """Gone at once, as after SIGKILL: no graceful shutdown, nothing saved at exit."""
        self.scopes.pop(i).cancel()
        del self.daemons[i]


@asynccontextmanager
async def swarm(root: Path) -> AsyncIterator[Swarm]:
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        yield Swarm(root, nursery, network)
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool], virtual_seconds: float) -> float:
    """Wait (in virtual time) until ``condition()``; returns how long it took."""
    started = trio.current_time()
    with trio.fail_after(virtual_seconds):
        while not condition():  # noqa: ASYNC110 (polling costs nothing in virtual time)
            await trio.sleep(STEP)
    return trio.current_time() - started


def test_sixteen_nodes_that_know_only_the_first_find_and_connect_to_all(tmp_path: Path) -> None:
    nodes = 16
    base = NodeConfig(swarm="discovery", mdns=False, min_members=nodes)

    async def main() -> None:
        async with swarm(tmp_path) as s:
            await s.start_all(nodes, base)

            def everyone_knows_everyone() -> bool:
                return all(len(d.members()) == nodes for d in s.daemons.values())

            took = await until(everyone_knows_everyone, 120)
            assert took < 60, took
            # the swarm service dials members it learned of; nobody stays a leaf of node 0
            daemons = list(s.daemons.values())
            await until(lambda: all(len(d.connected_peer_ids()) >= 4 for d in daemons), 120)
            joins = [d.swarm.join_seconds for d in s.daemons.values() if d.swarm is not None]
            assert all(j is not None for j in joins), joins

    virtual(main)


def _learning(d: Daemon) -> dict[str, Any]:
    assert d.learner is not None
    return d.learner.status()


def test_sixteen_node_gossip_swarm_learns_digits(tmp_path: Path) -> None:
    nodes, rounds = 16, 12
    base = NodeConfig(
        swarm="learn", mdns=False, algo="gossip-vca", min_members=nodes, round_interval=1.0
    )

    async def main() -> None:
        async with swarm(tmp_path) as s:
            await s.start_all(nodes, base)
            took = await until(
                lambda: all(_learning(d)["round"] >= rounds for d in s.daemons.values()), 600
            )
            assert took < 30, took  # 12 rounds of 1 s each, plus joining
            states = [_learning(d) for d in s.daemons.values()]
            assert all(st["accuracy"] >= 0.8 for st in states), states
            assert all(st["models_received"] > 0 for st in states)

    virtual(main)


def test_a_node_restarted_from_its_data_dir_resumes_its_round_and_model(tmp_path: Path) -> None:
    nodes = 4
    base = NodeConfig(swarm="restart", mdns=False, algo="gossip", min_members=nodes)

    async def main() -> None:
        async with swarm(tmp_path) as s:
            boot = await s.start_all(nodes, base)
            await until(lambda: _learning(s.daemons[3])["round"] >= 5, 300)
            before = _learning(s.daemons[3])
            s.kill(3)
            await trio.sleep(10)  # the swarm goes on without it
            again = await s.start(3, s.config(3, boot))
            resumed = _learning(again)
            assert resumed["resumed_from_round"] == before["round"]
            assert resumed["accuracy"] == before["accuracy"]  # the checkpoint's model
            target = max(_learning(d)["round"] for d in s.daemons.values()) + 5
            await until(lambda: _learning(again)["round"] >= target, 300)
            assert _learning(again)["accuracy"] >= 0.85

    virtual(main)


def test_modest_rounds_go_on_after_three_quarters_of_the_swarm_dies(tmp_path: Path) -> None:
    nodes = 8
    base = NodeConfig(swarm="modest", mdns=False, algo="modest", sample_size=4, min_members=nodes)

    async def main() -> None:
        async with swarm(tmp_path) as s:
            await s.start_all(nodes, base)
            await until(lambda: all(_learning(d)["round"] >= 5 for d in s.daemons.values()), 300)
            for i in range(2, nodes):
                s.kill(i)
            reached = max(_learning(d)["round"] for d in s.daemons.values())
            took = await until(
                lambda: all(_learning(d)["round"] >= reached + 5 for d in s.daemons.values()), 600
            )
            assert took < 300, took  # dead trainers and aggregators time out, then are skipped
            states = [_learning(d) for d in s.daemons.values()]
            assert all(st["accuracy"] >= 0.85 for st in states), states

    virtual(main)


def test_bristle_daemons_learn_their_familiar_classes_on_label_skewed_shards(
    tmp_path: Path,
) -> None:
    base = NodeConfig(
        swarm="bristle",
        mdns=False,
        algo="gossip",
        filter="bristle",
        partition="label-skew",
        min_members=2,
        max_rounds=15,
        round_interval=0.2,
    )

    async def main() -> None:
        async with swarm(tmp_path) as s:
            first = await s.start(0, s.config(0, dataclasses.replace(base, data_shard="0/2")))
            boot = dataclasses.replace(base, data_shard="1/2", bootstrap=(first.addrs()[0],))
            await s.start(1, s.config(1, boot))
            await until(lambda: all(_learning(d)["round"] >= 15 for d in s.daemons.values()), 300)
            # Shards of 4 consecutive classes from i: {0..3} and {1..4}, so 5 of 10 classes
            # are held and about 0.5 is the ceiling; an untrained output layer scores ~0.1.
            states = [_learning(d) for d in s.daemons.values()]
            assert all(st["accuracy"] > 0.4 for st in states), states

    virtual(main)


@pytest.mark.parametrize(
    ("algo", "codec", "fewer"), [("gossip-vca", "int4", 4), ("modest", "int8", 2.5)]
)
def test_compressed_swarms_learn_sending_a_fraction_of_the_bytes(
    tmp_path: Path, algo: str, codec: str, fewer: float
) -> None:
    nodes, rounds = 6, 12
    base = NodeConfig(
        swarm="compressed",
        mdns=False,
        algo=algo,
        compression=codec,
        sample_size=4,
        min_members=nodes,
        round_interval=1.0,
    )

    async def main() -> None:
        async with swarm(tmp_path) as s:
            await s.start_all(nodes, base)
            await until(
                lambda: all(_learning(d)["round"] >= rounds for d in s.daemons.values()), 600
            )
            learner = s.daemons[0].learner
            assert learner is not None
            whole = len(state_dict_to_bytes(learner.model))
            states = [_learning(d) for d in s.daemons.values()]
            assert all(st["accuracy"] >= 0.8 for st in states), states
            assert sum(st["models_received"] for st in states) > 0
            sent = sum(st["model_bytes_sent"] for st in states)
            models = sum(st["models_sent"] for st in states)
            assert sent / models < whole / fewer, (sent / models, whole)

    virtual(main)
