"""What the three embedding examples share: a node's settings, a toy task (y = 2x + 1) and a
toy rollout to share (as swarm-RL agents share theirs)."""

from __future__ import annotations

from pathlib import Path

import torch

from peerlearn import NodeConfig, Rollout, RolloutPool


def node_config(root: Path, name: str, bootstrap: tuple[str, ...] = ()) -> NodeConfig:
    """A node on loopback in its own data dir, in the examples' swarm."""
    return NodeConfig(
        data_dir=root / name,
        listen=("/ip4/127.0.0.1/tcp/0",),
        bootstrap=bootstrap,
        swarm="embed-example",
        mdns=False,
        log_level="warning",
    )


def new_model(seed: int) -> torch.nn.Linear:
    """A one-in, one-out linear model initialised from ``seed``, so that runs repeat."""
    model = torch.nn.Linear(1, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.weight.uniform_(-1.0, 1.0, generator=g)
        model.bias.uniform_(-1.0, 1.0, generator=g)
    return model


def train(model: torch.nn.Linear, seed: int) -> float:
    """Ten SGD steps on y = 2x + 1 with data that differs per node and round; the loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1, generator=g)
    y = 2 * x + 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def describe(model: torch.nn.Linear) -> str:
    return f"y = {model.weight.item():.2f}x + {model.bias.item():.2f}"


def toy_rollout(steps: int) -> Rollout:
    """A made-up episode of ``steps`` steps: 2-number observations, action 1, reward 1."""
    return Rollout([[0.5, -0.5]] * steps, [1] * steps, [1.0] * steps, [-0.69] * steps)


def rollout_pool() -> RolloutPool:
    """Where received toy rollouts wait to be trained on (checked on arrival)."""
    return RolloutPool(obs_size=2, num_actions=2, max_steps=100)


def describe_rollouts(rollouts: list[Rollout]) -> str:
    return f"{len(rollouts)} rollouts, rewards {[r.total_reward for r in rollouts]}"
