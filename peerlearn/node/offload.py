"""Where the daemon runs CPU-heavy or blocking work: training, merges, hashing, decoding,
disk writes. Worker threads in a real node (``in_thread``); on the event loop itself in
virtual-time tests (``inline``), so that the work takes no virtual time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

T = TypeVar("T")


class Offload(Protocol):
    """Runs ``fn(*args)`` away from the event loop, like ``trio.to_thread.run_sync``."""

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


async def in_thread(fn: Callable[..., T], /, *args: Any) -> T:
    """In one of trio's worker threads."""
    return await trio.to_thread.run_sync(fn, *args)


async def inline(fn: Callable[..., T], /, *args: Any) -> T:
    """On the event loop itself (virtual-time tests)."""
    return fn(*args)
