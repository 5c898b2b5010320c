"""The live dashboard of `testnet up --dashboard`, loaded in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from peerlearn.testnet.local import process_alive
from tests.conftest import wait_until
from tests.test_testnet import _node_pids, _up

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium)"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _data(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "data.json", timeout=5) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def _chromium(url: str, *args: str) -> str:
    assert CHROMIUM is not None
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
         "--window-size=1100,1000", *args, url],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_dashboard_draws_the_swarm_and_a_fault_as_it_happens(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/"
    supervisor, state = _up(tmp_path, 3, "--dashboard", url.removeprefix("http://").rstrip("/"))
    try:

        def learning() -> bool:
            nodes = _data(url)["nodes"]
            return len(nodes) == 3 and all(n["metric"] is not None for n in nodes)

        wait_until(learning, 60, interval=0.5)
        os.kill(_node_pids(state)[2], signal.SIGKILL)  # a fault
        wait_until(lambda: "node2 down" in json.dumps(_data(url)["events"]), 30, interval=0.5)

        dom = _chromium(url, "--dump-dom")
        assert dom.count("<circle") == 3, dom
        assert 'data-node="node2" data-state="down"' in dom
        assert 'data-node="node0" data-state="up"' in dom
        assert dom.count('data-path="direct"') >= 1  # node0-node1 still connected
        assert '<polyline points="' in dom  # the metric over time
        assert "2 of 3 nodes up" in dom
        assert "node2 down" in dom  # in the list of events
        shot = tmp_path / "dashboard.png"
        _chromium(url, f"--screenshot={shot}")
        assert shot.read_bytes()[:4] == b"\x89PNG"
        assert shot.stat().st_size > 20_000  # drawn, not a blank page

        supervisor.send_signal(signal.SIGINT)
        assert supervisor.wait(timeout=60) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    assert all(not process_alive(pid) for pid in _node_pids(state))


def test_a_nodes_dashboard_shows_it_its_peer_and_their_metric(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/"

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.log").open("wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "peerlearn", "node", "start", "--data-dir",
                 str(tmp_path / name), "--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "dash",
                 "--round-interval", "0.5", *args],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    a = start("a", "--dashboard", url.removeprefix("http://").rstrip("/"))
    nodes = [a]
    try:
        addrs = wait_until(lambda: json.loads((tmp_path / "a" / "addrs.json").read_text()), 60)
        nodes.append(start("b", "--bootstrap", addrs["addrs"][0]))

        def both_learning() -> bool:
            data = _data(url)
            return len(data["links"]) == 1 and all(n["metric"] for n in data["nodes"])

        wait_until(both_learning, 60, interval=0.5)
        dom = _chromium(url, "--dump-dom")
        assert dom.count("<circle") == 2, dom
        assert "(this node)" in dom
        assert dom.count('data-path="direct"') == 1
        assert dom.count("<polyline") >= 2  # this node's metric and its peer's
        assert "2 of 2 nodes up" in dom
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        try:
            codes = [node.wait(timeout=30) for node in nodes]
        finally:
            for node in nodes:
                if node.poll() is None:
                    node.kill()
    assert codes == [0] * len(nodes)
