"""Live progress of a testnet in the terminal (rich): one row per node, refreshed each sample.

Without a terminal (CI, pipes) it prints one summary line per sample instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from peerlearn.testnet.network import Sample

PLAIN_EVERY = 5.0  # seconds between plain-text lines


class LiveView:
    def __init__(self, title: str, nodes: int) -> None:
        self.title = title
        self.nodes = nodes
        self.console = Console(file=sys.stdout)
        self.interactive = self.console.is_terminal
        self._live: Live | None = None
        self._last_plain = -PLAIN_EVERY
        self._label = title

    def __enter__(self) -> LiveView:
        if self.interactive:
            self._live = Live(console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def progress(self, result: Any, samples: list[Sample], elapsed: float) -> None:
        """``runner.Progress`` callback."""
        label = f"{self.title} / {result.label}"
        if label != self._label:  # a new run: its clock starts again at 0
            self._label, self._last_plain = label, -PLAIN_EVERY
        self.update(samples, elapsed, [what for _, what in result.events])

    def update(self, samples: list[Sample], elapsed: float, events: Sequence[str] = ()) -> None:
        if self._live is not None:
            self._live.update(self._table(samples, elapsed, events))
        elif elapsed - self._last_plain >= PLAIN_EVERY:
            self._last_plain = elapsed
            print(self._line(samples, elapsed), flush=True)

    def _line(self, samples: list[Sample], elapsed: float) -> str:
        alive = [s for s in samples if s.alive]
        accs = [s.accuracy for s in alive if s.accuracy is not None and not s.attacker]
        mean = f"{sum(accs) / len(accs):.3f}" if accs else "-"
        top = max((s.round for s in alive), default=0)
        return (
            f"[{self._label}] t={elapsed:6.1f}s  live {len(alive)}/{len(samples)}  "
            f"round {top}  honest accuracy {mean}"
        )

    def _table(self, samples: list[Sample], elapsed: float, events: Sequence[str]) -> Table:
        table = Table(title=f"{self._line(samples, elapsed)}", title_justify="left")
        for column in ("node", "state", "round", "accuracy", "members", "peers", "MB out", "RSS"):
            table.add_column(column, justify="right")
        for s in samples:
            state = "down" if not s.alive else ("attacker" if s.attacker else "up")
            table.add_row(
                str(s.node),
                state,
                str(s.round),
                "-" if s.accuracy is None else f"{s.accuracy:.3f}",
                str(s.members),
                str(s.peers),
                f"{s.bytes_out / 1e6:.1f}",
                "-" if s.rss_mb is None else f"{s.rss_mb:.0f} MiB",
            )
        if events:
            table.caption = "events: " + "; ".join(events[-4:])
        return table
