"""``peerlearn`` command line: ``node`` (daemon and control), ``sim``, ``testnet``."""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from peerlearn import __version__
from peerlearn.cli.testnet import dashboard_option, testnet
from peerlearn.dashboard import Dashboard, NodeRow
from peerlearn.errors import ConfigError, LocalProtocolError, PeerlearnError, unwrap_group
from peerlearn.learning.choices import ALGORITHMS, ATTACKS, FILTERS, PARTITIONS
from peerlearn.node.config import LEARNING_ALGORITHMS, NODE_ATTACKS, NodeConfig, load_config

EXIT_ERROR = 1
EXIT_USAGE = 2


def _fail(error: BaseException) -> None:
    error = unwrap_group(error)
    if not isinstance(error, PeerlearnError):
        raise error
    click.echo(f"error: {error}", err=True)
    sys.exit(EXIT_USAGE if isinstance(error, LocalProtocolError) else EXIT_ERROR)


def _config(config_file: Path | None, **flags: Any) -> NodeConfig:
    return load_config(config_file=config_file, flags=flags)


def _emit(value: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True) if as_json else render(value))


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Node data directory [default: ~/.peerlearn/node, or PEERLEARN_DATA_DIR].",
)
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="TOML config file (settings at top level or under [node]).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
@click.version_option(__version__, prog_name="peerlearn")
def cli() -> None:
    """peerlearn: peer-to-peer decentralized learning."""


@cli.group()
def node() -> None:
    """Run a node daemon and talk to it."""


async def _feed_dashboard(daemon: Any, board: Dashboard) -> None:
    """Once a second until the daemon stops: this node, the peers it is connected to and the
    swarm's members with their announced metric."""
    import trio

    started = trio.current_time()
    me = daemon.identity.peer_id
    while not daemon.stop.is_set():
        status = daemon.status()
        learning = status.get("learning") or {}
        board.title = f"node {me}"
        board.metric = learning.get("metric", board.metric)
        metrics = daemon.swarm_metrics()
        rounds = daemon.swarm_rounds()
        connected = set(status["connected_peer_ids"])
        names = [me, *sorted((connected | set(metrics)) - {me})]
        rows = [
            NodeRow(
                name=f"{peer[-6:]}{' (this node)' if peer == me else ''}",
                state="up" if peer == me or peer in connected else "down",
                round=learning.get("round", 0) if peer == me else rounds.get(peer, 0),
                metric=learning.get("accuracy") if peer == me else metrics.get(peer),
                peers=status["connected_peers"] if peer == me else 0,
                mb_out=round(status["bytes_out"] / 1e6, 2) if peer == me else 0.0,
            )
            for peer in names
        ]
        links = {(rows[0].name, f"{p[-6:]}"): status["paths"].get(p, "direct") for p in connected}
        board.update(trio.current_time() - started, rows, links)
        with trio.move_on_after(1.0):
            await daemon.stop.wait()


