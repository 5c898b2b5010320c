"""peerlearn and hivemind side by side: one model A->B, and groups of peers averaging models.

Every peer is a process of its own. Cases run one after another in one run, each system in
turn (peerlearn, then hivemind, then plain TCP for A->B), and the table gives ratios:

- **A->B**, on 127.0.0.1: one model sent from A to B and acknowledged, for each size, as
  a fraction of a blocking TCP socket's throughput (the median of ``--repeats``): one that
  reads into the same 1 MB again and again, and one that keeps the model (a new buffer of
  its size each time, as every real receiver needs). A second table gives the CPU seconds
  the sender and the receiver spent per transfer, and so the least time that work needs on
  the machine's cores, beside the time it took: how close each system runs to what the
  machine allows.
  peerlearn: ``share_model`` of the embedding API (safetensors, blob/3, sealed bulk path).
  hivemind: its tensor serialization over a stream of its p2p daemon.
- **Averaging**: ``--peers`` peers average a model of ``--sizes`` MB, ``--rounds`` rounds.
  peerlearn: ``average()`` of the embedding API (butterfly all-reduce; with
  ``--all-to-all`` also every peer sharing its model with every other, ``share_model`` then
  ``merge``), VCA on; hivemind: ``DecentralizedAverager.step()`` (butterfly all-reduce).
  Each round starts at a barrier; its time is the slowest peer's. Bytes are what each
  peer's network card sent, CPU seconds those of the peer's processes (hivemind's averager
  and p2p daemon included), memory the peak RSS over the idle one. When run as root, each
  peer lives in a network namespace of its own (198.18.0.0/24, removed at the end), so that
  its bytes can be counted; otherwise on 127.0.0.1, without the bytes.

hivemind runs in an interpreter of its own (it needs protobuf 7, libp2p 0.8.1 protobuf 6):
``make bench`` builds ``.venv-hivemind``; ``--hivemind-python`` points elsewhere, and
without one the hivemind columns say "-".

    python bench/exchange.py [--sizes-ab 1 16 100 500] [--peers 4 8] [--sizes 16 100]
                             [--rounds 10] [--repeats 3] [--only ab average compression]
                             [--all-to-all] [--compression int8|int4] [--json FILE]

- **Compression**: int8 and int4 against none in the simulator (``compression.py``).

It ends with the issue's goals, each with this run's number and whether it is met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from exchange_common import Folder, PeakRss, Rounds, model_shapes, rss_bytes, write_result

HERE = Path(__file__).resolve().parent
DEFAULT_HIVEMIND = HERE.parent / ".venv-hivemind" / "bin" / "python"
ROUND_TIMEOUT = 300.0  # seconds before a round counts as stalled
A_TO_B_SYSTEMS = ("peerlearn", "hivemind", "tcp", "tcp-kept")
CORES = os.cpu_count() or 1
MB = 1_000_000


# --- workers (each in its own process) -----------------------------------------------------


def tcp_worker(spec: dict[str, Any]) -> None:
    """A->B over a blocking socket: worker 1 receives, worker 0 sends. ``tcp`` reads into
    one 1 MB buffer again and again (the bytes are dropped); ``tcp-kept`` into a new
    ``bytearray`` of the model's size each time, as a receiver that keeps the model must."""
    folder = Folder(spec["folder"], spec["index"], 2)
    size, rounds = spec["size"], Rounds()
    if spec["index"] == 1:
        with socket.create_server((spec["ip"], 0)) as server:
            folder.publish("addr", str(server.getsockname()[1]))
            scratch = memoryview(bytearray(1 << 20))
            for _ in range(spec["rounds"]):
                connection, _ = server.accept()
                with rounds.measure(), connection:
                    kept = memoryview(bytearray(size)) if spec["system"] == "tcp-kept" else None
                    done = 0
                    while done < size:
                        into = scratch[: size - done] if kept is None else kept[done:]
                        done += connection.recv_into(into)
                    connection.sendall(b"ok")
        write_result(folder, {"rounds": rounds.records})
        return
    folder.wait_for("addr", [1])
    port = int(folder.read("addr", 1))
    data = os.urandom(size)
    for _ in range(spec["rounds"]):
        with rounds.measure(), socket.create_connection((spec["ip"], port)) as connection:
            connection.sendall(data)
            if connection.recv(2) != b"ok":
                raise RuntimeError("the TCP receiver did not acknowledge")
    write_result(folder, {"rounds": rounds.records})


