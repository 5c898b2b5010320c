"""Run a scenario: start the testnet, sample every node each second, inject the scenario's
faults when due, stop, then check the expectations and write the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from peerlearn.errors import PeerlearnError
from peerlearn.testnet.network import Sample, Testnet
from peerlearn.testnet.scenario import Event, Expectations, Run, Scenario, SwarmSpec

SAMPLE_INTERVAL = 1.0  # seconds between samples


@dataclass(frozen=True)
class Check:
    name: str
    expected: str
    measured: str
    passed: bool


@dataclass
class RunResult:
    """Everything one run of one scenario (or variant) produced."""

    label: str
    spec: SwarmSpec
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    edges: set[tuple[int, int]] = field(default_factory=set)
    exit_codes: list[int | None] = field(default_factory=list)
    convergence_seconds: float | None = None
    restarted_at: dict[int, float] = field(default_factory=dict)
    rounds_after_faults: int | None = None
    error: str | None = None
    wall_seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    accuracy_rounds: int = 1  # a node's accuracy: its mean over its last N rounds

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks)

    def last(self) -> dict[int, Sample]:
        """Each node's last sample."""
        out: dict[int, Sample] = {}
        for sample in self.samples:
            out[sample.node] = sample
        return out

    def final_honest(self) -> list[Sample]:
        return [s for s in self.last().values() if s.alive and not s.attacker]

    def honest_accuracy(self) -> dict[int, float]:
        """Each honest live node's accuracy: its mean over the last ``accuracy_rounds`` rounds
        it reported (with 1, its final model's accuracy). Nodes not evaluated yet are left out."""
        per_round: dict[int, dict[int, float]] = {}
        for s in self.samples:
            if s.accuracy is not None:
                per_round.setdefault(s.node, {})[s.round] = s.accuracy
        out = {}
        for last in self.final_honest():
            if last.accuracy is None:
                continue
            accs = per_round[last.node]
            tail = [accs[r] for r in sorted(accs)[-self.accuracy_rounds :]]
            out[last.node] = sum(tail) / len(tail)
        return out

    def accuracy_name(self) -> str:
        """What ``honest_accuracy`` measures, in words."""
        if self.accuracy_rounds == 1:
            return "final accuracy"
        return f"accuracy over the last {self.accuracy_rounds} rounds"

    def rejoin_seconds(self) -> dict[int, float]:
        """Join time each restarted node reported after its restart."""
        out = {}
        for s in self.samples:
            restarted = self.restarted_at.get(s.node)
            if restarted is not None and s.t > restarted and s.join_seconds is not None:
                out[s.node] = s.join_seconds
        return out

    def top_round(self) -> int:
        return max((s.round for s in self.last().values() if s.alive), default=0)


Progress = Callable[[RunResult, list[Sample], float], None]


class _Convergence:
    """Time from a heal until every live replica holds what any replica held at the heal."""

    def __init__(self, healed_at: float, versions: dict[int, dict[str, int]]) -> None:
        self.healed_at = healed_at
        self.target: dict[str, int] = {}
        for replica in versions.values():
            for key, clock in replica.items():
                self.target[key] = max(self.target.get(key, 0), clock)

    def reached(self, versions: dict[int, dict[str, int]]) -> bool:
        return bool(versions) and all(
            all(replica.get(k, -1) >= clock for k, clock in self.target.items())
            for replica in versions.values()
        )


def _due(event: Event, elapsed: float, top_round: int) -> bool:
    if event.at_seconds is not None:
        return elapsed >= event.at_seconds
    return event.at_round is not None and top_round >= event.at_round


def _finished(samples: list[Sample], spec: SwarmSpec) -> bool:
    honest = [s for s in samples if s.alive and not s.attacker]
    return bool(honest) and all(
        s.round >= spec.max_rounds and s.accuracy is not None for s in honest
    )


