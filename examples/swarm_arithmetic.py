"""RL-Swarm-style: agents learn to answer arithmetic questions from a verifiable reward and
share their rollouts (answers with rewards) through peerlearn.

Every question is ``a + b = ?`` with ``a, b`` in 0..9; the policy writes the answer as two
digit tokens, one at a time (a small MLP sees the question and the digit written so far).
The reward is checked, not trusted: half a point per correct digit, and a receiver recomputes
the reward of every rollout it receives from the question and the answer. Each agent
practises only on its own quarter of the questions (agents with different data); all are
scored on every question, answered greedily.

Learning is GRPO-style: ``GROUP`` answers per question, advantage = reward minus the group's
mean, PPO's clipped objective. Arms (same seeds, same budget per agent):

* ``alone``:       no communication;
* ``sapo``:        each agent shares all its answer groups every iteration and trains on its
                   own plus everything it received, weighted by pi/mu (the sender's
                   log-probabilities), clipped;
* ``sapo-local``:  the same, but received answers are scored with the receiver's own current
                   log-probabilities (ratio 1 on the first pass), as SAPO's paper does;
* ``mean``:        policies averaged (plain mean, beta 0.5) every iteration, no rollouts shared;
* ``vca``:         the same with variance-corrected averaging.

    python examples/swarm_arithmetic.py [--seeds 5] [--agents 4] [--iterations 60]
                                        [--plot curves.png] [--json result.json]
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import swarm_eval

from peerlearn import Rollout, RolloutPool, pack_rollouts

LARGEST = 9  # operands are 0..LARGEST
QUESTIONS_PER_ITERATION = 16
GROUP = 4  # answers sampled per question
DIGITS = 10
OBS_SIZE = 2 * (LARGEST + 1) + 1 + DIGITS  # one-hot a, one-hot b, step, tens digit written
HIDDEN = 128
LR = 0.01
EPOCHS = 4
CLIP = 0.2


@dataclass(frozen=True)
class Arm:
    name: str
    share: bool = False  # share all answer groups every iteration
    local: bool = False  # score received answers with the own policy
    period: int = 0  # average policies every `period` iterations (0: never)
    vca: bool = True  # variance-corrected averaging, else the plain mean


ARMS = {
    "alone": Arm("alone"),
    "sapo": Arm("sapo", share=True),
    "sapo-local": Arm("sapo-local", share=True, local=True),
    "mean": Arm("mean", period=1, vca=False),
    "vca": Arm("vca", period=1),
}


def all_questions() -> list[tuple[int, int]]:
    return [(a, b) for a in range(LARGEST + 1) for b in range(LARGEST + 1)]


def my_questions(index: int, agents: int, seed: int) -> list[tuple[int, int]]:
    """The agent's own share of the questions: a seeded quarter (for 4 agents)."""
    questions = all_questions()
    random.Random(seed).shuffle(questions)
    return questions[index::agents]


def observe(a: int, b: int, tens: int | None) -> list[float]:
    obs = [0.0] * OBS_SIZE
    obs[a] = obs[LARGEST + 1 + b] = 1.0
    if tens is not None:
        obs[2 * (LARGEST + 1)] = 1.0
        obs[2 * (LARGEST + 1) + 1 + tens] = 1.0
    return obs


def question_of(rollout: Rollout) -> tuple[int, int]:
    first = rollout.observations[0]
    return first.index(1.0), first.index(1.0, LARGEST + 1) - (LARGEST + 1)


def reward(a: int, b: int, digits: list[int]) -> float:
    """The verifiable reward: half a point per correct digit of ``a + b`` (two digits)."""
    answer = divmod(a + b, 10)
    return 0.5 * (digits[0] == answer[0]) + 0.5 * (digits[1] == answer[1])


def verified(rollout: Rollout) -> Rollout | None:
    """A received rollout with its reward recomputed here; None if it is not an answer to a
    question (wrong shape)."""
    if len(rollout.actions) != 2:
        return None
    try:
        a, b = question_of(rollout)
    except ValueError:
        return None
    if rollout.observations[0] != observe(a, b, None):
        return None
    return replace(rollout, rewards=[0.0, reward(a, b, rollout.actions)])


def make_policy(seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(OBS_SIZE, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, DIGITS)
    )


