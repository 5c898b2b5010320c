"""The papers' claims, reproduced with the simulator on scikit-learn's digits; prints a table.

    python bench/learning_claims.py [--seeds 3 | --seeds 11,12,13] [--skip-scale] [--only textlm]

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
from typing import Any

from peerlearn.sim.simulator import SimConfig, SimResult, Simulation, run_simulation

VCA_TARGET = 0.90  # accuracy for "rounds to target"


def mean_over_seeds(make: Callable[[int], SimConfig], seeds: Sequence[int]) -> list[SimResult]:
    return [run_simulation(make(seed)) for seed in seeds]


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"11,12,13"`` -> those seeds."""
    seeds = (
        [int(part) for part in text.split(",") if part.strip()]
        if "," in text
        else list(range(int(text)))
    )
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}: give a count >= 1 or a list")
    return seeds


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


VCA_OURS = {"nodes": 50, "rounds": 60, "sample_size": 50, "fanout": 4, "eval_every": 1}
# The VCA authors' own gossip setting, as far as the simulator runs it: 50 nodes, 8 peers per
# round (their random 8-regular graph, drawn again every round here), one mini-batch of 64 per
# round between merges, own weight 0.5; FedAvg averages all 50 clients after the same work.
VCA_PAPER = {
    "nodes": 50,
    "rounds": 400,
    "sample_size": 50,
    "fanout": 8,
    "local_steps": 1,
    "batch_size": 64,
    "eval_every": 5,
}


def vca_claim(
    seeds: Sequence[int], setting: dict[str, Any], label: str, target: float = VCA_TARGET
) -> None:
    runs = {
        algo: mean_over_seeds(lambda s, a=algo: SimConfig(algo=a, seed=s, **setting), seeds)
        for algo in ("fedavg", "gossip", "gossip-vca")
    }
    r = {a: [x.rounds_to(target) for x in runs[a]] for a in runs}
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
        f"VCA gossip reaches {target:.0%} in <= 1.2x FedAvg's rounds, faster than plain gossip "
        f"({label})",
        f"rounds: FedAvg {rounds_to(runs['fedavg'], target)}, gossip-vca "
        f"{rounds_to(runs['gossip-vca'], target)}, plain gossip "
        f"{rounds_to(runs['gossip'], target)}; ratio {spread(ratios, 2) if ok else 'inf'}",
        ok and ratio <= 1.2 and faster,
    )


MODEST = {"nodes": 100, "rounds": 60, "sample_size": 10, "eval_every": 5}


def modest_claims(seeds: Sequence[int], setting: dict[str, Any], label: str) -> None:
    """MoDeST's accuracy against FedAvg's, and its bytes against D-PSGD's."""
    runs = {
        algo: mean_over_seeds(lambda s, a=algo: SimConfig(algo=a, seed=s, **setting), seeds)
        for algo in ("fedavg", "modest", "dpsgd")
    }
    f_accs, m_accs, d_accs = ([r.final(3) for r in runs[a]] for a in ("fedavg", "modest", "dpsgd"))
    m_bytes = avg([r.records[-1].bytes_sent for r in runs["modest"]])
    d_bytes = avg([r.records[-1].bytes_sent for r in runs["dpsgd"]])
    row(
        f"MoDeST within 1 pp of FedAvg ({label})",
        f"final acc FedAvg {spread(f_accs)}, MoDeST {spread(m_accs)} (D-PSGD {spread(d_accs)})",
        avg(m_accs) >= avg(f_accs) - 0.01,
    )
    row(
        f"MoDeST sends >= 5x fewer bytes than D-PSGD, degree 4 ({label})",
        f"MoDeST {m_bytes / 1e6:.1f} MB, D-PSGD {d_bytes / 1e6:.1f} MB: {d_bytes / m_bytes:.1f}x",
        d_bytes >= 5 * m_bytes,
    )


def modest_kill_claim(seeds: Sequence[int]) -> None:
    common = MODEST
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


BRISTLE_SETTING: dict[str, Any] = {  # testnet/byzantine.toml runs the daemons with these settings
    "algo": "gossip",
    "nodes": 10,
    "rounds": 160,
    "partition": "label-skew",
    "fanout": 4,
    "eval_every": 1,
    "task_options": ("model=transfer",),
}
# A node's accuracy moves 1-3 pp from round to round under Bristle, so a claim's accuracy is
# the honest mean over the last 10 rounds (byzantine.toml's accuracy_rounds does the same).
BRISTLE_ACCURACY_ROUNDS = 10


