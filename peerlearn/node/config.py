"""Node configuration: defaults < TOML file < environment (``PEERLEARN_*``) < command-line flags."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import json
import os
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from peerlearn.errors import ConfigError, LocalProtocolError

if TYPE_CHECKING:
    from peerlearn.gossip.admission import Admission

ENV_PREFIX = "PEERLEARN_"
MIB = 2**20
DEFAULT_DATA_DIR = Path("~/.peerlearn/node").expanduser()


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node daemon needs; each field documents its unit."""

    data_dir: Path = DEFAULT_DATA_DIR
    """Identity key, lock, control socket, received updates and checkpoints live here."""

    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    """libp2p listen multiaddrs (TCP); 0.0.0.0 is expanded to each interface address."""

    bootstrap: tuple[str, ...] = ()
    """Peers to connect to at start (``/ip4/.../tcp/.../p2p/<id>``)."""

    bootstrap_timeout: float = 30.0
    """Seconds to keep retrying bootstrap peers before failing with an error."""

    shutdown_timeout: float = 10.0
    """Seconds allowed for a graceful shutdown after SIGINT/SIGTERM or `node stop`."""

    max_connections: int = 256
    """Upper bound on simultaneous libp2p connections."""

    max_blob_size: int = 512 * MIB
    """Largest model/blob (bytes) we accept from a peer."""

    blob_memory: int = 1024 * MIB
    """Bytes of inbound blob bodies held in memory at once, all peers together."""

    blob_memory_per_peer: int = 512 * MIB
    """Bytes of inbound blob bodies held in memory at once for one peer."""

    stream_idle_timeout: float = 30.0
    """Seconds a peer may leave a stream without sending a byte (also for its first byte)."""

    stream_min_rate: float = 64 * 1024
    """Bytes per second a transfer must average once stream_idle_timeout has passed."""

    received_quota: int = 1024 * MIB
    """Bytes of shared models kept in the data dir's received/ folder (members only)."""

    blob_chunk_size: int = 1 * MIB
    """Bytes per write when sending a blob."""

    blob_timeout: float = 300.0
    """Seconds allowed for one blob transfer (offer to acknowledgement)."""

    bulk_port: int = 0
    """TCP port of the encrypted bulk path models of 256 KiB or more travel on, beside
    libp2p (0: any free port; -1: off, every model takes the slower libp2p stream). Behind a
    NAT, forward it as well as the libp2p port, or models fall back to the libp2p stream."""

    log_level: str = "info"
    """debug, info, warning or error."""

    log_format: str = "text"
    """text (date, time, level, logger, message) or json (one object per line)."""

    metrics_listen: str = ""
    """host:port to serve Prometheus metrics on at /metrics, e.g. 127.0.0.1:9464 (empty: off)."""

    swarm: str = ""
    """Swarm to join and learn in (empty: no swarm, the node only serves `share`)."""

    mdns: bool = True
    """Announce and discover peers with mDNS on the local network (never on loopback)."""

    admission: str = "open"
    """Who may join the swarm: open (anyone), allowlist (allowlist_file) or token (invites)."""

    allowlist_file: str = ""
    """admission = allowlist: a file of peer IDs, one per line (# starts a comment)."""

    swarm_authority: str = ""
    """admission = token: the peer ID of the key that signs invites (`peerlearn swarm create`)."""

    invite: str = ""
    """admission = token: this node's invite token (`peerlearn swarm invite PEER_ID`)."""

    max_members: int = 10_000
    """Most members the swarm state keeps; beyond it the least recently active are dropped,
    never members this node met in person (a sync session, or a model it accepted)."""

    member_join_burst: int = 1000
    """Newcomers one peer (or one IP address) may introduce at once; a node that joins
    learns a swarm this large from its first peer in one go."""

    member_joins_per_second: float = 2.0
    """Newcomers one peer (or one IP address) may introduce per second after the burst; the
    rest wait for the next anti-entropy session."""

    member_pow_bits: int = 0
    """Proof of work every member record must carry: leading zero bits of a sha256 (each
    identity then costs about 2**bits hashes: about a second at 20 on one core). Every node
    of a swarm must use the same value; 0: none."""

    max_update_ratio: float = 10.0
    """Refuse models whose distance to ours exceeds this times (|our model| + sqrt(size));
    0: no bound. NaN/inf values and wrong layouts are always refused."""

    update_clip_ratio: float = 1.0
    """Scale a received model back toward ours when it lies farther than this times the
    median distance of the other recent senders' models (so no one peer can move the bound;
    Bristle is exempt); 0: no clipping."""

    contribution: str = "off"
    """Contribution scores (how each peer's models do on a batch of our data): off; score
    (shown in status and metrics; two forward passes of the batch per received model); or
    filter (also leave out of merges, and count against their sender, the models of peers
    scoring far below the others). Off by default: it catches sign flips somewhat, not ALIE
    nor a ratchet (docs/security.md)."""

    fresh: bool = False
    """Set unusable (or any) checkpoints aside and start learning from round 0."""

    task: str = "digits"
    """Learning task: digits, textlm, an installed peerlearn.tasks entry point, or
    package.module:factory (your own ``peerlearn.Task``)."""

    task_options: tuple[str, ...] = ()
    """key=value options passed to the task (e.g. size_mb=50 for textlm)."""

    device: str = "cpu"
    """torch device the task trains on (cpu, cuda, cuda:1)."""

    algo: str = "gossip-vca"
    """gossip-vca, gossip, dpsgd or modest."""

    compression: str = "none"
    """How this node sends models: none; int8 or int4 (block-wise quantization, 3.9x or
    7.8x fewer bytes); or topk:F with modest (the fraction F of largest changes from the
    swarm's shared start). With error feedback: what one model leaves out, the next sends
    (kept as one float32 copy of the model). Any codec is accepted from peers; a swarm
    picks one for its nodes' settings."""

    filter: str = "none"
    """Robust rule for received models: none, median, trimmed, krum or clip."""

    byzantine_bound: int = 1
    """Assumed number of Byzantine peers among received models (krum, trimmed)."""

    data_shard: str = "0/1"
    """i/n: this node trains on the i-th of n shards of the training data."""

    partition: str = "iid"
    """How shards are cut: iid, or label-skew (each shard holds classes_per_node classes)."""

    classes_per_node: int = 4
    """Classes per shard with partition = label-skew."""

    round_interval: float = 2.0
    """Seconds between gossip/D-PSGD rounds."""

    local_steps: int = 10
    """SGD steps per round."""

    batch_size: int = 16
    """Samples per SGD step."""

    lr: float = 0.0
    """SGD learning rate (0: 0.1 for the MLP, 0.5 for Bristle's output layer)."""

    fanout: int = 4
    """Peers each model is pushed to per round (gossip), or graph degree (dpsgd)."""

    beta: float = 0.5
    """Weight of the node's own model when merging."""

    sample_size: int = 10
    """MoDeST trainers per round."""

    aggregators: int = 1
    """MoDeST aggregators per round."""

    min_members: int = 1
    """Wait until the swarm has this many members before learning starts."""

    max_rounds: int = 0
    """Stop learning after this many rounds (0: never); the node keeps running and serving."""

    nat_traversal: bool = True
    """Check reachability, reserve relay slots when not public, hole punch relayed peers."""

    relay_service: bool = False
    """Serve as a circuit relay v2 for NATed peers (turn on for publicly reachable nodes)."""

    relay_circuit_seconds: int = 600
    """Relay service: longest life of one relayed connection (seconds)."""

    relay_circuit_bytes: int = 16 * MIB
    """Relay service: most bytes one relayed connection may carry (models should go direct)."""

    relay_blobs: bool = False
    """Allow model blobs over relayed connections (off: models wait for a direct path)."""

    upnp: bool = False
    """Ask the local router for a port mapping with UPnP (best effort)."""

    attack: str = "none"
    """Experiments only: behave as a Byzantine node (label-flip, sign-flip, alie or ipm)."""


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}
_TYPES = get_type_hints(NodeConfig)


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _TYPES[name]
    try:
        if kind is Path:
            return Path(str(value)).expanduser()
        if kind == tuple[str, ...]:
            if isinstance(value, str):
                value = [part for part in value.replace(",", " ").split() if part]
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError("expected a list of strings")
            return tuple(value)
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is int and not isinstance(value, bool | float):
            return int(value)
        if kind is str and isinstance(value, str):
            return value
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"1", "true", "yes", "0", "false", "no"}:
                return value.lower() in {"1", "true", "yes"}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name} = {value!r} is invalid: {exc}") from exc
    raise ConfigError(f"{source}: {name} = {value!r} is not a valid {kind}")


