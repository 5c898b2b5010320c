"""Logging: one handler of ours, libp2p's loggers routed through it, payloads never dumped."""

from __future__ import annotations

import logging
import re
import sys

MAX_LOG_MESSAGE = 500  # characters; longer messages are cut
_HEX_RUN = re.compile(r"(?:0x)?[0-9a-fA-F]{64,}")
_QUIET_LIBRARY_LOGGERS = {
    # Logs normal StreamEOF as warnings and dumps rejected values as hex.
    "libp2p.kad_dht": logging.ERROR,
    # Warns at every start about the auto-connector and health monitor.
    "libp2p.network.auto_connector": logging.WARNING,
    # Logs every failed dial as ERROR (a dead member: several a second); the caller gets the
    # error as an exception and reports it.
    "libp2p.transport.tcp.tcp": logging.CRITICAL,
    # Logs every address parse at DEBUG (thousands of lines a second in a swarm).
    "multiaddr": logging.WARNING,
}


class RedactingFilter(logging.Filter):
    """Replaces long hex runs (payload dumps) and truncates very long messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _HEX_RUN.sub(lambda m: f"<{len(m.group(0))} hex chars>", message)
        if len(redacted) > MAX_LOG_MESSAGE:
            redacted = redacted[:MAX_LOG_MESSAGE] + f"... <{len(message)} chars>"
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def reattach_library_logging(level: int = logging.WARNING) -> None:
    """Make libp2p log through our handlers (it sets ``propagate=False`` at import)."""
    library = logging.getLogger("libp2p")
    library.propagate = True
    library.setLevel(level)
    library.handlers.clear()
    for name, quiet in _QUIET_LIBRARY_LOGGERS.items():
        logging.getLogger(name).setLevel(max(quiet, level))


def configure_logging(level: str = "info") -> None:
    """Install our stderr handler on the root logger (CLI entry points only)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    reattach_library_logging(max(numeric, logging.WARNING))
