"""The papers' claims, reproduced with the simulator on scikit-learn's digits; prints a table.

    python bench/learning_claims.py [--seeds 3 | --seeds 11,12,13] [--skip-scale]

Every row is measured in this run, side by side, with the same seeds and budgets; numbers are
mean +- standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

from peerlearn.sim.simulator import SimConfig, SimResult, run_simulation

VCA_TARGET = 0.90  # accuracy for "rounds to target"


def mean_over_seeds(make: Callable[[int], SimConfig], seeds: Sequence[int]) -> list[SimResult]:
    return [run_simulation(make(seed)) for seed in seeds]


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"11,12,13"`` -> those seeds."""
    if "," in text:
        return [int(part) for part in text.split(",") if part.strip()]
    return list(range(int(text)))


def spread(values: Sequence[float], digits: int = 3) -> str:
    """Mean +- sample standard deviation over the seeds (+- 0 for one seed)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def rounds_to(results: list[SimResult], target: float) -> str:
    values = [r.rounds_to(target) for r in results]
    if any(v is None for v in values):
        reached = [v for v in values if v is not None]
        return f"not in budget ({len(reached)}/{len(values)} seeds)"
    return spread([float(v or 0) for v in values], 1)


def avg(values: list[float]) -> float:
    return statistics.mean(values)


def row(claim: str, measured: str, verdict: bool | None) -> None:
    mark = {True: "yes", False: "NO", None: "-"}[verdict]
    print(f"| {claim} | {measured} | {mark} |", flush=True)


def vca_claim(seeds: Sequence[int]) -> None:
    common = {"nodes": 50, "rounds": 60, "sample_size": 50, "eval_every": 1}
    runs = {
        algo: mean_over_seeds(lambda s, a=algo: SimConfig(algo=a, seed=s, **common), seeds)
        for algo in ("fedavg", "gossip", "gossip-vca")
    }
    r = {a: [x.rounds_to(VCA_TARGET) for x in runs[a]] for a in runs}
    ok = all(v is not None for v in r["fedavg"] + r["gossip-vca"])
    ratios = [
        float(v or 0) / float(f or 1) for v, f in zip(r["gossip-vca"], r["fedavg"], strict=True)
    ]
    ratio = avg(ratios) if ok else float("inf")
    plain = r["gossip"]
    faster = ok and all(
        p is None or (v or 0) < p for v, p in zip(r["gossip-vca"], plain, strict=True)
    )
    row(
        f"VCA gossip reaches {VCA_TARGET:.0%} in <= 1.2x FedAvg's rounds, faster than plain gossip "
        "(50 nodes, 4 peers/round, FedAvg with all 50 clients)",
        f"rounds: FedAvg {rounds_to(runs['fedavg'], VCA_TARGET)}, gossip-vca "
        f"{rounds_to(runs['gossip-vca'], VCA_TARGET)}, plain gossip "
        f"{rounds_to(runs['gossip'], VCA_TARGET)}; ratio {spread(ratios, 2) if ok else 'inf'}",
        ok and ratio <= 1.2 and faster,
    )


def modest_claims(seeds: Sequence[int]) -> None:
    common = {"nodes": 100, "rounds": 60, "sample_size": 10, "eval_every": 5}
    fedavg = mean_over_seeds(lambda s: SimConfig(algo="fedavg", seed=s, **common), seeds)
    modest = mean_over_seeds(lambda s: SimConfig(algo="modest", seed=s, **common), seeds)
    dpsgd = mean_over_seeds(lambda s: SimConfig(algo="dpsgd", seed=s, **common), seeds)
    f_accs, m_accs, d_accs = ([r.final(3) for r in runs] for runs in (fedavg, modest, dpsgd))
    f_acc, m_acc = avg(f_accs), avg(m_accs)
    m_bytes = avg([r.records[-1].bytes_sent for r in modest])
    d_bytes = avg([r.records[-1].bytes_sent for r in dpsgd])
    row(
        "MoDeST within 1 pp of FedAvg (100 nodes, s=10, 60 rounds)",
        f"final acc FedAvg {spread(f_accs)}, MoDeST {spread(m_accs)} (D-PSGD {spread(d_accs)})",
        m_acc >= f_acc - 0.01,
    )
    row(
        "MoDeST sends >= 5x fewer bytes than D-PSGD (degree 4)",
        f"MoDeST {m_bytes / 1e6:.1f} MB, D-PSGD {d_bytes / 1e6:.1f} MB: {d_bytes / m_bytes:.1f}x",
        d_bytes >= 5 * m_bytes,
    )
    killed = mean_over_seeds(
        lambda s: SimConfig(algo="modest", seed=s, kill_fraction=0.8, kill_round=20, **common),
        seeds,
    )
    completed = [r.records[-1].round for r in killed]
    row(
        "MoDeST keeps completing rounds after 80% of nodes are killed (at round 20)",
        f"last round reached {completed} of {common['rounds']}; final acc "
        f"{spread([r.final(3) for r in killed])}; alive {killed[0].records[-1].alive}",
        all(c >= common["rounds"] for c in completed),
    )


def bristle_claims(seeds: Sequence[int]) -> None:
    common = {
        "algo": "gossip",
        "nodes": 20,
        "rounds": 120,
        "partition": "label-skew",
        "byzantine": 0.3,
        "fanout": 19,
        "eval_every": 10,
    }
    for attack in ("label-flip", "sign-flip", "alie"):
        defended = mean_over_seeds(
            lambda s, a=attack: SimConfig(filter="bristle", attack=a, seed=s, **common), seeds
        )
        plain = mean_over_seeds(
            lambda s, a=attack: SimConfig(
                filter="none", task_options=("model=transfer",), attack=a, seed=s, **common
            ),
            seeds,
        )
        b_accs, p_accs = [r.final(2) for r in defended], [r.final(2) for r in plain]
        b_acc, p_acc = avg(b_accs), avg(p_accs)
        b_min = min(r.records[-1].acc_min for r in defended)
        verdict = (b_acc >= 0.9 and p_acc < 0.7) if attack == "label-flip" else None
        row(
            f"Bristle, 30% {attack} attackers, non-iid (4 classes/node), 20 nodes, 120 rounds"
            + (": >= 90% honest vs plain mean < 70%" if attack == "label-flip" else ""),
            f"honest acc Bristle {spread(b_accs)} (worst node {b_min:.3f}), "
            f"plain mean {spread(p_accs)}",
            verdict,
        )


def scale_claim() -> None:
    for algo in ("modest", "gossip-vca"):
        started = time.perf_counter()
        result = run_simulation(SimConfig(algo=algo, nodes=1000, rounds=50, eval_every=10))
        wall = time.perf_counter() - started
        row(
            f"1000 simulated nodes x 50 rounds in < 10 min ({algo})",
            f"{wall:.0f} s wall, final acc {result.records[-1].acc_mean:.3f}, "
            f"{result.records[-1].bytes_sent / 1e6:.0f} MB simulated traffic",
            wall < 600,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--seeds", type=parse_seeds, default=[0, 1, 2], help="a count (3) or a list (11,12,13)"
    )
    parser.add_argument("--skip-scale", action="store_true")
    args = parser.parse_args()
    seeds: list[int] = args.seeds
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; seeds {seeds}\n"
    )
    print("| claim | measured | holds |")
    print("|---|---|---|")
    started = time.perf_counter()
    vca_claim(seeds)
    modest_claims(seeds)
    bristle_claims(seeds)
    if not args.skip_scale:
        scale_claim()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
