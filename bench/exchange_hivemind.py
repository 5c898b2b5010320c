"""The hivemind side of ``bench/exchange.py``: one worker process, run with an interpreter that
has hivemind (``.venv-hivemind``); it does not import peerlearn.

- ``ab``: worker 0 sends worker 1 the model, each tensor serialized as hivemind serializes
  tensors for its averaging (``serialize_torch_tensor``), over a stream of its p2p daemon;
  worker 1 deserializes them and acknowledges.
- ``average``: every worker runs ``DecentralizedAverager.step()`` once per round, in a group
  of all the workers (butterfly all-reduce).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import hivemind
import torch
from exchange_common import Folder, PeakRss, Rounds, model_shapes, rss_bytes, write_result
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

STEP_TIMEOUT = 300.0
HANDLER = "bench-a-to-b"


def tensors(index: int, size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(index)
    return [torch.randn(n, generator=generator) for n in model_shapes(size)]


def average(spec: dict[str, Any]) -> dict[str, Any]:
    folder = Folder(spec["folder"], spec["index"], spec["workers"])
    host = [f"/ip4/{spec['ip']}/tcp/0"]
    # Each peer starts knowing every earlier one: in 198.18.0.0/15 (the lab's addresses,
    # "benchmarking" to libp2p) the p2p daemons do not pass addresses on.
    earlier = list(range(spec["index"]))
    folder.wait_for("addr", earlier)
    known = [a for i in earlier for a in json.loads(folder.read("addr", i))]
    dht = hivemind.DHT(start=True, host_maddrs=host, initial_peers=known)
    folder.publish("addr", json.dumps([str(a) for a in dht.get_visible_maddrs()]))
    averager = hivemind.averaging.DecentralizedAverager(
        tensors(spec["index"], spec["size"]),
        dht,
        start=True,
        prefix="bench",
        target_group_size=spec["workers"],
        min_group_size=spec["workers"],
        min_matchmaking_time=5.0,
        request_timeout=3.0,
    )
    folder.barrier("ready")
    rounds, baseline = Rounds(spec["interface"]), rss_bytes()
    with PeakRss() as peak:
        for r in range(spec["rounds"]):
            folder.barrier(f"round{r}")
            with rounds.measure() as meter:
                gathered = averager.step(timeout=STEP_TIMEOUT)
                meter.extra["group"] = len(gathered) if gathered else 0
    averager.shutdown()
    dht.shutdown()
    return {"rounds": rounds.records, "baseline_rss": baseline, "peak_rss": peak.peak}


async def a_to_b(spec: dict[str, Any]) -> dict[str, Any]:
    folder = Folder(spec["folder"], spec["index"], 2)
    host = [f"/ip4/{spec['ip']}/tcp/0"]

    async def barrier(name: str) -> None:
        await asyncio.to_thread(folder.barrier, name)

    if spec["index"] == 1:
        p2p = await P2P.create(host_maddrs=host)
        received = asyncio.Queue[int]()

        async def handle(
            _: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            count = int.from_bytes(await reader.readexactly(8), "big")
            for _ in range(count):
                length = int.from_bytes(await reader.readexactly(8), "big")
                message = runtime_pb2.Tensor.FromString(await reader.readexactly(length))
                deserialize_torch_tensor(message)
            writer.write(b"ok")
            await writer.drain()
            writer.close()
            await received.put(count)

        await p2p.add_binary_stream_handler(HANDLER, handle)
        addrs = [f"{a}/p2p/{p2p.peer_id}" for a in await p2p.get_visible_maddrs()]
        folder.publish("addr", json.dumps({"id": p2p.peer_id.to_base58(), "addrs": addrs}))
        rounds = Rounds()
        for r in range(spec["rounds"]):
            await barrier(f"round{r}")
            with rounds.measure():
                await received.get()
        await barrier("done")
        await p2p.shutdown()
        return {"rounds": rounds.records}

    await asyncio.to_thread(folder.wait_for, "addr", [1])
    other = json.loads(folder.read("addr", 1))
    p2p = await P2P.create(host_maddrs=host, initial_peers=other["addrs"])
    model, rounds = tensors(0, spec["size"]), Rounds()
    for r in range(spec["rounds"]):
        await barrier(f"round{r}")
        with rounds.measure():
            _, reader, writer = await p2p.call_binary_stream_handler(
                PeerID.from_base58(other["id"]), HANDLER
            )
            writer.write(len(model).to_bytes(8, "big"))
            for tensor in model:
                message = serialize_torch_tensor(tensor).SerializeToString()
                writer.write(len(message).to_bytes(8, "big"))
                writer.write(message)
                await writer.drain()
            if await reader.readexactly(2) != b"ok":
                raise RuntimeError("the hivemind receiver did not acknowledge")
            writer.close()
    await barrier("done")
    await p2p.shutdown()
    return {"rounds": rounds.records}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    spec = json.loads(parser.parse_args().worker)
    folder = Folder(spec["folder"], spec["index"], spec["workers"])
    result = average(spec) if spec["mode"] == "average" else asyncio.run(a_to_b(spec))
    write_result(folder, result)


if __name__ == "__main__":
    main()