@node.command("start")
@click.option(
    "--listen", multiple=True, help="Listen multiaddr, repeatable [default: /ip4/0.0.0.0/tcp/0]."
)
@click.option("--bootstrap", multiple=True, help="Peer multiaddr with /p2p/<id>, repeatable.")
@data_dir_option
@config_option
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="[default: info; libp2p's own messages show from warning, all of them at debug].",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="text: date, time, level, message; json: one object per line [default: text].",
)
@dashboard_option
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464).",
)
@click.option("--shutdown-timeout", type=float, default=None, help="Seconds [default: 10].")
@click.option("--bootstrap-timeout", type=float, default=None, help="Seconds [default: 30].")
@click.option("--swarm", default=None, help="Join this swarm and learn in it.")
@click.option(
    "--task",
    default=None,
    help="digits, textlm, an installed task, or package.module:factory [default: digits].",
)
@click.option(
    "--task-opt",
    "task_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Option for the task, repeatable (e.g. --task-opt size_mb=50).",
)
@click.option("--device", default=None, help="torch device to train on [default: cpu].")
@click.option(
    "--algo",
    type=click.Choice(LEARNING_ALGORITHMS),
    default=None,
    help="Learning protocol [default: gossip-vca]. (fedavg needs a server: it is in `sim` as "
    "the baseline; modest is its serverless counterpart.)",
)
@click.option(
    "--filter",
    "filter_",
    type=click.Choice(FILTERS),
    default=None,
    help="Robust rule for received models [default: none].",
)
@click.option(
    "--compression",
    default=None,
    help="Send models as int8, int4 or topk:F (modest), with error feedback [default: none].",
)
@click.option("--data-shard", default=None, help="i/n: train on shard i of n [default: 0/1].")
@click.option(
    "--partition",
    type=click.Choice(["iid", "label-skew"]),
    default=None,
    help="How shards are cut [default: iid].",
)
@click.option("--round-interval", type=float, default=None, help="Seconds per round [default: 2].")
@click.option("--min-members", type=int, default=None, help="Members to wait for [default: 1].")
@click.option("--sample-size", type=int, default=None, help="MoDeST trainers per round.")
@click.option(
    "--max-rounds",
    type=int,
    default=None,
    help="Stop learning after N rounds; the node keeps running and serving its model until "
    "`node stop` or Ctrl-C [default: 0, never].",
)
@click.option(
    "--relay-service/--no-relay-service",
    default=None,
    help="Serve as a circuit relay for NATed peers (public nodes) [default: off].",
)
@click.option(
    "--nat-traversal/--no-nat-traversal",
    default=None,
    help="Reachability checks, relay reservations, hole punching [default: on].",
)
@click.option(
    "--relay-blobs/--no-relay-blobs",
    default=None,
    help="Let model blobs use relayed connections [default: off, models go direct].",
)
@click.option("--upnp/--no-upnp", default=None, help="UPnP port mapping [default: off].")
@click.option(
    "--admission",
    type=click.Choice(["open", "allowlist", "token"]),
    default=None,
    help="Who may join the swarm [default: open].",
)
@click.option("--allowlist-file", default=None, help="admission allowlist: file of peer IDs.")
@click.option("--swarm-authority", default=None, help="admission token: the swarm's peer ID.")
@click.option("--invite", default=None, help="admission token: this node's invite token.")
@click.option(
    "--member-pow-bits",
    type=int,
    default=None,
    help="Proof of work (leading zero bits) every member must show; the same on every node "
    "of a swarm [default: 0, none].",
)
@click.option(
    "--fresh",
    is_flag=True,
    default=None,
    help="Set existing checkpoints aside and start learning from round 0.",
)
@click.option(
    "--attack",
    type=click.Choice(NODE_ATTACKS),
    default=None,
    help="Experiments only: act as a Byzantine node [default: none].",
)
def node_start(
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    data_dir: Path | None,
    config_file: Path | None,
    log_level: str | None,
    log_format: str | None,
    dashboard: str | None,
    metrics_listen: str | None,
    shutdown_timeout: float | None,
    bootstrap_timeout: float | None,
    filter_: str | None,
    **learning: Any,
) -> None:
    """Run the node daemon in the foreground until SIGINT/SIGTERM or `node stop`."""
    try:  # settings are checked before torch and libp2p are imported: errors in < 1 s
        config = _config(
            config_file,
            listen=listen,
            bootstrap=bootstrap,
            data_dir=data_dir,
            log_level=log_level,
            log_format=log_format,
            metrics_listen=metrics_listen,
            shutdown_timeout=shutdown_timeout,
            bootstrap_timeout=bootstrap_timeout,
            filter=filter_,
            **learning,
        )
        board = Dashboard("node", dashboard) if dashboard else None
    except ConfigError as exc:
        _fail(exc)
        return
    import trio

    from peerlearn.node.daemon import Daemon, run_daemon
    from peerlearn.node.logs import configure_logging

    configure_logging(config.log_level, config.log_format)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(run_daemon, config)
            # What start-up built (torch's and libp2p's modules, the task's data) lives as
            # long as the process: the garbage collector need not scan it again. Full
            # collections over it held the event loop 60-150 ms under a 10,000-member flood.
            gc.freeze()
            click.echo(f"peerlearn node ready: peer id {daemon.identity.peer_id}")
            for addr in daemon.host.addrs():
                click.echo(f"  listening on {addr}")
            click.echo(f"  data dir {daemon.data_dir.root}")
            if daemon.metrics_url:
                click.echo(f"  metrics at {daemon.metrics_url}")
            if board is not None:
                click.echo(f"  dashboard at {board.url}")
                nursery.start_soon(_feed_dashboard, daemon, board)
            sys.stdout.flush()

    try:
        with board if board is not None else contextlib.nullcontext():
            trio.run(main)
    except BaseException as exc:
        _fail(exc)
    click.echo("peerlearn node stopped")


