"""Two embedded nodes in one trio program: train, share, merge, share rollouts.

python examples/embed_trio.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import trio
from toy_regression import (
    describe,
    describe_rollouts,
    new_model,
    node_config,
    rollout_pool,
    toy_rollout,
    train,
)

from peerlearn import open_node, pack_rollouts


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with (
            open_node(node_config(root, "a")) as a,
            open_node(node_config(root, "b", ((await a.addrs())[0],))) as b,
        ):
            models = {node.peer_id: new_model(seed=i) for i, node in enumerate((a, b))}
            for r in range(rounds):
                for i, node in enumerate((a, b)):
                    loss = train(models[node.peer_id], seed=10 * r + i)
                    state = models[node.peer_id].state_dict()
                    assert all(d.ok for d in await node.share_model(state, round=r))
                for node in (a, b):  # each merges the model it received (VCA)
                    update = await node.receive()
                    own = models[node.peer_id]
                    own.load_state_dict(node.merge(own.state_dict(), [update]))
                print(f"round {r}: loss {loss:.4f}")
            await b.share(pack_rollouts([toy_rollout(3), toy_rollout(5)]), round=rounds)
            pool = rollout_pool()
            pool.add(await a.receive())
            print("received", describe_rollouts(pool.take(10)))
            print(f"trio example: learned {describe(models[a.peer_id])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    trio.run(main, parser.parse_args().rounds)
