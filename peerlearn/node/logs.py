"""Logging: one handler of ours, libp2p's loggers routed through it, payloads never dumped."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

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


# What the CLI's --log-level chose for libp2p's own loggers: all of it at debug, else only
# critical messages (its ERROR lines and tracebacks are the library's; what they mean for the
# node is counted and reported by our code in plain words). Embedded use leaves WARNING.
_library_level = logging.WARNING


def reattach_library_logging() -> None:
    """Make libp2p log through our handlers (it sets ``propagate=False`` at import)."""
    library = logging.getLogger("libp2p")
    library.propagate = True
    level = _library_level
    library.setLevel(level)
    library.handlers.clear()
    for name, quiet in _QUIET_LIBRARY_LOGGERS.items():
        logging.getLogger(name).setLevel(max(quiet, level))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message[, error]."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """Install our stderr handler on the root logger (CLI entry points only)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter(TEXT_FORMAT, "%Y-%m-%d %H:%M:%S")
    )
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    global _library_level
    _library_level = logging.DEBUG if numeric <= logging.DEBUG else logging.CRITICAL
    reattach_library_logging()
