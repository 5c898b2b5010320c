"""mDNS discovery between two network namespaces joined by a veth pair (root only).

Traffic stays inside the namespaces this test creates (198.18.5.0/24); they are always removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 to create network namespaces",
    ),
]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    tag = f"plm{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for ns, dev, addr in ((a, f"{tag}va", "198.18.5.1/24"), (b, f"{tag}vb", "198.18.5.2/24")):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_mdns_finds_the_other_namespace_without_bootstrap(
    two_namespaces: tuple[str, str], tmp_path: Path
) -> None:
    processes = []
    try:
        for ns, ip, name in zip(two_namespaces, ("198.18.5.1", "198.18.5.2"), "ab", strict=True):
            log = (tmp_path / f"{name}.log").open("wb")
            processes.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        sys.executable,
                        "-m",
                        "peerlearn",
                        "node",
                        "start",
                        "--data-dir",
                        str(tmp_path / name),
                        "--listen",
                        f"/ip4/{ip}/tcp/0",
                        "--swarm",
                        "lan",
                        "--max-rounds",
                        "1",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()  # the child keeps its own copy
        for name in "ab":  # each side reports its own join, possibly a moment later
            wait_until(lambda n=name: "joined swarm lan" in (tmp_path / f"{n}.log").read_text(), 60)
        assert "1 members connected" in (tmp_path / "b.log").read_text()

    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
