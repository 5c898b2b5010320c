"""``peerlearn testnet``: many daemons on this machine, scenarios with faults, reports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import click

from peerlearn.errors import ConfigError, PeerlearnError
from peerlearn.learning.choices import FILTERS
from peerlearn.node.config import LEARNING_ALGORITHMS

DEFAULT_DIR = Path("~/.peerlearn/testnet").expanduser()
# The shipped scenarios: in a clone a link to the top-level testnet/ folder, in a wheel a copy.
SCENARIO_DIR = Path(__file__).resolve().parents[1] / "testnet" / "scenarios"
DOWN_TIMEOUT = 60.0  # seconds for a supervisor to tear its testnet down

dir_option = click.option(
    "--dir",
    "root",
    type=click.Path(path_type=Path),
    default=None,
    help=f"Testnet directory [default: {DEFAULT_DIR}, or PEERLEARN_TESTNET_DIR].",
)


def _root(root: Path | None) -> Path:
    return root or Path(os.environ.get("PEERLEARN_TESTNET_DIR", DEFAULT_DIR)).expanduser()


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _state(root: Path) -> dict[str, Any]:
    from peerlearn.testnet.network import STATE_FILE

    path = root / STATE_FILE
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        _fail(f"no testnet runs in {root} (start one with `peerlearn testnet up`)")
        raise
    except (OSError, ValueError) as exc:
        _fail(f"cannot read {path}: {exc}")
        raise
    return state


class _Terminated(Exception):
    """SIGTERM (e.g. from `testnet down`): unwind like Ctrl-C so everything is torn down."""


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group()
def testnet() -> None:
    """Run many daemons on this machine: `up`, `status`, `logs`, `down`, `run SCENARIO`."""


def _task_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--task`` and ``--task-opt``, for every node of the testnet."""
    command = click.option(
        "--task-opt",
        "task_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="Option for the task, repeatable.",
    )(command)
    return click.option("--task", default=None, help="Learning task [default: digits].")(command)


def _task_settings(task: str | None, task_options: tuple[str, ...]) -> dict[str, Any]:
    """``--task``/``--task-opt`` as node settings (checked by the nodes' own validation)."""
    settings: dict[str, Any] = {}
    if task is not None:
        settings["task"] = task
    if task_options:
        settings["task_options"] = list(task_options)
    return settings


dashboard_option = click.option(
    "--dashboard",
    is_flag=False,
    flag_value="127.0.0.1:8080",
    default=None,
    metavar="[HOST:PORT]",
    help="Serve a live dashboard in the browser [default address: 127.0.0.1:8080].",
)


def _dashboard_rows(samples: list[Any]) -> list[Any]:
    from peerlearn.dashboard import NodeRow

    return [
        NodeRow(
            name=f"node{s.node}",
            state="down" if not s.alive else ("attacker" if s.attacker else "up"),
            round=s.round,
            metric=s.accuracy,
            peers=s.peers,
            mb_out=round(s.bytes_out / 1e6, 2),
        )
        for s in samples
    ]


def _dashboard_links(
    edges: set[tuple[int, int]], raw: dict[int, dict[str, Any]], peer_ids: dict[int, str]
) -> dict[tuple[str, str], str]:
    """Links between nodes, relayed where either end says so."""
    links = {}
    for a, b in edges:
        paths = [
            (raw.get(i) or {}).get("paths", {}).get(peer_ids.get(j, ""), "direct")
            for i, j in ((a, b), (b, a))
        ]
        links[(f"node{a}", f"node{b}")] = "relayed" if "relayed" in paths else "direct"
    return links


