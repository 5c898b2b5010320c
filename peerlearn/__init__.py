"""peerlearn: a peer-to-peer decentralized learning daemon.

Embedding API (imported on first use, so ``import peerlearn`` stays cheap)::

    from peerlearn import Node, NodeConfig, open_node

Swarm RL: rollouts to share, checked on arrival, and a loss for training on them::

    from peerlearn import Rollout, RolloutPool, clipped_policy_loss, pack_rollouts

Your own learning task (``node start --task mymodule:factory``)::

    from peerlearn import Task, TaskContext, TaskOptions
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EMBEDDED = (
    "AsyncNode",
    "AsyncioNode",
    "Averaged",
    "Delivery",
    "Node",
    "TrioNode",
    "Update",
    "open_node",
)
_TASK = ("Task", "TaskContext", "TaskError", "TaskOptions", "Training", "create_task")
_TASK_MODEL = ("TaskModel",)
_ROLLOUTS = ("Rollout", "RolloutPool", "clipped_policy_loss", "pack_rollouts")

if TYPE_CHECKING:
    from peerlearn.learning.task import Task as Task
    from peerlearn.learning.task import TaskContext as TaskContext
    from peerlearn.learning.task import TaskError as TaskError
    from peerlearn.learning.task import TaskOptions as TaskOptions
    from peerlearn.learning.task import Training as Training
    from peerlearn.learning.task import create_task as create_task
    from peerlearn.learning.task_model import TaskModel as TaskModel
    from peerlearn.node.config import NodeConfig as NodeConfig
    from peerlearn.node.embedded import AsyncioNode as AsyncioNode
    from peerlearn.node.embedded import AsyncNode as AsyncNode
    from peerlearn.node.embedded import Averaged as Averaged
    from peerlearn.node.embedded import Delivery as Delivery
    from peerlearn.node.embedded import Node as Node
    from peerlearn.node.embedded import TrioNode as TrioNode
    from peerlearn.node.embedded import Update as Update
    from peerlearn.node.embedded import open_node as open_node
    from peerlearn.rollouts import Rollout as Rollout
    from peerlearn.rollouts import RolloutPool as RolloutPool
    from peerlearn.rollouts import clipped_policy_loss as clipped_policy_loss
    from peerlearn.rollouts import pack_rollouts as pack_rollouts


def __getattr__(name: str) -> Any:
    if name in _EMBEDDED:
        from peerlearn.node import embedded

        return getattr(embedded, name)
    if name in _TASK:
        from peerlearn.learning import task

        return getattr(task, name)
    if name in _TASK_MODEL:
        from peerlearn.learning import task_model

        return getattr(task_model, name)
    if name in _ROLLOUTS:
        from peerlearn import rollouts

        return getattr(rollouts, name)
    if name == "NodeConfig":
        from peerlearn.node.config import NodeConfig

        return NodeConfig
    raise AttributeError(f"module 'peerlearn' has no attribute {name!r}")


__all__ = [*_EMBEDDED, *_TASK, *_TASK_MODEL, *_ROLLOUTS, "NodeConfig", "__version__"]
