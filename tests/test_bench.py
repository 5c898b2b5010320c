"""`make bench` keeps working: its script runs end to end at a tiny size (its numbers are
not checked here; benchmarks are not tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_stream_throughput_bench_runs_at_a_tiny_size() -> None:
    """It once called ``receive_blob`` without an argument the function had gained, so every
    transfer failed and `make bench` printed a traceback."""
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "stream_throughput.py"),
            "--megabytes",
            "1",
            "--chunk-kib",
            "256",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "blob/1 chunk 256 KiB" in result.stdout
    assert "best blob/1 ratio" in result.stdout
