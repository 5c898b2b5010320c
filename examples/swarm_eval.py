"""What the swarm-RL examples share: agents as processes with embedded nodes, several seeds
per arm, a report that can tell the arms apart (mean +- sd over seeds, curves with bands),
the command line around them, and the clipped policy update both learners use.

An example supplies ``agent(task) -> curve`` (one number per iteration); ``evaluate`` runs
``agents`` processes per (arm, seed), all arms with the same seeds and budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import queue
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerlearn import Rollout, clipped_policy_loss

JOIN_TIMEOUT = 60.0  # seconds for the whole swarm to find each other, and to finish together
RUN_TIMEOUT = 1800.0  # seconds for one (arm, seed) run; a failed agent stops it at once


@dataclass(frozen=True)
class AgentTask:
    """What one agent process is asked to do."""

    arm: str
    seed: int
    index: int
    agents: int
    iterations: int
    root: str  # a directory shared by the run's agents
    swarm: str


def policy_update(
    policy: Any,
    optimizer: Any,
    own: list[Rollout],
    received: list[Rollout],
    advantages: list[float],
    *,
    local: bool,
    epochs: int,
    clip: float,
) -> None:
    """``epochs`` passes of PPO's clipped objective over ``own + received`` (discrete
    actions; ``advantages``: one per action, in that order). The ratio is pi(a|s) / mu(a|s),
    mu the policy that produced each rollout; with ``local``, received rollouts are scored by
    this policy as it is now instead (treated as its own, as SAPO's paper does)."""
    import torch

    batch = own + received
    states = torch.tensor([o for r in batch for o in r.observations])
    actions = torch.tensor([a for r in batch for a in r.actions])
    behaviour = torch.tensor([lp for r in batch for lp in r.logprobs])
    advantage = torch.tensor(advantages)
    if local and received:
        with torch.no_grad():
            now = torch.distributions.Categorical(logits=policy(states)).log_prob(actions)
        mine = sum(len(r.actions) for r in own)
        behaviour = torch.cat([behaviour[:mine], now[mine:]])
    for _ in range(epochs):
        logp = torch.distributions.Categorical(logits=policy(states)).log_prob(actions)
        loss = clipped_policy_loss(logp, behaviour, advantage, clip=clip)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up after {JOIN_TIMEOUT:.0f} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def join_swarm(
    task: AgentTask, *, beta: float = 0.5, vca: bool = True, alone: bool = False
) -> Iterator[Any]:
    """A started ``Node`` that knows the run's other agents (None when ``alone``). Agent 0
    publishes its address for the others; on leaving, each waits for all to reach the last
    iteration (``_others_finished``), so nobody's final share is refused by a node that
    already left."""
    if alone:
        yield None
        return
    from peerlearn import Node, NodeConfig

    addr_file = Path(task.root) / "bootstrap.txt"
    bootstrap: tuple[str, ...] = ()
    if task.index > 0:
        _wait(addr_file.exists, "agent 0's address")
        bootstrap = (addr_file.read_text().strip(),)
    config = NodeConfig(
        data_dir=Path(task.root) / f"agent{task.index}",
        listen=("/ip4/127.0.0.1/tcp/0",),
        bootstrap=bootstrap,
        swarm=f"{task.swarm}-{task.arm}-{task.seed}",
        mdns=False,
        algo="gossip-vca" if vca else "gossip",  # what ``node.merge`` does
        beta=beta,
        log_level="warning",
    )
    with Node(config) as node:
        if task.index == 0:
            tmp = addr_file.with_suffix(".tmp")
            tmp.write_text(node.addrs[0])
            tmp.rename(addr_file)
        _wait(lambda: len(node.peers()) >= task.agents - 1, "the other agents")
        yield node
        node.set_round(task.iterations)
        _wait(lambda: _others_finished(node, task.iterations), "the other agents to finish")


def _others_finished(node: Any, iterations: int) -> bool:
    """Every agent still connected has announced the last iteration. One that has left
    saw everyone there first, and may have left before its own announcement reached us."""
    rounds = node.swarm_rounds()
    return all(rounds.get(peer, 0) >= iterations for peer in node.peers())


def _agent_main(agent: Callable[[AgentTask], list[float]], task: AgentTask, out: Any) -> None:
    out.put((task.index, agent(task)))


def run_agents(
    agent: Callable[[AgentTask], list[float]],
    arm: str,
    seed: int,
    agents: int,
    iterations: int,
    swarm: str,
) -> list[list[float]]:
    """One run: ``agents`` processes of one arm and seed; their curves, by agent index."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix=f"{swarm}-{arm}-") as root:
        tasks = [AgentTask(arm, seed, i, agents, iterations, root, swarm) for i in range(agents)]
        procs = [ctx.Process(target=_agent_main, args=(agent, t, out)) for t in tasks]
        for p in procs:
            p.start()
        curves: dict[int, list[float]] = {}
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while len(curves) < agents:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    why = f"an agent exited with {failed[0]}" if failed else "out of time"
                    raise SystemExit(f"{arm}, seed {seed}: {why} (see its output above)")
                with contextlib.suppress(queue.Empty):
                    index, curve = out.get(timeout=1.0)
                    curves[index] = curve
        finally:
            for p in procs:
                if len(curves) < agents:  # failed or out of time: stop the others now
                    p.kill()
                p.join(timeout=JOIN_TIMEOUT)
                if p.is_alive():
                    p.kill()
    return [curves[i] for i in range(agents)]


def evaluate(
    agent: Callable[[AgentTask], list[float]],
    *,
    arms: list[str],
    seeds: list[int],
    agents: int,
    iterations: int,
    swarm: str,
) -> dict[str, Any]:
    """Curves per arm and seed (each the mean over the agents), run seed by seed with the
    arms interleaved, so a machine that slows down hurts every arm alike."""
    curves: dict[str, dict[int, list[float]]] = {arm: {} for arm in arms}
    for seed in seeds:
        for arm in arms:
            started = time.monotonic()
            per_agent = run_agents(agent, arm, seed, agents, iterations, swarm)
            curves[arm][seed] = [
                statistics.fmean(c[i] for c in per_agent) for i in range(iterations)
            ]
            summary = summarize(curves[arm][seed])
            print(
                f"seed {seed} {arm:10s} last-20% {_number(summary['final'])}  "
                f"area {_number(summary['area'])}  ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    return {"agents": agents, "iterations": iterations, "seeds": seeds, "curves": curves}


def summarize(curve: list[float]) -> dict[str, float]:
    """The mean over the last 20% of iterations, and the area under the curve (the mean)."""
    tail = curve[-max(1, len(curve) // 5) :]
    return {"final": statistics.fmean(tail), "area": statistics.fmean(curve)}


def _number(value: float, like: float | None = None) -> str:
    """Three decimals for scores below 10 (accuracies), one above (rewards)."""
    return f"{value:7.3f}" if abs(value if like is None else like) < 10 else f"{value:7.1f}"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per arm: final and area as mean and sd over seeds, and how many seeds beat ``alone``."""
    rows = []
    base = result["curves"].get("alone")
    for arm, by_seed in result["curves"].items():
        finals = [summarize(c)["final"] for c in by_seed.values()]
        areas = [summarize(c)["area"] for c in by_seed.values()]
        row: dict[str, Any] = {"arm": arm, "final": _mean_sd(finals), "area": _mean_sd(areas)}
        if base is not None and arm != "alone":
            row["beats_alone"] = sum(
                summarize(c)["area"] > summarize(base[s])["area"] for s, c in by_seed.items()
            )
        rows.append(row)
    return rows


def report(
    result: Mapping[str, Any],
    *,
    title: str,
    ylabel: str,
    json_path: Path | None,
    plot_path: Path | None,
) -> None:
    seeds = result["seeds"]
    print(f"{title}; seeds {','.join(map(str, seeds))}: mean +- sd over the {len(seeds)} seeds")
    for row in table(result):
        final, area = row["final"], row["area"]
        beats = (
            f"  beats alone on {row['beats_alone']}/{len(seeds)} seeds"
            if "beats_alone" in row
            else ""
        )
        print(
            f"  {row['arm']:10s} last-20% {_number(final[0])} +- {_number(final[1], final[0])}   "
            f"area {_number(area[0])} +- {_number(area[1], area[0])}{beats}"
        )
    if json_path:
        json_path.write_text(json.dumps({**result, "table": table(result)}, indent=2))
        print(f"wrote {json_path}")
    if plot_path:
        plot(result, title=title, ylabel=ylabel, path=plot_path)
        print(f"wrote {plot_path}")


def plot(result: Mapping[str, Any], *, title: str, ylabel: str, path: Path) -> None:
    """Mean curve per arm over seeds, with a band of +- one sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm, by_seed in result["curves"].items():
        curves = list(by_seed.values())
        length = len(curves[0])
        mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
        sd = [_mean_sd([c[i] for c in curves])[1] for i in range(length)]
        steps = range(1, length + 1)
        axes.plot(steps, mean, label=arm)
        low, high = (
            [m - s for m, s in zip(mean, sd, strict=True)],
            [m + s for m, s in zip(mean, sd, strict=True)],
        )
        axes.fill_between(steps, low, high, alpha=0.2)
    axes.set_xlabel("iteration")
    axes.set_ylabel(ylabel)
    axes.set_title(f"{title}\n{len(result['seeds'])} seeds, band: +- 1 sd over seeds", fontsize=10)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or a count: ``5`` means 0..4."""
    if "," not in text and text.isdigit():
        return list(range(int(text)))
    return [int(s) for s in text.split(",") if s.strip()]


def parse_arguments(
    parser: argparse.ArgumentParser, *, arms: Mapping[str, Any], iterations: int
) -> argparse.Namespace:
    """The options both examples take; ``--smoke`` is 1 seed x 2 agents x 3 iterations."""
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=list(range(5)),
        help="seed list (0,1,2) or a count (5 means 0..4); default 5",
    )
    parser.add_argument(
        "--arms",
        type=lambda text: text.split(","),
        default=list(arms),
        help=f"comma-separated, of: {', '.join(arms)}",
    )
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=iterations)
    parser.add_argument("--smoke", action="store_true", help="1 seed x 2 agents x 3 iterations")
    parser.add_argument("--plot", type=Path, default=None, help="learning curves as PNG")
    parser.add_argument("--json", type=Path, default=None, help="curves and table as JSON")
    args = parser.parse_args()
    unknown = [arm for arm in args.arms if arm not in arms]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r}; choose from {', '.join(arms)}")
    if args.smoke:
        args.seeds, args.agents, args.iterations = [0], 2, 3
    return args


def run_command(
    agent: Callable[[AgentTask], list[float]],
    *,
    description: str | None,
    arms: Mapping[str, Any],
    iterations: int,
    swarm: str,
    title: Callable[[argparse.Namespace], str],
    ylabel: str,
) -> None:
    """An example's ``main``: parse the options, evaluate the arms, report, time it all."""
    args = parse_arguments(
        argparse.ArgumentParser(description=description), arms=arms, iterations=iterations
    )
    started = time.monotonic()
    result = evaluate(
        agent,
        arms=args.arms,
        seeds=args.seeds,
        agents=args.agents,
        iterations=args.iterations,
        swarm=swarm,
    )
    report(result, title=title(args), ylabel=ylabel, json_path=args.json, plot_path=args.plot)
    print(f"({time.monotonic() - started:.0f} s)", flush=True)
