"""The embedding API from trio, asyncio and synchronous code, with real nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import trio

from peerlearn import Node, NodeConfig, open_node
from peerlearn.errors import LocalProtocolError
from peerlearn.learning.aggregate import vca_merge

pytestmark = pytest.mark.integration
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
TIMEOUT = 60  # seconds


def config(tmp_path: Path, name: str, bootstrap: tuple[str, ...] = ()) -> NodeConfig:
    return NodeConfig(
        data_dir=tmp_path / name,
        listen=LOOPBACK,
        bootstrap=bootstrap,
        swarm="embed",
        mdns=False,
        shutdown_timeout=5,
    )


def model(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 3).state_dict()


def test_trio_nodes_share_models_and_payloads(tmp_path: Path) -> None:
    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with (
                open_node(config(tmp_path, "a")) as a,
                open_node(config(tmp_path, "b", ((await a.addrs())[0],))) as b,
            ):
                deliveries = await a.share_model(model(1), round=3)
                assert [(d.peer_id, d.ok) for d in deliveries] == [(b.peer_id, True)]
                update = await b.receive()
                assert (update.sender, update.kind, update.round) == (a.peer_id, "model", 3)
                assert update.model is not None
                assert all(torch.equal(update.model[k], v) for k, v in model(1).items())
                rollouts = {"episode": [1.0, 0.5, -1.0], "task": "cartpole"}
                assert (await b.share(rollouts))[0].ok
                assert (await a.receive()).payload == rollouts
                merged = b.merge(model(2), [update])  # the configured gossip-vca merge
                expected = vca_merge(model(2), [model(1)], beta=0.5)
                assert all(torch.allclose(merged[k], expected[k]) for k in merged)
                await a.set_round(7)
                with trio.fail_after(20):  # gossip, or anti-entropy within a discovery period

                    async def seen() -> bool:
                        rounds, members = await b.swarm_rounds(), await b.members()
                        return rounds.get(a.peer_id) == 7 and len(members) == 2

                    while not await seen():  # noqa: ASYNC110 (the swarm state, from outside)
                        await trio.sleep(0.05)
                assert set(await b.members()) == {a.peer_id, b.peer_id}

    trio.run(main)


def test_asyncio_node_talks_to_a_sync_node(tmp_path: Path) -> None:
    with Node(config(tmp_path, "sync")) as sync_node:

        async def main() -> None:
            async with open_node(config(tmp_path, "aio", (sync_node.addrs[0],))) as node:
                assert sync_node.peer_id in await node.peers()
                assert (await node.share_model(model(3)))[0].ok
                update = await asyncio.to_thread(sync_node.receive, 10.0)
                assert update is not None
                assert update.sender == node.peer_id
                assert sync_node.share({"reward": 1.5})[0].ok
                received = await asyncio.wait_for(node.receive(), 10)
                assert received.payload == {"reward": 1.5}

        asyncio.run(asyncio.wait_for(main(), TIMEOUT))
        assert sync_node.receive(timeout=0.01) is None


def test_sync_node_callback_and_clear_errors(tmp_path: Path) -> None:
    seen: list[str] = []
    with Node(config(tmp_path, "x")) as x, Node(config(tmp_path, "y", ())) as y:
        y.connect(x.addrs[0])
        x.on_update(lambda u: seen.append(u.kind))
        assert y.share({"n": 1})[0].ok
        assert seen == ["payload"]  # delivered before share() returned: it was acknowledged
    with pytest.raises(LocalProtocolError, match="inside `with Node"):
        Node(config(tmp_path, "z")).peers()


def test_sharing_with_nobody_is_an_error_not_a_silent_drop(tmp_path: Path) -> None:
    with (
        Node(config(tmp_path, "alone")) as alone,
        pytest.raises(LocalProtocolError, match="no connected peers"),
    ):
        alone.share({"x": 1})
