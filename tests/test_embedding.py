"""The embedding API from trio, asyncio and synchronous code, with real nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from peerlearn import Node, NodeConfig, open_node
from peerlearn.errors import LocalProtocolError
from peerlearn.learning import parts
from peerlearn.learning.aggregate import population_variance, vca_merge
from peerlearn.learning.compression import LAYOUT_KEY
from peerlearn.node.allreduce import PART_ROUNDS
from peerlearn.node.embedded import EmbeddedNode
from peerlearn.node.learning_transport import COMPRESSION_KEY, MODEL_KIND
from peerlearn.tensors import state_dict_to_bytes

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


@asynccontextmanager
async def connected_pair(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNode, EmbeddedNode]]:
    """Nodes a and b on 127.0.0.1, b dialled a, once a counts b among its peers."""
    async with (
        open_node(config(tmp_path, "a")) as a,
        open_node(config(tmp_path, "b", ((await a.addrs())[0],))) as b,
    ):
        while not await a.peers():  # noqa: ASYNC110 - polls the node
            await trio.sleep(0.05)
        yield a, b


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


def averaged_models(
    tmp_path: Path, algo: str, silent: int | None = None, compression: str = "none"
) -> list[Any]:
    """Four trio nodes average their models by all-reduce; ``silent`` never calls average."""
    from contextlib import AsyncExitStack

    async def main() -> list[Any]:
        with trio.fail_after(TIMEOUT):
            async with AsyncExitStack() as stack:
                nodes = []
                for i in range(4):
                    cfg = dataclasses.replace(
                        config(tmp_path, f"n{i}"), algo=algo, compression=compression
                    )
                    nodes.append(await stack.enter_async_context(open_node(cfg)))
                for i, node in enumerate(nodes):
                    for other in nodes[:i]:
                        await node.connect((await other.addrs())[0])
                results: list[Any] = [None] * 4

                async def average(i: int) -> None:
                    results[i] = await nodes[i].average(model(i), round=0, timeout=6)

                async with trio.open_nursery() as nursery:
                    for i in range(4):
                        if i != silent:
                            nursery.start_soon(average, i)
                return [*results, nodes[silent].peer_id if silent is not None else None]

    return trio.run(main)


def test_all_reduce_gives_every_member_the_group_mean(tmp_path: Path) -> None:
    results = averaged_models(tmp_path, "gossip")[:4]
    mean = {k: sum(model(i)[k] for i in range(4)) / 4 for k in model(0)}
    for result in results:
        assert (len(result.group), result.reduced_with, result.fallback_parts) == (4, 4, [])
        assert all(torch.allclose(result.model[k], mean[k], atol=1e-6) for k in mean)


def test_all_reduce_with_vca_keeps_the_members_mean_variance(tmp_path: Path) -> None:
    results = averaged_models(tmp_path, "gossip-vca")[:4]
    target = sum(population_variance(model(i)["weight"]) for i in range(4)) / 4
    for result in results:
        assert population_variance(result.model["weight"]) == pytest.approx(target, rel=1e-5)
        assert torch.equal(result.model["weight"], results[0].model["weight"])


@pytest.mark.parametrize(("algo", "codec"), [("gossip", "int8"), ("gossip-vca", "int4")])
def test_all_reduce_with_compressed_parts_gives_the_group_mean_within_its_steps(
    tmp_path: Path, algo: str, codec: str
) -> None:
    """Each part is quantized twice (a member's values to their reducer, the average back),
    so every value is within a step of the mean; the members' variances travel as they
    are, so VCA still gives every member their mean variance."""
    results = averaged_models(tmp_path, algo, compression=codec)[:4]
    models = [model(i) for i in range(4)]
    levels = 127 if codec == "int8" else 7
    for name in models[0]:
        mean = sum(m[name] for m in models) / 4
        step = float(torch.stack([m[name] for m in models]).abs().max()) / levels
        for result in results:
            assert (result.reduced_with, result.fallback_parts) == (4, [])
            if algo == "gossip":
                assert float((result.model[name] - mean).abs().max()) <= step + 1e-6
    if algo == "gossip":
        exact = parts.flat_vectors({k: sum(m[k] for m in models) / 4 for k in models[0]})
        got = parts.flat_vectors(results[0].model)
        assert not all(torch.allclose(got[k], exact[k], atol=1e-7) for k in exact)  # quantized
    else:
        target = sum(population_variance(m["weight"]) for m in models) / 4
        for result in results:
            assert population_variance(result.model["weight"]) == pytest.approx(target, rel=1e-5)


def test_top_k_is_refused_by_average_in_one_line(tmp_path: Path) -> None:
    async def main() -> None:
        chosen = dataclasses.replace(config(tmp_path, "a"), algo="modest", compression="topk:0.1")
        async with open_node(chosen) as a:
            with pytest.raises(LocalProtocolError, match="use int8 or int4"):
                await a.average(model(1), round=0, peers=[])

    trio.run(main)


def test_all_reduce_falls_back_to_own_values_when_a_member_is_silent(tmp_path: Path) -> None:
    *results, silent = averaged_models(tmp_path, "gossip", silent=3)
    for i, result in enumerate(results[:3]):
        missing = result.group.index(silent)
        assert result.reduced_with == 3  # the silent member's part never came
        assert result.fallback_parts == [missing]  # nor its average of its part
        own = parts.cut(parts.flat_vectors(model(i)), missing, 4)
        got = parts.cut(parts.flat_vectors(result.model), missing, 4)
        assert all(torch.equal(got[k], own[k]) for k in own)  # that part stays ours


def test_parts_a_peer_floods_in_are_dropped_and_counted_in_status(tmp_path: Path) -> None:
    """Parts for rounds nobody averages yet: a node keeps PART_ROUNDS of a sender's rounds
    and counts the rest in its status."""
    flood = range(100, 110)

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with connected_pair(tmp_path) as (a, b):
                data = state_dict_to_bytes({"float32": torch.zeros(4)})
                for round_ in flood:
                    meta = {"round": round_, "butterfly": "reduce", "part": 0, "of": 2}
                    await b._daemon.push_to_peers(data, MODEL_KIND, meta, [a.peer_id])
                while (await a.status())["embedding"]["dropped_parts"] < len(flood) - PART_ROUNDS:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert (await a.status())["embedding"] == {
                    "rejected_updates": 0,
                    "dropped_parts": len(flood) - PART_ROUNDS,
                    "updates_clipped": 0,  # parts do not go through merge()
                    "median_distance": None,
                }

    trio.run(main)


def test_a_node_set_to_compress_shares_models_in_fewer_bytes(tmp_path: Path) -> None:
    """int8 with error feedback: a receiver that holds no model rebuilds it in the layout
    the bytes state; sharing the same model again sends what the first message left out."""
    generator = torch.Generator().manual_seed(3)
    sent = {
        "w": torch.randn(64, 256, generator=generator),
        "half": torch.randn(300, generator=generator).half(),
        "steps": torch.tensor(5),
    }
    plain = len(state_dict_to_bytes(sent))

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with (
                open_node(dataclasses.replace(config(tmp_path, "a"), compression="int8")) as a,
                open_node(config(tmp_path, "b", ((await a.addrs())[0],))) as b,
            ):
                received = []
                for round_ in (1, 2):
                    (delivery,) = await a.share_model(sent, round=round_)
                    assert delivery.ok
                    assert delivery.bytes is not None
                    assert delivery.bytes < plain / 3.5
                    update = await b.receive()
                    assert update.model is not None
                    assert update.round == round_
                    received.append(update.model)
                first, second = received
                assert {k: (t.dtype, t.shape) for k, t in first.items()} == {
                    k: (t.dtype, t.shape) for k, t in sent.items()
                }
                assert torch.equal(first["steps"], sent["steps"])
                step = float(sent["w"].abs().max()) / 127
                assert float((first["w"] - sent["w"]).abs().max()) <= step / 2 + 1e-6
                error = float((first["w"] - sent["w"]).abs().mean())
                mean = (first["w"] + second["w"]) / 2
                assert float((mean - sent["w"]).abs().mean()) < 0.7 * error

    trio.run(main)


def test_top_k_is_refused_by_share_model_in_one_line(tmp_path: Path) -> None:
    async def main() -> None:
        chosen = dataclasses.replace(config(tmp_path, "a"), algo="modest", compression="topk:0.1")
        async with open_node(chosen) as a:
            with pytest.raises(LocalProtocolError, match="use int8 or int4"):
                await a.share_model(model(1))

    trio.run(main)


@pytest.mark.parametrize(
    ("layout", "codec", "error"),
    [
        ('{"w":["F32",[100000000000]]}', "int8", "decodes to more than"),
        ('{"w":["F32",[4]]}', "topk:0.1", "start we do not share"),
        ('{"w":["F32",[4]]}', "none", "'none' named"),
        (None, "int8", "without its layout"),
    ],
)
def test_compressed_models_a_peer_cannot_back_are_refused_to_it(
    tmp_path: Path, layout: str | None, codec: str, error: str
) -> None:
    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with connected_pair(tmp_path) as (a, b):
                wire = {"w/q": torch.ones(256, dtype=torch.int8), "w/scale": torch.ones(1)}
                data = state_dict_to_bytes(wire, None if layout is None else {LAYOUT_KEY: layout})
                (result,) = await b._daemon.push_to_peers(
                    data, MODEL_KIND, {COMPRESSION_KEY: codec}, [a.peer_id]
                )
                assert not result["ok"]
                assert error in result["error"]
                status = await a.status()
                assert (status["phase"], status["updates_rejected"]) == ("running", 1)

    trio.run(main)
