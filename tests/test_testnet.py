"""The testnet: scenario files, a small scenario end to end, `testnet up/status/logs/down`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peerlearn.errors import ConfigError
from peerlearn.learning.choices import experiment_shards
from peerlearn.nat.lab import lab_unavailable_reason, netem_unavailable_reason
from peerlearn.testnet import network
from peerlearn.testnet.local import process_alive
from peerlearn.testnet.network import Sample
from peerlearn.testnet.report import write_report
from peerlearn.testnet.runner import RunResult, evaluate, run_scenario
from peerlearn.testnet.scenario import (
    Expectations,
    Scenario,
    SwarmSpec,
    load_scenario,
    parse_scenario,
)
from tests.conftest import wait_until

SCENARIOS = Path(__file__).resolve().parents[1] / "testnet"
SHIPPED = ("baseline", "churn", "byzantine", "partition", "nat", "lossy", "packet-loss", "textlm")


# -- scenario files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SHIPPED, "smoke"])
def test_every_shipped_scenario_parses(name: str) -> None:
    scenario = load_scenario(SCENARIOS / f"{name}.toml")
    assert scenario.name == name
    assert scenario.expect != type(scenario.expect)(), "a scenario must state expectations"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"swarm": {"nodez": 3}}, "unknown key(s) nodez"),
        ({"swarm": {"network": "wifi"}}, "network must be one of"),
        ({"swarm": {"options": {"fanot": 9}}}, "unknown node setting(s) fanot"),
        ({"events": [{"action": "explode", "at_round": 1}]}, "action must be one of"),
        ({"events": [{"action": "kill"}]}, "exactly one of at_round and at_seconds"),
        ({"events": [{"action": "kill", "at_round": 1, "nodes": [9]}]}, "node 9 does not exist"),
        ({"events": [{"action": "heal", "at_round": 1}]}, "need network = 'netns' or 'nat'"),
        ({"expect": {"min_accuracy": 1}}, "unknown key(s) min_accuracy"),
        ({"variants": [{"name": "x", "attack": "bribe"}]}, "attack must be one of"),
        ({"accuracy_rounds": 0}, "accuracy_rounds must be a whole number of rounds, at least 1"),
        ({"accuracy_rounds": 2.5}, "accuracy_rounds must be a whole number of rounds, at least 1"),
    ],
)
def test_bad_scenarios_are_refused_with_the_reason(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_scenario(raw, default_name="t")
    assert message in str(excinfo.value)


def test_variants_override_the_swarm_and_attackers_are_the_last_nodes() -> None:
    scenario = parse_scenario(
        {
            "swarm": {"nodes": 10, "attackers": 0.3, "attack": "sign-flip"},
            "expect": {"min_mean_accuracy": 0.5},
            "variants": [
                {"name": "a", "filter": "bristle", "expect": {"min_mean_accuracy": 0.9}},
                {"name": "b"},
            ],
        },
        default_name="t",
    )
    runs = {run.label: run for run in scenario.runs()}
    assert runs["a"].swarm.filter == "bristle"
    assert runs["b"].swarm.filter == "none"
    assert runs["a"].swarm.attacker_indices() == [7, 8, 9]
    assert runs["a"].expect.min_mean_accuracy == 0.9  # its own expectation
    assert runs["b"].expect.min_mean_accuracy == 0.5  # the scenario's


def test_daemons_get_the_simulators_shards_attackers_an_iid_share(tmp_path: Path) -> None:
    spec = SwarmSpec(nodes=10, partition="label-skew", attackers=0.3, attack="ipm")
    testnet = network.Testnet(tmp_path, spec)
    args = testnet._node_args()
    # the 7 honest nodes split the label-skewed shards; the 3 attackers an IID cut of all
    for i in range(7):
        assert testnet.shards[i] == (i, 7, "label-skew")
        assert args[i] == ["--partition", "label-skew"]
    for k, i in enumerate((7, 8, 9)):
        assert testnet.shards[i] == (k, 3, "iid")
        assert args[i] == ["--partition", "iid", "--attack", "ipm"]
    # the simulator cuts the same shards (its attackers are drawn at random)
    assert experiment_shards(10, {0, 4, 9}, "label-skew")[4] == (1, 3, "iid")
    assert experiment_shards(10, {0, 4, 9}, "label-skew")[5] == (3, 7, "label-skew")
    iid = network.Testnet(tmp_path, SwarmSpec(nodes=4))
    assert iid.shards == {i: (i, 4, "iid") for i in range(4)}
    assert iid._node_args() == {i: ["--partition", "iid"] for i in range(4)}


# -- a small scenario end to end (in make test) -----------------------------------------------


@pytest.mark.integration
def test_smoke_scenario_survives_a_kill_and_writes_its_report(tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIOS / "smoke.toml")
    results = run_scenario(scenario, tmp_path)
    summary_md = write_report(scenario, results, tmp_path)
    (result,) = results
    assert result.passed, summary_md.read_text()
    assert [what.split(":")[0] for _, what in result.events] == [
        "kill at round 5",
        "restart at round 15",
    ]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] is True
    run_dir = tmp_path / "smoke"
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("t,node,alive")
    assert len(rows) > 4 * 5
    for png in ("accuracy.png", "bytes.png", "topology.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    # node 3 was down for a while: some samples say so
    assert any(",3,False," in row for row in rows)


# -- testnet up / status / logs / down ---------------------------------------------------------


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerlearn", "testnet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ctrl_c_reaches_it() -> None:
    """A suite run in the background by a shell inherits SIGINT ignored; at a terminal, Ctrl-C
    reaches `testnet up` with its default action, which is what the test means to send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _up(
    tmp_path: Path, nodes: int, *extra: str
) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    with (tmp_path / "up.log").open("wb") as log:  # the child keeps its own copy
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "peerlearn", "testnet", "up", "--nodes", str(nodes),
             "--dir", str(tmp_path), "--round-interval", "0.5", *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_ctrl_c_reaches_it,
        )  # fmt: skip

    def ready() -> dict[str, object] | None:
        assert supervisor.poll() is None, (tmp_path / "up.log").read_text()
        try:
            state = json.loads((tmp_path / "testnet.json").read_text())
        except (OSError, ValueError):
            return None
        status = _cli("status", "--dir", str(tmp_path), "--json")
        rows = json.loads(status.stdout) if status.returncode == 0 else []
        ok = len(rows) == nodes and all(r["peer_id"] for r in rows)
        return state if ok and all(n["pid"] for n in state["nodes"]) else None

    return supervisor, wait_until(ready, 90, interval=0.5)


