"""Sans-I/O NAT traversal decisions: reachability verdicts, when to hole punch, which path a
model blob may take. The daemon feeds in observations and the current time; nothing here
does I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"
MAX_PUNCH_ATTEMPTS = 3  # DCUtR spec: retry twice before giving up
PUNCH_BACKOFF = 2.0  # seconds between attempts to one peer
PUNCH_RETRY_AFTER_FAIL = 300.0  # seconds before a peer that exhausted its attempts is retried
# Of each pair the peer with the smaller ID starts DCUtR; two sessions at once (one from each
# side) make both ends dial as "responder" and "initiator" together and the punch fails. The
# other side starts its own only if the pair is still relayed this long (the smaller one may
# not punch at all, e.g. --no-nat-traversal).
FOLLOWER_GRACE = 20.0  # seconds
MAX_VERDICTS = 8  # distinct servers remembered


class Reachability:
    """AutoNAT-style verdicts ("did server S reach us by dialing back?") -> one status.

    The most recent verdict of each distinct server counts once; the majority decides and a
    tie is ``unknown``. One server is enough on a small swarm, more outvote a liar.
    """

    def __init__(self) -> None:
        self._verdicts: dict[str, bool] = {}

    def record(self, server: str, reachable: bool) -> None:
        self._verdicts.pop(server, None)
        self._verdicts[server] = reachable
        while len(self._verdicts) > MAX_VERDICTS:
            del self._verdicts[next(iter(self._verdicts))]

    @property
    def status(self) -> str:
        yes = sum(self._verdicts.values())
        no = len(self._verdicts) - yes
        return PUBLIC if yes > no else PRIVATE if no > yes else UNKNOWN

    @property
    def servers(self) -> int:
        return len(self._verdicts)


@dataclass
class _PeerPath:
    first_relayed: float | None = None
    attempts: int = 0
    last_attempt: float = float("-inf")
    in_progress: bool = False
    direct_after: float | None = None  # seconds from first relayed sight to direct
    gave_up_at: float | None = None


@dataclass
class PathTracker:
    """Per peer: relayed or direct, hole-punch attempts, and who to punch next.

    ``local_peer`` is our peer ID: we lead the punch to peers whose ID is larger.
    """

    local_peer: str = ""
    peers: dict[str, _PeerPath] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    successes: int = 0
    failures: int = 0

    def observe(self, paths: dict[str, str], now: float) -> list[str]:
        """Take the current ``{peer: "direct"|"relayed"}``; returns the peers to punch now."""
        self.paths = dict(paths)
        due = []
        for peer, path in paths.items():
            state = self.peers.setdefault(peer, _PeerPath())
            if path == "direct":
                if state.first_relayed is not None and state.direct_after is None:
                    state.direct_after = now - state.first_relayed
                continue
            if state.first_relayed is None:
                state.first_relayed = now
            if state.gave_up_at is not None:
                if now - state.gave_up_at < PUNCH_RETRY_AFTER_FAIL:
                    continue
                state.gave_up_at, state.attempts = None, 0
            leader = self.local_peer < peer or now - state.first_relayed >= FOLLOWER_GRACE
            if leader and not state.in_progress and now - state.last_attempt >= PUNCH_BACKOFF:
                state.in_progress = True
                state.attempts += 1
                state.last_attempt = now
                due.append(peer)
        for gone in set(self.peers) - set(paths):
            del self.peers[gone]
        return due

    def punched(self, peer: str, direct: bool, now: float) -> None:
        """The outcome of one attempt started for ``peer``."""
        state = self.peers.setdefault(peer, _PeerPath())
        state.in_progress = False
        if direct:
            self.successes += 1
            if state.first_relayed is not None and state.direct_after is None:
                state.direct_after = now - state.first_relayed
            self.paths[peer] = "direct"
        elif state.attempts >= MAX_PUNCH_ATTEMPTS:
            self.failures += 1
            state.gave_up_at = now

    def summary(self) -> dict[str, object]:
        direct = sorted(p for p, path in self.paths.items() if path == "direct")
        relayed = sorted(p for p, path in self.paths.items() if path == "relayed")
        return {
            "direct_peers": len(direct),
            "relayed_peers": len(relayed),
            "relayed_only": [p for p in relayed if self.peers.get(p, _PeerPath()).gave_up_at],
            "hole_punch_successes": self.successes,
            "hole_punch_failures": self.failures,
            "seconds_to_direct": {
                p: round(s.direct_after, 3)
                for p, s in sorted(self.peers.items())
                if s.direct_after is not None
            },
        }


def blob_path_allowed(path: str | None, relay_blobs: bool) -> bool:
    """May a model blob go to a peer reached over ``path``? Relays carry small messages;
    bulk models go direct unless the operator allowed relaying them."""
    return path != "relayed" or relay_blobs