def _validate(config: NodeConfig) -> NodeConfig:
    positive = (
        "bootstrap_timeout",
        "shutdown_timeout",
        "max_connections",
        "max_blob_size",
        "blob_memory",
        "blob_memory_per_peer",
        "stream_idle_timeout",
        "stream_min_rate",
        "received_quota",
        "max_members",
        "member_join_burst",
        "member_joins_per_second",
        "relay_circuit_seconds",
        "relay_circuit_bytes",
    )
    for name in (*positive, "blob_chunk_size", "blob_timeout"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")
    if not config.max_blob_size <= config.blob_memory_per_peer <= config.blob_memory:
        raise ConfigError("need max_blob_size <= blob_memory_per_peer <= blob_memory")
    if not -1 <= config.bulk_port <= 65535:
        raise ConfigError(f"bulk_port must be -1 (off) or 0-65535, got {config.bulk_port}")
    for name in ("max_update_ratio", "update_clip_ratio"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(config, name)}")
    from peerlearn.gossip.admission import MAX_POW_BITS

    if not 0 <= config.member_pow_bits <= MAX_POW_BITS:
        bits = config.member_pow_bits
        raise ConfigError(f"member_pow_bits must be 0-{MAX_POW_BITS}, got {bits}")
    admission_rule(config)
    if config.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"log_level must be debug/info/warning/error, not {config.log_level!r}")
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"log_format must be text or json, not {config.log_format!r}")
    if config.metrics_listen:
        parse_host_port(config.metrics_listen, "metrics_listen", "127.0.0.1:9464")
    if not config.listen:
        raise ConfigError("at least one listen address is required")
    for address in config.listen:
        parse_listen_address(address)
    for address in config.bootstrap:
        check_peer_address(address)
    if config.swarm:
        _validate_learning(config)
    return config