def _call(data_dir: Path | None, op: str, timeout: float = 30.0, **args: Any) -> Any:
    from peerlearn.node.control import call
    from peerlearn.node.datadir import DataDir

    config = _config(None, data_dir=data_dir)
    return call(DataDir(config.data_dir).control_socket, op, timeout=timeout, **args)


def _render_status(s: dict[str, Any]) -> str:
    lines = [
        f"peer id          {s['peer_id']}",
        f"phase            {s['phase']}",
        f"uptime           {s['uptime_s']:.0f} s",
        f"connected peers  {s['connected_peers']}",
        f"shared models    {s['updates_sent']} sent, {s['updates_received']} received, "
        f"{s['updates_rejected']} rejected (`node share` and the embedding API)",
        f"bytes            {s['bytes_out']} out, {s['bytes_in']} in",
    ]
    lines += [f"listening        {a}" for a in s["addrs"]]
    nat = s.get("nat")
    if nat:
        lines += [
            f"reachability     {nat['reachability']} ({nat['reachability_servers']} servers asked)",
            f"peer paths       {nat['direct_peers']} direct, {nat['relayed_peers']} relayed; "
            f"hole punches {nat['hole_punch_successes']} ok, {nat['hole_punch_failures']} failed",
        ]
        lines += [f"relay address    {a}" for a in nat["circuit_addrs"]]
        if nat["relayed_only"]:
            lines.append(f"relay only       {', '.join(nat['relayed_only'])} (hole punch failed)")

    boundary = s.get("boundary") or {}
    rejected = boundary.get("rejected") or {}
    if rejected or boundary.get("banned_now"):
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(rejected.items()))
        lines.append(
            f"rejected inputs  {counts or 'none'}; {len(boundary.get('banned_now', []))} peers "
            f"banned now, {boundary.get('bans_total', 0)} bans in all"
        )
    learning = s.get("learning")
    if learning:
        metric = learning.get("metric", "accuracy")
        acc = "-" if learning["accuracy"] is None else f"{learning['accuracy']:.3f}"
        join = "-" if learning["join_seconds"] is None else f"{learning['join_seconds']:.2f} s"
        lines += [
            f"swarm            {s['swarm']} ({learning['members']} members, joined in {join})",
            f"learning         {learning.get('task', 'digits')} with "
            f"{learning['algo']}/{learning['filter']} {learning['phase']}, "
            f"round {learning['round']}, {metric} {acc}",
            f"learner models   {learning['models_sent']} sent, "
            f"{learning['models_received']} received",
        ]
    return "\n".join(lines)