@testnet.command("up")
@click.option("--nodes", type=int, default=4, show_default=True)
@click.option("--algo", type=click.Choice(LEARNING_ALGORITHMS), default="modest", show_default=True)
@click.option("--filter", "filter_", type=click.Choice(FILTERS), default="none", show_default=True)
@_task_flags
@click.option("--rounds", type=int, default=0, help="Stop learning after N rounds [0: never].")
@click.option("--round-interval", type=float, default=1.0, show_default=True)
@click.option("--nat", is_flag=True, help="Nodes behind NAT routers in a namespace lab (root).")
@click.option("--nat-mode", type=click.Choice(["cone", "symmetric"]), default="cone")
@dashboard_option
@dir_option
def testnet_up(
    nodes: int,
    algo: str,
    filter_: str,
    rounds: int,
    round_interval: float,
    nat: bool,
    nat_mode: str,
    root: Path | None,
    task: str | None,
    task_options: tuple[str, ...],
    dashboard: str | None,
) -> None:
    """Start NODES daemons and show live progress until Ctrl-C or `testnet down`."""
    from peerlearn.dashboard import Dashboard
    from peerlearn.testnet.live import LiveView
    from peerlearn.testnet.network import Testnet
    from peerlearn.testnet.scenario import parse_scenario

    directory = _root(root)
    try:
        scenario = parse_scenario(
            {
                "swarm": {
                    "nodes": nodes,
                    "algo": algo,
                    "filter": filter_,
                    "max_rounds": rounds,
                    "round_interval": round_interval,
                    "network": "nat" if nat else "loopback",
                    "nat": nat_mode,
                    "options": _task_settings(task, task_options),
                }
            },
            default_name="up",
        )
    except ConfigError as exc:
        _fail(str(exc))
        return
    if (directory / "testnet.json").exists():
        _fail(f"a testnet already runs in {directory} (`peerlearn testnet down` first)")
    for old in directory.glob("node*"):  # an earlier testnet's nodes: start fresh
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    net = Testnet(directory, scenario.swarm, swarm="testnet")
    view = LiveView(f"testnet in {directory}", nodes)
    board = Dashboard(f"testnet in {directory}", dashboard) if dashboard else None
    failed = False
    try:
        with _sigterm_unwinds(), contextlib.ExitStack() as serving:
            if board is not None:
                serving.enter_context(board)
                click.echo(f"dashboard at {board.url}")
            click.echo(f"starting {nodes} daemons ({algo}/{filter_}) in {directory} ...")
            net.start()
            click.echo("all nodes listen; Ctrl-C or `peerlearn testnet down` stops them")
            t0 = time.monotonic()
            alive: dict[int, bool] = {}
            with view:
                while True:
                    elapsed = time.monotonic() - t0
                    samples, raw = net.sample(elapsed)
                    view.update(samples, elapsed)
                    if board is not None:
                        for s in samples:
                            if alive.get(s.node, True) != s.alive:
                                board.event(elapsed, f"node{s.node} {'up' if s.alive else 'down'}")
                            alive[s.node] = s.alive
                        links = _dashboard_links(net.edges(raw), raw, net.peer_ids)
                        board.update(elapsed, _dashboard_rows(samples), links)
                    time.sleep(1.0)
    except (KeyboardInterrupt, _Terminated):
        click.echo("stopping every daemon ...")
    except (PeerlearnError, OSError, RuntimeError, TimeoutError) as exc:
        click.echo(f"error: {exc}", err=True)
        failed = True
    finally:
        problems = net.close()
        codes = net.exit_codes
        click.echo(f"stopped {len(codes)} daemons, exit codes {codes}")
        for problem in problems:
            click.echo(f"warning: {problem}", err=True)
    if failed:
        sys.exit(1)


