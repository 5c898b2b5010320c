"""Membership attacks on an open swarm, at full size, against real daemons in virtual time.

    python bench/open_swarm.py [--nodes 10] [--only ATTACK] [--scale 1.0]

Each row runs a swarm of honest gossip daemons on the in-memory network (the test suite's
``tests.virtual``: real daemons, in-memory host, trio's MockClock), measures the models
they receive in 40 virtual seconds, floods it for 40 s with one member handing out fake
members, then measures 40 s after the flooder left. The goal (#31): models received stay
>= 90% of the no-attack rate, and no honest node evicts another.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the harness lives in tests/

from tests.adversarial.open_swarm import AttackResult, Flooder, measure_membership_attack

ATTACKS = {  # name: (fakes, seconds ahead, re-signed every, extra settings)
    "sybil": (10_000, 59.0, 12.0, {}),
    "sybil, no join rate": (10_000, 59.0, 12.0, {"member_join_burst": 10**6}),
    "sybil-10x": (100_000, 59.0, 12.0, {}),
    "dilution": (3_000, 0.0, 0.0, {}),
    "dilution-10x": (30_000, 0.0, 0.0, {}),
}


def run(name: str, nodes: int, scale: float) -> tuple[AttackResult, float]:
    fakes, ahead, resign, settings = ATTACKS[name]
    fakes = max(1, round(fakes * scale))
    out: list[AttackResult] = []

    async def main() -> None:
        with tempfile.TemporaryDirectory() as root:
            result = await measure_membership_attack(
                Path(root),
                nodes=nodes,
                flooder=lambda: Flooder("bench", fakes, ahead=ahead, resign_every=resign),
                **settings,
            )
            out.append(result)

    started = time.perf_counter()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return out[0], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--only", choices=sorted(ATTACKS))
    parser.add_argument("--scale", type=float, default=1.0, help="times the fakes of each row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {args.nodes} honest gossip daemons, 1 s rounds\n"
    )
    print(
        "| attack | fakes | models/round before | during | after | kept | fakes held "
        "(most) | honest members kept | owners evicted | real time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in [args.only] if args.only else list(ATTACKS):
        r, seconds = run(name, args.nodes, args.scale)
        kept = min(r.during.per_round, r.after.per_round) / r.before.per_round
        print(
            f"| {name} | {round(ATTACKS[name][0] * args.scale):,} | {r.before.per_round:.2f} | "
            f"{r.during.per_round:.2f} | {r.after.per_round:.2f} | {kept:.1%} | "
            f"{r.fakes_held:,} | {min(r.during.members_min, r.after.members_min)} of "
            f"{args.nodes} | {r.evicted:,} | {seconds:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
