"""A task's model and optimizer as the protocol drivers see them: state_dicts in and out.

Drivers (the simulator, the daemon, the embedding API) hold the *exchanged* state of a model
(``StateDict`` of detached CPU tensors) and ask a ``TaskModel`` to train from one, evaluate
one, or checkpoint the whole thing. The ``torch.nn.Module`` inside is scratch space: every
call loads the state it is given, under a lock, so a training thread and an evaluation
never see each other's weights.
"""

from __future__ import annotations

import io
import math
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peerlearn import wire
from peerlearn.buffers import Segments
from peerlearn.errors import RemoteProtocolError
from peerlearn.learning import bristle
from peerlearn.learning.aggregate import Rule, StateDict, merge_received, neighbourhood_mean
from peerlearn.learning.hygiene import check_finite, check_layout
from peerlearn.learning.task import Task, TaskError
from peerlearn.tensors import state_dict_from_bytes, state_dict_to_bytes


class CheckpointContentError(TaskError):
    """A checkpoint's content does not fit this task (another model, a bad value)."""


@dataclass(frozen=True)
class Restored:
    round: int
    metrics: dict[str, float]
    state: StateDict  # the exchanged state


class TaskModel:
    """One node's model, optimizer and (for Bristle) merger, built from its task."""

    def __init__(
        self,
        task: Task,
        init: torch.Generator,
        *,
        lr: float = 0.0,
        device: str = "cpu",
        bristle_rng: random.Random | None = None,
    ) -> None:
        """``init`` draws the initial weights; ``lr`` 0 is the task's default; the model
        trains on ``device``; a ``bristle_rng`` makes merges Bristle's (the task must
        support it)."""
        self.task = task
        self.model = task.create_model(init).to(device)
        self.lr = lr or task.default_lr()
        self.optimizer = task.create_optimizer(self.model, self.lr)
        self._lock = threading.Lock()
        full = self.model.state_dict()
        chosen = task.exchanged(self.model)
        names = list(chosen) if chosen is not None else list(full)
        self.names = [n for n in names if n in full and full[n].is_floating_point()]
        missing = sorted(set(names) - set(full))
        if missing or not self.names:
            raise TaskError(f"the task exchanges {missing or 'nothing'}: not in its model")
        self.bristle_view: bristle.BristleView | None = None
        self.merger: bristle.BristleMerger | None = None
        if bristle_rng is not None:
            view_of = getattr(task, "bristle_view", None)
            if view_of is None:
                raise TaskError(f"{type(task).__name__} does not support Bristle")
            self.bristle_view = view_of()
            self.merger = bristle.BristleMerger(self.bristle_view, bristle_rng)

    # -- exchanged state ---------------------------------------------------------------------

    def state(self) -> StateDict:
        """The exchanged tensors, detached CPU copies (what peers receive)."""
        with self._lock:
            return self._state()

    def _state(self) -> StateDict:
        full = self.model.state_dict()
        return {n: full[n].detach().to("cpu", copy=True) for n in self.names}

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(dict(state), strict=False)

    def train(self, start: StateDict) -> tuple[StateDict, dict[str, float]]:
        """One round of the task's training from ``start``; the trained state and metrics."""
        with self._lock:
            self._load(start)
            self.model.train()
            metrics = _metrics(self.task.train_round(self.model, self.optimizer), "train_round")
            trained = self._state()
        if self.bristle_view is not None:
            trained = bristle.consolidate(self.bristle_view, start, trained)
        return trained, metrics

    def merge(
        self, own: StateDict, received: Sequence[StateDict], *, algo: str, rule: Rule, beta: float
    ) -> StateDict:
        """A gossip/D-PSGD round's merge of ``received`` into ``own``: Bristle's when it
        filters, D-PSGD's neighbourhood ``rule``, else gossip's mix (VCA for gossip-vca)."""
        if self.merger is not None:
            return self.merger(own, received)
        if algo == "dpsgd":
            return neighbourhood_mean(own, received, rule=rule)
        return merge_received(
            own, received, rule=rule, beta=beta, variance_correction=algo == "gossip-vca"
        )

    def evaluate(self, state: StateDict) -> dict[str, float]:
        """The task's metrics of ``state`` (``metric`` among them, a finite number)."""
        with self._lock:
            self._load(state)
            self.model.eval()
            with torch.no_grad():
                metrics = _metrics(self.task.evaluate(self.model), "evaluate")
        if self.task.metric not in metrics:
            raise TaskError(f"evaluate() returned no {self.task.metric!r} (the task's metric)")
        return metrics

    def contribution_loss(self, state: StateDict) -> float | None:
        """The task's ``contribution_loss`` of ``state`` (None: the task does not score);
        a non-finite loss counts as infinitely bad."""
        with self._lock:
            self._load(state)
            self.model.eval()
            loss = self.task.contribution_loss(self.model)
        if loss is None:
            return None
        return float(loss) if math.isfinite(loss) else math.inf

    def score(self, metrics: Mapping[str, float]) -> float:
        return float(metrics[self.task.metric])

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self, round_: int, state: StateDict, metrics: Mapping[str, float]) -> Segments:
        """Everything needed to resume at ``round_`` with ``state``: the whole model (frozen
        parts and buffers included), the optimizer, the task's own state; one copy of the
        model and one of the optimizer state, framed as msgpack, not joined."""
        with self._lock:
            self._load(state)
            model = state_dict_to_bytes(self.model.state_dict())
            optimizer = io.BytesIO()
            torch.save(self.optimizer.state_dict(), optimizer)
            return wire.pack_segments(
                {
                    "round": round_,
                    "metrics": dict(metrics),
                    "model": model,
                    "optimizer": optimizer.getbuffer(),
                    "task": self.task.state_dict(),
                }
            )

    def restore(self, payload: bytes) -> Restored:
        """Load a ``checkpoint``; ``CheckpointContentError`` in one line if it does not fit."""
        limits = wire.Limits(
            max_message_size=len(payload), max_array_len=100_000, max_map_len=100_000
        )
        try:
            raw = wire.expect_map(
                wire.unpack(payload, limits),
                {"round", "metrics", "model", "optimizer", "task"},
                "checkpoint",
            )
            round_, metrics = raw["round"], raw["metrics"]
            if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
                raise CheckpointContentError(f"round must be a non-negative integer: {round_!r:.9}")
            metrics = _metrics(wire.expect(metrics, dict, "checkpoint.metrics"), "checkpoint")
            model_bytes = wire.expect(raw["model"], bytes, "checkpoint.model")
            full = state_dict_from_bytes(model_bytes, len(model_bytes))
            check_layout(full, self.model.state_dict())
            check_finite(full)
            optimizer_bytes = wire.expect(raw["optimizer"], bytes, "checkpoint.optimizer")
            task_state = wire.expect(raw["task"], dict, "checkpoint.task")
        except (RemoteProtocolError, TaskError) as exc:
            raise CheckpointContentError(str(exc)) from exc
        try:
            optimizer_state = torch.load(io.BytesIO(optimizer_bytes), weights_only=True)
        except Exception as exc:  # torch's unpickler raises many types on damaged bytes
            raise CheckpointContentError(f"optimizer state unreadable: {exc}") from exc
        with self._lock:
            self._load(full)
            try:
                self.optimizer.load_state_dict(optimizer_state)
                self.task.load_state_dict(task_state)
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise CheckpointContentError(f"does not fit this task: {exc}") from exc
            return Restored(round_, metrics, self._state())


def _metrics(value: Any, where: str) -> dict[str, float]:
    """Finite named numbers; ``TaskError`` for anything that is not a metrics dict."""
    if not isinstance(value, Mapping):
        raise TaskError(f"{where} must return a dict of metrics, not {type(value).__name__}")
    out: dict[str, float] = {}
    for key, number in value.items():
        if not isinstance(key, str) or isinstance(number, bool):
            raise TaskError(f"{where}: metric {key!r} must be a name with a number")
        try:
            number = float(number)
        except (TypeError, ValueError):
            raise TaskError(f"{where}: metric {key!r} = {number!r:.40} is not a number") from None
        if math.isfinite(number):  # a diverged loss is left out, not reported as NaN
            out[key] = number
    return out
