"""The examples run end to end: swarm RL in its smoke mode, the embedding examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "swarm_rl.py"


@pytest.mark.slow  # three arms of agent processes: 100-160 s on 2 cores
def test_swarm_rl_smoke() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for arm in ("alone", "vca", "sapo"):
        assert f"{arm:6s} last-20% mean" in result.stdout


@pytest.mark.parametrize("flavour", ["trio", "asyncio", "sync"])
def test_embedding_examples_learn_and_exchange(flavour: str) -> None:
    """examples/embed_{trio,asyncio,sync}.py, run as a user runs them."""
    script = EXAMPLE.parent / f"embed_{flavour}.py"
    result = subprocess.run(
        [sys.executable, str(script), "--rounds", "3"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "payload received: {'note': 'done', 'rounds': 3}" in result.stdout
    assert f"{flavour} example: learned y = 2.00x + 1.00" in result.stdout