def peerlearn_worker(spec: dict[str, Any]) -> None:
    """A->B (worker 0 shares with worker 1) or all-to-all averaging, over the embedding API."""
    import torch
    import trio

    from peerlearn import NodeConfig, open_node

    folder = Folder(spec["folder"], spec["index"], spec["workers"])
    index, workers, size = spec["index"], spec["workers"], spec["size"]
    generator = torch.Generator().manual_seed(index)
    model = {
        f"layer{i}": torch.randn(n, generator=generator) for i, n in enumerate(model_shapes(size))
    }
    config = NodeConfig(
        data_dir=Path(spec["folder"]) / f"node{index}",
        listen=(f"/ip4/{spec['ip']}/tcp/0",),
        swarm="bench",
        mdns=False,
        nat_traversal=False,
        log_level="warning",
        max_blob_size=max(512 * 2**20, size + 2**20),
        blob_memory=max(1024 * 2**20, 2 * workers * size),
        blob_memory_per_peer=max(512 * 2**20, 2 * size),
        compression=spec["compression"],
    )

    async def barrier(name: str) -> None:
        await trio.to_thread.run_sync(folder.barrier, name)

    async def main() -> dict[str, Any]:
        async with open_node(config) as node:
            folder.publish("addr", (await node.addrs())[0])
            await trio.to_thread.run_sync(folder.wait_for, "addr", range(workers))
            for other in range(index):
                await node.connect(folder.read("addr", other))
            with trio.fail_after(60):
                while len(await node.peers()) < workers - 1:  # noqa: ASYNC110 - polls the node
                    await trio.sleep(0.05)
            await barrier("ready")
            if spec["mode"] == "ab":
                return await (a_to_b_sender(node) if index == 0 else a_to_b_receiver(node))
            return await average(node)

    async def a_to_b_sender(node: Any) -> dict[str, Any]:
        rounds = Rounds()
        for r in range(spec["rounds"]):
            await barrier(f"round{r}")
            with rounds.measure():
                deliveries = await node.share_model(model, round=r)
            if not all(d.ok for d in deliveries):
                raise RuntimeError(f"A->B not delivered: {deliveries}")
        await barrier("done")
        return {"rounds": rounds.records}

    async def a_to_b_receiver(node: Any) -> dict[str, Any]:
        rounds = Rounds()
        for r in range(spec["rounds"]):
            await barrier(f"round{r}")
            with rounds.measure():
                await node.receive()
        await barrier("done")
        return {"rounds": rounds.records}

    async def share(node: Any, model: Any, r: int, out: list[Any]) -> None:
        out.extend(await node.share_model(model, round=r))

    async def average(node: Any) -> dict[str, Any]:
        nonlocal model
        rounds, early = Rounds(spec["interface"]), []
        baseline = rss_bytes()
        with PeakRss() as peak:
            for r in range(spec["rounds"]):
                await barrier(f"round{r}")
                with rounds.measure() as meter:
                    if spec["system"] == "peerlearn":
                        with trio.move_on_after(ROUND_TIMEOUT):
                            result = await node.average(model, round=r, timeout=ROUND_TIMEOUT)
                            model = result.model
                            full = result.reduced_with == workers and not result.fallback_parts
                            meter.extra["group"] = workers if full else result.reduced_with
                        continue
                    updates = [u for u in early if u.round == r]
                    early = [u for u in early if u.round != r]
                    delivered: list[Any] = []
                    with trio.move_on_after(ROUND_TIMEOUT):
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(share, node, model, r, delivered)
                            while len(updates) < workers - 1:
                                update = await node.receive()
                                (updates if update.round == r else early).append(update)
                    model = node.merge(model, updates)
                    meter.extra["delivered"] = sum(d.ok for d in delivered)
                    meter.extra["received"] = len(updates)
        return {"rounds": rounds.records, "baseline_rss": baseline, "peak_rss": peak.peak}

    write_result(folder, trio.run(main))


