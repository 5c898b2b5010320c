"""The gossip / D-PSGD core: its state machine, and the simulator and the daemon's driver
making the same decisions with it (the daemon's driver in virtual time, trio's MockClock)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from peerlearn.errors import LocalProtocolError, RemoteProtocolError
from peerlearn.gossip import rounds
from peerlearn.gossip.rounds import MergeRound, Phase, Received, RoundSettings, RoundsNode
from peerlearn.node.config import NodeConfig
from peerlearn.node.rounds_driver import ATTACKER_VIEW_ROUNDS, PeersModels, RoundsDriver
from peerlearn.sim.simulator import SimConfig, Simulation

ME, A, B, C = (bytes([i]) * 32 for i in range(4))


def test_a_round_trains_sends_collects_then_merges() -> None:
    core = RoundsNode(ME, RoundSettings("gossip", 2, 5.0, 2), random.Random(0))
    core.set_members([ME, A, B, C])
    core.start(now=100.0)
    assert core.get_timer() == 100.0
    core.handle_timer(100.0)
    assert core.next_event() == rounds.TrainRound(1)
    assert core.phase is Phase.TRAINING
    assert core.get_timer() is None  # waiting for the driver, not for time
    core.receive(A, Received(1, "a1"), 101.0)
    core.trained(1, "mine", 102.0)
    sends = core.messages_to_send()
    assert len(sends) == 2
    assert {s.dst for s in sends} <= {A, B, C}
    assert all(s.model == "mine" and s.round == 1 for s in sends)
    assert core.get_timer() == 105.0  # collecting until round_interval after the start
    core.receive(A, Received(1, "a1-again"), 103.0)  # the latest per peer counts
    core.receive(B, Received(1, "b1"), 104.0)
    core.handle_timer(104.9)
    assert core.next_event() is None
    core.handle_timer(105.0)
    assert core.next_event() == MergeRound(1, ["a1-again", "b1"], [A, B])
    assert core.completed == 0
    core.merged(1, 105.5)
    assert core.completed == 1
    core.handle_timer(105.5)
    assert core.next_event() == rounds.TrainRound(2)
    core.trained(2, "mine2", 120.0)  # training took longer than a round: merge at once
    assert core.get_timer() == 120.0
    core.handle_timer(120.0)
    assert isinstance(core.next_event(), MergeRound)
    core.merged(2, 120.0)
    assert core.phase is Phase.FINISHED
    assert core.get_timer() is None
    core.receive(A, Received(3, "late"), 121.0)  # ignored once finished
    with pytest.raises(LocalProtocolError):
        core.trained(3, "x", 122.0)


def test_dpsgd_targets_are_a_graph_every_member_computes_alike() -> None:
    members = [bytes([i]) * 32 for i in range(10)]
    graphs = {m: set(rounds.ring_neighbours(m, members, 4)) for m in members}
    for node, neighbours in graphs.items():
        assert node not in neighbours
        assert 2 <= len(neighbours) <= 4
        assert all(node in graphs[other] for other in neighbours)  # undirected


@given(st.data())
def test_any_sequence_of_inputs_keeps_the_core_consistent(data: st.DataObject) -> None:
    """Whatever order inputs come in, the core only asks for rounds in order, never sends
    to itself, and a driver error (a wrong round) is our misuse, not a crash."""
    core = RoundsNode(ME, RoundSettings("gossip-vca", 2, 1.0, 5), random.Random(1))
    core.set_members([ME, A, B])
    now = 0.0
    core.start(now)
    asked: list[tuple[str, int]] = []
    for _ in range(data.draw(st.integers(1, 60))):
        now += data.draw(st.floats(0.0, 2.0))
        action = data.draw(st.sampled_from(["timer", "receive", "trained", "merged"]))
        round_ = data.draw(st.integers(0, 6))
        try:
            if action == "timer":
                core.handle_timer(now)
            elif action == "receive":
                core.receive(data.draw(st.sampled_from([A, B, ME])), Received(round_, 0), now)
            elif action == "trained":
                core.trained(round_, "m", now)
            else:
                core.merged(round_, now)
        except LocalProtocolError:
            pass
        while (event := core.next_event()) is not None:
            asked.append((type(event).__name__, event.round))
        assert all(s.dst != ME for s in core.messages_to_send())
    expected = [(kind, r) for r in range(1, 6) for kind in ("TrainRound", "MergeRound")]
    assert asked == expected[: len(asked)]


@pytest.mark.parametrize(
    "meta", [{}, {"round": 0}, {"round": -1}, {"round": True}, {"round": 2**60}, [1], None]
)
def test_model_metadata_from_peers_is_checked(meta: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        rounds.decode_meta(meta, None)
    assert rounds.decode_meta({"round": 3}, "m") == Received(3, "m")


# --- the simulator and the daemon's driver, same core, same decisions -------------------


@pytest.fixture
def recorded_sends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bytes, bytes]]:
    """Every (round, sender, receiver) any ``RoundsNode`` decides, in any driver."""
    sends: list[tuple[int, bytes, bytes]] = []
    original = RoundsNode.messages_to_send

    def recording(self: RoundsNode) -> list[rounds.Send]:
        out = original(self)
        sends.extend((s.round, self.me, s.dst) for s in out)
        return out

    monkeypatch.setattr(RoundsNode, "messages_to_send", recording)
    return sends


@dataclass
class _Transport:
    """Delivers pushes to the other in-process drivers at once (a perfect network)."""

    drivers: dict[bytes, RoundsDriver] = field(default_factory=dict)
    me: bytes = b""

    async def push_model(self, dst: bytes, model: Any, kind: str, meta: Any) -> bool:
        await trio.sleep(0.01)
        self.drivers[dst].receive_model(self.me, kind, meta, model)
        return True


class _Learner:
    """What ``RoundsDriver`` asks of the daemon's learner, without torch or a network."""

    def __init__(self, config: NodeConfig, me: bytes, members: list[bytes]) -> None:
        self.config, self.me, self.members = config, me, members
        self.round = 0
        self.model: Any = torch.zeros(1)
        self.transport = _Transport(me=me)
        self.finished: list[int] = []
        self.poisons_models = False

    def members_pk(self) -> list[bytes]:
        return self.members

    async def train(self, model: Any) -> Any:
        await trio.sleep(0.3)  # virtual seconds
        return model + 1

    async def merge(self, own: Any, received: list[Any]) -> Any:
        return own

    def poison(self, trained: Any, received: list[Any]) -> Any:
        return trained

    async def finish_round(self, round_: int, model: Any) -> None:
        self.round, self.model = round_, model
        self.finished.append(round_)