def _validate_learning(config: NodeConfig) -> None:
    from peerlearn.learning.choices import FILTERS, Compression

    if config.algo not in LEARNING_ALGORITHMS:
        raise ConfigError(
            f"algo must be one of {', '.join(LEARNING_ALGORITHMS)}, not {config.algo!r}"
        )
    if config.filter not in FILTERS:
        raise ConfigError(f"filter must be one of {', '.join(FILTERS)}, not {config.filter!r}")
    try:
        unsuited = Compression.parse(config.compression).unsuited_to(config.algo)
    except LocalProtocolError as exc:
        raise ConfigError(str(exc)) from None
    if unsuited is not None:
        raise ConfigError(unsuited)
    if config.filter == "bristle" and config.algo == "modest":
        raise ConfigError("bristle merges gossiped output layers: use gossip, gossip-vca or dpsgd")
    if config.partition not in ("iid", "label-skew"):
        raise ConfigError(f"partition must be iid or label-skew, not {config.partition!r}")
    from peerlearn.learning.task import parse_task_options, resolve_task

    resolve_task(config.task)  # the name only: the task is imported when the daemon starts
    parse_task_options(config.task_options)
    if not (config.device == "cpu" or config.device.split(":")[0] in ("cuda", "mps", "xpu")):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, not {config.device!r}")
    if not all(c.isalnum() or c in "-_." for c in config.swarm) or len(config.swarm) > 64:
        raise ConfigError("swarm names are 1-64 letters, digits, '-', '_' or '.'")
    parse_shard(config.data_shard)
    if config.lr < 0:
        raise ConfigError(f"lr must not be negative, got {config.lr}")
    for name in (
        "round_interval",
        "local_steps",
        "batch_size",
        "classes_per_node",
        "fanout",
        "sample_size",
        "aggregators",
        "min_members",
    ):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")
    if not 0.0 <= config.beta <= 1.0:
        raise ConfigError(f"beta must be in [0, 1], got {config.beta}")
    from peerlearn.learning.contribution import CONTRIBUTION_MODES

    if config.contribution not in CONTRIBUTION_MODES:
        choices = ", ".join(CONTRIBUTION_MODES)
        raise ConfigError(f"contribution must be one of {choices}, not {config.contribution!r}")
    if config.attack not in NODE_ATTACKS:
        raise ConfigError(f"attack must be one of {', '.join(NODE_ATTACKS)}")
    if config.attack in MODEL_ATTACKS and config.algo == "modest":
        raise ConfigError(f"the {config.attack} attack poisons gossiped models: use a gossip algo")


