"""What each swarm-state record may hold (checked before a signature is even verified).

A peer owns one record of each name; these are their shapes:

``member``     ``{"addrs": [multiaddr, ...], "invite": bytes?, "pow": bytes?}``  (up to 8
               addresses; ``pow``: the proof-of-work nonce, see ``admission``)
``heartbeat``  ``{"t": unix time}``
``round``      ``{"round": int}``
``model``      ``{"version": int, "sha256": hex str}``
``metrics``    ``{name: number, ...}``  (up to 16 finite numbers, e.g. accuracy and round)
"""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet
from typing import Any

from peerlearn.errors import RemoteProtocolError

RECORD_NAMES = ("member", "heartbeat", "round", "model", "metrics")
MAX_ADDRS = 8
MAX_ADDR_LENGTH = 256  # characters
MAX_INVITE_BYTES = 512
MAX_POW_NONCE = 16  # bytes
MAX_METRICS = 16
MAX_METRIC_NAME = 32  # characters
MAX_ROUND = 2**62


def _number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) < 2**62
    )


def _fields(
    value: Any, required: AbstractSet[str], optional: AbstractSet[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"record value must be a map, got {type(value).__name__}")
    keys = set(value) if all(isinstance(k, str) for k in value) else None
    if keys is None or not required <= keys <= required | optional:
        raise RemoteProtocolError(f"record value must have the keys {sorted(required)}")
    return value


def _member(value: Any) -> None:
    fields = _fields(value, {"addrs"}, {"invite", "pow"})
    addrs = fields["addrs"]
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
        raise RemoteProtocolError(f"member addrs must be a list of at most {MAX_ADDRS}")
    for addr in addrs:
        if not isinstance(addr, str) or not 0 < len(addr) <= MAX_ADDR_LENGTH:
            raise RemoteProtocolError("member addrs must be multiaddr strings")
    invite = fields.get("invite")
    if invite is not None and (not isinstance(invite, bytes) or len(invite) > MAX_INVITE_BYTES):
        raise RemoteProtocolError("member invite must be bytes")
    nonce = fields.get("pow")
    if nonce is not None and (not isinstance(nonce, bytes) or len(nonce) > MAX_POW_NONCE):
        raise RemoteProtocolError(f"member pow must be at most {MAX_POW_NONCE} bytes")


def _heartbeat(value: Any) -> None:
    if not _number(_fields(value, {"t"})["t"]):
        raise RemoteProtocolError("heartbeat t must be a number")


def _round(value: Any) -> None:
    round_ = _fields(value, {"round"})["round"]
    if not isinstance(round_, int) or isinstance(round_, bool) or not 0 <= round_ < MAX_ROUND:
        raise RemoteProtocolError("round must be a non-negative integer")


def _model(value: Any) -> None:
    fields = _fields(value, {"version", "sha256"})
    version, digest = fields["version"], fields["sha256"]
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < MAX_ROUND:
        raise RemoteProtocolError("model version must be a non-negative integer")
    if not isinstance(digest, str) or len(digest) != 64:
        raise RemoteProtocolError("model sha256 must be 64 hex characters")
    try:
        bytes.fromhex(digest)
    except ValueError:
        raise RemoteProtocolError("model sha256 must be 64 hex characters") from None


def _metrics(value: Any) -> None:
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise RemoteProtocolError(f"metrics must be a map of at most {MAX_METRICS} numbers")
    for name, number in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME:
            raise RemoteProtocolError("metric names must be short strings")
        if not _number(number):
            raise RemoteProtocolError(f"metric {name!r} must be a finite number")


_CHECKS = {
    "member": _member,
    "heartbeat": _heartbeat,
    "round": _round,
    "model": _model,
    "metrics": _metrics,
}


def check_record(name: str, value: Any) -> None:
    """Raise ``RemoteProtocolError`` unless ``value`` is a valid ``name`` record."""
    check = _CHECKS.get(name)
    if check is None:
        raise RemoteProtocolError(f"unknown record {name!r}")
    check(value)
