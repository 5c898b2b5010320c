"""Scenario files (TOML): a swarm to start, faults to inject, expectations to check.

name = "churn"
description = "..."
timeout = 300                 # seconds for the whole run
accuracy_rounds = 1           # a node's accuracy: its mean over its last N rounds (1: final)

[swarm]                       # how every node starts (node flags, snake_case)
nodes = 16
algo = "modest"
max_rounds = 40
network = "loopback"          # loopback | netns | nat (netns and nat need root)
nat = "cone"                  # nat network: cone | symmetric
attackers = 0.3               # fraction of nodes started with --attack
attack = "label-flip"

[[events]]                    # at_round (highest round of a live node) or at_seconds
at_round = 10
action = "kill"               # kill | restart | partition | heal | netem | clear-netem
fraction = 0.8                # or: nodes = [3, 4]

[expect]                      # every key is checked and reported as pass/fail
min_mean_accuracy = 0.85

[[variants]]                  # optional: run again with these [swarm] overrides
name = "bristle"
filter = "bristle"
expect = { min_mean_accuracy = 0.8 }  # overrides [expect] for this variant
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from peerlearn.errors import ConfigError
from peerlearn.node.config import NODE_ATTACKS, NodeConfig

ACTIONS = ("kill", "restart", "partition", "heal", "netem", "clear-netem")
NETWORKS = ("loopback", "netns", "nat")

DEFAULT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Expectations:
    """Pass/fail criteria; None means not checked."""

    min_mean_accuracy: float | None = None  # mean accuracy of honest live nodes (accuracy_rounds)
    min_node_accuracy: float | None = None  # worst honest live node
    max_mean_accuracy: float | None = None  # e.g. "plain mean breaks under attack"
    min_final_round: int | None = None  # highest round reached by a live node
    min_rounds_after_faults: int | None = None  # rounds completed after the last kill
    max_join_seconds: float | None = None  # every node's join time
    max_rejoin_seconds: float | None = None  # join time of nodes restarted into the swarm
    max_convergence_seconds: float | None = None  # CRDT replicas equal after a heal
    max_rss_mb: float | None = None  # peak RSS of every node
    min_direct_fraction: float | None = None  # nat: connections between NATed nodes direct
    clean_exit: bool = True  # every live node exits 0 on SIGTERM


@dataclass(frozen=True)
class Event:
    action: str
    at_round: int | None = None
    at_seconds: float | None = None
    nodes: tuple[int, ...] = ()
    fraction: float | None = None
    groups: tuple[tuple[int, ...], ...] = ()  # partition
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    def describe(self) -> str:
        when = f"round {self.at_round}" if self.at_round is not None else f"{self.at_seconds} s"
        return f"{self.action} at {when}"


@dataclass(frozen=True)
class SwarmSpec:
    nodes: int = 4
    algo: str = "modest"
    filter: str = "none"
    partition: str = "iid"
    max_rounds: int = 20
    round_interval: float = 1.0
    sample_size: int | None = None
    network: str = "loopback"
    nat: str = "cone"
    attackers: float = 0.0
    attack: str = "none"
    options: dict[str, Any] = field(default_factory=dict)  # any other node setting

    def node_args(self) -> list[str]:
        """``node start`` flags shared by every node (the partition is per node: the
        testnet's ``experiment_shards``)."""
        args = [
            "--algo", self.algo,
            "--filter", self.filter,
            "--max-rounds", str(self.max_rounds),
            "--round-interval", str(self.round_interval),
        ]  # fmt: skip
        if self.sample_size is not None:
            args += ["--sample-size", str(self.sample_size)]
        return args

    def node_env(self) -> dict[str, str]:
        """``options`` as ``PEERLEARN_*`` variables: any node setting, flag or not."""
        return {
            f"PEERLEARN_{key.upper()}": (
                " ".join(str(v) for v in value) if isinstance(value, list) else str(value)
            )
            for key, value in self.options.items()
        }

    def attacker_indices(self) -> list[int]:
        """The last ``attackers`` fraction of nodes (node 0, the bootstrap, stays honest)."""
        count = round(self.nodes * self.attackers) if self.attack != "none" else 0
        return list(range(self.nodes - count, self.nodes))


def with_swarm_options(scenario: Scenario, settings: dict[str, Any]) -> Scenario:
    """``scenario`` with more node settings for every node (e.g. ``--task`` of ``testnet run``)."""
    if not settings:
        return scenario

    def more(spec: SwarmSpec) -> SwarmSpec:
        return replace(spec, options={**spec.options, **settings})

    variants = tuple(replace(run, swarm=more(run.swarm)) for run in scenario.variants)
    return replace(scenario, swarm=more(scenario.swarm), variants=variants)


@dataclass(frozen=True)
class Run:
    """One run of a scenario: the base swarm, or a variant with its own overrides."""

    label: str
    swarm: SwarmSpec
    expect: Expectations


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    swarm: SwarmSpec
    events: tuple[Event, ...]
    expect: Expectations
    timeout: float = DEFAULT_TIMEOUT
    variants: tuple[Run, ...] = ()
    accuracy_rounds: int = 1  # a node's accuracy: its mean over its last N rounds

    def runs(self) -> list[Run]:
        """The base run, or each variant."""
        return list(self.variants) or [Run(self.name, self.swarm, self.expect)]


def _as_dict(spec: SwarmSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in fields(spec)}


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(allowed))}"
        )


