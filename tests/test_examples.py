"""The swarm-RL example runs end to end in its short smoke mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "swarm_rl.py"


def test_swarm_rl_smoke() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for arm in ("alone", "vca", "sapo"):
        assert f"{arm:6s} last-20% mean" in result.stdout
