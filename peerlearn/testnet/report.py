"""A scenario's report folder: per-run CSV and PNGs, and a summary with pass/fail."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from peerlearn.testnet.network import Sample
from peerlearn.testnet.runner import RunResult
from peerlearn.testnet.scenario import Scenario


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_csv(result: RunResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Sample)])
        writer.writeheader()
        for sample in result.samples:
            writer.writerow(asdict(sample))


def _per_node(result: RunResult) -> dict[int, list[Sample]]:
    nodes: dict[int, list[Sample]] = {}
    for sample in result.samples:
        nodes.setdefault(sample.node, []).append(sample)
    return nodes


def _mark_events(ax: Any, result: RunResult) -> None:
    for t, what in result.events:
        ax.axvline(t, color="grey", ls=":", lw=1)
        ax.annotate(what.split(":")[0], (t, 0.02), rotation=90, fontsize=7, color="grey")


def _down_intervals(rows: list[Sample]) -> list[tuple[float, float]]:
    """(from, to) of each stretch of time a node was down (to: its next live sample)."""
    intervals, down_since = [], None
    for sample in rows:
        if not sample.alive and down_since is None:
            down_since = sample.t
        elif sample.alive and down_since is not None:
            intervals.append((down_since, sample.t))
            down_since = None
    if down_since is not None:
        intervals.append((down_since, rows[-1].t))
    return intervals


def cumulative(values: list[float | None]) -> list[float | None]:
    """A per-process counter made monotone across restarts (a restarted process counts
    from 0 again: what it counted before is added back)."""
    out: list[float | None] = []
    offset, previous = 0.0, 0.0
    for value in values:
        if value is None:
            out.append(None)
            continue
        if value < previous:
            offset += previous
        previous = value
        out.append(offset + value)
    return out


def _plot_per_node(
    result: RunResult,
    path: Path,
    values: Callable[[list[Sample]], list[float | None]],
    ylabel: str,
    what: str,
    **axes: Any,
) -> None:
    """One line per node over time; no line while a node is down (its down time is shaded
    under the curves); attackers dashed, restarted nodes dotted, each named as such in the
    legend; faults marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for node, rows in sorted(_per_node(result).items()):
        down = _down_intervals(rows)
        ys = [v if s.alive else None for s, v in zip(rows, values(rows), strict=True)]
        xy = [(s.t, math.nan if v is None else v) for s, v in zip(rows, ys, strict=True)]
        if all(math.isnan(v) for _, v in xy):
            continue
        if rows[0].attacker:
            label, style = f"node{node} (attacker)", {"ls": "--", "color": "red", "alpha": 0.7}
        elif down:
            label, style = f"node{node} (down, restarted)", {"ls": ":", "lw": 1.8}
        else:
            label, style = f"node{node}", {}
        (line,) = ax.plot(*zip(*xy, strict=True), lw=style.pop("lw", 1), label=label, **style)
        for start, end in down:
            ax.axvspan(start, end, ymax=0.04, color=line.get_color(), alpha=0.5, lw=0)
    _mark_events(ax, result)
    ax.set(xlabel="seconds (shaded at the bottom: a node down)", ylabel=ylabel, **axes)
    ax.set_title(f"{result.label}: {what}")
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(result: RunResult, path: Path) -> None:
    _plot_per_node(
        result, path, lambda rows: [s.accuracy for s in rows], "test accuracy", "accuracy",
        ylim=(0, 1),
    )  # fmt: skip


def plot_bytes(result: RunResult, path: Path) -> None:
    _plot_per_node(
        result,
        path,
        lambda rows: cumulative([s.bytes_out / 1e6 if s.alive else None for s in rows]),
        "MB sent (cumulative, across restarts)",
        "bytes",
    )


