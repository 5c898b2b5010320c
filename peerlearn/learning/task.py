"""The Task: what a researcher brings (model, data, training, evaluation); the swarm does the rest.

A task is a class with three required methods; a *factory* (any callable taking a
``TaskContext``) builds one per node::

    class MyTask(peerlearn.Task):
        metric = "accuracy"                       # the key of evaluate() that rises as it learns

        def __init__(self, context: peerlearn.TaskContext) -> None:
            self.data = my_loader(shard=context.shard, shards=context.shards)

        def create_model(self, generator: torch.Generator) -> torch.nn.Module: ...
        def train_round(self, model, optimizer) -> dict[str, float]: ...   # one round of local work
        def evaluate(self, model) -> dict[str, float]: ...

    # peerlearn node start --swarm s --task mypackage.mytask:MyTask --task-opt epochs=2

Optional: ``create_optimizer`` (default: SGD with the swarm's ``lr``), ``exchanged`` (which
state_dict entries travel; default: every floating-point one), ``state_dict`` /
``load_state_dict`` (the task's own state, saved in each checkpoint with the model and the
optimizer), ``contribution_loss`` (a model's loss on a small fixed batch of this node's own
data: it scores the models peers send).

``--task`` takes a built-in name (``digits``, ``textlm``), the name of an installed entry
point of group ``peerlearn.tasks``, or ``module:attribute``. Names are checked without
importing torch or the task (fast errors); ``load_task_factory`` imports.
"""

from __future__ import annotations

import abc
import difflib
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from peerlearn.errors import ConfigError

if TYPE_CHECKING:
    import torch

Number = TypeVar("Number", int, float)
ENTRY_POINT_GROUP = "peerlearn.tasks"
BUILTIN_TASKS = {
    "digits": "peerlearn.learning.tasks.digits:DigitsTask",
    "textlm": "peerlearn.learning.tasks.textlm:TextLMTask",
}


class TaskError(ConfigError):
    """The task named, its options or what it returned are unusable (the operator's or the
    task author's error, said in one line)."""


@dataclass(frozen=True)
class Training:
    """The swarm's per-round training settings; a task may follow or ignore them."""

    local_steps: int = 10
    batch_size: int = 16
    lr: float = 0.0  # 0: the task's own default


@dataclass(frozen=True)
class TaskContext:
    """What a node tells its task: which shard of the data is its own, seeds, settings."""

    shard: int = 0
    shards: int = 1
    partition: str = "iid"  # iid, label-skew or dirichlet (tasks with labels)
    classes_per_node: int = 4  # label-skew
    dirichlet_alpha: float = 0.5
    data_seed: int = 1234  # the same on every node, so shards cut the same data
    seed: int = 0  # this node's own randomness (batches)
    training: Training = field(default_factory=Training)
    device: str = "cpu"
    options: Mapping[str, str] = field(default_factory=dict)  # --task-opt key=value
    poison_labels: bool = False  # experiments: this node flips its labels (an attacker)
    bristle: bool = False  # Bristle merges this node's models: see ``SupportsBristle``


