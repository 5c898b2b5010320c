"""peerlearn: a peer-to-peer decentralized learning daemon.

Embedding API (imported on first use, so ``import peerlearn`` stays cheap)::

    from peerlearn import Node, NodeConfig, open_node
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EMBEDDED = ("AsyncNode", "AsyncioNode", "Delivery", "Node", "TrioNode", "Update", "open_node")

if TYPE_CHECKING:
    from peerlearn.node.config import NodeConfig as NodeConfig
    from peerlearn.node.embedded import AsyncioNode as AsyncioNode
    from peerlearn.node.embedded import AsyncNode as AsyncNode
    from peerlearn.node.embedded import Delivery as Delivery
    from peerlearn.node.embedded import Node as Node
    from peerlearn.node.embedded import TrioNode as TrioNode
    from peerlearn.node.embedded import Update as Update
    from peerlearn.node.embedded import open_node as open_node


def __getattr__(name: str) -> Any:
    if name in _EMBEDDED:
        from peerlearn.node import embedded

        return getattr(embedded, name)
    if name == "NodeConfig":
        from peerlearn.node.config import NodeConfig

        return NodeConfig
    raise AttributeError(f"module 'peerlearn' has no attribute {name!r}")


__all__ = [*_EMBEDDED, "NodeConfig", "__version__"]
