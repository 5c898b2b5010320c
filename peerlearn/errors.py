"""Error hierarchy.

Two families, as in h11: ``LocalProtocolError`` means *we* (the caller, the local
configuration) did something wrong; ``RemoteProtocolError`` means a *peer* sent
something invalid. Decoders only ever raise ``RemoteProtocolError``.
"""

from __future__ import annotations

import enum


class Offence(enum.StrEnum):
    """What a peer did wrong, for counting and scoring (``peerlearn.gossip.conduct``)."""

    MALFORMED = "malformed"  # undecodable bytes or a schema violation
    FORGED = "forged"  # a bad signature, or signed by someone else than the sender
    REPLAYED = "replayed"  # a replayed, stale or future-dated message or record
    NOT_MEMBER = "not a member"  # input from a peer the swarm has not admitted
    OVERSIZED = "oversized"  # more bytes, items or streams than allowed
    BAD_MODEL = "bad model"  # non-finite values, wrong layout, or an update norm over the bound
    TOO_SLOW = "too slow"  # idle or below the minimum transfer rate
    LIBRARY_ERROR = "library error"  # input that made the networking library fail


class PeerlearnError(Exception):
    """Base class of every error peerlearn raises on purpose."""


class LocalProtocolError(PeerlearnError):
    """We misused an API or were misconfigured (our bug or the operator's)."""


class ConfigError(LocalProtocolError):
    """The configuration (defaults, TOML file, environment or flags) is invalid."""


class DataDirLockedError(LocalProtocolError):
    """Another daemon already owns this data directory."""


class RemoteProtocolError(PeerlearnError):
    """A peer sent bytes or a message that we reject (malformed, forged, replayed, too big).

    ``offence`` says what kind of misbehaviour it was, so the peer can be scored for it.
    """

    def __init__(self, message: str, offence: Offence = Offence.MALFORMED) -> None:
        super().__init__(message)
        self.offence = offence


class NetworkError(PeerlearnError):
    """A peer could not be reached or a connection/stream broke underneath us."""


class ProtocolUnsupportedError(NetworkError):
    """The peer does not serve the protocol we asked for (it is not that kind of node)."""


class TransferTooSlowError(NetworkError):
    """A peer stopped sending, or sent slower than the minimum rate we accept."""


class ControlError(PeerlearnError):
    """The local control API could not be reached or answered with an error."""


def unwrap_group(error: BaseException) -> BaseException:
    """The first ``PeerlearnError`` inside (nested) exception groups, else ``error`` itself."""
    while isinstance(error, BaseExceptionGroup):
        matched, _ = error.split(PeerlearnError)
        if matched is None:
            return error
        error = matched.exceptions[0]
    return error
