"""`pip install` of a built wheel gives a working `peerlearn` command, scenarios included."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_built_wheel_installs_a_working_peerlearn_command(tmp_path: Path) -> None:
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT)
    (wheel,) = (tmp_path / "dist").glob("peerlearn-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    # The dependencies (torch, libp2p, ...) come from this environment, not from a download.
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(python, "-m", "pip", "install", "--no-deps", "-q", wheel)
    elsewhere = tmp_path / "elsewhere"  # not the clone: nothing is found next to the sources
    elsewhere.mkdir()
    peerlearn = venv / "bin" / "peerlearn"
    assert "peer-to-peer decentralized learning" in _run(peerlearn, "--help", cwd=elsewhere)
    listed = _run(peerlearn, "testnet", "run", "--help", cwd=elsewhere)
    for name in ("smoke", "baseline", "byzantine", "churn", "nat"):
        assert name in listed, listed
    imported = _run(python, "-c", "import peerlearn; print(peerlearn.__file__)", cwd=elsewhere)
    assert str(venv) in imported
    sim = _run(
        peerlearn, "sim", "run", "--nodes", "4", "--rounds", "1", "--quiet",
        "--out", tmp_path / "run", cwd=elsewhere,
    )  # fmt: skip
    assert "final accuracy" in sim
