"""How fast strangers may join: a token bucket per introducer (sans-I/O).

A member record of an owner we do not know yet is a *newcomer*. Whoever hands it to us (the
peer a sync session is with, the publisher of a gossip message, and the IP address the peer
connects from) is its *introducer*, and each introducer may bring at most ``burst``
newcomers at once and ``per_second`` after that. A newcomer over the rate is deferred, not
held against anyone: it comes again with the next anti-entropy session, so an honest swarm's
members all arrive, while one peer (or one machine) cannot add ten thousand fakes at once.
The default burst lets a node that joins learn a swarm of a thousand members from its first
peer in one session.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_BURST = 1000.0  # newcomers one introducer may bring at once
DEFAULT_PER_SECOND = 2.0  # newcomers per second after that
MAX_INTRODUCERS = 10_000  # buckets kept; the least recently used are forgotten (they refill)


@dataclass(frozen=True)
class JoinSettings:
    burst: float = DEFAULT_BURST
    per_second: float = DEFAULT_PER_SECOND


class JoinLimiter:
    """Token buckets per introducer key (a peer ID, an IP address)."""

    def __init__(self, settings: JoinSettings = JoinSettings()) -> None:
        self.settings = settings
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self.deferred = 0

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.settings.burst, now))
        return min(self.settings.burst, tokens + max(now - at, 0.0) * self.settings.per_second)

    def allow(self, introducers: Sequence[str], now: float) -> bool:
        """One newcomer from ``introducers`` (all of them must have a token, and each then
        spends one); False, and counted as deferred, if one of them is out of tokens."""
        tokens = [self._tokens(key, now) for key in introducers]
        if any(t < 1.0 for t in tokens):
            self.deferred += 1
            return False
        for key, left in zip(introducers, tokens, strict=True):
            self._buckets.pop(key, None)
            self._buckets[key] = (left - 1.0, now)
        while len(self._buckets) > MAX_INTRODUCERS:
            self._buckets.popitem(last=False)
        return True