@testnet.command("status")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def testnet_status(root: Path | None, as_json: bool) -> None:
    """Round, accuracy and peers of every node of the running testnet."""
    from peerlearn.errors import ControlError
    from peerlearn.node.control import call
    from peerlearn.node.datadir import DataDir

    state = _state(_root(root))
    rows = []
    for node in state["nodes"]:
        try:
            status = call(DataDir(Path(node["data_dir"])).control_socket, "status", timeout=5)
        except ControlError as exc:
            status = {"error": str(exc)}
        learning = status.get("learning") or {}
        rows.append(
            {
                "node": node["node"],
                "peer_id": status.get("peer_id"),
                "ip": node["ip"],
                "attacker": node["attacker"],
                "round": learning.get("round"),
                "accuracy": learning.get("accuracy"),
                "peers": status.get("connected_peers"),
                "error": status.get("error"),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if row["error"]:
            click.echo(f"node{row['node']:<3} down: {row['error']}")
            continue
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        click.echo(
            f"node{row['node']:<3} {row['ip']:<15} round {row['round']:>4}  accuracy {acc}  "
            f"peers {row['peers']:>2}{'  attacker' if row['attacker'] else ''}"
        )


@testnet.command("logs")
@click.argument("node", type=int)
@click.option("--lines", "-n", type=int, default=50, show_default=True)
@dir_option
def testnet_logs(node: int, lines: int, root: Path | None) -> None:
    """The last lines of NODE's log."""
    state = _state(_root(root))
    known = {n["node"]: n for n in state["nodes"]}
    if node not in known:
        _fail(f"no node {node}; nodes are 0..{len(known) - 1}")
    try:
        text = Path(known[node]["log"]).read_text(errors="replace")
    except OSError as exc:
        _fail(f"cannot read the log of node{node}: {exc}")
        return
    click.echo("\n".join(text.splitlines()[-lines:]))


@testnet.command("down")
@dir_option
def testnet_down(root: Path | None) -> None:
    """Stop the running testnet (its supervisor tears everything down)."""
    from peerlearn.nat.lab import remove_namespaces
    from peerlearn.testnet.local import process_alive
    from peerlearn.testnet.network import STATE_FILE

    directory = _root(root)
    state = _state(directory)
    pid = int(state["supervisor_pid"])
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DOWN_TIMEOUT
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    # The supervisor was gone or stuck: clean up after it.
    leftovers = [n["pid"] for n in state["nodes"] if n.get("pid") and process_alive(n["pid"])]
    for node_pid in leftovers:
        os.kill(node_pid, signal.SIGKILL)
    failed = remove_namespaces(state.get("namespaces", []))
    (directory / STATE_FILE).unlink(missing_ok=True)
    if failed:
        _fail(f"could not remove namespaces {failed}")
    click.echo(f"testnet in {directory} is down" + (f" (killed {leftovers})" if leftovers else ""))


def _scenario_names() -> str:
    return ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))) or "none found"


@testnet.command(
    "run",
    epilog=f"Shipped scenarios (testnet/): {_scenario_names()}.",
)
@click.argument("scenario")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Report folder [default: runs/<scenario>-<time>].",
)
@_task_flags
@dashboard_option
def testnet_run(
    scenario: str,
    out: Path | None,
    task: str | None,
    task_options: tuple[str, ...],
    dashboard: str | None,
) -> None:
    """Run SCENARIO (a name from testnet/ or a .toml file) and write its report."""
    from peerlearn.dashboard import Dashboard
    from peerlearn.testnet.live import LiveView
    from peerlearn.testnet.report import write_report
    from peerlearn.testnet.runner import run_scenario
    from peerlearn.testnet.scenario import find_scenario, load_scenario, with_swarm_options

    try:
        loaded = load_scenario(find_scenario(scenario, SCENARIO_DIR))
        loaded = with_swarm_options(loaded, _task_settings(task, task_options))
    except ConfigError as exc:
        _fail(str(exc))
        return
    out = out or Path("runs") / f"{loaded.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    click.echo(f"scenario {loaded.name}: {loaded.description.strip()}")
    click.echo(f"report folder: {out}")
    view = LiveView(loaded.name, loaded.swarm.nodes)
    board = Dashboard(loaded.name, dashboard) if dashboard else None
    shown: dict[str, int] = {}

    def progress(result: Any, samples: list[Any], elapsed: float) -> None:
        view.progress(result, samples, elapsed)
        if board is None:
            return
        for t, what in result.events[shown.get(result.label, 0) :]:
            board.event(t, f"{result.label}: {what}")
        shown[result.label] = len(result.events)
        links = {(f"node{a}", f"node{b}"): "direct" for a, b in result.edges}
        board.update(elapsed, _dashboard_rows(samples), links)

    try:
        with _sigterm_unwinds(), view, contextlib.ExitStack() as serving:
            if board is not None:
                serving.enter_context(board)
                click.echo(f"dashboard at {board.url}")
            results = run_scenario(loaded, out, progress)
    except (KeyboardInterrupt, _Terminated):
        _fail("interrupted; every daemon was stopped")
        return
    except ConfigError as exc:
        _fail(str(exc))
        return
    summary = write_report(loaded, results, out)
    click.echo(summary.read_text())
    if not all(r.passed for r in results):
        sys.exit(1)
