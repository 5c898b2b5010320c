"""Compressed models side by side with uncompressed ones: bytes sent until a target accuracy,
and the accuracy compression costs.

    python bench/compression.py [--seeds 3] [--only sim|daemons|cost] [--hidden 256]

* simulator: 20 nodes, 30 rounds of gossip-vca, MoDeST (10 trainers) and FedAvg (the
  reference), each codec with the same seeds; bytes are every node's sent models;
* daemons: 6 real daemons on 127.0.0.1 (``peerlearn node start``), 30 rounds of 1 s,
  gossip-vca and MoDeST (4 trainers), each codec in turn; bytes are the models the daemons
  delivered (``model_bytes_sent`` in their status), accuracy the mean over the nodes.

* cost: seconds to compress and to rebuild a 100 MB float32 model (25 tensors of 4 MiB),
  and its size, per codec.

Both learn digits with the MLP (``--hidden`` units: the default 256 makes a 77 KB model,
where the safetensors header matters less than at the task's default 32).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from peerlearn.sim.simulator import SimConfig, SimResult, run_simulation

TARGET = 0.90  # mean accuracy for "bytes to target"
SIM_CASES = {
    "gossip-vca": ("none", "int8", "int4"),
    "modest": ("none", "int8", "int4", "topk:0.1"),
    "fedavg": ("none", "int8", "int4", "topk:0.1", "topk:0.01"),
}
DAEMON_CASES = {
    "gossip-vca": ("none", "int8", "int4"),
    "modest": ("none", "int8", "int4", "topk:0.1"),
}
DAEMONS = 6
DAEMON_ROUNDS = 30
DAEMON_TIMEOUT = 300.0  # seconds a daemon run may take


def bytes_to_target(result: SimResult) -> float | None:
    return next((r.bytes_sent for r in result.records if r.acc_mean >= TARGET), None)


def cell(values: list[float | None], scale: float = 1e6, digits: int = 2) -> str:
    reached = [v for v in values if v is not None]
    if len(reached) < len(values):
        return f"not reached ({len(reached)}/{len(values)})"
    mean = statistics.mean(reached) / scale
    if len(reached) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} +- {statistics.stdev(reached) / scale:.{digits}f}"


def ratio(base: list[float | None], other: list[float | None]) -> str:
    if None in base or None in other:
        return "-"
    return f"{statistics.mean(base) / statistics.mean(other):.2f}x"  # type: ignore[arg-type]


def table_header() -> None:
    print(
        f"| algo | compression | MB sent to {TARGET:.2f} | fewer bytes | final accuracy "
        "| accuracy cost (pp) |"
    )
    print("|---|---|---|---|---|---|", flush=True)


def line(
    algo: str,
    codec: str,
    to_target: list[float | None],
    finals: list[float],
    base: tuple[list[float | None], list[float]],
) -> None:
    cost = (statistics.mean(base[1]) - statistics.mean(finals)) * 100
    accuracy = cell(list(finals), scale=1, digits=3)
    print(
        f"| {algo} | {codec} | {cell(to_target)} | {ratio(base[0], to_target)} "
        f"| {accuracy} | {cost:+.1f} |",
        flush=True,
    )


def codec_cost() -> None:
    import torch

    from peerlearn.learning.choices import Compression
    from peerlearn.learning.compression import ErrorFeedback, decode
    from peerlearn.tensors import state_dict_to_bytes

    generator = torch.Generator().manual_seed(0)
    model = {f"layer{i}": torch.randn(2**20, generator=generator) for i in range(25)}
    whole = len(state_dict_to_bytes(model))
    print(f"\nA {whole / 1e6:.0f} MB float32 model, torch threads {torch.get_num_threads()}:\n")
    print("| compression | compress | rebuild | MB on the wire | fewer bytes |")
    print("|---|---|---|---|---|")
    for codec in ("int8", "int4", "topk:0.1", "topk:0.01"):
        compression = Compression.parse(codec)
        started = time.perf_counter()
        wire, _ = ErrorFeedback(compression).encode(model)
        compressed = time.perf_counter()
        decode(wire, model, compression)
        rebuilt = time.perf_counter()
        size = len(state_dict_to_bytes(wire))
        print(
            f"| {codec} | {compressed - started:.2f} s | {rebuilt - compressed:.2f} s "
            f"| {size / 1e6:.1f} | {whole / size:.2f}x |",
            flush=True,
        )


def simulator(seeds: list[int], hidden: int) -> None:
    print(f"\nSimulator, seeds {seeds}, digits MLP hidden={hidden}:\n")
    table_header()
    for algo, codecs in SIM_CASES.items():
        base: tuple[list[float | None], list[float]] | None = None
        for codec in codecs:
            to_target, finals = sim_case(algo, codec, seeds, hidden)
            base = base or (to_target, finals)
            line(algo, codec, to_target, finals, base)


def sim_case(
    algo: str, codec: str, seeds: list[int], hidden: int
) -> tuple[list[float | None], list[float]]:
    """Per seed, the bytes sent until TARGET (None if never) and the final accuracy."""
    results = [
        run_simulation(
            SimConfig(algo=algo, compression=codec, seed=seed, task_options=(f"hidden={hidden}",))
        )
        for seed in seeds
    ]
    return [bytes_to_target(r) for r in results], [r.final() for r in results]


def daemon_run(algo: str, codec: str, hidden: int) -> tuple[float | None, float]:
    """One swarm of real daemons: bytes its models took to reach TARGET, final accuracy."""
    from peerlearn.testnet.local import LocalSwarm

    with tempfile.TemporaryDirectory(prefix="compression-") as root:
        swarm = LocalSwarm(
            Path(root),
            DAEMONS,
            swarm="compression",
            algo=algo,
            compression=codec,
            sample_size=4,
            max_rounds=DAEMON_ROUNDS,
            round_interval=1.0,
            task_opt=f"hidden={hidden}",
        )
        reached: float | None = None
        states: list[dict[str, Any]] = []
        try:
            swarm.start_all()
            deadline = time.monotonic() + DAEMON_TIMEOUT
            while time.monotonic() < deadline:
                states = [swarm.learning(i) for i in range(DAEMONS)]
                scores = [s.get("accuracy") for s in states]
                if all(a is not None for a in scores):
                    sent = sum(s.get("model_bytes_sent", 0) for s in states)
                    if reached is None and statistics.mean(scores) >= TARGET:  # type: ignore[arg-type]
                        reached = sent
                    if all(s.get("round", 0) >= DAEMON_ROUNDS for s in states):
                        break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"{algo} {codec}: {DAEMON_ROUNDS} rounds not done in time")
        finally:
            swarm.stop_all()
        return reached, statistics.mean(float(s["accuracy"]) for s in states)


def daemons(hidden: int) -> None:
    print(f"\n{DAEMONS} daemons on 127.0.0.1, {DAEMON_ROUNDS} rounds of 1 s, one run each:\n")
    table_header()
    for algo, codecs in DAEMON_CASES.items():
        base: tuple[list[float | None], list[float]] | None = None
        for codec in codecs:
            reached, final = daemon_run(algo, codec, hidden)
            base = base or ([reached], [final])
            line(algo, codec, [reached], [final], base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="simulator seeds 0..N-1")
    parser.add_argument("--only", choices=("sim", "daemons", "cost"))
    parser.add_argument("--hidden", type=int, default=256, help="hidden units of the MLP")
    args = parser.parse_args()
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    if args.only in (None, "cost"):
        codec_cost()
    if args.only in (None, "sim"):
        simulator(list(range(args.seeds)), args.hidden)
    if args.only in (None, "daemons"):
        daemons(args.hidden)


if __name__ == "__main__":
    main()
