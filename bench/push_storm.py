"""Many peers pushing blobs at each other over real connections: do pushes keep flowing?

Each of ``--nodes`` processes runs a host on 127.0.0.1 and, every ``--interval`` seconds, pushes
``--size-mb`` of bytes over ``/peerlearn/blob/3`` to ``--peers`` random others (one push per
destination at a time, as the daemon does), each body on the libp2p stream (no bulk path).
With ``--cut-after S``, pushes of the first half are cancelled after S seconds, mid-write
most of the time; the second half then shows whether the connections survived that.
Prints, per half, pushes delivered and failed, and the slowest.

    python bench/push_storm.py [--nodes 10] [--peers 4] [--size-mb 2] [--interval 0.5]
                               [--seconds 40] [--cut-after 1.0]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any


async def files_written(root: str, suffix: str, count: int) -> None:
    """Wait (up to 120 s) until the run's processes have written ``count`` such files."""
    import trio

    for _ in range(1200):
        if len(list(Path(root).glob(f"*{suffix}"))) >= count:
            return
        await trio.sleep(0.1)
    raise TimeoutError(f"the other processes did not all write their {suffix} file")


def node(index: int, args: argparse.Namespace, root: str, out: Any) -> None:
    import trio

    from peerlearn.errors import NetworkError
    from peerlearn.identity import Identity
    from peerlearn.node import blob
    from peerlearn.node.host import open_host

    async def main() -> dict[str, Any]:
        identity = Identity.generate()
        async with open_host(identity, ["/ip4/127.0.0.1/tcp/0"]) as host:
            blob.serve_every_blob(host, 1 << 31)
            (Path(root) / f"{index}.addr").write_text(host.addrs()[0])
            await files_written(root, ".addr", args.nodes)
            peers = []
            for i in range(args.nodes):
                if i != index:
                    peers.append(await host.connect((Path(root) / f"{i}.addr").read_text()))
            data = os.urandom(int(args.size_mb * 1e6))
            rng = random.Random(index)
            halves = [{"delivered": 0, "failed": 0, "slowest_s": 0.0} for _ in range(2)]
            busy: set[str] = set()
            seq = iter(range(1, 1 << 40))
            start = trio.current_time()

            async def push(peer: str, half: int) -> None:
                began = trio.current_time()
                limit = args.cut_after if half == 0 and args.cut_after else 60.0
                try:
                    with trio.fail_after(limit):
                        await blob.push_blob(
                            lambda: host.open_stream(peer, blob.PROTOCOL),
                            identity,
                            next(seq),
                            data,
                            kind="bench",
                            meta={},
                        )
                    halves[half]["delivered"] += 1
                except (trio.TooSlowError, NetworkError):
                    halves[half]["failed"] += 1
                took = trio.current_time() - began
                halves[half]["slowest_s"] = max(halves[half]["slowest_s"], round(took, 2))
                busy.discard(peer)

            async with trio.open_nursery() as nursery:
                while (now := trio.current_time() - start) < args.seconds:
                    half = 0 if now < args.seconds / 2 else 1
                    for peer in rng.sample(peers, min(args.peers, len(peers))):
                        if peer not in busy:
                            busy.add(peer)
                            nursery.start_soon(push, peer, half)
                    await trio.sleep(args.interval)
            (Path(root) / f"{index}.done").write_text("")
            await files_written(root, ".done", args.nodes)  # serving the others till then
            return {"halves": halves}

    out.put(trio.run(main))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--size-mb", type=float, default=2.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--cut-after", type=float, default=0.0)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="push-storm-") as root:
        procs = [ctx.Process(target=node, args=(i, args, root, out)) for i in range(args.nodes)]
        for p in procs:
            p.start()
        results = [out.get(timeout=args.seconds + 180) for _ in procs]
        for p in procs:
            p.join(timeout=30)
    print(
        f"{args.nodes} nodes, {args.peers} peers each, {args.size_mb} MB every {args.interval} s,"
    )
    print(f"{args.seconds} s, first half cut off after {args.cut_after or 'no'} s:")
    for half, name in enumerate(("first half", "second half")):
        rows = [r["halves"][half] for r in results]
        total = {
            "delivered": sum(r["delivered"] for r in rows),
            "failed": sum(r["failed"] for r in rows),
            "slowest_s": max(r["slowest_s"] for r in rows),
        }
        print(f"  {name}: {json.dumps(total)}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