@pytest.mark.parametrize("algo", ["gossip", "dpsgd"])
def test_simulator_and_daemon_driver_make_the_same_decisions(
    algo: str, recorded_sends: list[tuple[int, bytes, bytes]], tmp_path: Path
) -> None:
    nodes, rounds_, fanout, seed = 6, 5, 2, 3
    simulation = Simulation(
        SimConfig(algo=algo, nodes=nodes, rounds=rounds_, fanout=fanout, seed=seed, local_steps=1)
    )
    simulation.run()
    in_simulator = sorted(recorded_sends)
    recorded_sends.clear()

    members = [n.pk for n in simulation.nodes]
    config = NodeConfig(
        data_dir=tmp_path, algo=algo, fanout=fanout, round_interval=1.0, max_rounds=rounds_
    )
    learners = [_Learner(config, pk, members) for pk in members]
    # the simulator seeds node i's core with seed * 7919 + i (see Simulation._run_rounds)
    drivers = {
        lr.me: RoundsDriver(lr, random.Random(seed * 7_919 + i))  # type: ignore[arg-type]
        for i, lr in enumerate(learners)
    }
    for learner in learners:
        learner.transport.drivers = drivers

    async def main() -> None:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for driver in drivers.values():
                nursery.start_soon(driver.run)
        # 5 rounds of 1 s each (training 0.3 s fits inside), in virtual time
        assert trio.current_time() - started == pytest.approx(rounds_ * 1.0, abs=0.5)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert all(lr.finished == list(range(1, rounds_ + 1)) for lr in learners)
    assert sorted(recorded_sends) == in_simulator
    assert len(in_simulator) >= nodes * rounds_ * min(fanout, 2)


def test_an_attacker_sees_each_peers_latest_model_of_recent_rounds() -> None:
    seen = PeersModels()
    a, b = torch.zeros(1), torch.ones(1)
    seen.merged(MergeRound(1, [{"w": a}, {"w": a}], [b"p1", b"p2"]))
    seen.merged(MergeRound(2, [{"w": b}], [b"p1"]))
    assert sorted(float(m["w"]) for m in seen.recent(3)) == [0.0, 1.0]  # p1's newer, p2's
    assert [float(m["w"]) for m in seen.recent(1 + ATTACKER_VIEW_ROUNDS + 1)] == [1.0]
    assert seen.recent(2 + ATTACKER_VIEW_ROUNDS + 1) == []
