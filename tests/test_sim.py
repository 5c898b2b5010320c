"""The simulator: determinism, churn, and the papers' claims at small scale."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from peerlearn.cli.main import cli
from peerlearn.errors import LocalProtocolError
from peerlearn.sim.simulator import SimConfig, Simulation, run_simulation


@pytest.mark.parametrize("algo", ["gossip-vca", "modest", "dpsgd", "fedavg"])
def test_same_seed_same_trace_hash(algo: str) -> None:
    config = SimConfig(algo=algo, nodes=8, rounds=4, local_steps=2)
    first, second = run_simulation(config), run_simulation(config)
    assert first.trace_hash == second.trace_hash
    assert first.records == second.records
    assert run_simulation(
        SimConfig(algo=algo, nodes=8, rounds=4, local_steps=2, seed=1)
    ).trace_hash != (first.trace_hash)


def test_modest_keeps_completing_rounds_after_80_percent_are_killed() -> None:
    result = run_simulation(
        SimConfig(algo="modest", nodes=30, rounds=30, kill_fraction=0.8, kill_round=8, seed=3)
    )
    assert result.records[-1].round == 30
    assert result.records[-1].alive == 6
    after = [r for r in result.records if r.round > 8]
    assert after[-1].acc_mean > after[0].acc_mean - 0.02
    assert result.final() > 0.85


def test_gossip_nodes_keep_learning_after_kills() -> None:
    result = run_simulation(
        SimConfig(
            algo="gossip-vca", nodes=20, rounds=20, kill_fraction=0.5, kill_round=5, local_steps=5
        )
    )
    assert result.records[-1].alive == 10
    assert result.final() > 0.8


def test_invalid_configs_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError, match="bristle"):
        SimConfig(algo="modest", filter="bristle").resolved()
    with pytest.raises(LocalProtocolError, match="unknown algo"):
        SimConfig(algo="fedsgd").resolved()
    with pytest.raises(LocalProtocolError, match="transfer"):
        Simulation(SimConfig(filter="bristle", task_options=("model=mlp",)))


def test_vca_gossip_is_faster_than_plain_gossip_and_close_to_fedavg() -> None:
    target = 0.85
    runs = {
        algo: run_simulation(SimConfig(algo=algo, nodes=20, rounds=30, sample_size=20))
        for algo in ("fedavg", "gossip", "gossip-vca")
    }
    fedavg, plain, vca = (runs[a].rounds_to(target) for a in ("fedavg", "gossip", "gossip-vca"))
    assert fedavg is not None
    assert vca is not None
    assert plain is None or vca < plain
    assert vca <= 1.5 * fedavg


def test_modest_matches_fedavg_with_far_fewer_bytes_than_dpsgd() -> None:
    common = {"nodes": 50, "rounds": 40, "sample_size": 10, "eval_every": 5}
    fedavg = run_simulation(SimConfig(algo="fedavg", **common))
    modest = run_simulation(SimConfig(algo="modest", **common))
    dpsgd = run_simulation(SimConfig(algo="dpsgd", **common))
    assert modest.final(2) >= fedavg.final(2) - 0.02
    assert dpsgd.records[-1].bytes_sent >= 5 * modest.records[-1].bytes_sent


def test_bristle_resists_label_flipping_on_non_iid_data() -> None:
    common = {
        "algo": "gossip",
        "nodes": 20,
        "rounds": 120,
        "partition": "label-skew",
        "byzantine": 0.3,
        "attack": "label-flip",
        "fanout": 19,
        "eval_every": 10,
    }
    defended = run_simulation(SimConfig(filter="bristle", **common))
    # the undefended mean (no clipping either), so that the attack shows its teeth
    plain = run_simulation(
        SimConfig(filter="none", task_options=("model=transfer",), clip_ratio=0.0, **common)
    )
    assert defended.final(2) >= 0.9
    assert plain.final(2) < 0.7


def test_sim_cli_prints_rounds_and_writes_a_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "sim",
            "run",
            "--algo",
            "modest",
            "--nodes",
            "10",
            "--rounds",
            "3",
            "--sample-size",
            "4",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "round    3" in result.output
    assert "trace hash" in result.output
    csv_lines = (tmp_path / "trace.csv").read_text().splitlines()
    assert csv_lines[0] == "round,time,acc_mean,acc_min,bytes_sent,alive"
    assert len(csv_lines) >= 3
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_sim_compare_overlays_runs_and_refuses_other_folders(tmp_path: Path) -> None:
    for algo in ("modest", "gossip"):
        args = ["sim", "run", "--algo", algo, "--nodes", "6", "--rounds", "2", "--quiet"]
        ran = CliRunner().invoke(cli, [*args, "--sample-size", "3", "--out", str(tmp_path / algo)])
        assert ran.exit_code == 0, ran.output
    out = tmp_path / "compare.png"
    result = CliRunner().invoke(
        cli,
        ["sim", "compare", str(tmp_path / "modest"), str(tmp_path / "gossip"), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "modest: modest/none, iid, seed 0: final accuracy mean" in result.output
    assert "gossip: gossip/none, iid, seed 0" in result.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    other = CliRunner().invoke(cli, ["sim", "compare", str(tmp_path)])
    assert other.exit_code == 2
    assert "is not a `peerlearn sim run` folder" in other.output