def plot_topology(result: RunResult, path: Path) -> None:
    """Nodes on a circle, one line per connection at the end of the run."""
    plt = _plt()
    last = result.last()
    n = max(len(last), 1)
    pos = {i: (math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)) for i in last}
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for a, b in sorted(result.edges):
        if a in pos and b in pos:
            ax.plot(*zip(pos[a], pos[b], strict=True), color="#8aa", lw=0.8, zorder=1)
    for i, (x, y) in pos.items():
        s = last[i]
        color = "red" if s.attacker else ("#4a7" if s.alive else "#bbb")
        ax.scatter([x], [y], s=320, color=color, zorder=2, edgecolors="black")
        ax.annotate(str(i), (x, y), ha="center", va="center", fontsize=8, zorder=3)
    ax.set_title(f"{result.label}: {len(result.edges)} connections (red: attacker, grey: down)")
    ax.set_axis_off()
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _node_rows(result: RunResult) -> list[dict[str, Any]]:
    rows = []
    for node, samples in sorted(_per_node(result).items()):
        last = samples[-1]
        rss = [s.rss_mb for s in samples if s.rss_mb is not None]
        joins = [s.join_seconds for s in samples if s.join_seconds is not None]
        rows.append(
            {
                "node": node,
                "alive": last.alive,
                "attacker": last.attacker,
                "round": last.round,
                "accuracy": last.accuracy,
                "peak_rss_mb": round(max(rss), 1) if rss else None,
                "join_seconds": round(max(joins), 3) if joins else None,
                "mb_out": round(
                    (
                        cumulative([s.bytes_out / 1e6 if s.alive else None for s in samples])[-1]
                        or 0
                    ),
                    2,
                ),
                "down_intervals": len(_down_intervals(samples)),
                "reachability": last.reachability,
            }
        )
    return rows


def write_report(scenario: Scenario, results: list[RunResult], out_dir: Path) -> Path:
    """Writes everything; returns the path of ``summary.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for result in results:
        run_dir = out_dir / result.label
        run_dir.mkdir(parents=True, exist_ok=True)
        write_csv(result, run_dir / "metrics.csv")
        plot_accuracy(result, run_dir / "accuracy.png")
        plot_bytes(result, run_dir / "bytes.png")
        plot_topology(result, run_dir / "topology.png")
        runs.append(
            {
                "label": result.label,
                "passed": result.passed,
                "error": result.error,
                "wall_seconds": result.wall_seconds,
                "swarm": asdict(result.spec),
                "events": [{"t": t, "what": what} for t, what in result.events],
                "checks": [asdict(c) for c in result.checks],
                "convergence_seconds": result.convergence_seconds,
                "rounds_after_faults": result.rounds_after_faults,
                "nodes": _node_rows(result),
                "accuracy_rounds": result.accuracy_rounds,
                "honest_accuracy": result.honest_accuracy(),
            }
        )
    passed = all(r.passed for r in results)
    summary = {"scenario": scenario.name, "passed": passed, "runs": runs}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = out_dir / "summary.md"
    md.write_text(render_summary(scenario, results))
    return md


def render_summary(scenario: Scenario, results: list[RunResult]) -> str:
    verdict = "PASS" if all(r.passed for r in results) else "FAIL"
    lines = [f"# {scenario.name}: {verdict}", "", scenario.description.strip(), ""]
    for result in results:
        s = result.spec
        lines += [
            f"## {result.label}: {'PASS' if result.passed else 'FAIL'} ({result.wall_seconds} s)",
            "",
            f"{s.nodes} nodes, {s.algo}/{s.filter}, {s.partition}, network {s.network}"
            + (f" ({s.nat} NAT)" if s.network == "nat" else "")
            + (
                f", {len(s.attacker_indices())} attackers ({s.attack})"
                if s.attack != "none"
                else ""
            ),
            "",
        ]
        if result.error:
            lines += [f"**error:** {result.error}", ""]
        lines += ["| check | expected | measured | |", "|---|---|---|---|"]
        lines += [
            f"| {c.name} | {c.expected} | {c.measured} | {'pass' if c.passed else 'FAIL'} |"
            for c in result.checks
        ]
        honest = result.honest_accuracy()
        if honest:
            worst = min(honest, key=lambda node: honest[node])
            mean = sum(honest.values()) / len(honest)
            lines += [
                "",
                f"Honest nodes' {result.accuracy_name()}: mean {mean:.3f}, worst "
                f"{honest[worst]:.3f} (node {worst}), over {len(honest)} nodes.",
            ]
        if result.events:
            lines += ["", "Events:"] + [f"- t={t:.1f} s {what}" for t, what in result.events]
        header = (
            "| node | alive | attacker | times down | round | accuracy | MB sent | peak RSS MiB "
            "| slowest join s |"
        )
        lines += ["", header, "|---|---|---|---|---|---|---|---|---|"]
        for row in _node_rows(result):
            acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
            lines.append(
                f"| {row['node']} | {row['alive']} | {row['attacker']} | {row['down_intervals']} "
                f"| {row['round']} | {acc} | {row['mb_out']} | {row['peak_rss_mb']} "
                f"| {row['join_seconds']} |"
            )
        lines += ["", f"Plots: {result.label}/accuracy.png, bytes.png, topology.png", ""]
    return "\n".join(lines) + "\n"
