"""Two embedded nodes in plain synchronous code: train, share, merge, share rollouts.

Each node runs in its own trio thread; calls block only the caller.

    python examples/embed_sync.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from toy_regression import (
    describe,
    describe_rollouts,
    new_model,
    node_config,
    rollout_pool,
    toy_rollout,
    train,
)

from peerlearn import Node, pack_rollouts


def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with Node(node_config(root, "a")) as a, Node(node_config(root, "b", (a.addrs[0],))) as b:
            models = {node.peer_id: new_model(seed=i) for i, node in enumerate((a, b))}
            for r in range(rounds):
                for i, node in enumerate((a, b)):
                    loss = train(models[node.peer_id], seed=10 * r + i)
                    state = models[node.peer_id].state_dict()
                    assert all(d.ok for d in node.share_model(state, round=r))
                for node in (a, b):  # each merges the model it received (VCA)
                    update = node.receive(timeout=30)
                    assert update is not None, "no model arrived within 30 s"
                    own = models[node.peer_id]
                    own.load_state_dict(node.merge(own.state_dict(), [update]))
                print(f"round {r}: loss {loss:.4f}")
            b.share(pack_rollouts([toy_rollout(3), toy_rollout(5)]), round=rounds)
            pool = rollout_pool()
            pool.add(a.receive(timeout=30))
            print("received", describe_rollouts(pool.take(10)))
            print(f"sync example: learned {describe(models[a.peer_id])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    main(parser.parse_args().rounds)
