"""Throughput of /peerlearn/blob/1 vs a plain asyncio TCP socket, measured side by side.

Each transfer goes from this process to a receiver subprocess on 127.0.0.1, so both
sides of each stack run in their own interpreter, as two daemons would.

    python bench/stream_throughput.py [--megabytes 100] [--chunk-kib 1024 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from typing import Any

SIZE_MB_DEFAULT = 100
RAW_CHUNK = 64 * 1024


# --- receivers (run in a subprocess) -----------------------------------------------------


def blob_receiver() -> None:
    import trio

    from peerlearn.identity import Identity
    from peerlearn.node import blob
    from peerlearn.node.host import open_host

    async def main() -> None:
        async with open_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as host:
            done = trio.Event()

            blob.serve_every_blob(host, 2**31)
            print(host.addrs()[0], flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # parent closes stdin at the end
            done.set()

    trio.run(main)


def raw_receiver() -> None:
    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            size = int.from_bytes(await reader.readexactly(8), "big")
            while size:
                size -= len(await reader.read(min(size, 1 << 20)))
            writer.write(b"ok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        server.close()

    asyncio.run(main())


# --- senders -------------------------------------------------------------------------------


def spawn(role: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--role", role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def send_raw(port: int, data: bytes) -> float:
    async def main() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.perf_counter()
        writer.write(len(data).to_bytes(8, "big"))
        view = memoryview(data)
        for start in range(0, len(data), RAW_CHUNK):
            writer.write(view[start : start + RAW_CHUNK])
            await writer.drain()
        assert await reader.readexactly(2) == b"ok"
        elapsed = time.perf_counter() - started
        writer.close()
        return elapsed

    return asyncio.run(main())


def send_blob(address: str, data: bytes, chunk_size: int) -> float:
    import trio

    from peerlearn.identity import Identity
    from peerlearn.node import blob
    from peerlearn.node.host import open_host

    async def main() -> float:
        identity = Identity.generate()
        async with open_host(identity, ["/ip4/127.0.0.1/tcp/0"]) as host:
            peer_id = await host.connect(address)
            started = time.perf_counter()
            await blob.push_blob(
                lambda: host.open_stream(peer_id, blob.PROTOCOL),
                identity,
                1,
                data,
                kind="bench",
                meta={},
                chunk_size=chunk_size,
            )
            return time.perf_counter() - started

    result: float = trio.run(main)
    return result


def machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=["blob", "raw"])
    parser.add_argument("--megabytes", type=int, default=SIZE_MB_DEFAULT)
    parser.add_argument("--chunk-kib", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    if args.role == "blob":
        return blob_receiver()
    if args.role == "raw":
        return raw_receiver()

    data = os.urandom(args.megabytes * 2**20)
    mb = len(data) / 1e6
    print(f"machine: {machine()}")
    print(f"payload: {mb:.0f} MB over 127.0.0.1, receiver in a separate process")
    results: dict[str, Any] = {}
    raw_proc, port = spawn("raw")
    try:
        results["asyncio TCP"] = mb / send_raw(int(port), data)
    finally:
        raw_proc.communicate("")
    for chunk_kib in args.chunk_kib:
        blob_proc, address = spawn("blob")
        try:
            results[f"blob/1 chunk {chunk_kib} KiB"] = mb / send_blob(
                address, data, chunk_kib * 1024
            )
        finally:
            blob_proc.communicate("")
    raw = results["asyncio TCP"]
    for name, rate in results.items():
        print(f"{name:28s} {rate:8.1f} MB/s   ratio to asyncio TCP {rate / raw:.3f}")
    best = max(v for k, v in results.items() if k.startswith("blob"))
    print(f"best blob/1 ratio: {best / raw:.3f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
