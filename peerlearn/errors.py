"""Error hierarchy.

Two families, as in h11: ``LocalProtocolError`` means *we* (the caller, the local
configuration) did something wrong; ``RemoteProtocolError`` means a *peer* sent
something invalid. Decoders only ever raise ``RemoteProtocolError``.
"""

from __future__ import annotations


class PeerlearnError(Exception):
    """Base class of every error peerlearn raises on purpose."""


class LocalProtocolError(PeerlearnError):
    """We misused an API or were misconfigured (our bug or the operator's)."""


class ConfigError(LocalProtocolError):
    """The configuration (defaults, TOML file, environment or flags) is invalid."""


class DataDirLockedError(LocalProtocolError):
    """Another daemon already owns this data directory."""


class RemoteProtocolError(PeerlearnError):
    """A peer sent bytes or a message that we reject (malformed, forged, replayed, too big)."""


class NetworkError(PeerlearnError):
    """A peer could not be reached or a connection/stream broke underneath us."""


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