def run_once(
    run: Run,
    scenario: Scenario,
    root: Path,
    progress: Progress | None = None,
) -> RunResult:
    """Run one of the scenario's runs with its events; always tears the testnet down."""
    label, spec = run.label, run.swarm
    result = RunResult(label, spec, accuracy_rounds=scenario.accuracy_rounds)
    started = time.monotonic()
    pending = list(scenario.events)
    convergence: _Convergence | None = None
    kill_round: int | None = None
    net = Testnet(root, spec, swarm=label.replace(" ", "-")[:64])
    try:
        net.start()
        t0 = time.monotonic()
        while True:
            tick = time.monotonic()
            elapsed = tick - t0
            samples, raw = net.sample(elapsed)
            result.samples += samples
            top = max((s.round for s in samples if s.alive), default=0)  # this tick's
            if (
                convergence is not None
                and result.convergence_seconds is None
                and convergence.reached(net.crdt_versions())
            ):
                result.convergence_seconds = round(elapsed - convergence.healed_at, 3)
            # Events fire in file order, at most one per sample, so each one's effect is seen.
            for event in [e for e in pending if _due(e, elapsed, top)][:1]:
                pending.remove(event)
                what, targets = net.apply(event)
                result.events.append((round(elapsed, 3), what))
                if event.action == "kill":
                    kill_round = top
                if event.action == "heal":
                    convergence = _Convergence(elapsed, net.crdt_versions())
                if event.action == "restart":
                    result.restarted_at.update(dict.fromkeys(targets, elapsed))
            if progress is not None:
                progress(result, samples, elapsed)
            converged = convergence is None or result.convergence_seconds is not None
            if not pending and converged and _finished(samples, spec):
                result.edges = net.edges(raw)
                break
            if elapsed > scenario.timeout:
                result.edges = net.edges(raw)
                result.error = f"timed out after {scenario.timeout:.0f} s"
                break
            time.sleep(max(0.0, SAMPLE_INTERVAL - (time.monotonic() - tick)))
    except (PeerlearnError, OSError, RuntimeError, TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        problems = net.close()
        result.exit_codes = net.exit_codes
        if problems:
            result.error = "; ".join(filter(None, [result.error, *problems]))
    if kill_round is not None:
        result.rounds_after_faults = result.top_round() - kill_round
    result.wall_seconds = round(time.monotonic() - started, 1)
    result.checks = evaluate(run.expect, result, net.killed)
    return result


def evaluate(expect: Expectations, result: RunResult, killed: set[int]) -> list[Check]:
    """Each stated expectation as a pass/fail ``Check``."""
    checks: list[Check] = []
    honest = result.final_honest()
    accuracies = list(result.honest_accuracy().values())
    mean_acc = sum(accuracies) / len(accuracies) if accuracies else 0.0
    what = result.accuracy_name()

    def add(name: str, expected: str, measured: str, passed: bool) -> None:
        checks.append(Check(name, expected, measured, passed))

    if expect.min_mean_accuracy is not None:
        add(f"mean {what} (honest, live)", f">= {expect.min_mean_accuracy}", f"{mean_acc:.3f}",
            mean_acc >= expect.min_mean_accuracy)  # fmt: skip
    if expect.max_mean_accuracy is not None:
        add(f"mean {what} (honest, live)", f"<= {expect.max_mean_accuracy}", f"{mean_acc:.3f}",
            bool(accuracies) and mean_acc <= expect.max_mean_accuracy)  # fmt: skip
    if expect.min_node_accuracy is not None:
        worst = min(accuracies, default=0.0)
        add(f"worst node's {what}", f">= {expect.min_node_accuracy}", f"{worst:.3f}",
            len(accuracies) == len(honest) and worst >= expect.min_node_accuracy)  # fmt: skip
    if expect.min_final_round is not None:
        top = result.top_round()
        add("final round", f">= {expect.min_final_round}", str(top),
            top >= expect.min_final_round)  # fmt: skip
    if expect.min_rounds_after_faults is not None:
        after = result.rounds_after_faults
        add("rounds completed after the kill", f">= {expect.min_rounds_after_faults}",
            str(after), after is not None and after >= expect.min_rounds_after_faults)  # fmt: skip
    if expect.max_join_seconds is not None:
        joins = [s.join_seconds for s in result.samples if s.join_seconds is not None]
        worst_join = max(joins, default=None)
        add("join time (worst node)", f"<= {expect.max_join_seconds} s",
            "-" if worst_join is None else f"{worst_join:.2f} s",
            worst_join is not None and worst_join <= expect.max_join_seconds)  # fmt: skip
    if expect.max_rejoin_seconds is not None:
        rejoins = result.rejoin_seconds()
        slowest = max(rejoins.values(), default=None)
        add("join time of restarted nodes", f"<= {expect.max_rejoin_seconds} s",
            "-" if slowest is None else f"{slowest:.2f} s ({len(rejoins)} nodes)",
            slowest is not None and len(rejoins) == len(result.restarted_at)
            and slowest <= expect.max_rejoin_seconds)  # fmt: skip
    if expect.max_convergence_seconds is not None:
        conv = result.convergence_seconds
        add("CRDT replicas converged after heal", f"<= {expect.max_convergence_seconds} s",
            "never" if conv is None else f"{conv:.1f} s",
            conv is not None and conv <= expect.max_convergence_seconds)  # fmt: skip
    if expect.max_rss_mb is not None:
        peak = max((s.rss_mb for s in result.samples if s.rss_mb is not None), default=0.0)
        add("peak RSS per node", f"<= {expect.max_rss_mb} MiB", f"{peak:.0f} MiB",
            peak <= expect.max_rss_mb)  # fmt: skip
    if expect.min_direct_fraction is not None:
        last = [s for s in result.last().values() if s.alive and s.node != 0]
        direct = sum(s.direct_peers for s in last)
        total = direct + sum(s.relayed_peers for s in last)
        fraction = direct / total if total else 0.0
        add("direct share of NATed connections", f">= {expect.min_direct_fraction}",
            f"{fraction:.2f} ({direct}/{total})",
            fraction >= expect.min_direct_fraction)  # fmt: skip
    if expect.clean_exit:
        codes = [c for i, c in enumerate(result.exit_codes) if i not in killed]
        add("live daemons exit 0 on SIGTERM", "all 0", str(codes),
            bool(codes) and all(c == 0 for c in codes))  # fmt: skip
    return checks


def run_scenario(
    scenario: Scenario, out_dir: Path, progress: Progress | None = None
) -> list[RunResult]:
    """Every run (the base run, or each variant) one after the other."""
    results = []
    for run in scenario.runs():
        results.append(run_once(run, scenario, out_dir / run.label, progress))
    return results
