"""Swarm reinforcement learning on CartPole with embedded peerlearn nodes.

N agents, each in its own process with its own node, train a small policy with a clipped
importance-weighted policy gradient (PPO's objective on Monte-Carlo returns). Every arm runs
with the same seeds, the same shared initial policy and the same budget: ``iterations`` x
``EPISODES`` episodes per agent. Few episodes per iteration is where sharing pays: an agent
alone learns from a noisy batch of 2, a swarm agent from 2 of its own and 6 of its peers'.

* ``alone``:       no communication (the baseline);
* ``sapo``:        SAPO-style: each agent shares its episodes every iteration and trains on its
                   own plus up to ``external`` received ones (from the last 2 iterations). Each
                   episode carries the sender's log-probabilities, so the receiver weights it
                   by pi/mu, clipped: off-policy data is corrected, not taken as its own;
* ``sapo-local``:  the same, but received episodes are scored with the receiver's current
                   log-probabilities (ratio 1 on the first pass), as SAPO's paper does;
* ``mean``:        policies averaged (plain mean, beta 0.5) after every iteration;
* ``vca``:         the same with variance-corrected averaging.

    python examples/swarm_rl.py [--seeds 5] [--arms alone,sapo] [--agents 4]
                                [--iterations 40] [--plot curves.png] [--json result.json]

Prints, per arm, the mean episode reward over the last 20% of iterations and the area under
the learning curve (the mean over all iterations), as mean +- sd over seeds (each seed: the
mean over its agents).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import swarm_eval

from peerlearn import Rollout, RolloutPool, pack_rollouts

EPISODES = 2  # per agent per iteration
GAMMA = 0.99
LR = 0.01
EPOCHS = 4  # passes over each iteration's batch
CLIP = 0.2  # PPO's clip on pi/mu
HIDDEN = 32
OBS_SIZE, NUM_ACTIONS, MAX_STEPS = 4, 2, 500


@dataclass(frozen=True)
class Arm:
    """How an agent takes part in the swarm."""

    name: str
    shared: int = 0  # episodes shared per iteration (the best ones, if fewer than EPISODES)
    external: int = 0  # received episodes trained on per iteration
    period: int = 0  # share and merge policies every `period` iterations (0: never)
    beta: float = 0.5  # weight of the own policy in a merge
    vca: bool = True  # variance-corrected averaging, else the plain mean
    local: bool = False  # score received rollouts with the own policy (SAPO's way)
    fresh: int = 2  # train only on rollouts from the last `fresh` iterations


ARMS = {
    "alone": Arm("alone"),
    "sapo": Arm("sapo", shared=EPISODES, external=3 * EPISODES),
    "sapo-local": Arm("sapo-local", shared=EPISODES, external=3 * EPISODES, local=True),
    "mean": Arm("mean", period=1, vca=False),
    "vca": Arm("vca", period=1),
}


def make_policy(seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(OBS_SIZE, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, NUM_ACTIONS)
    )


def run_episodes(envs: list[Any], policy: Any, seeds: list[int]) -> list[Rollout]:
    """One episode in each env, stepped together (one policy call per step for all)."""
    import numpy
    import torch

    obs = [env.reset(seed=seed)[0] for env, seed in zip(envs, seeds, strict=True)]
    steps: list[list[tuple[list[float], int, float, float]]] = [[] for _ in envs]
    running = list(range(len(envs)))
    with torch.no_grad():
        while running:
            batch = torch.as_tensor(numpy.stack([obs[i] for i in running]), dtype=torch.float32)
            dist = torch.distributions.Categorical(logits=policy(batch))
            actions = dist.sample()
            logprobs = dist.log_prob(actions)
            still = []
            for k, i in enumerate(running):
                action = int(actions[k])
                seen = [float(v) for v in obs[i]]
                obs[i], reward, terminated, truncated, _ = envs[i].step(action)
                steps[i].append((seen, action, float(reward), float(logprobs[k])))
                if not (terminated or truncated):
                    still.append(i)
            running = still
    return [
        Rollout([s[0] for s in ep], [s[1] for s in ep], [s[2] for s in ep], [s[3] for s in ep])
        for ep in steps
    ]


def returns_to_go(rewards: list[float]) -> list[float]:
    out, running = [], 0.0
    for reward in reversed(rewards):
        running = reward + GAMMA * running
        out.append(running)
    return out[::-1]


def train_step(
    policy: Any, optimizer: Any, own: list[Rollout], received: list[Rollout], *, local: bool
) -> None:
    """The clipped policy update with the batch's normalised returns as advantages."""
    import torch

    returns = torch.tensor([g for r in own + received for g in returns_to_go(r.rewards)])
    advantages = (returns - returns.mean()) / (returns.std() + 1e-8)
    swarm_eval.policy_update(
        policy, optimizer, own, received, advantages.tolist(), local=local, epochs=EPOCHS, clip=CLIP
    )


@dataclass
class Agent:
    """One agent's learning, apart from how it talks to the swarm."""

    index: int
    seed: int
    envs: list[Any] = field(init=False)
    policy: Any = field(init=False)
    optimizer: Any = field(init=False)

    def __post_init__(self) -> None:
        import gymnasium
        import torch

        torch.manual_seed(1000 * self.seed + self.index)  # action sampling differs per agent
        self.envs = [gymnasium.make("CartPole-v1") for _ in range(EPISODES)]
        self.policy = make_policy(self.seed)  # one shared initial policy per seed
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=LR)

    def collect(self, iteration: int) -> list[Rollout]:
        base = (self.seed * 100 + self.index) * 100_000 + iteration * 100
        return run_episodes(self.envs, self.policy, [base + e for e in range(EPISODES)])


def agent_process(task: swarm_eval.AgentTask) -> list[float]:
    """One agent in its own process: its env, policy and (unless alone) peerlearn node."""
    import torch

    torch.set_num_threads(1)
    arm = ARMS[task.arm]
    me = Agent(task.index, task.seed)
    pool = RolloutPool(obs_size=OBS_SIZE, num_actions=NUM_ACTIONS, max_steps=MAX_STEPS)
    curve = []
    with swarm_eval.join_swarm(task, beta=arm.beta, vca=arm.vca, alone=arm.name == "alone") as node:
        for iteration in range(task.iterations):
            episodes = me.collect(iteration)
            curve.append(sum(r.total_reward for r in episodes) / len(episodes))
            updates = []
            if node is not None:
                node.set_round(iteration)
                updates = node.receive_all()
            pool.add_all(updates)
            models = [u for u in updates if u.kind == "model"]
            received = pool.take(arm.external, newer_than=iteration - 1 - arm.fresh)
            train_step(me.policy, me.optimizer, episodes, received, local=arm.local)
            if node is None:
                continue
            if arm.period and models:
                me.policy.load_state_dict(node.merge(me.policy.state_dict(), models))
            if arm.shared:
                best = sorted(episodes, key=lambda r: -r.total_reward)[: arm.shared]
                node.share(pack_rollouts(best), round=iteration)
            if arm.period and (iteration + 1) % arm.period == 0:
                node.share_model(me.policy.state_dict(), round=iteration)
    return curve


def main() -> None:
    swarm_eval.run_command(
        agent_process,
        description=__doc__,
        arms=ARMS,
        iterations=40,
        swarm="rl-cartpole",
        title=lambda args: f"CartPole, {args.agents} agents, {EPISODES} episodes per iteration",
        ylabel="mean episode reward",
    )


if __name__ == "__main__":
    main()