def bristle_claims(seeds: Sequence[int]) -> None:
    """Bristle against each attack, and each attack's harm to the plain mean: its honest
    accuracy without attackers (the 30% behave honestly) minus its accuracy under attack."""
    common = BRISTLE_SETTING
    clean = mean_over_seeds(lambda s: SimConfig(filter="none", seed=s, **common), seeds)
    clean_accs = [r.final(BRISTLE_ACCURACY_ROUNDS) for r in clean]
    calm = mean_over_seeds(lambda s: SimConfig(filter="bristle", seed=s, **common), seeds)
    calm_accs = [r.final(BRISTLE_ACCURACY_ROUNDS) for r in calm]
    row(
        "No attack (the yardsticks; 10 nodes, 4 classes per node, 4 peers per round, 160 "
        f"rounds, transfer model; accuracy: honest mean over the last {BRISTLE_ACCURACY_ROUNDS} "
        "rounds)",
        f"plain mean {spread(clean_accs)}, Bristle {spread(calm_accs)} "
        f"(worst node {min(r.records[-1].acc_min for r in calm):.3f})",
        None,
    )
    for attack in ("label-flip", "sign-flip", "alie", "ipm"):
        defended = mean_over_seeds(
            lambda s, a=attack: SimConfig(
                filter="bristle", attack=a, byzantine=0.3, seed=s, **common
            ),
            seeds,
        )
        plain = mean_over_seeds(
            lambda s, a=attack: SimConfig(filter="none", attack=a, byzantine=0.3, seed=s, **common),
            seeds,
        )
        b_accs = [r.final(BRISTLE_ACCURACY_ROUNDS) for r in defended]
        p_accs = [r.final(BRISTLE_ACCURACY_ROUNDS) for r in plain]
        harm = [c - p for c, p in zip(clean_accs, p_accs, strict=True)]
        b_min = min(r.records[-1].acc_min for r in defended)
        if attack == "label-flip":
            claim = ": >= 90% honest (>= 85% on the worst node) vs plain mean < 70%"
            verdict: bool | None = avg(b_accs) >= 0.9 and b_min >= 0.85 and avg(p_accs) < 0.7
        elif attack == "alie":
            cost = avg(calm_accs) - avg(b_accs)
            claim = f": costs Bristle <= 2 pp (measured {100 * cost:.1f} pp)"
            verdict = cost <= 0.02
        else:
            claim = ": harms the plain mean (>= 1 pp on every seed)"
            verdict = all(h >= 0.01 for h in harm)
        row(
            f"Bristle, 30% {attack} attackers (same setting){claim}",
            f"honest acc Bristle {spread(b_accs)} (worst node {b_min:.3f}), "
            f"plain mean {spread(p_accs)}; harm to the plain mean {spread(harm)}",
            verdict,
        )


BOUNDS: dict[str, Any] = {"algo": "gossip-vca", "nodes": 10, "rounds": 60, "eval_every": 5}
BOUND_ATTACKS = (("none", 0.0), ("ratchet", 0.1), ("alie", 0.1), ("alie", 0.3), ("sign-flip", 0.3))
BOUND_DEFENCES: dict[str, dict[str, Any]] = {
    "mean, no clipping (before)": {"filter": "none", "clip_ratio": 0.0},
    "mean (default)": {"filter": "none"},
    "mean + contribution filter": {"filter": "none", "contribution": "filter"},
    "trimmed": {"filter": "trimmed"},
    "krum": {"filter": "krum"},
    "median": {"filter": "median"},
    "clip": {"filter": "clip"},
}


