"""Attack 3 of the open swarm: a member that ratchets the update-norm bound.

Before: the bound was ``10 * (|own| + sqrt(n))``, relative to the receiver's own model. A
member that sent the receiver's model plus a change of norm just under that bound, every
round, was accepted about 25 times in a row; the bound climbed from 616 to 5e19 and the
victim's accuracy fell from 0.97 to 0.04-0.17 (another honest node's to 0.76), with the
default filter. In the simulator (``bench/learning_claims.py --only bounds``; 10 nodes, one
attacker that does this to every node it pushes to): honest accuracy 0.96 -> 0.74, worst
node 0.11.

Now a received model farther than ``update_clip_ratio`` times the median distance of the
other recent senders' models is scaled back to it. The tests below run an omniscient
attacker (it reads the victim's model and bound in memory) against real daemons in virtual
time, with the clipping on, and off to show the attack has teeth.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import trio

from peerlearn.identity import Identity
from peerlearn.learning import attacks
from peerlearn.learning.hygiene import update_norm_bound
from peerlearn.node import blob
from peerlearn.node.daemon import Daemon
from peerlearn.node.host_api import OpenGate
from peerlearn.node.learning_transport import MODEL_KIND
from peerlearn.tensors import state_dict_to_bytes
from tests.adversarial.open_swarm import serve_member, swarm_config
from tests.memory_host import WALL_CLOCK_EPOCH, MemoryHost
from tests.virtual import swarm, until, virtual

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NODES = 6
ROUNDS_ATTACKED = 30


def _round(d: Daemon) -> int:
    assert d.learner is not None
    return d.learner.current_round()


def _accuracy(d: Daemon) -> float:
    assert d.learner is not None
    assert d.learner.accuracy is not None
    return d.learner.accuracy


async def _ratchet(host: MemoryHost, victim: Daemon, rounds: int) -> int:
    """Push the victim its own model plus a change just under its bound, once a round;
    returns how many it took."""
    learner = victim.learner
    assert learner is not None
    pk = host.identity.public_key
    direction = attacks.ratchet_direction(learner.model, torch.Generator().manual_seed(7))
    taken = 0
    for _ in range(rounds):
        round_ = _round(victim)
        own = learner.model
        bound = learner.bound.limit_for(pk) or update_norm_bound(
            own, learner.bound.max_update_ratio
        )
        data = state_dict_to_bytes(attacks.ratchet(own, bound, direction))
        now = WALL_CLOCK_EPOCH + trio.current_time()
        try:
            await blob.push_blob(
                lambda: host.open_stream(victim.identity.peer_id, blob.PROTOCOL),
                host.identity,
                int(now * 1000),
                data,
                kind=MODEL_KIND,
                meta={"round": round_ + 1},
                wall_clock=lambda: WALL_CLOCK_EPOCH + trio.current_time(),
            )
            taken += 1
        except Exception as exc:  # refused: the attack's own problem
            print("refused:", exc)
        await until(lambda r=round_: _round(victim) > r, 60)
    return taken


def _attack(root: Path, clip: float) -> tuple[float, float, float, int]:
    """(victim's accuracy before, after; the others' mean after; models taken)."""
    out: list[tuple[float, float, float, int]] = []

    async def main() -> None:
        base = dataclasses.replace(
            swarm_config("ratchet", NODES), algo="gossip-vca", update_clip_ratio=clip
        )
        async with swarm(root) as s:
            await s.start_all(NODES, base)
            daemons = list(s.daemons.values())
            await until(lambda: all(_round(d) >= 15 for d in daemons), 300)
            victim = daemons[1]
            before = _accuracy(victim)
            identity = Identity.from_seed(b"ratchet".ljust(32, b"\0"))
            async with s.network._open(identity, OpenGate(), swarm_services=True) as host:
                host.set_handler(*serve_member("ratchet", host))
                await host.connect(victim.addrs()[0])
                await until(
                    lambda: victim.swarm is not None and victim.swarm.is_member(identity.peer_id),
                    30,
                )
                taken = await _ratchet(host, victim, ROUNDS_ATTACKED)
            others = [_accuracy(d) for d in daemons if d is not victim]
            out.append((before, _accuracy(victim), sum(others) / len(others), taken))

    virtual(main)
    print(
        f"clip {clip}: victim {out[0][0]:.3f} -> {out[0][1]:.3f}, others {out[0][2]:.3f}, "
        f"{out[0][3]} taken"
    )
    return out[0]


def test_a_member_cannot_ratchet_the_bound_to_ruin_a_node(tmp_path: Path) -> None:
    before, after, others, taken = _attack(tmp_path / "on", 1.0)
    assert taken == ROUNDS_ATTACKED  # nothing refused: the models are clipped, then merged
    assert after >= before - 0.05
    assert others >= 0.9


def test_without_clipping_the_same_attack_ruins_the_victim(tmp_path: Path) -> None:
    before, after, _, _ = _attack(tmp_path / "off", 0.0)
    assert before >= 0.9
    assert after < 0.5
