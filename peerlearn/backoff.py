"""Exponential backoff shared by the sans-I/O cores and the daemon."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_DOUBLINGS = 30  # beyond this the cap has long been reached (and the factor fits a float)


def doubling_delay(first: float, failures: int, cap: float) -> float:
    """``first`` after one failure, twice as long after each further one, at most ``cap``."""
    return min(cap, first * (1 << min(max(failures - 1, 0), MAX_DOUBLINGS)))


@dataclass
class Backoff:
    """When to try a peer again after failures: ``first`` seconds, doubling per failure up
    to ``cap`` (a dead peer is not tried every half second)."""

    first: float
    cap: float
    failures: dict[str, tuple[int, float]] = field(default_factory=dict)  # peer: (n, retry at)

    def due(self, peer: str, now: float) -> bool:
        return now >= self.failures.get(peer, (0, now))[1]

    def failed(self, peer: str, now: float) -> None:
        n = self.failures.get(peer, (0, now))[0] + 1
        self.failures[peer] = (n, now + doubling_delay(self.first, n, self.cap))

    def reset(self, peer: str) -> None:
        """It answered (or changed its addresses): try it at once next time."""
        self.failures.pop(peer, None)

    @property
    def unreachable(self) -> set[str]:
        """Peers whose last try failed."""
        return set(self.failures)