def parse_host_port(text: str, what: str, example: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); ``ConfigError`` naming ``what`` otherwise."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} must look like {example}, not {text!r}")
    return host, int(port)


def check_peer_address(text: str) -> None:
    """``ConfigError`` in one line unless ``text`` is a multiaddr that names its peer."""
    import multiaddr  # light (30 ms): addresses are checked before libp2p is imported

    try:
        multiaddr.Multiaddr(text).value_for_protocol("p2p")
    except Exception as exc:
        raise ConfigError(
            f"invalid peer address {text!r}: {exc} "
            "(expected e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...)"
        ) from None


def parse_listen_address(text: str) -> tuple[str, int]:
    """``/ip4/<ip>/tcp/<port>`` -> (ip, port); ``ConfigError`` in one line otherwise."""
    import multiaddr

    try:
        addr = multiaddr.Multiaddr(text)
        return str(addr.value_for_protocol("ip4")), int(addr.value_for_protocol("tcp"))
    except Exception as exc:
        raise ConfigError(
            f"invalid listen address {text!r}: {exc} (expected /ip4/<ip>/tcp/<port>)"
        ) from None


def admission_rule(config: NodeConfig) -> Admission:
    """The admission rule the settings describe; ``ConfigError`` in plain words if they are
    incomplete (an allowlist without its file, token mode without authority or invite)."""
    from peerlearn.gossip.admission import (
        Admission,
        AdmissionMode,
        invite_from_token,
        parse_allowlist,
    )
    from peerlearn.identity import public_key_from_peer_id

    try:
        mode = AdmissionMode(config.admission)
    except ValueError:
        known = ", ".join(m.value for m in AdmissionMode)
        raise ConfigError(f"admission must be one of {known}, not {config.admission!r}") from None
    if mode is AdmissionMode.ALLOWLIST:
        if not config.allowlist_file:
            raise ConfigError("admission = allowlist needs allowlist_file (a file of peer IDs)")
        path = Path(config.allowlist_file).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read allowlist_file {path}: {exc.strerror}") from None
        allowlist = parse_allowlist(text, str(path))
        return Admission(mode, allowlist=allowlist, pow_bits=config.member_pow_bits)
    if mode is AdmissionMode.TOKEN:
        if not config.swarm_authority or not config.invite:
            raise ConfigError(
                "admission = token needs swarm_authority (the swarm's peer ID from "
                "`peerlearn swarm create`) and invite (from `peerlearn swarm invite`)"
            )
        try:
            authority = public_key_from_peer_id(config.swarm_authority)
        except ValueError as exc:
            raise ConfigError(f"swarm_authority is not a peer ID: {exc}") from None
        invite = invite_from_token(config.invite)
        if invite.authority != authority or invite.swarm != config.swarm:
            raise ConfigError(
                f"the invite is not for swarm {config.swarm!r} of authority "
                f"{config.swarm_authority}"
            )
        return Admission(mode, authority=authority, pow_bits=config.member_pow_bits)
    return Admission(mode, pow_bits=config.member_pow_bits)


LEARNING_ALGORITHMS = ("gossip-vca", "gossip", "dpsgd", "modest")
MODEL_ATTACKS = ("sign-flip", "alie", "ipm")  # poison the models a node sends
NODE_ATTACKS = ("none", "label-flip", *MODEL_ATTACKS)


