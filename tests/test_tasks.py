"""The Task API: a user's own task file, built-in tasks, any float dtype, checkpoints."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import trio

from peerlearn import wire
from peerlearn.buffers import to_bytes
from peerlearn.errors import ConfigError
from peerlearn.learning import aggregate, robust
from peerlearn.learning.hygiene import check_received
from peerlearn.learning.task import (
    TaskContext,
    TaskError,
    Training,
    create_task,
    parse_task_options,
    resolve_task,
)
from peerlearn.learning.task_model import CheckpointContentError, TaskModel
from peerlearn.learning.tasks.textlm import width_for
from peerlearn.node.config import NodeConfig, load_config
from peerlearn.node.daemon import Daemon, run_daemon
from peerlearn.tensors import state_dict_from_bytes, state_dict_to_bytes

# What a researcher writes: their model, data, optimizer and metrics, nothing about peers.
USER_TASK = '''
import torch
import peerlearn


class Regression(peerlearn.Task):
    """Fit y = 3x - 1 on this node's shard; the task counts its own rounds."""

    metric = "r2"

    def __init__(self, context):
        options = peerlearn.TaskOptions("regression", context.options)
        dtype = options.choice("dtype", "float32", ["float32", "bfloat16", "float16"])
        self.dtype = getattr(torch, dtype)
        options.finish()
        g = torch.Generator().manual_seed(context.data_seed + context.shard)
        self.x = torch.rand(64, 1, generator=g)
        self.y = 3 * self.x - 1
        self.rounds = 0

    def create_model(self, generator):
        model = torch.nn.Linear(1, 1).to(self.dtype)
        with torch.no_grad():
            model.weight.normal_(generator=generator)
            model.bias.zero_()
        return model

    def create_optimizer(self, model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def default_lr(self):
        return 0.1

    def train_round(self, model, optimizer):
        for _ in range(20):
            loss = torch.nn.functional.mse_loss(model(self.x.to(self.dtype)).float(), self.y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.rounds += 1
        return {"loss": loss.item()}

    def evaluate(self, model):
        error = torch.nn.functional.mse_loss(model(self.x.to(self.dtype)).float(), self.y)
        return {"r2": 1 - float(error) / float(self.y.var()), "mse": float(error)}

    def state_dict(self):
        return {"rounds": self.rounds}

    def load_state_dict(self, state):
        self.rounds = state["rounds"]


def make(context):
    return Regression(context)
'''


@pytest.fixture
def user_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``usertask_mod:make`` importable, as a user's module on their Python path."""
    (tmp_path / "usertask_mod.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usertask_mod:make"
    sys.modules.pop("usertask_mod", None)


def _model(name: str, **context: object) -> TaskModel:
    task = create_task(name, TaskContext(**context))  # type: ignore[arg-type]
    return TaskModel(task, torch.Generator().manual_seed(0))


def test_a_users_task_trains_and_its_metric_rises(user_task: str) -> None:
    model = _model(user_task)
    state = model.state()
    before = model.evaluate(state)["r2"]
    for _ in range(3):
        state, metrics = model.train(state)
    after = model.evaluate(state)
    assert after["r2"] > 0.95 > before, (before, after)
    assert set(after) == {"r2", "mse"}
    assert "loss" in metrics


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_travel_and_merge(user_task: str, dtype: str) -> None:
    a = _model(user_task, options={"dtype": dtype})
    b = _model(user_task, options={"dtype": dtype}, shard=1)
    own, _ = a.train(a.state())
    theirs, _ = b.train(b.state())
    received = state_dict_from_bytes(state_dict_to_bytes(theirs), 2**20)
    assert received["weight"].dtype == getattr(torch, dtype)
    check_received(received, own)
    merged = aggregate.merge_received(
        own, [received], rule=robust.create_rule("mean"), beta=0.5, variance_correction=True
    )
    assert merged["weight"].dtype == getattr(torch, dtype)
    assert a.evaluate(merged)["r2"] > 0.5


def test_checkpoints_carry_the_optimizer_and_the_tasks_own_state(user_task: str) -> None:
    first = _model(user_task)
    state, _ = first.train(first.state())
    state, _ = first.train(state)
    metrics = first.evaluate(state)
    payload = to_bytes(first.checkpoint(2, state, metrics))
    raw = wire.unpack(payload, wire.Limits(max_message_size=len(payload)))
    assert payload == wire.pack(raw)  # framed as msgpack would, without a joined copy
    second = _model(user_task)
    restored = second.restore(payload)
    assert restored.round == 2
    assert restored.metrics["r2"] == first.evaluate(state)["r2"]
    assert all(torch.equal(restored.state[n], state[n]) for n in state)
    assert second.task.rounds == 2  # type: ignore[attr-defined]
    momentum = [s["momentum_buffer"] for s in second.optimizer.state.values()]
    expected = [s["momentum_buffer"] for s in first.optimizer.state.values()]
    assert len(momentum) == len(expected) == 2
    assert all(torch.equal(m, e) for m, e in zip(momentum, expected, strict=True))
    other = _model("digits")
    with pytest.raises(CheckpointContentError, match="layout differs") as info:
        other.restore(payload)
    assert "\n" not in str(info.value)


def test_task_names_and_options_fail_fast_in_one_line(user_task: str) -> None:
    assert resolve_task("digits").endswith(":DigitsTask")
    assert resolve_task(user_task) == user_task
    with pytest.raises(TaskError, match="did you mean digits"):
        resolve_task("digit")
    with pytest.raises(TaskError, match="no module named 'nowhere_mod'"):
        resolve_task("nowhere_mod:make")
    with pytest.raises(TaskError, match="did you mean size_mb"):
        create_task("textlm", TaskContext(options={"size_md": "3"}))
    with pytest.raises(TaskError, match="key=value"):
        parse_task_options(["size_mb"])
    with pytest.raises(ConfigError, match="did you mean digits"):
        load_config(env={}, flags={"swarm": "s", "task": "digit"})
    # a task name is checked without importing torch (the CLI answers in well under 1 s)
    probe = (
        "import sys; from peerlearn.node.config import load_config\n"
        "try:\n    load_config(env={}, flags={'swarm': 's', 'task': 'textml'})\n"
        "except Exception as e:\n    print(e)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == [
        "unknown task 'textml' (did you mean textlm?); known: digits, textlm, "
        "or module:factory for your own",
        "False",
    ], out.stderr


def test_textlm_size_option_sets_the_model_size_and_it_learns() -> None:
    for size_mb in (1, 4):
        model = _model("textlm", options={"size_mb": str(size_mb)})
        encoded = len(state_dict_to_bytes(model.state())) / 2**20
        assert abs(encoded - size_mb) / size_mb < 0.15, (size_mb, encoded)
    assert width_for(200, 2, 64) == 1472  # 12 * 2 * 1472^2 * 4 bytes: about 200 MiB
    model = _model("textlm", training=Training(local_steps=10, batch_size=16))
    state = model.state()
    before = model.evaluate(state)["accuracy"]
    for _ in range(3):
        state, _ = model.train(state)
    after = model.evaluate(state)["accuracy"]
    assert before < 0.15, before
    assert after > 0.35, after


async def _finished(daemon: Daemon) -> None:
    """Poll the daemon's learning phase (a test's view from outside)."""
    while True:
        if daemon.learner is not None and daemon.learner.phase == "finished":
            return
        await trio.sleep(0.05)


def test_a_daemon_learns_a_users_task(user_task: str, tmp_path: Path) -> None:
    config = NodeConfig(
        data_dir=tmp_path / "n",
        listen=("/ip4/127.0.0.1/tcp/0",),
        swarm="t",
        task=user_task,
        task_options=("dtype=bfloat16",),
        algo="gossip",
        round_interval=0.1,
        max_rounds=4,
        mdns=False,
    )

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                daemon: Daemon = await nursery.start(
                    lambda task_status: run_daemon(
                        config, handle_signals=False, task_status=task_status
                    )
                )
                await _finished(daemon)
                learning = daemon.status()["learning"]
                daemon.stop.set()
        assert learning["round"] == 4
        assert learning["metric"] == "r2"
        assert learning["accuracy"] == learning["metrics"]["r2"] > 0.9
        assert set(learning["metrics"]) == {"r2", "mse"}

    trio.run(main)


def test_the_cifar_example_task_loads_its_data_format(tmp_path: Path) -> None:
    """examples/cifar10_task.py reads CIFAR-10's python batches; here a tiny fake set."""
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in [*((f"data_batch_{i}", 20) for i in range(1, 6)), ("test_batch", 30)]:
        batch = {
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, count)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        context = TaskContext(
            shard=1, shards=4, options={"root": str(tmp_path)}, training=Training(2, 8)
        )
        model = TaskModel(
            create_task("cifar10_task:CifarTask", context), torch.Generator().manual_seed(0)
        )
        assert model.task.train_samples == 25  # type: ignore[attr-defined]
        state, metrics = model.train(model.state())
        assert 0.0 <= model.evaluate(state)["accuracy"] <= 1.0
        assert metrics["loss"] > 0
        missing = TaskContext(options={"root": str(tmp_path / "x")})
        with pytest.raises(TaskError, match="download=1"):
            create_task("cifar10_task:CifarTask", missing)
    finally:
        sys.path.pop(0)
        sys.modules.pop("cifar10_task", None)


def test_embedded_nodes_train_a_task_object_the_caller_holds(
    user_task: str, tmp_path: Path
) -> None:
    """``open_node(config, task=factory or name)``: the built-in learner trains the caller's
    task in the swarm; payloads still reach the application."""
    from peerlearn.learning.task import load_task_factory
    from peerlearn.node.embedded import open_node

    factory = load_task_factory(user_task)  # any callable TaskContext -> Task
    rounds = 4

    def config(name: str, bootstrap: tuple[str, ...] = ()) -> NodeConfig:
        return NodeConfig(
            data_dir=tmp_path / name,
            listen=("/ip4/127.0.0.1/tcp/0",),
            swarm="embedded-task",
            bootstrap=bootstrap,
            algo="gossip",
            min_members=2,
            round_interval=0.2,
            max_rounds=rounds,
            mdns=False,
        )

    async def main() -> None:
        with trio.fail_after(60):
            async with (
                open_node(config("a"), task=factory) as a,
                open_node(config("b", ((await a.addrs())[0],)), task=user_task) as b,
            ):

                async def finished() -> bool:
                    states = [(await n.status())["learning"] or {} for n in (a, b)]
                    return all(s.get("phase") == "finished" for s in states)

                while not await finished():  # noqa: ASYNC110 (the node's status, from outside)
                    await trio.sleep(0.05)
                assert (await b.share({"note": 1}, peers=[a.peer_id]))[0].ok
                update = await a.receive()
                states = [(await n.status())["learning"] for n in (a, b)]
        assert update.payload == {"note": 1}
        assert [state["task"] for state in states] == ["make", user_task]  # factory, name
        for state in states:
            assert state["round"] == rounds
            assert state["models_received"] > 0
            assert state["metrics"]["r2"] > 0.9

    trio.run(main)
