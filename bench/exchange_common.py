"""What every worker of ``bench/exchange.py`` shares, whichever system it runs (peerlearn,
hivemind, plain TCP): barriers through files in the run's folder, the model, and its own
CPU, memory and network readings. Standard library, psutil and torch only, so that the
hivemind workers (their own interpreter, without peerlearn) import it too."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil

BARRIER_TIMEOUT = 600.0  # seconds a worker waits for the others before giving up
TENSOR_BYTES = 4 * 2**20  # the model is float32 tensors of 4 MiB (the last one smaller)


class Folder:
    """The run's shared folder: workers publish addresses and meet at barriers there."""

    def __init__(self, path: str, index: int, workers: int) -> None:
        self.path = Path(path)
        self.index = index
        self.workers = workers

    def publish(self, name: str, value: str) -> None:
        target = self.path / f"{name}.{self.index}"
        temporary = target.with_suffix(target.suffix + ".tmp")
        temporary.write_text(value)
        temporary.rename(target)

    def read(self, name: str, index: int) -> str:
        return (self.path / f"{name}.{index}").read_text()

    def barrier(self, name: str) -> None:
        """Publish ``name`` and wait until every worker has."""
        self.publish(name, "")
        self.wait_for(name, range(self.workers))

    def wait_for(self, name: str, indexes: range | list[int]) -> None:
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while not all((self.path / f"{name}.{i}").exists() for i in indexes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.index}: the others never reached {name!r}")
            time.sleep(0.01)


def model_shapes(size_bytes: int) -> list[int]:
    """Element counts of the model's float32 tensors, ``size_bytes`` in all."""
    elements, per_tensor = size_bytes // 4, TENSOR_BYTES // 4
    shapes = [per_tensor] * (elements // per_tensor)
    if elements % per_tensor:
        shapes.append(elements % per_tensor)
    return shapes


def own_tree() -> list[psutil.Process]:
    """This process and every process it started (hivemind's averager and p2pd)."""
    me = psutil.Process(os.getpid())
    return [me, *me.children(recursive=True)]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its live children."""
    total = 0.0
    for process in own_tree():
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def rss_bytes(tree: list[psutil.Process] | None = None) -> int:
    total = 0
    for process in tree if tree is not None else own_tree():
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


def sent_bytes(interface: str | None) -> int | None:
    """Bytes this network namespace has sent on ``interface`` (the lab's cable), or None."""
    return (
        None
        if interface is None
        else int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())
    )


class PeakRss:
    """Samples the RSS of this process tree every 50 ms until stopped; keeps the peak.
    The tree is listed once, at the start (listing it reads every process's stat)."""

    def __init__(self) -> None:
        self.peak = 0
        self._tree = own_tree()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self._tree))


class Rounds:
    """Times each round of a worker: wall seconds, CPU seconds and bytes sent."""

    def __init__(self, interface: str | None = None) -> None:
        self.interface = interface  # whose sent bytes to count, None for none
        self.records: list[dict[str, Any]] = []

    def measure(self) -> _RoundMeter:
        return _RoundMeter(self)


class _RoundMeter:
    def __init__(self, rounds: Rounds) -> None:
        self.rounds = rounds
        self.extra: dict[str, Any] = {}

    def __enter__(self) -> _RoundMeter:
        self.started, self.cpu = time.perf_counter(), cpu_seconds()
        self.sent = sent_bytes(self.rounds.interface)
        return self

    def __exit__(self, *exc: object) -> None:
        sent = sent_bytes(self.rounds.interface)
        self.rounds.records.append(
            {
                "seconds": time.perf_counter() - self.started,
                "cpu_seconds": cpu_seconds() - self.cpu,
                "sent_bytes": None if sent is None or self.sent is None else sent - self.sent,
                **self.extra,
            }
        )


def write_result(folder: Folder, result: dict[str, Any]) -> None:
    folder.publish("result", json.dumps(result))