def _node_pids(state: dict[str, object]) -> list[int]:
    return [int(n["pid"]) for n in state["nodes"]]  # type: ignore[attr-defined]


@pytest.mark.integration
def test_up_status_logs_then_ctrl_c_leaves_no_process_behind(tmp_path: Path) -> None:
    supervisor, state = _up(tmp_path, 3)
    try:
        status = _cli("status", "--dir", str(tmp_path))
        assert status.returncode == 0, status
        assert status.stdout.count("node") == 3, status

        logs = _cli("logs", "1", "--dir", str(tmp_path))
        assert "peerlearn node ready" in logs.stdout, logs
        assert _cli("logs", "7", "--dir", str(tmp_path)).returncode == 1
        supervisor.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert supervisor.wait(timeout=60) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    assert all(not process_alive(pid) for pid in _node_pids(state))
    assert not (tmp_path / "testnet.json").exists()
    output = (tmp_path / "up.log").read_text()
    assert "exit codes [0, 0, 0]" in output, output
    down = _cli("status", "--dir", str(tmp_path))
    assert down.returncode == 1
    assert "no testnet runs" in down.stderr


@pytest.mark.integration
def test_down_stops_a_running_testnet_and_a_killed_supervisor_leaves_no_orphans(
    tmp_path: Path,
) -> None:
    supervisor, state = _up(tmp_path / "a", 2)
    down = _cli("down", "--dir", str(tmp_path / "a"))
    assert down.returncode == 0, down
    assert supervisor.wait(timeout=30) == 0
    assert all(not process_alive(pid) for pid in _node_pids(state))

    supervisor, state = _up(tmp_path / "b", 2)
    supervisor.kill()  # SIGKILL: no chance to clean up; the daemons die with it
    supervisor.wait(timeout=10)
    wait_until(lambda: all(not process_alive(pid) for pid in _node_pids(state)), 10)
    down = _cli("down", "--dir", str(tmp_path / "b"))  # removes the stale state
    assert down.returncode == 0, down
    assert not (tmp_path / "b" / "testnet.json").exists()


