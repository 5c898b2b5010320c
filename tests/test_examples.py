"""The examples run end to end: swarm RL in its smoke mode, the embedding examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_swarm_example(script: str, *options: str, timeout: float) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke", *options],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow  # three arms of agent processes: about 90 s on 2 cores
def test_swarm_rl_smoke(tmp_path: Path) -> None:
    out = run_swarm_example("swarm_rl.py", "--json", str(tmp_path / "r.json"), timeout=400)
    for arm in ("alone", "sapo", "vca"):
        assert f"seed 0 {arm:10s} last-20%" in out
    assert (tmp_path / "r.json").exists()


def test_swarm_arithmetic_smoke_shares_rollouts_and_policies(tmp_path: Path) -> None:
    """The RL-Swarm-style example at smoke size: two agents share answers (SAPO) in one run
    and average policies (VCA) in another, through real nodes; table, JSON and plot."""
    out = run_swarm_example(
        "swarm_arithmetic.py",
        "--arms",
        "sapo,vca",
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
        timeout=300,
    )
    assert "seeds 0: mean +- sd over the 1 seeds" in out
    for arm in ("sapo", "vca"):
        assert f"  {arm:10s} last-20%" in out
    assert (tmp_path / "r.png").stat().st_size > 10_000


@pytest.mark.parametrize("flavour", ["trio", "asyncio", "sync"])
def test_embedding_examples_learn_and_exchange(flavour: str) -> None:
    """examples/embed_{trio,asyncio,sync}.py, run as a user runs them."""
    script = EXAMPLES / f"embed_{flavour}.py"
    result = subprocess.run(
        [sys.executable, str(script), "--rounds", "3"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "received 2 rollouts, rewards [3.0, 5.0]" in result.stdout
    assert f"{flavour} example: learned y = 2.00x + 1.00" in result.stdout