class Task(abc.ABC):
    """One node's learning task. Subclass it; see the module docstring for an example."""

    metric: ClassVar[str] = "accuracy"
    """The key of ``evaluate``'s result that rises as the model learns (the swarm reports it)."""

    @abc.abstractmethod
    def create_model(self, generator: torch.Generator) -> torch.nn.Module:
        """A fresh model. Draw initial weights from ``generator``: MoDeST gives every node
        the same one (a shared start), gossip and D-PSGD a node's own."""

    def create_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer ``train_round`` receives (kept across rounds, checkpointed)."""
        import torch

        return torch.optim.SGD(model.parameters(), lr=lr)

    @abc.abstractmethod
    def train_round(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> Mapping[str, float]:
        """One round of local training on this node's data; returns training metrics."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module) -> Mapping[str, float]:
        """Metrics of ``model`` (must include ``metric``)."""

    def exchanged(self, model: torch.nn.Module) -> Collection[str] | None:
        """Names of the state_dict entries peers exchange (None: every floating-point one)."""
        return None

    def default_lr(self) -> float:
        """Learning rate when the swarm's ``lr`` setting is 0."""
        return 0.1

    def contribution_loss(self, model: torch.nn.Module) -> float | None:
        """``model``'s loss on a small fixed batch of this node's own data, which scores
        the models peers send (``contribution``); None: the task does not score them."""
        del model
        return None

    def state_dict(self) -> dict[str, Any]:
        """The task's own state for checkpoints: msgpack-able values (str, int, float, bytes,
        lists, maps)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        del state  # a task without state of its own has nothing to restore


TaskFactory = Callable[[TaskContext], Task]


class TaskOptions:
    """Typed access to ``--task-opt`` values; ``finish`` refuses options nobody read."""

    def __init__(self, task: str, options: Mapping[str, str]) -> None:
        self.task = task
        self._options = dict(options)
        self._read: set[str] = set()

    def _get(self, name: str) -> str | None:
        self._read.add(name)
        return self._options.get(name)

    def text(self, name: str, default: str) -> str:
        value = self._get(name)
        return default if value is None else value

    def int(self, name: str, default: int, *, minimum: int = 1) -> int:
        return self._number(name, default, int, "an integer", minimum)

    def float(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        return self._number(name, default, float, "a number", minimum)

    def _number(
        self, name: str, default: Number, parse: Callable[[str], Number], what: str, minimum: Number
    ) -> Number:
        text = self._get(name)
        if text is None:
            return default
        try:
            value = parse(text)
        except ValueError:
            raise TaskError(f"task option {name} must be {what}, not {text!r}") from None
        if not value >= minimum:  # NaN too
            raise TaskError(f"task option {name} must be at least {minimum}, not {value}")
        return value

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        known = list(choices)
        text = self._get(name)
        if text is None:
            return default
        if text not in known:
            raise TaskError(f"task option {name} must be one of {', '.join(known)}, not {text!r}")
        return text

    def finish(self) -> None:
        """Raise ``TaskError`` for any option the task did not read (a typo)."""
        unknown = sorted(set(self._options) - self._read)
        if unknown:
            hint = difflib.get_close_matches(unknown[0], sorted(self._read), n=1)
            suggestion = f" (did you mean {hint[0]}?)" if hint else ""
            known = ", ".join(sorted(self._read)) or "none"
            raise TaskError(
                f"unknown option {unknown[0]!r} for task {self.task}{suggestion}; known: {known}"
            )


def parse_task_options(pairs: Iterable[str]) -> dict[str, str]:
    """``["size_mb=4", "layers=2"]`` -> ``{"size_mb": "4", "layers": "2"}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise TaskError(f"task options are key=value, not {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _installed_tasks() -> dict[str, str]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {entry.name: entry.value for entry in found}


def resolve_task(name: str) -> str:
    """The ``module:attribute`` a task name stands for, checked without importing the task
    (``TaskError`` with the known names otherwise)."""
    target = BUILTIN_TASKS.get(name)
    if target is None and ":" not in name:
        installed = _installed_tasks()  # scanning installed packages: only when needed
        target = installed.get(name)
        if target is None:
            known = sorted({*BUILTIN_TASKS, *installed})
            hint = difflib.get_close_matches(name, known, n=1)
            suggestion = f" (did you mean {hint[0]}?)" if hint else ""
            raise TaskError(
                f"unknown task {name!r}{suggestion}; known: {', '.join(known)}, "
                "or module:factory for your own"
            )
    target = target or name
    module, _, attribute = target.partition(":")
    if not module or not attribute.isidentifier():
        raise TaskError(f"task {name!r} must look like package.module:factory")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise TaskError(f"task {name!r}: cannot find module {module!r} ({exc})") from None
    if spec is None:
        raise TaskError(f"task {name!r}: no module named {module!r} on the Python path")
    return target


def load_task_factory(name: str) -> TaskFactory:
    """Import the factory ``name`` stands for (see ``resolve_task``)."""
    module_name, _, attribute = resolve_task(name).partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error while importing it is theirs
        raise TaskError(
            f"task {name!r}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise TaskError(f"task {name!r}: {module_name} has no callable {attribute!r}")
    return factory  # type: ignore[no-any-return]


def create_task(task: str | TaskFactory, context: TaskContext) -> Task:
    """Build the task for one node from its name (see ``resolve_task``) or from a factory
    the caller holds (the embedding API); ``TaskError`` in one line if it cannot be."""
    if isinstance(task, str):
        name, factory = task, load_task_factory(task)
    else:
        name, factory = getattr(task, "__qualname__", repr(task)), task
    built = factory(context)
    if not isinstance(built, Task):
        raise TaskError(f"task {name!r}: the factory returned {type(built).__name__}, not a Task")
    return built