WORKERS = {
    "tcp": tcp_worker,
    "tcp-kept": tcp_worker,
    "peerlearn": peerlearn_worker,
    "peerlearn-a2a": peerlearn_worker,
}


# --- the run -------------------------------------------------------------------------------


class Network:
    """Where peers run: namespaces of a lab on one bridge (as root), else 127.0.0.1."""

    def __init__(self, peers: int, use_lab: bool) -> None:
        self.lab: Any = None
        if use_lab:
            from peerlearn.nat.lab import NatLab, lab_unavailable_reason

            if lab_unavailable_reason() is None:
                self.lab = NatLab(prefix=f"plx{os.getpid() % 100000}")
                for i in range(peers):
                    host = self.lab.add_public(f"peer{i}")
                    # a default route, without which hivemind's p2p daemon finds no address
                    subprocess.run(
                        ["ip", "-n", host.namespace, "route", "add", "default", "dev", "eth0"],
                        check=True,
                    )

    def ip(self, index: int) -> str:
        return self.lab.hosts[index].ip if self.lab else "127.0.0.1"

    def command(self, index: int, argv: list[str]) -> list[str]:
        return self.lab.hosts[index].command(*argv) if self.lab else argv

    def close(self) -> None:
        if self.lab:
            self.lab.close()


def run_case(
    system: str,
    mode: str,
    workers: int,
    size: int,
    rounds: int,
    network: Network,
    python: str,
    compression: str = "none",
) -> list[dict[str, Any]] | str:
    """Start ``workers`` processes of ``system``; their results, or why they failed."""
    folder = tempfile.mkdtemp(prefix=f"exchange-{system}-")
    script = HERE / ("exchange_hivemind.py" if system == "hivemind" else "exchange.py")
    processes = []
    try:
        for index in range(workers):
            spec = {
                "system": system,
                "mode": mode,
                "index": index,
                "workers": workers,
                "size": size,
                "rounds": rounds,
                "folder": folder,
                "ip": network.ip(index),
                "interface": "eth0" if network.lab else None,
                "compression": compression,
            }
            argv = network.command(index, [python, str(script), "--worker", json.dumps(spec)])
            log = open(Path(folder) / f"log.{index}", "w")  # noqa: SIM115 - closed with the run
            processes.append(
                subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
        deadline = time.monotonic() + 120 + rounds * ROUND_TIMEOUT
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.1)
        failed = [i for i, p in enumerate(processes) if p.poll() != 0]
        if failed:
            tail = (Path(folder) / f"log.{failed[0]}").read_text().strip().splitlines()[-3:]
            return f"worker {failed[0]} failed: {' | '.join(tail)}"
        return [json.loads((Path(folder) / f"result.{i}").read_text()) for i in range(workers)]
    finally:
        for p in processes:  # and what they started (hivemind's averager, DHT, p2p daemon)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        shutil.rmtree(folder, ignore_errors=True)


