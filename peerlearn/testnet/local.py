"""Local swarms of real daemon processes on 127.0.0.1 (used by the demo, tests and testnet)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from peerlearn.errors import ControlError
from peerlearn.node.control import call
from peerlearn.node.datadir import DataDir

T = TypeVar("T")
STOP_TIMEOUT = 20.0  # seconds for a daemon to exit after SIGTERM


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
    """``size`` daemons, node 0 bootstraps the others, each with its own data dir and shard."""

    def __init__(self, root: Path, size: int, *, swarm: str = "local", **options: Any) -> None:
        self.root = root
        self.size = size
        self.args = ["--swarm", swarm, "--min-members", str(size)]
        for key, value in options.items():
            self.args += [f"--{key.replace('_', '-')}", str(value)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.bootstrap: str | None = None

    def data_dir(self, i: int) -> DataDir:
        return DataDir(self.root / f"node{i}")

    def log_path(self, i: int) -> Path:
        return self.root / f"node{i}.log"

    def start(self, i: int) -> None:
        cmd = [
            sys.executable,
            "-m",
            "peerlearn",
            "node",
            "start",
            "--data-dir",
            str(self.data_dir(i).root),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-shard",
            f"{i}/{self.size}",
            *self.args,
        ]
        if self.bootstrap and i != 0:
            cmd += ["--bootstrap", self.bootstrap]
        with self.log_path(i).open("ab") as log:
            self.processes[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def _addrs(self, i: int) -> dict[str, Any] | None:
        process = self.processes[i]
        if process.poll() is not None:
            raise RuntimeError(f"node{i} exited with code {process.returncode}:\n{self.tail(i)}")
        info: dict[str, Any] = json.loads(self.data_dir(i).addrs_file.read_text())
        return info

    def start_all(self, timeout: float = 60.0) -> None:
        self.start(0)
        self.bootstrap = wait_for("node0 to listen", lambda: self._addrs(0), timeout)["addrs"][0]
        for i in range(1, self.size):
            self.start(i)
        for i in range(self.size):
            wait_for(f"node{i} to become ready", partial(self._addrs, i), timeout)

    def status(self, i: int) -> dict[str, Any]:
        """The daemon's status, or {} while it cannot answer."""
        try:
            status: dict[str, Any] = call(self.data_dir(i).control_socket, "status", timeout=10)
        except ControlError:
            return {}
        return status

    def learning(self, i: int) -> dict[str, Any]:
        learning: dict[str, Any] = self.status(i).get("learning") or {}
        return learning

    def kill(self, i: int) -> None:
        """SIGKILL: the node gets no chance to clean up."""
        self.processes[i].send_signal(signal.SIGKILL)
        self.processes[i].wait(timeout=STOP_TIMEOUT)

    def stop_all(self) -> list[int | None]:
        """SIGTERM everyone, wait, SIGKILL stragglers; exit codes (None = had to be killed)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for process in self.processes.values():
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
