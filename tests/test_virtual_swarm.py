"""Whole swarms of real daemons in one process, in virtual time (``tests.virtual``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trio

from peerlearn.node.config import NodeConfig
from peerlearn.node.daemon import Daemon
from peerlearn.tensors import state_dict_to_bytes
from tests.virtual import swarm, until, virtual

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