# -- the big scenarios: slow, runnable by name (pytest -m slow -k churn) ----------------------


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenario(name: str, tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIOS / f"{name}.toml")
    if scenario.swarm.network != "loopback" and lab_unavailable_reason():
        pytest.skip(lab_unavailable_reason() or "")
    delays = any(e.action == "netem" and (e.delay_ms or e.jitter_ms) for e in scenario.events)
    if delays and netem_unavailable_reason():
        pytest.skip(netem_unavailable_reason() or "")
    results = run_scenario(scenario, tmp_path)
    summary = write_report(scenario, results, tmp_path)
    assert all(r.passed for r in results), summary.read_text()


# -- honest reports ------------------------------------------------------------------------------


def _sample(t: float, node: int, alive: bool, acc: float | None, mb: float, **kw: Any) -> Sample:
    return Sample(
        t=t, node=node, alive=alive, attacker=kw.get("attacker", False), round=int(t),
        accuracy=acc, members=3, peers=2, bytes_out=int(mb * 1e6), bytes_in=0, rss_mb=100.0,
        join_seconds=0.1, reachability="public", direct_peers=2, relayed_peers=0,
    )  # fmt: skip


def test_reports_show_down_time_as_gaps_and_keep_cumulative_series_monotone(
    tmp_path: Path,
) -> None:
    from peerlearn.testnet.report import _down_intervals, cumulative, render_summary

    samples = []
    for t in range(10):
        samples.append(_sample(t, 0, True, 0.5 + t / 20, t * 1.0))
        samples.append(_sample(t, 1, True, 0.1, t * 2.0, attacker=True))
        down = 3 <= t < 6  # node 2 killed at 3 s, restarted at 6 s: its counter starts again
        samples.append(_sample(t, 2, not down, None if down else 0.58, 0 if down else t % 6))
    scenario = Scenario("report", "d", SwarmSpec(nodes=3), events=(), expect=Expectations())
    result = RunResult(label="report", spec=SwarmSpec(nodes=3), samples=samples)
    node2 = [s for s in samples if s.node == 2]
    assert _down_intervals(node2) == [(3, 6)]
    series = cumulative([s.bytes_out / 1e6 if s.alive else None for s in node2])
    assert series == [0, 1, 2, None, None, None, 2, 3, 4, 5]  # 2 MB before the kill kept
    write_report(scenario, [result], tmp_path)
    assert (tmp_path / "report" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    summary = render_summary(scenario, [result])
    assert "worst 0.580 (node 2), over 2 nodes" in summary  # the attacker is not honest
    assert "| 2 | True | False | 1 | 9 | 0.580 | 5.0 |" in summary  # down once, MB kept


def test_accuracy_over_the_last_rounds_averages_each_nodes_rounds_not_its_samples() -> None:
    from peerlearn.testnet.report import render_summary

    # Node 0 is sampled twice in round 9; its accuracies in rounds 7-9 are 0.85, 0.95, 0.90.
    samples = [_sample(t, 0, True, 0.5 + t / 20, 1.0) for t in range(9)]
    samples[-1] = _sample(8, 0, True, 0.95, 1.0)
    samples += [_sample(9, 0, True, 0.90, 1.0), _sample(9.5, 0, True, 0.90, 1.0)]
    samples.append(_sample(9, 1, True, 0.10, 1.0, attacker=True))
    expect = Expectations(min_mean_accuracy=0.89, min_node_accuracy=0.89)
    final = RunResult(label="r", spec=SwarmSpec(nodes=2), samples=samples)
    tail = RunResult(label="r", spec=SwarmSpec(nodes=2), samples=samples, accuracy_rounds=3)
    assert final.honest_accuracy() == {0: 0.90}
    assert tail.honest_accuracy() == {0: pytest.approx((0.85 + 0.95 + 0.90) / 3)}
    checks = evaluate(expect, tail, killed=set())
    assert [c.name for c in checks][:2] == [
        "mean accuracy over the last 3 rounds (honest, live)",
        "worst node's accuracy over the last 3 rounds",
    ]
    assert [c.passed for c in checks][:2] == [True, True]
    scenario = Scenario("r", "d", SwarmSpec(nodes=2), events=(), expect=expect, accuracy_rounds=3)
    summary = render_summary(scenario, [tail])
    expected = "accuracy over the last 3 rounds: mean 0.900, worst 0.900 (node 0), over 1 nodes"
    assert expected in summary
