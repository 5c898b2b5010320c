"""How peers behave: every input we reject is an offence of a declared kind (sans-I/O).

Each offence adds its weight to the peer's score, which halves every ``half_life`` seconds,
so an honest peer's rare mishap (a message that went stale on the way, a transfer slowed by
a busy machine) fades, while a peer that keeps sending garbage crosses ``ban_score`` and is
banned: disconnected and refused for ``ban_seconds``, twice as long at every further ban.
Memory is bounded: at most ``max_peers`` peers are tracked (the lowest scores are forgotten
first), and the counts per offence are totals for ``status``.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import dataclass, field

from peerlearn.backoff import doubling_delay
from peerlearn.errors import Offence

WEIGHTS: dict[Offence, float] = {
    Offence.MALFORMED: 4.0,
    Offence.FORGED: 10.0,
    Offence.REPLAYED: 1.0,
    Offence.NOT_MEMBER: 2.0,
    Offence.OVERSIZED: 4.0,
    Offence.BAD_MODEL: 5.0,
    Offence.TOO_SLOW: 2.0,
    Offence.LIBRARY_ERROR: 4.0,
}


class Verdict(enum.Enum):
    TOLERATED = "tolerated"  # counted; the peer stays
    BANNED = "banned"  # disconnect now and refuse it until the ban ends


@dataclass(frozen=True)
class ConductSettings:
    ban_score: float = 20.0  # score at which a peer is banned
    half_life: float = 60.0  # seconds for a score to halve
    ban_seconds: float = 600.0  # first ban; doubles per further ban
    max_ban_seconds: float = 86_400.0
    max_peers: int = 10_000  # peers tracked at once


@dataclass
class _Record:
    score: float = 0.0
    updated: float = 0.0
    bans: int = 0
    banned_until: float = float("-inf")


@dataclass
class PeerConduct:
    """Scores, bans and offence counts of every peer we heard from."""

    settings: ConductSettings = field(default_factory=ConductSettings)
    counts: Counter[Offence] = field(default_factory=Counter)
    bans_total: int = 0
    _peers: dict[str, _Record] = field(default_factory=dict)

    def _decayed(self, record: _Record, now: float) -> float:
        elapsed = max(now - record.updated, 0.0)
        return record.score * math.pow(0.5, elapsed / self.settings.half_life)

    def offence(self, peer: str, offence: Offence, now: float, weight: float = 1.0) -> Verdict:
        """Count ``offence`` by ``peer``; ``BANNED`` when the peer must go now."""
        self.counts[offence] += 1
        record = self._peers.get(peer)
        if record is None:
            self._make_room(now)
            record = self._peers[peer] = _Record(updated=now)
        record.score = self._decayed(record, now) + WEIGHTS[offence] * weight
        record.updated = now
        if record.score < self.settings.ban_score or now < record.banned_until:
            return Verdict.TOLERATED if now >= record.banned_until else Verdict.BANNED
        record.bans += 1
        self.bans_total += 1
        record.score = 0.0
        duration = doubling_delay(
            self.settings.ban_seconds, record.bans, self.settings.max_ban_seconds
        )
        record.banned_until = now + duration
        return Verdict.BANNED

    def banned(self, peer: str, now: float) -> bool:
        record = self._peers.get(peer)
        return record is not None and now < record.banned_until

    def banned_peers(self, now: float) -> list[str]:
        return sorted(p for p, r in self._peers.items() if now < r.banned_until)

    def score(self, peer: str, now: float) -> float:
        record = self._peers.get(peer)
        return 0.0 if record is None else self._decayed(record, now)

    def _make_room(self, now: float) -> None:
        if len(self._peers) < self.settings.max_peers:
            return

        # Forget the tenth with the lowest scores; peers banned right now go last, those whose
        # ban ends soonest first.
        def rank(peer: str) -> tuple[bool, float, float]:
            record = self._peers[peer]
            banned = now < record.banned_until
            return banned, record.banned_until if banned else 0.0, self._decayed(record, now)

        ranked = sorted(self._peers, key=rank)
        for peer in ranked[: max(1, len(self._peers) // 10)]:
            del self._peers[peer]

    def status(self, now: float) -> dict[str, object]:
        return {
            "rejected": {o.value: self.counts[o] for o in Offence if self.counts[o]},
            "rejected_total": sum(self.counts.values()),
            "bans_total": self.bans_total,
            "banned_now": self.banned_peers(now),
        }