def a_to_b(args: argparse.Namespace, pythons: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    network = Network(2, use_lab=False)
    for size_mb in args.sizes_ab:
        size, row = int(size_mb * MB), {"size_mb": size_mb}
        for system in A_TO_B_SYSTEMS:
            if system not in pythons:
                continue
            results = run_case(
                system, "ab", 2, size, args.repeats, network, pythons[system], args.compression
            )
            if isinstance(results, str):
                row[system] = results
                continue
            seconds = statistics.median(r["seconds"] for r in results[0]["rounds"])
            row[system] = size / seconds / MB  # MB/s
            row[f"{system} cpu"] = [  # the sender's and the receiver's CPU-s per transfer
                statistics.median(r["cpu_seconds"] for r in result["rounds"]) for result in results
            ]
        rows.append(row)
        print(ab_line(row), flush=True)
    return rows


def least_seconds(cpu: list[float]) -> float:
    """The least time ``cpu`` seconds of work (sender's and receiver's) take on this
    machine's cores."""
    return sum(cpu) / CORES


def ab_cpu_line(row: dict[str, Any]) -> str:
    """CPU-s per transfer (sender + receiver), and the shortest time the machine's cores
    leave for that much work, beside the time it took."""

    def cell(system: str) -> str:
        cpu, speed = row.get(f"{system} cpu"), row.get(system)
        if not cpu or not isinstance(speed, float):
            return "-"
        seconds = row["size_mb"] / speed
        return f"{cpu[0]:.3f} + {cpu[1]:.3f}: >= {least_seconds(cpu):.3f} s, took {seconds:.3f} s"

    return f"| {row['size_mb']:g} MB | " + " | ".join(map(cell, A_TO_B_SYSTEMS)) + " |"


def averaging(args: argparse.Namespace, pythons: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for peers in args.peers:
        network = Network(peers, use_lab=not args.loopback)
        try:
            for size_mb in args.sizes:
                size, row = int(size_mb * MB), {"peers": peers, "size_mb": size_mb}
                for system in AVERAGING:
                    if system not in pythons or (system == "peerlearn-a2a" and not args.all_to_all):
                        continue
                    results = run_case(
                        system,
                        "average",
                        peers,
                        size,
                        args.rounds,
                        network,
                        pythons[system],
                        args.compression,
                    )
                    row[system] = results if isinstance(results, str) else summarize(results)
                rows.append(row)
                print(average_line(row), flush=True)
        finally:
            network.close()
    return rows


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round, the slowest peer's time; per peer, its mean bytes and CPU per round."""
    rounds = len(results[0]["rounds"])
    times = [max(r["rounds"][i]["seconds"] for r in results) for i in range(rounds)]
    sent = [x["sent_bytes"] for r in results for x in r["rounds"]]

    def peers_in(record: dict[str, Any]) -> int:  # hivemind's group, or 1 + models received
        return int(record.get("group", record.get("received", 0) + 1))

    return {
        "round_s": statistics.median(times),
        "slowest_round_s": max(times),
        "rounds_complete": sum(
            all(peers_in(r["rounds"][i]) == len(results) for r in results) for i in range(rounds)
        ),
        "rounds": rounds,
        "sent_mb": None if None in sent else statistics.mean(sent) / MB,
        "cpu_s": statistics.mean(x["cpu_seconds"] for r in results for x in r["rounds"]),
        "rss_over_idle_mb": max(r["peak_rss"] - r["baseline_rss"] for r in results) / MB,
    }


def ratio(ours: Any, theirs: Any) -> str:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs:
        return f"{ours / theirs:.2f}"
    return "-"


def ab_line(row: dict[str, Any]) -> str:
    def cell(system: str) -> str:
        value = row.get(system)
        return f"{value:.0f} MB/s" if isinstance(value, float) else (value or "-")

    ours, theirs = row.get("peerlearn"), row.get("hivemind")
    tcp, kept = row.get("tcp"), row.get("tcp-kept")
    return (
        f"| {row['size_mb']:g} MB | {cell('peerlearn')} ({ratio(ours, tcp)}x, {ratio(ours, kept)}x)"
        f" | {cell('hivemind')} ({ratio(theirs, tcp)}x, {ratio(theirs, kept)}x)"
        f" | {cell('tcp')} | {cell('tcp-kept')} |"
    )


AVERAGING = {
    "peerlearn": "peerlearn all-reduce (average)",
    "peerlearn-a2a": "peerlearn all-to-all (share_model + merge)",
    "hivemind": "hivemind DecentralizedAverager.step",
}


def average_line(row: dict[str, Any]) -> str:
    """One line per system: its numbers, then its ratios to hivemind's."""
    hivemind = row.get("hivemind")
    lines = []
    for system, label in AVERAGING.items():
        result = row.get(system)
        if result is None:
            continue
        case = f"| {row['peers']} x {row['size_mb']:g} MB | {label}"
        if isinstance(result, str):
            lines.append(f"{case} | {result} |" + " |" * 7)
            continue

        def number(key: str, result: dict[str, Any] = result) -> str:
            return "-" if result.get(key) is None else f"{result[key]:.2f}"

        def versus(key: str, result: dict[str, Any] = result) -> str:
            theirs = hivemind.get(key) if isinstance(hivemind, dict) else None
            return ratio(result.get(key), theirs)

        lines.append(
            f"{case} | {number('round_s')} s | {number('slowest_round_s')} s"
            f" | {result['rounds_complete']}/{result['rounds']} | {number('sent_mb')}"
            f" | {number('cpu_s')} | {number('rss_over_idle_mb')}"
            f" | {versus('round_s')} | {versus('sent_mb')} |"
        )
    return "\n".join(lines)


PARTS = ["ab", "average", "compression"]
GOAL_CODECS = ("int8", "int4")  # compression checked against the goal
GOAL_ALGOS = ("gossip-vca", "modest")
GOAL_SEEDS = [0, 1, 2]


def compression_rows() -> list[dict[str, Any]]:
    """Bytes to the target accuracy and accuracy cost of each goal codec, against none, in
    the simulator (20 nodes, the digits MLP with 256 hidden units; ``compression.py``)."""
    from compression import TARGET, sim_case

    rows = []
    for algo in GOAL_ALGOS:
        base_bytes, base_finals = sim_case(algo, "none", GOAL_SEEDS, 256)
        for codec in GOAL_CODECS:
            to_target, finals = sim_case(algo, codec, GOAL_SEEDS, 256)
            reached = None not in base_bytes and None not in to_target
            fewer = (
                statistics.mean(base_bytes) / statistics.mean(to_target)  # type: ignore[arg-type]
                if reached
                else None
            )
            cost = (statistics.mean(base_finals) - statistics.mean(finals)) * 100
            row = {"algo": algo, "codec": codec, "fewer": fewer, "cost_pp": cost}
            rows.append(row)
            print(
                f"| {algo} | {codec} | "
                + (f"{fewer:.2f}x" if fewer else f"not reached {TARGET}")
                + f" | {cost:+.1f} |",
                flush=True,
            )
    return rows


def goals(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, what this run measured, met) for every goal the run has numbers for (met is
    None when hivemind, not peerlearn, failed)."""
    out: list[tuple[str, str, bool | None]] = []
    for row in report.get("a_to_b", []):
        if row["size_mb"] == 100 and isinstance(row.get("tcp"), float):
            fraction = (
                row["peerlearn"] / row["tcp"] if isinstance(row.get("peerlearn"), float) else 0
            )
            out.append(("A->B >= 0.5x blocking TCP at 100 MB", f"{fraction:.2f}x", fraction >= 0.5))
            if isinstance(row.get("tcp-kept"), float):  # context: what keeping a model costs TCP
                kept = row["tcp-kept"] / row["tcp"]
                out.append(("(blocking TCP keeping the model, for scale)", f"{kept:.2f}x", None))
            if row.get("peerlearn cpu"):  # context: as fast as peerlearn's CPU use allows here
                fastest = row["size_mb"] / least_seconds(row["peerlearn cpu"]) / row["tcp"]
                out.append(
                    (
                        f"(peerlearn's CPU per transfer over {CORES} cores allows)",
                        f"{fastest:.2f}x",
                        None,
                    )
                )
    for row in report.get("averaging", []):
        ours, theirs = row.get("peerlearn"), row.get("hivemind")
        if not isinstance(ours, dict):
            continue
        case = f"{row['peers']} x {row['size_mb']:g} MB"
        full = ours["rounds_complete"] == ours["rounds"]
        out.append(
            (
                f"{case}: every round full, none stalled",
                f"{ours['rounds_complete']}/{ours['rounds']}",
                full,
            )
        )
        if isinstance(theirs, str):  # hivemind's run failed: nothing to compare with
            out.append((f"{case}: round time <= hivemind's", "hivemind failed", None))
        if isinstance(theirs, dict):
            pace = ours["round_s"] / theirs["round_s"]
            out.append((f"{case}: round time <= hivemind's", f"{pace:.2f}x", pace <= 1.0))
            if ours["sent_mb"] and theirs["sent_mb"]:
                sent = ours["sent_mb"] / theirs["sent_mb"]
                out.append(
                    (
                        f"{case}: bytes per peer <= hivemind's (within 1 %)",
                        f"{sent:.3f}x",
                        sent <= 1.01,
                    )
                )
        if row["peers"] == 8 and row["size_mb"] == 100:
            times = ours["rss_over_idle_mb"] / row["size_mb"]
            out.append((f"{case}: RSS over idle < 4x the model", f"{times:.2f}x", times < 4))
    for row in report.get("compression", []):
        fewer, cost = row["fewer"], row["cost_pp"]
        out.append((
            f"{row['algo']} {row['codec']}: >= 3.5x fewer bytes to target, <= 0.5 pp cost",
            (f"{fewer:.2f}x" if fewer else "target not reached") + f", {cost:+.1f} pp",
            bool(fewer and fewer >= 3.5 and cost <= 0.5),
        ))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes-ab", type=float, nargs="+", default=[1, 16, 100, 500])
    parser.add_argument("--peers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--sizes", type=float, nargs="+", default=[16, 100])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, default=PARTS, help="these parts only (default all)"
    )
    parser.add_argument("--loopback", action="store_true", help="averaging on 127.0.0.1 too")
    parser.add_argument(
        "--compression", default="none", help="peerlearn's models and parts: int8 or int4"
    )
    parser.add_argument(
        "--all-to-all", action="store_true", help="also peerlearn's share_model + merge rounds"
    )
    parser.add_argument("--hivemind-python", default=str(DEFAULT_HIVEMIND))
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        WORKERS[spec["system"]](spec)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # the lab is removed then
    pythons = dict.fromkeys(("peerlearn", "peerlearn-a2a", "tcp", "tcp-kept"), sys.executable)
    if Path(args.hivemind_python).exists():
        pythons["hivemind"] = args.hivemind_python
    else:
        print(f"hivemind: no interpreter at {args.hivemind_python} (make bench builds one)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip
    report: dict[str, Any] = {}
    if "ab" in args.only:
        print(
            "\n| A->B | peerlearn (vs TCP, vs TCP kept) | hivemind (the same) | blocking TCP "
            "| blocking TCP, model kept |\n|---|---|---|---|---|"
        )
        report["a_to_b"] = a_to_b(args, pythons)
        print(
            f"\nCPU-s per transfer, sender + receiver: the least time that work needs on {CORES}"
            " cores, and the time it took\n\n| A->B | peerlearn | hivemind | blocking TCP "
            "| blocking TCP, model kept |\n|---|---|---|---|---|"
        )
        for row in report["a_to_b"]:
            print(ab_cpu_line(row))
    if "average" in args.only:
        print(
            "\n| peers x model | exchange | round (median) | slowest round | full rounds "
            "| MB sent per peer per round | CPU-s per peer per round | MB RSS over idle "
            "| round vs hivemind | bytes vs hivemind |\n|---|---|---|---|---|---|---|---|---|---|"
        )
        report["averaging"] = averaging(args, pythons)
    if "compression" in args.only:
        print(
            "\n| algo (simulator) | compression | fewer bytes to target | accuracy cost (pp) |"
            "\n|---|---|---|---|"
        )
        report["compression"] = compression_rows()
    report["goals"] = goals(report)
    print("\n| goal | this run | met |\n|---|---|---|")
    for goal, measured, met in report["goals"]:
        print(f"| {goal} | {measured} | {'-' if met is None else 'yes' if met else '**no**'} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
