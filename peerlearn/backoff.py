"""Exponential backoff shared by the sans-I/O cores and the daemon."""

from __future__ import annotations

MAX_DOUBLINGS = 30  # beyond this the cap has long been reached (and the factor fits a float)


def doubling_delay(first: float, failures: int, cap: float) -> float:
    """``first`` after one failure, twice as long after each further one, at most ``cap``."""
    return min(cap, first * (1 << min(max(failures - 1, 0), MAX_DOUBLINGS)))
