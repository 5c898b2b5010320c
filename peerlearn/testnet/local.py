"""Local swarms of real daemon processes (used by the demo, tests and the testnet).

Daemons listen on 127.0.0.1, or inside lab namespaces (``peerlearn.nat.lab``) when given
hosts. They are started in their own session (a terminal's Ctrl-C reaches only the
supervisor, which stops them in order) and with a parent-death signal, so that even a
SIGKILLed supervisor leaves no orphans. Start them from the main thread: the parent-death
signal fires when the *thread* that spawned the child exits.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from peerlearn.errors import ControlError
from peerlearn.nat.lab import LabHost
from peerlearn.node.control import call
from peerlearn.node.datadir import DataDir

T = TypeVar("T")
STOP_TIMEOUT = 20.0  # seconds for a daemon to exit after SIGTERM
STATUS_TIMEOUT = 10.0  # seconds for one control call
_PR_SET_PDEATHSIG = 1
# Many daemons share the machine's cores: one compute thread each instead of one per core
# (torch/OpenMP oversubscription made 16 daemons on 2 cores ~4x slower).
ONE_THREAD_EACH = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (Linux), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


READY_SECONDS_PER_NODE = 10.0  # more time to become ready for each node starting at once


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; ``TimeoutError`` names ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (OSError, ValueError, ControlError):
            value = None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class LocalSwarm:
    """``size`` daemons, node 0 bootstraps the others, each with its own data dir and shard.

    ``hosts``: run node i in ``hosts[i]``'s namespace on its address (default 127.0.0.1).
    ``node_args``: extra ``node start`` flags for some nodes (e.g. attackers).
    ``shards``: node i's ``--data-shard`` (default ``i/size``).
    ``env``: extra environment for every node (``PEERLEARN_*`` settings).
    """

    def __init__(
        self,
        root: Path,
        size: int,
        *,
        swarm: str | None = "local",
        hosts: Sequence[LabHost] | None = None,
        node_args: dict[int, list[str]] | None = None,
        shards: dict[int, str] | None = None,
        env: dict[str, str] | None = None,
        **options: Any,
    ) -> None:
        self.root = root
        self.size = size
        self.hosts = list(hosts) if hosts is not None else None
        self.node_args = node_args or {}
        self.shards = shards or {}
        self.env = {**os.environ, **ONE_THREAD_EACH, **(env or {})}
        self.args = ["--swarm", swarm, "--min-members", str(size)] if swarm else []
        for key, value in options.items():
            self.args += [f"--{key.replace('_', '-')}", str(value)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.bootstrap: str | None = None

    def data_dir(self, i: int) -> DataDir:
        return DataDir(self.root / f"node{i}")

    def log_path(self, i: int) -> Path:
        return self.root / f"node{i}.log"

    def start(self, i: int) -> None:
        """Start (or restart) node ``i``; it bootstraps from node 0 once that one listens."""
        ip = self.hosts[i].ip if self.hosts else "127.0.0.1"
        cmd = [
            sys.executable,
            "-m",
            "peerlearn",
            "node",
            "start",
            "--data-dir",
            str(self.data_dir(i).root),
            "--listen",
            f"/ip4/{ip}/tcp/0",
            "--data-shard",
            self.shards.get(i, f"{i}/{self.size}"),
            *self.args,
            *self.node_args.get(i, []),
        ]
        if self.bootstrap and i != 0:
            cmd += ["--bootstrap", self.bootstrap]
        if self.hosts:
            cmd = self.hosts[i].command(*cmd)
        self.data_dir(i).root.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path(i).open("ab") as log:
            self.processes[i] = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def alive(self, i: int) -> bool:
        process = self.processes.get(i)
        return process is not None and process.poll() is None

    def pid(self, i: int) -> int | None:
        return self.processes[i].pid if self.alive(i) else None

    def rss_mb(self, i: int) -> float | None:
        pid = self.pid(i)
        return None if pid is None else rss_mb(pid)

    def _addrs(self, i: int) -> dict[str, Any] | None:
        process = self.processes[i]
        if process.poll() is not None:
            raise RuntimeError(f"node{i} exited with code {process.returncode}:\n{self.tail(i)}")
        info: dict[str, Any] = json.loads(self.data_dir(i).addrs_file.read_text())
        return info

    def start_all(self, timeout: float = 60.0) -> None:
        """Start node 0, then the others at once. Each has ``timeout`` to become ready, plus
        ``READY_SECONDS_PER_NODE`` for every node starting beside it: a daemon's start-up
        costs a few CPU-seconds (imports, the task), and the nodes share the machine."""
        self.start(0)
        self.bootstrap = wait_for("node0 to listen", lambda: self._addrs(0), timeout)["addrs"][0]
        for i in range(1, self.size):
            self.start(i)
        together = timeout + READY_SECONDS_PER_NODE * max(0, self.size - 2)
        for i in range(self.size):
            wait_for(f"node{i} to become ready", partial(self._addrs, i), together)

    def call(self, i: int, op: str, timeout: float = STATUS_TIMEOUT) -> Any:
        """Node ``i``'s answer to a control operation, or None while it cannot answer."""
        try:
            return call(self.data_dir(i).control_socket, op, timeout=timeout)
        except ControlError:
            return None

    def status(self, i: int, timeout: float = STATUS_TIMEOUT) -> dict[str, Any]:
        """The daemon's status, or {} while it cannot answer."""
        status: dict[str, Any] = self.call(i, "status", timeout) or {}
        return status

    def learning(self, i: int) -> dict[str, Any]:
        learning: dict[str, Any] = self.status(i).get("learning") or {}
        return learning

    def kill(self, i: int) -> None:
        """SIGKILL: the node gets no chance to clean up."""
        self.processes[i].send_signal(signal.SIGKILL)
        self.processes[i].wait(timeout=STOP_TIMEOUT)

    def addrs(self, i: int, timeout: float = 60.0) -> list[str]:
        """Node ``i``'s advertised addresses once it is ready."""
        info = wait_for(f"node{i} to become ready", partial(self._addrs, i), timeout)
        return list(info["addrs"])

    def stop_all(self) -> list[int | None]:
        """SIGTERM everyone, wait, SIGKILL stragglers; exit codes (None = had to be killed)."""
        return self.stop_some(sorted(self.processes))

    def stop_some(self, nodes: list[int]) -> list[int | None]:
        """SIGTERM these nodes together, wait, SIGKILL stragglers; their exit codes."""
        chosen = [self.processes[i] for i in nodes]
        for process in chosen:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for process in chosen:
            try:
                codes.append(process.wait(timeout=STOP_TIMEOUT))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                codes.append(None)
        return codes

    def tail(self, i: int, chars: int = 3000) -> str:
        try:
            return self.log_path(i).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def logs(self) -> str:
        return "\n".join(f"--- node{i}\n{self.tail(i)}" for i in range(self.size))