def _render_peers(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no connected peers"
    out = []
    for row in rows:
        rtt = "?" if row["rtt_ms"] is None else f"{row['rtt_ms']:.0f} ms"
        out.append(f"{row['peer_id']}  rtt {rtt}  {' '.join(row['addrs'][:2])}")
    return "\n".join(out)


@node.command("config")
@config_option
@data_dir_option
@click.option(
    "--reference", is_flag=True, help="Print every setting's reference (docs/configuration.md)."
)
def node_config(config_file: Path | None, data_dir: Path | None, reference: bool) -> None:
    """Print the settings in effect (defaults < TOML < environment) as TOML."""
    from peerlearn.node.config import config_as_toml, configuration_reference

    if reference:
        click.echo(configuration_reference(), nl=False)
        return
    try:
        click.echo(config_as_toml(_config(config_file, data_dir=data_dir)), nl=False)
    except ConfigError as exc:
        _fail(exc)


@node.command("status")
@data_dir_option
@json_option
def node_status(data_dir: Path | None, as_json: bool) -> None:
    """Show the running daemon's state."""
    try:
        _emit(_call(data_dir, "status"), as_json, _render_status)
    except PeerlearnError as exc:
        _fail(exc)


@node.command("peers")
@data_dir_option
@json_option
def node_peers(data_dir: Path | None, as_json: bool) -> None:
    """List connected peers with their ping round-trip time."""
    try:
        _emit(_call(data_dir, "peers"), as_json, _render_peers)
    except PeerlearnError as exc:
        _fail(exc)


@node.command("stop")
@data_dir_option
def node_stop(data_dir: Path | None) -> None:
    """Ask the running daemon to shut down gracefully."""
    try:
        _call(data_dir, "stop")
    except PeerlearnError as exc:
        _fail(exc)
    click.echo("stop requested")


@node.command("connect")
@click.argument("address")
@data_dir_option
def node_connect(address: str, data_dir: Path | None) -> None:
    """Connect the running daemon to ADDRESS (/ip4/.../tcp/.../p2p/<id>)."""
    try:
        result = _call(data_dir, "connect", address=address)
    except PeerlearnError as exc:
        _fail(exc)
    click.echo(f"connected to {result['peer_id']}")


@node.command("share")
@click.argument("state_dict_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@data_dir_option
@json_option
def node_share(state_dict_file: Path, data_dir: Path | None, as_json: bool) -> None:
    """Send a saved torch state_dict to every connected peer as a signed model update."""
    try:
        results = _call(data_dir, "share", timeout=600.0, path=str(state_dict_file.resolve()))
    except PeerlearnError as exc:
        _fail(exc)

    def render(rows: list[dict[str, Any]]) -> str:
        return "\n".join(
            f"{r['peer_id']}: delivered {r['bytes']} bytes in {r['seconds']:.2f} s"
            if r["ok"]
            else f"{r['peer_id']}: NOT delivered: {r['error']}"
            for r in rows
        )

    _emit(results, as_json, render)
    if not all(r["ok"] for r in results):
        sys.exit(EXIT_ERROR)


@cli.group()
def sim() -> None:
    """Deterministic in-process simulations with the learning cores."""


@sim.command("run")
@click.option("--algo", type=click.Choice(ALGORITHMS), default="gossip-vca", show_default=True)
@click.option("--filter", "filter_", type=click.Choice(FILTERS), default="none", show_default=True)
@click.option("--nodes", type=int, default=20, show_default=True)
@click.option("--byzantine", type=float, default=0.0, show_default=True, help="Fraction.")
@click.option("--attack", type=click.Choice(ATTACKS), default="none", show_default=True)
@click.option("--rounds", type=int, default=30, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--partition", type=click.Choice(PARTITIONS), default="iid", show_default=True)
@click.option(
    "--task", default="digits", show_default=True, help="digits, textlm, or module:factory."
)
@click.option(
    "--task-opt",
    "task_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Option for the task, repeatable (digits: model=mlp|transfer, hidden=N).",
)
@click.option("--fanout", type=int, default=4, show_default=True, help="Gossip/D-PSGD degree.")
@click.option("--sample-size", type=int, default=10, show_default=True, help="MoDeST/FedAvg.")
@click.option("--local-steps", type=int, default=10, show_default=True)
@click.option("--kill-fraction", type=float, default=0.0, show_default=True)
@click.option("--kill-round", type=int, default=0, show_default=True)
@click.option("--eval-every", type=int, default=1, show_default=True)
@click.option(
    "--compression",
    default="none",
    show_default=True,
    help="Models sent as int8, int4 or topk:F (fedavg, modest), with error feedback.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Report folder [default: runs/sim-ALGO-FILTER-seedS].",
)
@click.option("--quiet", is_flag=True, help="Only print the summary.")
def sim_run(**options: Any) -> None:
    """Simulate ROUNDS of ALGO on a task; print its metric and the bytes sent per round."""
    from peerlearn.sim.report import write_report
    from peerlearn.sim.simulator import SimConfig, run_simulation

    out = options.pop("out")
    quiet = options.pop("quiet")
    options["filter"] = options.pop("filter_")
    try:
        config = SimConfig(**options).resolved()
    except PeerlearnError as exc:
        _fail(exc)
    out = out or Path("runs") / f"sim-{config.algo}-{config.filter}-seed{config.seed}"

    def progress(r: Any) -> None:
        if not quiet:
            click.echo(
                f"round {r.round:4d}  t={r.time:8.1f}s  acc mean {r.acc_mean:.3f} "
                f"min {r.acc_min:.3f}  sent {r.bytes_sent / 1e6:9.2f} MB  alive {r.alive}"
            )

    try:
        result = run_simulation(config, progress)
    except PeerlearnError as exc:  # the task's options or data, in one line
        _fail(exc)
        return
    paths = write_report(result, out)
    click.echo(
        f"final accuracy (mean of last 5 evaluations) {result.final():.3f}; "
        f"{result.records[-1].bytes_sent / 1e6:.2f} MB sent; {result.wall_seconds:.1f} s wall"
    )
    click.echo(f"trace hash {result.trace_hash}")
    click.echo(f"wrote {', '.join(str(p) for p in paths)}")


@sim.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("runs/compare.png"),
    show_default=True,
    help="The PNG to write.",
)
def sim_compare(runs: tuple[Path, ...], out: Path) -> None:
    """Overlay several `sim run` folders in one plot and print their final numbers."""
    from peerlearn.sim.report import compare_runs

    try:
        table = compare_runs(list(runs), out)
    except PeerlearnError as exc:
        _fail(exc)
        return
    for name, mean, worst, mb in table:
        click.echo(f"{name}: final accuracy mean {mean:.3f}, worst {worst:.3f}; {mb:.2f} MB sent")
    click.echo(f"wrote {out}")


@cli.group()
def swarm() -> None:
    """Private swarms: an authority key signs invites (for --admission token)."""


def _authority_key_path(name: str, key: Path | None) -> Path:
    return key if key is not None else Path("~/.peerlearn/swarms").expanduser() / f"{name}.key"


@swarm.command("create")
@click.argument("name")
@click.option(
    "--key",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to keep the authority key [default: ~/.peerlearn/swarms/NAME.key].",
)
def swarm_create(name: str, key: Path | None) -> None:
    """Make the authority key of swarm NAME and print how members join it."""
    from peerlearn.identity import create_identity

    path = _authority_key_path(name, key)
    if path.exists():
        _fail(ConfigError(f"{path} exists already; swarm {name!r} has an authority key"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        authority = create_identity(path)
    except OSError as exc:
        _fail(ConfigError(f"cannot write {path}: {exc.strerror}"))
        return
    click.echo(f"swarm {name}: authority {authority.peer_id} (key in {path}; keep it safe)")
    click.echo("invite each member by its peer ID (`peerlearn node status` shows it):")
    click.echo(f"  peerlearn swarm invite PEER_ID --swarm {name}")
    click.echo("members start with:")
    click.echo(
        f"  peerlearn node start --swarm {name} --admission token "
        f"--swarm-authority {authority.peer_id} --invite TOKEN"
    )


@swarm.command("invite")
@click.argument("peer_id")
@click.option("--swarm", "name", required=True, help="The swarm's name.")
@click.option(
    "--key",
    type=click.Path(path_type=Path),
    default=None,
    help="The authority key [default: ~/.peerlearn/swarms/NAME.key].",
)
@click.option(
    "--valid-days", type=float, default=0.0, help="Days the invite stays valid (0: ever)."
)
def swarm_invite(peer_id: str, name: str, key: Path | None, valid_days: float) -> None:
    """Print an invite token that lets PEER_ID join the swarm."""
    import time

    from peerlearn.gossip.admission import issue_invite
    from peerlearn.identity import load_identity, public_key_from_peer_id

    path = _authority_key_path(name, key)
    try:
        member = public_key_from_peer_id(peer_id)
    except ValueError as exc:
        _fail(ConfigError(f"{peer_id!r} is not a peer ID: {exc}"))
        return
    if not path.exists():
        _fail(ConfigError(f"no authority key at {path}; run `peerlearn swarm create {name}`"))
    try:
        authority = load_identity(path)
    except PeerlearnError as exc:
        _fail(exc)
        return
    expires = time.time() + valid_days * 86_400 if valid_days > 0 else 0.0
    click.echo(issue_invite(authority, name, member, expires).token)


cli.add_command(testnet)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="peerlearn")
