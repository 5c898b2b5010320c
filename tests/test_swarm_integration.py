"""Five real daemon processes on 127.0.0.1 learning digits together, in wall-clock time.

The same behaviours (MoDeST, gossip-vca with a restart from a checkpoint, Bristle) run
in-process in virtual time in ``test_virtual_swarm.py``; these are the slow, real-socket
confirmation (``pytest -m slow tests/test_swarm_integration.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peerlearn.testnet.local import LocalSwarm
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NODES = 5
TARGET = 0.85
LEARN_TIMEOUT = 180  # seconds


def _swarm(root: Path, algo: str, rounds: int, **options: str) -> LocalSwarm:
    return LocalSwarm(
        root, NODES, swarm="test", algo=algo, max_rounds=rounds, round_interval=0.3, **options
    )


def _finished(swarm: LocalSwarm, rounds: int) -> list[dict[str, object]] | None:
    states = [swarm.learning(i) for i in range(swarm.size)]
    done = all(s and s["round"] >= rounds and s["accuracy"] is not None for s in states)
    return states if done else None


def test_modest_swarm_reaches_target_accuracy(tmp_path: Path) -> None:
    rounds = 30
    swarm = _swarm(tmp_path, "modest", rounds, sample_size="3")
    try:
        swarm.start_all()
        states = wait_until(lambda: _finished(swarm, rounds), LEARN_TIMEOUT, interval=1.0)
        for state in states:
            assert state["accuracy"] >= TARGET, (state, swarm.logs())
            assert state["members"] == NODES
        joins = [s["join_seconds"] for s in states[1:]]
        assert all(j is not None and j < 10 for j in joins), joins
    finally:
        codes = swarm.stop_all()
    assert codes == [0] * NODES, swarm.logs()


def test_gossip_vca_swarm_learns_and_a_killed_node_resumes_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    rounds = 40
    swarm = _swarm(tmp_path, "gossip-vca", rounds)
    try:
        swarm.start_all()
        before = wait_until(
            lambda: (s := swarm.learning(3)).get("round", 0) >= 8 and s, LEARN_TIMEOUT
        )
        swarm.kill(3)  # SIGKILL: no chance to clean up
        assert (swarm.data_dir(3).root / "checkpoint.msgpack").exists()
        swarm.start(3)
        resumed = wait_until(lambda: swarm.learning(3), 60)
        assert resumed["resumed_from_round"] is not None
        assert resumed["resumed_from_round"] >= before["round"]
        states = wait_until(lambda: _finished(swarm, rounds), LEARN_TIMEOUT, interval=1.0)
        for state in states:
            assert state["accuracy"] >= TARGET, (state, swarm.logs())
    finally:
        codes = swarm.stop_all()
    # node 3 was SIGKILLed and restarted: its second process is the one stopped here
    assert codes == [0] * NODES, swarm.logs()


def test_bristle_daemon_learns_its_familiar_classes(tmp_path: Path) -> None:
    swarm = LocalSwarm(
        tmp_path,
        2,
        swarm="b",
        algo="gossip",
        filter="bristle",
        partition="label-skew",
        max_rounds=15,
        round_interval=0.2,
    )
    try:
        swarm.start_all()
        states = wait_until(lambda: _finished(swarm, 15), LEARN_TIMEOUT, interval=0.5)
        # Shards of 4 consecutive classes from i: {0..3} and {1..4}, so 5 of 10 classes are
        # held and about 0.5 is the ceiling; an untrained output layer scores about 0.1.
        assert all(s["accuracy"] > 0.4 for s in states), (states, swarm.logs())
    finally:
        assert swarm.stop_all() == [0, 0], swarm.logs()