def _swarm_spec(raw: dict[str, Any]) -> SwarmSpec:
    _check_keys(raw, {f.name for f in fields(SwarmSpec)}, "[swarm]")
    try:
        spec = SwarmSpec(**raw)
    except TypeError as exc:
        raise ConfigError(f"[swarm]: {exc}") from exc
    if spec.network not in NETWORKS:
        raise ConfigError(f"[swarm] network must be one of {', '.join(NETWORKS)}")
    if spec.attack not in NODE_ATTACKS:
        raise ConfigError(f"[swarm] attack must be one of {', '.join(NODE_ATTACKS)}")
    if not 1 <= spec.nodes <= 64:
        raise ConfigError("[swarm] nodes must be between 1 and 64")
    if not 0 <= spec.attackers < 0.5:
        raise ConfigError("[swarm] attackers must be a fraction below 0.5")
    settings = {f.name for f in fields(NodeConfig)}
    unknown = sorted(set(spec.options) - settings)
    if unknown:
        raise ConfigError(f"[swarm] options: unknown node setting(s) {', '.join(unknown)}")
    return spec


def _event(raw: dict[str, Any], index: int, nodes: int) -> Event:
    where = f"[[events]] #{index + 1}"
    _check_keys(raw, {f.name for f in fields(Event)}, where)
    if raw.get("action") not in ACTIONS:
        raise ConfigError(f"{where}: action must be one of {', '.join(ACTIONS)}")
    if ("at_round" in raw) == ("at_seconds" in raw):
        raise ConfigError(f"{where}: give exactly one of at_round and at_seconds")
    values = dict(raw)
    values["nodes"] = tuple(int(n) for n in raw.get("nodes", ()))
    values["groups"] = tuple(tuple(int(n) for n in g) for g in raw.get("groups", ()))
    event = Event(**values)
    for n in (*event.nodes, *(n for g in event.groups for n in g)):
        if not 0 <= n < nodes:
            raise ConfigError(f"{where}: node {n} does not exist (nodes 0..{nodes - 1})")
    if event.action == "partition" and len(event.groups) < 2:
        raise ConfigError(f"{where}: partition needs groups = [[...], [...]]")
    return event


def _expectations(raw: dict[str, Any], where: str) -> Expectations:
    _check_keys(raw, {f.name for f in fields(Expectations)}, where)
    return Expectations(**raw)


def parse_scenario(raw: dict[str, Any], *, default_name: str) -> Scenario:
    _check_keys(
        raw,
        {
            "name",
            "description",
            "timeout",
            "accuracy_rounds",
            "swarm",
            "events",
            "expect",
            "variants",
        },
        "file",
    )
    accuracy_rounds = raw.get("accuracy_rounds", 1)
    if type(accuracy_rounds) is not int or accuracy_rounds < 1:
        raise ConfigError("accuracy_rounds must be a whole number of rounds, at least 1")
    swarm = _swarm_spec(dict(raw.get("swarm", {})))
    events = tuple(_event(e, i, swarm.nodes) for i, e in enumerate(raw.get("events", [])))
    expect_raw = dict(raw.get("expect", {}))
    expect = _expectations(expect_raw, "[expect]")
    variants = []
    for i, variant in enumerate(raw.get("variants", [])):
        overrides = dict(variant)
        label = str(overrides.pop("name", f"variant{i + 1}"))
        own_expect = {**expect_raw, **overrides.pop("expect", {})}
        variants.append(
            Run(
                label,
                _swarm_spec({**_as_dict(swarm), **overrides}),
                _expectations(own_expect, f"[[variants]] {label} expect"),
            )
        )
    needs_lab = any(e.action in ("partition", "heal", "netem", "clear-netem") for e in events)
    if needs_lab and swarm.network == "loopback":
        raise ConfigError("partition and netem events need network = 'netns' or 'nat'")
    return Scenario(
        name=str(raw.get("name", default_name)),
        description=str(raw.get("description", "")),
        swarm=swarm,
        events=events,
        expect=expect,
        timeout=float(raw.get("timeout", DEFAULT_TIMEOUT)),
        variants=tuple(variants),
        accuracy_rounds=accuracy_rounds,
    )


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; ``ConfigError`` says what is wrong and where."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return parse_scenario(raw, default_name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def find_scenario(name_or_path: str, search: Path) -> Path:
    """A path as given, or ``search/<name>.toml``."""
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = search / f"{name_or_path}.toml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in search.glob("*.toml")) if search.is_dir() else []
    raise ConfigError(
        f"no scenario {name_or_path!r}; give a file or one of: {', '.join(known) or '(none)'}"
    )
