"""The node's data directory: exclusive lock, well-known file names, atomic writes."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peerlearn.buffers import Body, chunks
from peerlearn.errors import ConfigError, DataDirLockedError

LOCK_FILE = "node.lock"
CONTROL_SOCKET = "control.sock"
ADDRS_FILE = "addrs.json"
RECEIVED_DIR = "received"
MAX_UNIX_SOCKET_PATH = 107  # bytes, Linux sun_path minus the terminator


def atomic_write_bytes(path: Path, data: Body) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks(data, 1 << 24):
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2).encode() + b"\n")


class DataDir:
    """Paths inside one node's data directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def control_socket(self) -> Path:
        return self.root / CONTROL_SOCKET

    @property
    def addrs_file(self) -> Path:
        return self.root / ADDRS_FILE

    @property
    def received_dir(self) -> Path:
        return self.root / RECEIVED_DIR

    def create(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.received_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create data dir {self.root}: {exc}") from exc
        if len(os.fsencode(self.control_socket)) > MAX_UNIX_SOCKET_PATH:
            raise ConfigError(
                f"data dir path {self.root} is too long for a Unix control socket; "
                "choose a shorter --data-dir"
            )

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the exclusive lock for this daemon's lifetime."""
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise DataDirLockedError(
                    f"another peerlearn daemon (pid {holder}) is already running with data dir "
                    f"{self.root}; stop it with `peerlearn node stop --data-dir {self.root}` "
                    "or choose another --data-dir"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)
