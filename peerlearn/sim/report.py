"""Write a simulation's trace as CSV and as a PNG plot."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from peerlearn.errors import LocalProtocolError
from peerlearn.sim.simulator import SimResult

CSV_FIELDS = ("round", "time", "acc_mean", "acc_min", "bytes_sent", "alive")


def write_csv(result: SimResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for record in result.records:
            writer.writerow(asdict(record))


def write_plot(result: SimResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result.config
    rounds = [r.round for r in result.records]
    fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    acc_ax.plot(rounds, [r.acc_mean for r in result.records], label="mean over honest nodes")
    acc_ax.plot(rounds, [r.acc_min for r in result.records], label="min over honest nodes", ls="--")
    acc_ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1))
    acc_ax.legend(loc="lower right")
    bytes_ax.plot(rounds, [r.bytes_sent / 1e6 for r in result.records])
    bytes_ax.set(xlabel="round", ylabel="MB sent (cumulative, all nodes)")
    fig.suptitle(
        f"{c.algo} / filter {c.filter} / {c.nodes} nodes, {c.byzantine:.0%} byzantine ({c.attack}),"
        f" {c.partition}, seed {c.seed}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: SimResult, out_dir: Path) -> list[Path]:
    """``trace.csv``, ``accuracy.png`` and ``summary.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "trace.csv", out_dir / "accuracy.png", out_dir / "summary.json"]
    write_csv(result, paths[0])
    write_plot(result, paths[1])
    summary = {
        "config": asdict(result.config),
        "trace_hash": result.trace_hash,
        "wall_seconds": round(result.wall_seconds, 3),
        "final_accuracy_last5": result.final(),
        "bytes_sent": result.records[-1].bytes_sent if result.records else 0,
    }
    paths[2].write_text(json.dumps(summary, indent=2) + "\n")
    return paths


def _read_run(folder: Path) -> tuple[str, list[dict[str, float]]]:
    """A run folder's label (from its config) and trace rows; ``LocalProtocolError`` if it
    is not a ``sim run`` folder."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        with (folder / "trace.csv").open(newline="") as handle:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
        c = summary["config"]
        attack = f", {c['byzantine']:.0%} {c['attack']}" if c.get("attack") != "none" else ""
        label = f"{c['algo']}/{c['filter']}{attack}, {c['partition']}, seed {c['seed']}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LocalProtocolError(f"{folder} is not a `peerlearn sim run` folder: {exc}") from None
    return label, rows


def compare_runs(folders: list[Path], path: Path) -> list[tuple[str, float, float, float]]:
    """Overlay several runs (mean and worst honest accuracy, bytes) in one PNG; returns
    (label, final mean accuracy, final worst, MB sent) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    table = []
    for folder in folders:
        label, rows = _read_run(folder)
        if not rows:
            raise LocalProtocolError(f"{folder}: the trace is empty")
        name = f"{folder.name}: {label}"
        rounds = [r["round"] for r in rows]
        (line,) = acc_ax.plot(rounds, [r["acc_mean"] for r in rows], label=name)
        acc_ax.plot(rounds, [r["acc_min"] for r in rows], ls="--", color=line.get_color())
        bytes_ax.plot(rounds, [r["bytes_sent"] / 1e6 for r in rows], color=line.get_color())
        last = rows[-1]
        table.append((name, last["acc_mean"], last["acc_min"], last["bytes_sent"] / 1e6))
    acc_ax.set(xlabel="round", ylabel="test accuracy (solid: mean, dashed: worst honest node)")
    acc_ax.set_ylim(0, 1)
    acc_ax.legend(fontsize=7, loc="lower right")
    bytes_ax.set(xlabel="round", ylabel="MB sent (cumulative, all nodes)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return table