def bound_claims(seeds: Sequence[int]) -> None:
    """The update bound (attack 3, the ratchet) and the robust filters, side by side: honest
    accuracy per defence under each attack, and the 2 pp goal for one ratchet member."""
    print(
        "\nhonest accuracy, mean over the last 3 evaluations (worst node at the end), "
        f"{BOUNDS['nodes']} nodes, {BOUNDS['algo']}, {BOUNDS['rounds']} rounds\n"
    )
    print("| attack | " + " | ".join(BOUND_DEFENCES) + " |")
    print("|---" * (len(BOUND_DEFENCES) + 1) + "|")
    table: dict[tuple[str, str], list[float]] = {}
    gains: dict[str, tuple[list[float], list[float]]] = {}  # attack: (honest, attackers)
    for attack, fraction in BOUND_ATTACKS:
        cells = []
        for name, defence in BOUND_DEFENCES.items():
            runs = []
            for seed in seeds:
                sim = Simulation(
                    SimConfig(attack=attack, byzantine=fraction, seed=seed, **BOUNDS, **defence)
                )
                runs.append(sim.run())
                if defence.get("contribution") == "filter":
                    scored = gains.setdefault(f"{attack} {fraction:.0%}", ([], []))
                    for node in sim.honest:
                        for sender in sim.nodes:
                            score = node.scores.score(sender.pk)
                            if score is not None and sender is not node:
                                scored[sender.byzantine].append(score)
            accs = [r.final(3) for r in runs]
            table[(f"{attack} {fraction:.0%}", name)] = accs
            worst = min(r.records[-1].acc_min for r in runs)
            cells.append(f"{spread(accs)} ({worst:.3f})")
        print(f"| {attack} {fraction:.0%} | " + " | ".join(cells) + " |", flush=True)
    print("\ncontribution scores, median over honest receivers (honest senders; attackers):")
    for label, (honest, attackers) in gains.items():
        shown = f"{statistics.median(attackers):+.2f}" if attackers else "-"
        print(f"  {label}: {statistics.median(honest):+.2f}; {shown}")
    calm = avg(table[("none 0%", "mean (default)")])
    hit = avg(table[("ratchet 10%", "mean (default)")])
    before = avg(table[("ratchet 10%", "mean, no clipping (before)")])
    print()
    row(
        "One ratchet member of 10 costs <= 2 pp of honest accuracy with the default filter",
        f"{100 * (calm - hit):.1f} pp ({calm:.3f} -> {hit:.3f}); without clipping "
        f"{100 * (calm - before):.1f} pp",
        calm - hit <= 0.02,
    )


TEXTLM: dict[str, Any] = {  # the realistic built-in task, at a size two cores allow
    "task": "textlm",
    "task_options": ("size_mb=0.1",),
    "nodes": 10,
    "rounds": 30,
    "eval_every": 5,
}
TEXTLM_TARGET = 0.6  # next-character accuracy for "rounds to target"


def textlm_claims(seeds: Sequence[int]) -> None:
    """MoDeST's and VCA's claims on ``textlm`` (a small transformer on generated text).
    Bristle needs classes per node (its integrator weighs each peer per class) and the
    digits transfer model; textlm has neither, so its claim is not run here."""
    modest_claims(seeds, {**TEXTLM, "sample_size": 5}, "textlm, 10 nodes, 5 per round, 30 rounds")
    vca_claim(
        seeds,
        {**TEXTLM, "sample_size": 10},
        "textlm, next-character accuracy, 10 nodes, 4 peers/round, FedAvg with all 10",
        TEXTLM_TARGET,
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
    parser.add_argument(
        "--only",
        choices=("digits", "bristle", "bounds", "textlm"),
        help="only the digits claims, only Bristle's or the update bound's (parts of "
        "digits), or only textlm's",
    )
    args = parser.parse_args()
    seeds: list[int] = args.seeds
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; seeds {seeds}\n"
    )
    print("| claim | measured | holds |")
    print("|---|---|---|")
    started = time.perf_counter()
    if args.only == "bristle":
        bristle_claims(seeds)
    elif args.only == "bounds":
        bound_claims(seeds)
    elif args.only != "textlm":
        vca_claim(seeds, VCA_OURS, "ours: 50 nodes, 4 peers/round, 10 local steps")
        vca_claim(seeds, VCA_PAPER, "the VCA paper's: 50 nodes, 8 peers/round, 1 step of 64")
        modest_claims(seeds, MODEST, "100 nodes, s=10, 60 rounds")
        modest_kill_claim(seeds)
        bristle_claims(seeds)
        bound_claims(seeds)
        if not args.skip_scale:
            scale_claim()
    if args.only in (None, "textlm"):
        textlm_claims(seeds)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
