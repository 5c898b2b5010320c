"""CPU cost of merging models: ``vca_merge`` of three received models into our own, and their
plain ``weighted_mean``, for float32 models of a given size.

    python bench/merge_cost.py [--megabytes 16] [--repeat 3]

Prints the best CPU-seconds of ``--repeat`` tries (process time, so a busy machine changes
it little) and checks that VCA kept the received models' variance.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from peerlearn.learning.aggregate import population_variance, vca_merge, weighted_mean


def model(megabytes: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A float32 state_dict of about ``megabytes`` MB: one big matrix, a vector and a bias."""
    side = max(2, int((megabytes * 1e6 / 4) ** 0.5))
    return {
        "layer.weight": torch.randn(side, side, generator=generator),
        "out.weight": torch.randn(side, generator=generator),
        "out.bias": torch.randn(10, generator=generator),
    }


def cpu_seconds(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=float, default=16.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    own = model(args.megabytes, generator)
    received = [model(args.megabytes, generator) for _ in range(3)]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; 4 float32 models of {args.megabytes:g} MB"
    )
    vca = cpu_seconds(lambda: vca_merge(own, received), args.repeat)
    mean = cpu_seconds(lambda: weighted_mean(received), args.repeat)
    merged = vca_merge(own, received)
    target = sum(population_variance(r["layer.weight"]) for r in received) / len(received)
    kept = population_variance(merged["layer.weight"]) / target
    print(f"vca_merge of 3 into 1: {vca:.3f} CPU-s")
    print(f"weighted_mean of 3: {mean:.3f} CPU-s")
    print(f"variance after VCA / received models' mean variance: {kept:.4f}")


if __name__ == "__main__":
    main()
