"""Throughput of a blob (/peerlearn/blob/3) vs a plain asyncio TCP socket, side by side: its
body over the libp2p stream (Noise, yamux) and over the sealed bulk path (``node.bulk_path``);
and a bare TLS 1.3 socket (Python's ssl, blocking, nothing hashed or checked), which the
bulk path replaced.

Each transfer goes from this process to a receiver subprocess on 127.0.0.1, so both
sides of each stack run in their own interpreter, as two daemons would.

    python bench/stream_throughput.py [--megabytes 100] [--chunk-kib 1024 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SIZE_MB_DEFAULT = 100
RAW_CHUNK = 64 * 1024


# --- receivers (run in a subprocess) -----------------------------------------------------


def blob_receiver(with_bulk: bool) -> None:
    import trio

    from peerlearn.identity import Identity
    from peerlearn.node import blob
    from peerlearn.node.bulk_path import BulkPath
    from peerlearn.node.host import open_host

    async def main() -> None:
        async with (
            open_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as host,
            trio.open_nursery() as nursery,
        ):
            bulk = None
            if with_bulk:
                bulk = BulkPath("127.0.0.1")
                await nursery.start(bulk.serve)
            blob.serve_every_blob(host, 2**31, bulk=bulk)
            print(host.addrs()[0], flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # parent closes stdin at the end
            nursery.cancel_scope.cancel()

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


def tls_context(server: bool) -> ssl.SSLContext:
    """TLS 1.3; the server with a fresh self-signed P-256 certificate, the client checking
    nothing (a throughput baseline only)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if not server:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with tempfile.TemporaryDirectory() as folder:  # ssl loads keys from files only
        cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        context.load_cert_chain(cert_path, key_path)
    return context


def tls_receiver() -> None:
    context = tls_context(server=True)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    listener.settimeout(1.0)
    while True:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        with context.wrap_socket(connection, server_side=True) as tls:
            header = tls.recv(8)
            if not header:
                return  # the sender's goodbye
            left, buffer = int.from_bytes(header, "big"), memoryview(bytearray(1 << 20))
            while left:
                left -= tls.recv_into(buffer, min(left, len(buffer)))
            tls.sendall(b"ok")


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


def send_raw(port: int, data: bytes, repeats: int) -> float:
    """Median seconds of ``repeats`` transfers after a warm-up one, a connection each."""

    async def once() -> float:
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

    async def main() -> float:
        times = [await once() for _ in range(1 + repeats)][1:]
        return statistics.median(times)

    return asyncio.run(main())


def send_tls(port: int, data: bytes, repeats: int) -> float:
    """Median seconds of ``repeats`` transfers over a fresh TLS 1.3 connection each."""
    context, view, times = tls_context(server=False), memoryview(data), []
    for _ in range(1 + repeats):
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port))) as tls:
            started = time.perf_counter()
            tls.sendall(len(data).to_bytes(8, "big"))
            for start in range(0, len(data), 1 << 20):
                tls.sendall(view[start : start + (1 << 20)])
            assert tls.recv(2) == b"ok"
            times.append(time.perf_counter() - started)
    context.wrap_socket(socket.create_connection(("127.0.0.1", port))).close()  # receiver ends
    return statistics.median(times[1:])


def send_blob(
    address: str,
    data: bytes,
    chunk_size: int,
    repeats: int,
    with_bulk: bool = False,
    digest_known: bool = False,
) -> float:
    """Median seconds of ``repeats`` pushes after a warm-up one, over one connection.
    ``digest_known``: the sha256 is computed before the clock starts, as a learner's pushes
    have it (computed once per model when it is encoded and announced)."""
    sha256 = hashlib.sha256(data).digest() if digest_known else None
    import trio

    from peerlearn.identity import Identity
    from peerlearn.node import blob
    from peerlearn.node.bulk_path import BulkPath
    from peerlearn.node.host import open_host

    async def main() -> float:
        identity = Identity.generate()
        bulk = BulkPath("127.0.0.1") if with_bulk else None
        if bulk is not None:
            bulk.stop_listening()  # this side only sends
        async with open_host(identity, ["/ip4/127.0.0.1/tcp/0"]) as host:
            peer_id = await host.connect(address)
            times = []
            for seq in range(1 + repeats):
                started = time.perf_counter()
                await blob.push_blob(
                    lambda: host.open_stream(peer_id, blob.PROTOCOL),
                    identity,
                    seq,
                    data,
                    kind="bench",
                    meta={},
                    chunk_size=chunk_size,
                    bulk=bulk,
                    sha256=sha256,
                )
                times.append(time.perf_counter() - started)
        if bulk is not None and bulk.bodies_sent != 1 + repeats:
            raise SystemExit("a blob did not take the bulk path")
        return statistics.median(times[1:])

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
    parser.add_argument("--role", choices=["blob", "bulk", "raw", "tls"])
    parser.add_argument("--megabytes", type=int, default=SIZE_MB_DEFAULT)
    parser.add_argument("--chunk-kib", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3, help="timed transfers per path")
    args = parser.parse_args()
    if args.role in ("blob", "bulk"):
        return blob_receiver(with_bulk=args.role == "bulk")
    if args.role == "raw":
        return raw_receiver()
    if args.role == "tls":
        return tls_receiver()

    data = os.urandom(args.megabytes * 2**20)
    mb = len(data) / 1e6
    print(f"machine: {machine()}")
    print(
        f"payload: {mb:.0f} MB over 127.0.0.1, receiver in a separate process; median of "
        f"{args.repeats} transfers per path after a warm-up one"
    )
    results: dict[str, Any] = {}
    raw_proc, port = spawn("raw")
    try:
        results["asyncio TCP"] = mb / send_raw(int(port), data, args.repeats)
    finally:
        raw_proc.communicate("")
    tls_proc, port = spawn("tls")
    try:
        results["TLS socket alone"] = mb / send_tls(int(port), data, args.repeats)
    finally:
        tls_proc.communicate("")
    for chunk_kib in args.chunk_kib:
        blob_proc, address = spawn("blob")
        try:
            results[f"libp2p stream, chunk {chunk_kib} KiB"] = mb / send_blob(
                address, data, chunk_kib * 1024, args.repeats
            )
        finally:
            blob_proc.communicate("")
    bulk_proc, address = spawn("bulk")
    try:
        results["bulk path"] = mb / send_blob(address, data, 1 << 20, args.repeats, with_bulk=True)
        results["bulk path, digest known"] = mb / send_blob(
            address, data, 1 << 20, args.repeats, with_bulk=True, digest_known=True
        )
    finally:
        bulk_proc.communicate("")
    raw = results["asyncio TCP"]
    for name, rate in results.items():
        print(f"{name:30s} {rate:8.1f} MB/s   ratio to asyncio TCP {rate / raw:.3f}")
    best = max(v for k, v in results.items() if k.startswith("libp2p"))
    print(f"best libp2p stream ratio: {best / raw:.3f}")
    print(f"bulk path ratio: {results['bulk path'] / raw:.3f} (goal >= 0.5)")
    known = results["bulk path, digest known"] / raw
    print(f"bulk path ratio, digest known (a learner's pushes): {known:.3f}")


if __name__ == "__main__":
    main()
