"""Checkpoints that never lose progress silently.

A checkpoint file is ``MAGIC + sha256(payload) + payload``. Saving writes a new file
atomically and keeps the one before as ``<name>.prev``; loading takes the newest file whose
checksum and content are valid, says so when it had to fall back to the previous one, and
refuses to start (``CheckpointError``, one line naming both files and why) when neither can
be used, unless the operator asks to start fresh (``discard``: the files are moved aside,
not deleted).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from peerlearn.buffers import Body, Segments, chunks, sha256
from peerlearn.errors import ConfigError, PeerlearnError
from peerlearn.node.datadir import atomic_write_bytes

logger = logging.getLogger(__name__)

MAGIC = b"PLCKPT1\n"
_DIGEST = 32  # bytes of sha256
T = TypeVar("T")


class CheckpointError(ConfigError):
    """No usable checkpoint although one exists (or its content is invalid)."""


@dataclass(frozen=True)
class Loaded(Generic[T]):
    value: T
    path: Path
    fell_back: bool  # the latest was unusable; this is the previous one


class CheckpointStore:
    """The latest and the previous checkpoint of one node, in its data directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.previous = path.with_name(path.name + ".prev")

    def save(self, payload: Body) -> None:
        """Write ``payload`` as the latest checkpoint (never joined into one copy); the
        latest so far becomes previous."""
        tmp = self.path.with_name(f".{self.path.name}.new")
        atomic_write_bytes(tmp, Segments([MAGIC, sha256(payload), *chunks(payload, 1 << 24)]))
        if self.path.exists():
            os.replace(self.path, self.previous)
        os.replace(tmp, self.path)

    def load(self, decode: Callable[[bytes], T]) -> Loaded[T] | None:
        """The newest usable checkpoint, decoded; None when there is none at all.

        ``decode`` turns a verified payload into a value and raises any ``PeerlearnError``
        (or ``ValueError``) for content it cannot use.
        """
        problems = []
        for path in (self.path, self.previous):
            if not path.exists():
                continue
            try:
                value = decode(self._verified_payload(path))
            except (OSError, PeerlearnError, ValueError) as exc:
                problems.append(f"{path.name}: {exc}")
                continue
            if path == self.previous and problems:
                logger.warning(
                    "latest checkpoint unusable (%s); resuming from the previous one", problems[0]
                )
            return Loaded(value, path, fell_back=bool(problems))
        if problems:
            raise CheckpointError(
                f"cannot resume from the checkpoints in {self.path.parent} "
                f"({'; '.join(problems)}); start with --fresh to set them aside and begin anew"
            )
        return None

    def _verified_payload(self, path: Path) -> bytes:
        data = path.read_bytes()
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _DIGEST:
            raise CheckpointError("not a peerlearn checkpoint")
        digest = data[len(MAGIC) : len(MAGIC) + _DIGEST]
        payload = data[len(MAGIC) + _DIGEST :]
        if hashlib.sha256(payload).digest() != digest:
            raise CheckpointError("checksum mismatch (the file is damaged)")
        return payload

    def discard(self) -> list[Path]:
        """Move both checkpoints aside (``*.discarded-<unix time>``); returns where to."""
        moved = []
        stamp = int(time.time())
        for path in (self.path, self.previous):
            if path.exists():
                target = path.with_name(f"{path.name}.discarded-{stamp}")
                os.replace(path, target)
                moved.append(target)
        return moved
