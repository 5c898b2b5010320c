"""Shared test helpers: polling with a deadline (never fixed sleeps)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch
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


ROOT_MARKERS = ("nat", "root", "browser")  # what .ci/run installs as root


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """With PEERLEARN_REQUIRE_ROOT_TESTS=1 (``.ci/run`` as root), a root-only test that
    skips is a failure: CI must run the NAT lab, not quietly leave it out."""
    outcome = yield
    report = outcome.get_result()
    required = os.environ.get("PEERLEARN_REQUIRE_ROOT_TESTS") == "1"
    if required and report.skipped and any(item.get_closest_marker(m) for m in ROOT_MARKERS):
        report.outcome = "failed"
        report.longrepr = f"root-only test skipped although CI runs as root: {report.longrepr}"


@pytest.fixture
def one_torch_thread() -> Any:
    """Every in-process node trains on this one thread in turn: tiny models run fastest
    without intra-op threads, which only contend with each other on a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
