"""The daemon's trust boundary: who may open which stream, and what happens to a peer
whose input we reject (the host's ``PeerGate``). Only the daemon shell knows the gate;
the swarm service is plugged in as ``is_member`` and ``introduce``.

Every rejected input is counted by kind (``status`` shows the counts), scored against the
peer (``PeerConduct``), and logged at most once per peer per ``LOG_EVERY`` seconds, so a
flood cannot flood the log either. A banned peer is disconnected and refused. Protocols
in ``members_only`` are refused, unread, to peers the swarm has not admitted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from peerlearn.errors import Offence
from peerlearn.gossip.conduct import PeerConduct, Verdict

logger = logging.getLogger(__name__)

LOG_EVERY = 10.0  # seconds between log lines about one peer
INTRODUCTION_TIMEOUT = 5.0  # seconds to learn whether an unknown peer is a member
MAX_LOGGED_PEERS = 1024  # peers whose last log line time is remembered


class Boundary:
    """Admission, conduct and bans for one daemon (a ``PeerGate``)."""

    def __init__(self, clock: Callable[[], float], conduct: PeerConduct | None = None) -> None:
        self.clock = clock
        self.conduct = conduct or PeerConduct()
        self.is_member: Callable[[str], bool] | None = None  # None: everyone may talk to us
        self.members_only: frozenset[str] = frozenset()
        # Learns whether a peer is a member (the swarm's anti-entropy pull from it).
        self.introduce: Callable[[str], Awaitable[None]] | None = None
        self._introductions: dict[str, trio.Event] = {}
        self.refused_banned = 0
        self._last_logged: OrderedDict[str, float] = OrderedDict()

    def banned(self, peer_id: str) -> bool:
        if self.conduct.banned(peer_id, self.clock()):
            self.refused_banned += 1
            return True
        return False

    async def admits(self, peer_id: str, protocol: str) -> bool:
        """A peer we do not know as a member yet is asked to introduce itself first (one
        anti-entropy pull, which starts with its member record) before it is refused."""
        is_member = self.is_member
        if self.banned(peer_id):
            return False
        if protocol not in self.members_only or is_member is None or is_member(peer_id):
            return True
        if self.introduce is not None:
            pending = self._introductions.get(peer_id)
            if pending is None:
                pending = self._introductions[peer_id] = trio.Event()
                try:
                    with trio.move_on_after(INTRODUCTION_TIMEOUT):
                        await self.introduce(peer_id)
                finally:
                    del self._introductions[peer_id]
                    pending.set()
            else:
                await pending.wait()
            if is_member(peer_id):
                return True
        self.rejected(peer_id, Offence.NOT_MEMBER, f"{protocol} stream from a non-member")
        return False

    def rejected(self, peer_id: str, offence: Offence, detail: str) -> bool:
        now = self.clock()
        verdict = self.conduct.offence(peer_id, offence, now)
        banned = verdict is Verdict.BANNED
        if banned:
            logger.warning("banned %s (%s: %s)", peer_id, offence, detail)
        elif self._may_log(peer_id, now):
            logger.info("rejected input from %s (%s): %s", peer_id, offence, detail)
        return banned

    def _may_log(self, peer_id: str, now: float) -> bool:
        last = self._last_logged.pop(peer_id, None)
        if last is not None and now - last < LOG_EVERY:
            self._last_logged[peer_id] = last
            return False
        self._last_logged[peer_id] = now
        while len(self._last_logged) > MAX_LOGGED_PEERS:
            self._last_logged.popitem(last=False)
        return True

    def status(self) -> dict[str, Any]:
        return {**self.conduct.status(self.clock()), "refused_banned": self.refused_banned}
