"""Swarm reinforcement learning on CartPole with embedded peerlearn nodes.

N agents, each in its own process with its own node, train a small REINFORCE policy. Three
arms run with the same seeds and the same budget (iterations x episodes per agent):

* ``alone``:  no communication (the baseline);
* ``vca``:    after every iteration each agent shares its policy and merges the policies it
              received with variance-corrected averaging (``node.merge``);
* ``sapo``:   SAPO-style: each agent shares its best rollouts and trains on its own plus the
              rollouts it received (no weights exchanged).

    python examples/swarm_rl.py [--agents 4] [--iterations 40] [--smoke] [--plot rewards.png]

Prints the mean episode reward per iteration for each arm and a summary.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ARMS = ("alone", "vca", "sapo")
EPISODES_PER_ITERATION = 8
SHARED_ROLLOUTS = 2  # SAPO: best local episodes shared per iteration
EXTERNAL_ROLLOUTS = 8  # SAPO: received episodes used per iteration
GAMMA = 0.99
LR = 0.01
HIDDEN = 32
POLICY_SEED = 0


def make_policy(seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 2)
    )


def run_episode(env: Any, policy: Any, seed: int) -> dict[str, Any]:
    import torch

    obs, _ = env.reset(seed=seed)
    states, actions, rewards = [], [], []
    done = False
    with torch.no_grad():
        while not done:
            logits = policy(torch.as_tensor(obs, dtype=torch.float32))
            action = int(torch.distributions.Categorical(logits=logits).sample())
            states.append([float(v) for v in obs])
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(float(reward))
            done = terminated or truncated
    return {"states": states, "actions": actions, "rewards": rewards}


def reinforce_step(policy: Any, optimizer: Any, episodes: list[dict[str, Any]]) -> None:
    import torch

    losses = []
    for episode in episodes:
        returns, running = [], 0.0
        for reward in reversed(episode["rewards"]):
            running = reward + GAMMA * running
            returns.append(running)
        ret = torch.tensor(list(reversed(returns)))
        ret = (ret - ret.mean()) / (ret.std() + 1e-8) if len(ret) > 1 else ret * 0
        logits = policy(torch.tensor(episode["states"]))
        logp = torch.distributions.Categorical(logits=logits).log_prob(
            torch.tensor(episode["actions"])
        )
        losses.append(-(logp * ret).sum())
    optimizer.zero_grad()
    torch.stack(losses).mean().backward()
    optimizer.step()


def agent(arm: str, index: int, agents: int, iterations: int, root: str, out: Any) -> None:
    """One agent process: its own env, policy and (unless alone) peerlearn node."""
    import gymnasium
    import torch

    from peerlearn import Node, NodeConfig

    torch.set_num_threads(1)
    seed = 1000 + index
    torch.manual_seed(seed)
    env = gymnasium.make("CartPole-v1")
    policy = make_policy(POLICY_SEED)  # one shared initial policy; episodes differ per agent
    optimizer = torch.optim.Adam(policy.parameters(), lr=LR)
    addr_file = Path(root) / "bootstrap.txt"
    node = None
    if arm != "alone":
        bootstrap: tuple[str, ...] = ()
        if index > 0:
            deadline = time.monotonic() + 60
            while not addr_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            bootstrap = (addr_file.read_text().strip(),)
        config = NodeConfig(
            data_dir=Path(root) / f"agent{index}",
            listen=("/ip4/127.0.0.1/tcp/0",),
            bootstrap=bootstrap,
            swarm=f"rl-{arm}",
            mdns=False,
            algo="gossip-vca",
            log_level="warning",
        )
        node = Node(config).__enter__()
        if index == 0:
            tmp = addr_file.with_suffix(".tmp")
            tmp.write_text(node.addrs[0])
            tmp.rename(addr_file)
        deadline = time.monotonic() + 60  # wait for the whole swarm before learning
        while len(node.members()) < agents and time.monotonic() < deadline:
            time.sleep(0.05)
    curve = []
    try:
        for iteration in range(iterations):
            episodes = [
                run_episode(env, policy, seed * 100_000 + iteration * 100 + e)
                for e in range(EPISODES_PER_ITERATION)
            ]
            curve.append(sum(sum(ep["rewards"]) for ep in episodes) / len(episodes))
            batch = list(episodes)
            if arm == "sapo" and node is not None:
                received = [u.payload for u in node.receive_all() if u.kind == "payload"]
                batch += [ep for payload in received for ep in payload["episodes"]][
                    -EXTERNAL_ROLLOUTS:
                ]
            reinforce_step(policy, optimizer, batch)
            if node is None or not node.peers():
                continue
            node.set_round(iteration)

            if arm == "vca":
                received_models = [u for u in node.receive_all() if u.kind == "model"]
                if received_models:
                    policy.load_state_dict(node.merge(policy.state_dict(), received_models))
                node.share_model(policy.state_dict(), round=iteration)
            else:
                best = sorted(episodes, key=lambda ep: -sum(ep["rewards"]))[:SHARED_ROLLOUTS]
                node.share({"episodes": best}, round=iteration)
        if node is not None:  # let everyone finish before leaving, so no share is refused
            node.set_round(iterations)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                sum(r >= iterations for r in node.swarm_rounds().values()) < agents
            ):
                time.sleep(0.05)
    finally:
        if node is not None:
            node.close()
    out.put((arm, index, curve))


def run_arm(arm: str, agents: int, iterations: int) -> list[list[float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix=f"swarm-rl-{arm}-") as root:
        procs = [
            ctx.Process(target=agent, args=(arm, i, agents, iterations, root, out))
            for i in range(agents)
        ]
        for p in procs:
            p.start()
        curves: dict[int, list[float]] = {}
        for _ in procs:
            _, index, curve = out.get(timeout=600)
            curves[index] = curve
        for p in procs:
            p.join(timeout=60)
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"{arm}: an agent failed: {[p.exitcode for p in procs]}")
    return [curves[i] for i in range(agents)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--smoke", action="store_true", help="2 agents x 3 iterations")
    parser.add_argument("--plot", type=Path, default=None, help="write reward curves as PNG")
    parser.add_argument("--json", type=Path, default=None, help="write the curves as JSON")
    args = parser.parse_args()
    if args.smoke:
        args.agents, args.iterations = 2, 3
    results: dict[str, list[float]] = {}
    for arm in ARMS:
        started = time.monotonic()
        curves = run_arm(arm, args.agents, args.iterations)
        mean_curve = [sum(c[i] for c in curves) / len(curves) for i in range(args.iterations)]
        results[arm] = mean_curve
        last = mean_curve[-max(1, args.iterations // 5) :]
        print(
            f"{arm:6s} mean reward per iteration: " + " ".join(f"{r:.0f}" for r in mean_curve),
            flush=True,
        )
        print(
            f"{arm:6s} last-20% mean {sum(last) / len(last):.1f}, area under curve "
            f"{sum(mean_curve):.0f} ({time.monotonic() - started:.0f} s)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for arm, curve in results.items():
            plt.plot(range(1, len(curve) + 1), curve, label=arm)
        plt.xlabel("iteration (8 episodes per agent)")
        plt.ylabel("mean episode reward over agents")
        plt.title(f"CartPole, {args.agents} agents, REINFORCE")
        plt.legend()
        plt.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
