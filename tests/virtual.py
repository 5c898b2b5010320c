"""Whole swarms of real daemons in one process, in virtual time (trio's MockClock).

Each node is ``run_daemon`` itself: swarm service, discovery, CRDT sync, the learner with its
task, its protocol core's driver and its checkpoints on disk. Only the host is in memory
(``tests.memory_host``) and blocking work runs inline, so that minutes of a swarm's life take
seconds. Identities are seeded; trio still shuffles the order of ready tasks, so runs differ a
little and thresholds must leave room for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

from peerlearn.identity import KEY_FILE_NAME, Identity, create_identity
from peerlearn.node.config import NodeConfig
from peerlearn.node.daemon import Daemon, run_daemon
from tests.memory_host import MemoryNetwork

STEP = 0.5  # virtual seconds between looks at the swarm


def virtual(main: Callable[[], Any]) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class Swarm:
    """Daemons on one in-memory network; each can be killed and started again with the same
    data directory."""

    def __init__(self, root: Path, nursery: trio.Nursery, network: MemoryNetwork) -> None:
        self.root, self.nursery, self.network = root, nursery, network
        self.daemons: dict[int, Daemon] = {}
        self.scopes: dict[int, trio.CancelScope] = {}

    def config(self, i: int, base: NodeConfig) -> NodeConfig:
        """Node ``i``'s settings; its identity (and so its seeds) is the same every run."""
        data_dir = self.root / f"node{i}"
        if not data_dir.exists():
            data_dir.mkdir(parents=True, mode=0o700)
            seed = hashlib.sha256(f"node {i}".encode()).digest()
            create_identity(data_dir / KEY_FILE_NAME, Identity.from_seed(seed))
        return dataclasses.replace(base, data_dir=data_dir)

    async def start(self, i: int, config: NodeConfig) -> Daemon:
        scope = trio.CancelScope()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await run_daemon(
                    config,
                    handle_signals=False,
                    runtime=self.network.runtime(),
                    task_status=task_status,
                )

        daemon: Daemon = await self.nursery.start(run)
        self.daemons[i], self.scopes[i] = daemon, scope
        return daemon

    async def start_all(self, nodes: int, base: NodeConfig) -> NodeConfig:
        """Node 0, then nodes 1.. bootstrapped from it; returns the others' settings."""
        first = await self.start(0, self.config(0, base))
        boot = dataclasses.replace(base, bootstrap=(first.addrs()[0],))
        for i in range(1, nodes):
            await self.start(i, self.config(i, boot))
        return boot

    def kill(self, i: int) -> None:
        """Gone at once, as after SIGKILL: no graceful shutdown, nothing saved at exit."""
        self.scopes.pop(i).cancel()
        del self.daemons[i]


@asynccontextmanager
async def swarm(root: Path) -> AsyncIterator[Swarm]:
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        yield Swarm(root, nursery, network)
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool], virtual_seconds: float) -> float:
    """Wait (in virtual time) until ``condition()``; returns how long it took."""
    started = trio.current_time()
    with trio.fail_after(virtual_seconds):
        while not condition():  # noqa: ASYNC110 (polling costs nothing in virtual time)
            await trio.sleep(STEP)
    return trio.current_time() - started