def answer(policy: Any, questions: list[tuple[int, int]], *, greedy: bool) -> list[Rollout]:
    """One answer per question, two digit tokens each, sampled (or greedy) from the policy."""
    import torch

    with torch.no_grad():
        first = [observe(a, b, None) for a, b in questions]
        dist = torch.distributions.Categorical(logits=policy(torch.tensor(first)))
        tens = dist.probs.argmax(-1) if greedy else dist.sample()
        tens_logp = dist.log_prob(tens)
        second = [observe(a, b, int(t)) for (a, b), t in zip(questions, tens, strict=True)]
        dist = torch.distributions.Categorical(logits=policy(torch.tensor(second)))
        ones = dist.probs.argmax(-1) if greedy else dist.sample()
        ones_logp = dist.log_prob(ones)
    out = []
    for k, (a, b) in enumerate(questions):
        digits = [int(tens[k]), int(ones[k])]
        out.append(
            Rollout(
                [first[k], second[k]],
                digits,
                [0.0, reward(a, b, digits)],
                [float(tens_logp[k]), float(ones_logp[k])],
            )
        )
    return out


def accuracy(policy: Any) -> float:
    """Exact answers, greedy, over every question (not only the agent's own)."""
    rollouts = answer(policy, all_questions(), greedy=True)
    return sum(r.rewards[-1] == 1.0 for r in rollouts) / len(rollouts)


def advantages(batch: list[Rollout]) -> list[float]:
    """GRPO's: each answer's reward minus the mean of all answers to the same question in
    the batch (own and received alike)."""
    by_question: dict[tuple[int, int], list[float]] = defaultdict(list)
    for rollout in batch:
        by_question[question_of(rollout)].append(rollout.total_reward)
    return [
        r.total_reward - sum(by_question[question_of(r)]) / len(by_question[question_of(r)])
        for r in batch
    ]


def train_step(
    policy: Any, optimizer: Any, own: list[Rollout], received: list[Rollout], *, local: bool
) -> None:
    """The clipped policy update with GRPO's group advantages (both tokens of an answer
    share its advantage)."""
    per_token = [adv for adv in advantages(own + received) for _ in range(2)]
    swarm_eval.policy_update(
        policy, optimizer, own, received, per_token, local=local, epochs=EPOCHS, clip=CLIP
    )


@dataclass
class Agent:
    index: int
    agents: int
    seed: int
    questions: list[tuple[int, int]] = field(init=False)
    policy: Any = field(init=False)
    optimizer: Any = field(init=False)
    sampler: random.Random = field(init=False)

    def __post_init__(self) -> None:
        import torch

        torch.manual_seed(1000 * self.seed + self.index)
        self.questions = my_questions(self.index, self.agents, self.seed)
        self.policy = make_policy(self.seed)  # one shared initial policy per seed
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=LR)
        self.sampler = random.Random(1000 * self.seed + self.index)

    def practise(self) -> list[Rollout]:
        picked = self.sampler.choices(self.questions, k=QUESTIONS_PER_ITERATION)
        return answer(self.policy, [q for q in picked for _ in range(GROUP)], greedy=False)


def agent_process(task: swarm_eval.AgentTask) -> list[float]:
    import torch

    torch.set_num_threads(1)
    arm = ARMS[task.arm]
    me = Agent(task.index, task.agents, task.seed)
    pool = RolloutPool(obs_size=OBS_SIZE, num_actions=DIGITS, max_steps=2, capacity=4096)
    curve = []
    with swarm_eval.join_swarm(task, vca=arm.vca, alone=arm.name == "alone") as node:
        for iteration in range(task.iterations):
            own = me.practise()
            updates = []
            if node is not None:
                node.set_round(iteration)
                updates = node.receive_all()
            pool.add_all(updates)
            models = [u for u in updates if u.kind == "model"]
            received = [v for r in pool.take(len(pool)) if (v := verified(r)) is not None]
            train_step(me.policy, me.optimizer, own, received, local=arm.local)
            if node is not None and arm.period and models:
                me.policy.load_state_dict(node.merge(me.policy.state_dict(), models))
            curve.append(accuracy(me.policy))
            if node is None:
                continue
            if arm.share:
                node.share(pack_rollouts(own), round=iteration)
            if arm.period and (iteration + 1) % arm.period == 0:
                node.share_model(me.policy.state_dict(), round=iteration)
    return curve


def main() -> None:
    swarm_eval.run_command(
        agent_process,
        description=__doc__,
        arms=ARMS,
        iterations=60,
        swarm="rl-arithmetic",
        title=lambda args: (
            f"a + b (0..{LARGEST}), {args.agents} agents, each practising on its own share"
        ),
        ylabel="exact answers over all questions",
    )


if __name__ == "__main__":
    main()
