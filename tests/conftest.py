"""Shared test helpers: polling with a deadline (never fixed sleeps)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, settings

T = TypeVar("T")

settings.register_profile(
    "peerlearn",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# `make fuzz`: random (not derandomized) and many more examples per property.
settings.register_profile(
    "fuzz",
    deadline=None,
    max_examples=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("fuzz" if os.environ.get("PEERLEARN_FUZZ") else "peerlearn")


def wait_until(probe: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as exc:  # the thing polled for may not exist yet
            last_error = exc
        else:
            if value:
                return value
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout} s (last error: {last_error})")
