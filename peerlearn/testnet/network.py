"""A running testnet: the daemons of one ``SwarmSpec``, on loopback or in a namespace lab."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peerlearn.errors import ConfigError
from peerlearn.learning.choices import experiment_shards
from peerlearn.nat.lab import LabHost, NatLab
from peerlearn.node.datadir import atomic_write_json
from peerlearn.testnet.local import LocalSwarm
from peerlearn.testnet.scenario import Event, SwarmSpec

STATE_FILE = "testnet.json"
SAMPLE_STATUS_TIMEOUT = 3.0  # seconds per node and sample


@dataclass(frozen=True)
class Sample:
    """One node's state at one moment (a row of the report's CSV)."""

    t: float
    node: int
    alive: bool
    attacker: bool
    round: int
    accuracy: float | None
    members: int
    peers: int
    bytes_out: int
    bytes_in: int
    rss_mb: float | None
    join_seconds: float | None
    reachability: str
    direct_peers: int
    relayed_peers: int


def build_lab(spec: SwarmSpec) -> tuple[NatLab | None, list[LabHost] | None]:
    """loopback: no lab. netns: every node public. nat: node 0 public (bootstrap and relay),
    the others alternate between two NAT routers of kind ``spec.nat``."""
    if spec.network == "loopback":
        return None, None
    lab = NatLab()
    try:
        if spec.network == "netns":
            return lab, [lab.add_public(f"node{i}") for i in range(spec.nodes)]
        hosts = [lab.add_public("node0")]
        routers = [lab.add_router(spec.nat), lab.add_router(spec.nat)]  # type: ignore[arg-type]
        hosts += [lab.add_private(f"node{i}", routers[i % 2]) for i in range(1, spec.nodes)]
        return lab, hosts
    except BaseException:
        lab.close()
        raise


class Testnet:
    """Start with ``start()``; ``close()`` stops every daemon and removes the lab."""

    def __init__(self, root: Path, spec: SwarmSpec, *, swarm: str = "testnet") -> None:
        self.root = root
        self.spec = spec
        self.attackers = set(spec.attacker_indices())
        # each node's (shard, shards, partition), cut as the simulator cuts them
        self.shards = experiment_shards(spec.nodes, self.attackers, spec.partition)
        self.lab: NatLab | None = None
        self.hosts: list[LabHost] | None = None
        self.swarm_name = swarm
        self.local: LocalSwarm | None = None
        self.killed: set[int] = set()
        self.peer_ids: dict[int, str] = {}
        self.exit_codes: list[int | None] = []

    @property
    def swarm(self) -> LocalSwarm:
        if self.local is None:
            raise RuntimeError("the testnet is not started")
        return self.local

    def start(self) -> None:
        """Build the lab (if any) and start every daemon from fresh data dirs."""
        if (self.root / "node0").exists():
            raise ConfigError(
                f"{self.root} holds an earlier testnet's nodes; choose a new folder or remove it"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.lab, self.hosts = build_lab(self.spec)
        self.local = LocalSwarm(
            self.root,
            self.spec.nodes,
            swarm=self.swarm_name,
            hosts=self.hosts,
            node_args=self._node_args(),
            shards={i: f"{shard}/{count}" for i, (shard, count, _) in self.shards.items()},
            env=self.spec.node_env(),
        )
        self.local.args += self.spec.node_args()
        self.write_state()
        self.local.start_all()
        self.write_state()

    def _node_args(self) -> dict[int, list[str]]:
        """Per node: its partition (attackers' may differ), its attack, relaying."""
        args = {i: ["--partition", partition] for i, (_, _, partition) in self.shards.items()}
        for i in self.attackers:
            args[i] += ["--attack", self.spec.attack]
        if self.spec.network == "nat":  # node 0, the only public node, relays for the others
            args.setdefault(0, []).append("--relay-service")
        return args

    def write_state(self) -> None:
        """What `testnet status|logs|down` read: node dirs, logs, pids and lab namespaces."""
        local = self.swarm
        nodes = [
            {
                "node": i,
                "data_dir": str(local.data_dir(i).root),
                "log": str(local.log_path(i)),
                "pid": local.pid(i) if i in local.processes else None,
                "ip": self.hosts[i].ip if self.hosts else "127.0.0.1",
                "attacker": i in self.attackers,
            }
            for i in range(self.spec.nodes)
        ]
        state = {
            "supervisor_pid": os.getpid(),
            "spec": asdict(self.spec),
            "nodes": nodes,
            "namespaces": list(self.lab.namespaces) if self.lab else [],
        }
        atomic_write_json(self.root / STATE_FILE, state)

    # -- observing ----------------------------------------------------------------------------

    def sample(self, t: float) -> tuple[list[Sample], dict[int, dict[str, Any]]]:
        """One row per node, and each live node's raw status."""
        rows, raw = [], {}
        for i in range(self.spec.nodes):
            alive = self.swarm.alive(i)
            status = self.swarm.status(i, SAMPLE_STATUS_TIMEOUT) if alive else {}
            raw[i] = status
            if status.get("peer_id"):
                self.peer_ids[i] = status["peer_id"]
            learning = status.get("learning") or {}
            nat = status.get("nat") or {}
            rows.append(
                Sample(
                    t=round(t, 3),
                    node=i,
                    alive=alive,
                    attacker=i in self.attackers,
                    round=int(learning.get("round", 0)),
                    accuracy=learning.get("accuracy"),
                    members=int(learning.get("members", 0)),
                    peers=int(status.get("connected_peers", 0)),
                    bytes_out=int(status.get("bytes_out", 0)),
                    bytes_in=int(status.get("bytes_in", 0)),
                    rss_mb=self.swarm.rss_mb(i) if alive else None,
                    join_seconds=learning.get("join_seconds"),
                    reachability=str(nat.get("reachability", "-")),
                    direct_peers=int(nat.get("direct_peers", 0)),
                    relayed_peers=int(nat.get("relayed_peers", 0)),
                )
            )
        return rows, raw

    def crdt_versions(self) -> dict[int, dict[str, int]]:
        """Each live node's ``{"<owner>/<record>": clock}`` (for replica convergence)."""
        out = {}
        for i in range(self.spec.nodes):
            if self.swarm.alive(i):
                rows = self.swarm.call(i, "crdt_versions", SAMPLE_STATUS_TIMEOUT)
                if rows is not None:
                    out[i] = {f"{owner}/{name}": clock for owner, name, clock in rows}
        return out

    def edges(self, raw: dict[int, dict[str, Any]]) -> set[tuple[int, int]]:
        """Connections between nodes, as index pairs, from their statuses."""
        index = {peer: i for i, peer in self.peer_ids.items()}
        out = set()
        for i, status in raw.items():
            for peer in status.get("connected_peer_ids", []):
                j = index.get(peer)
                if j is not None and j != i:
                    out.add((min(i, j), max(i, j)))
        return out

    # -- faults -------------------------------------------------------------------------------

    def select(self, event: Event) -> list[int]:
        """The nodes an event acts on: explicit, or a fraction (never node 0, the bootstrap)."""
        if event.nodes:
            return list(event.nodes)
        if event.fraction is None:
            return list(range(self.spec.nodes))
        if event.action == "restart":
            pool = sorted(self.killed)
            return pool[: round(len(pool) * event.fraction)]
        count = round(self.spec.nodes * event.fraction)
        pool = [i for i in range(self.spec.nodes - 1, 0, -1) if self.swarm.alive(i)]
        return sorted(pool[:count])

    def apply(self, event: Event) -> tuple[str, list[int]]:
        """Inject one fault; returns what was done (for the report) and to which nodes."""
        targets = self.select(event)
        if event.action == "kill":
            for i in targets:
                if self.swarm.alive(i):
                    self.swarm.kill(i)
                    self.killed.add(i)
        elif event.action == "restart":
            for i in targets:
                if not self.swarm.alive(i):
                    self.swarm.start(i)
                    self.killed.discard(i)
            self.write_state()
        elif event.action in ("partition", "heal", "netem", "clear-netem"):
            lab, hosts = self.lab, self.hosts
            if lab is None or hosts is None:
                raise RuntimeError(f"{event.action} needs a namespace lab")
            if event.action == "partition":
                lab.partition(*[[hosts[i] for i in group] for group in event.groups])
                targets = [i for g in event.groups for i in g]
            elif event.action == "heal":
                lab.heal()
            elif event.action == "netem":
                for i in targets:
                    lab.netem(
                        hosts[i],
                        delay_ms=event.delay_ms,
                        jitter_ms=event.jitter_ms,
                        loss_pct=event.loss_pct,
                    )
            else:
                for i in targets:
                    lab.clear_netem(hosts[i])
        return f"{event.describe()}: nodes {targets}", targets

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop every daemon (SIGTERM, then SIGKILL) and remove the lab; returns problems."""
        problems = []
        if self.local is not None:
            self.exit_codes = self.local.stop_all()
        if self.lab is not None:
            left = self.lab.close()
            if left:
                problems.append(f"could not remove namespaces {left}")
        state = self.root / STATE_FILE
        state.unlink(missing_ok=True)
        return problems