def parse_shard(text: str) -> tuple[int, int]:
    """ "i/n" -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"data_shard must look like 2/5, not {text!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"data_shard {text!r}: need 0 <= i < n")
    return index, count


def _layer(values: dict[str, Any], updates: Mapping[str, Any], source: str) -> None:
    for key, value in updates.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"{source}: unknown setting {key!r}; known: {', '.join(_FIELDS)}")
        values[name] = _coerce(name, value, source)


# Read by the testnet command and the test suite, not node settings.
OTHER_VARIABLES = frozenset(
    {"PEERLEARN_TESTNET_DIR", "PEERLEARN_FUZZ", "PEERLEARN_REQUIRE_ROOT_TESTS"}
)


def _refuse_unknown_variables(env: Mapping[str, str]) -> None:
    """A typo'd ``PEERLEARN_*`` variable is an error, as a typo'd TOML key is."""
    known = [ENV_PREFIX + name.upper() for name in _FIELDS]
    for key in sorted(env):
        if key.startswith(ENV_PREFIX) and key not in OTHER_VARIABLES and key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigError(f"environment: unknown setting {key}{suggestion}")


def load_config(
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Merge the four layers. ``flags`` entries that are None (flag not given) are skipped."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            document = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        _layer(values, document.get("node", document), str(config_file))
    env = os.environ if env is None else env
    _refuse_unknown_variables(env)
    from_env = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in _FIELDS
    }
    _layer(values, from_env, "environment")
    _layer(values, {k: v for k, v in (flags or {}).items() if v not in (None, ())}, "flags")
    return _validate(dataclasses.replace(NodeConfig(), **values))


def config_as_dict(config: NodeConfig) -> dict[str, Any]:
    """JSON/msgpack-friendly view (paths as strings, tuples as lists)."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(config, name)
        out[name] = (
            str(value)
            if isinstance(value, Path)
            else (list(value) if isinstance(value, tuple) else value)
        )
    return out


# -- the settings described: `node config`, docs/configuration.md ------------------------------

_TYPE_NAMES = {
    Path: "path",
    tuple[str, ...]: "list of strings",
    float: "number",
    int: "integer",
    str: "string",
    bool: "true/false",
}


@dataclass(frozen=True)
class SettingDoc:
    """One setting as the reference shows it."""

    name: str
    type: str
    default: str  # as TOML
    variable: str
    doc: str


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML basic-string escapes
    return repr(value)


def setting_docs() -> list[SettingDoc]:
    """Every setting, in ``NodeConfig``'s order, with the docstring written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(NodeConfig)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    out = []
    for name, field in _FIELDS.items():
        default = field.default
        shown = '"~/.peerlearn/node"' if default == DEFAULT_DATA_DIR else _toml_value(default)
        out.append(
            SettingDoc(
                name, _TYPE_NAMES[_TYPES[name]], shown, ENV_PREFIX + name.upper(), docs[name]
            )
        )
    return out


def config_as_toml(config: NodeConfig) -> str:
    """``config`` as a TOML file that ``--config`` reads back to the same settings."""
    lines = ["# peerlearn node settings: defaults < TOML file < environment < flags", "[node]"]
    for doc in setting_docs():
        lines.append(f"{doc.name} = {_toml_value(getattr(config, doc.name))}")
    return "\n".join(lines) + "\n"


def configuration_reference() -> str:
    """docs/configuration.md: every setting, generated from ``NodeConfig`` itself."""
    rows = [
        "# Node configuration",
        "",
        "Generated from `peerlearn/node/config.py` by `peerlearn node config --reference`; a test",
        "checks that this file is current. Each setting comes from, in rising priority: its",
        "default, a TOML file (`--config`, settings at top level or under `[node]`), its",
        "environment variable, a command-line flag. Unknown keys and unknown `PEERLEARN_*`",
        "variables are errors. `peerlearn node config` prints the settings in effect as TOML.",
        "",
        "| setting | type | default | environment variable | what |",
        "|---|---|---|---|---|",
    ]
    for doc in setting_docs():
        cell = doc.doc.replace("|", "\\|")
        rows.append(f"| `{doc.name}` | {doc.type} | `{doc.default}` | `{doc.variable}` | {cell} |")
    return "\n".join(rows) + "\n"
