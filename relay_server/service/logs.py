"""Structured logs: every record carries the id of the session it was logged for.

    configure_logging("json", "INFO")     # the root logger, to stderr, one JSON object per line

A session's tasks run with relay_server.session.session.current_session_id set (Session.start()
sets it around the task it creates; tasks copy the context they are created in), so
SessionFilter can put `session_id` on every record without any call site naming it. The decode
thread, which logs too, runs in a copy of the context of the task that started it.

Text:  2025-01-01 12:00:00,000 INFO relay_server.session.session [session=cam-1]: session cam-1: running
JSON:  {"time": "2025-01-01T12:00:00.000Z", "level": "INFO", "logger": "…", "message": "…",
        "session_id": "cam-1"}            (and "exc_info": "Traceback …" when there is one)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from relay_server.session.session import current_session_id

__all__ = [
    "JsonFormatter",
    "SessionFilter",
    "TextFormatter",
    "configure_logging",
    "current_session_id",
    "make_handler",
]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(session_tag)s: %(message)s"


class SessionFilter(logging.Filter):
    """Sets `record.session_id` (None outside a session) and `record.session_tag`
    (" [session=ID]", or "" outside a session). Passes every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) is None:  # a caller's extra={"session_id": …} wins
            record.session_id = current_session_id.get()
        session_id = getattr(record, "session_id", None)
        record.session_tag = f" [session={session_id}]" if session_id else ""
        return True


class TextFormatter(logging.Formatter):
    """One line per record, `[session=ID]` after the logger name on a session's records."""

    def __init__(self, fmt: str = TEXT_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "session_tag"):  # a handler without SessionFilter
            SessionFilter().filter(record)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601, milliseconds), level, logger, message,
    session_id (null outside a session) and, when the record has one, exc_info (the formatted
    traceback) and stack_info."""

    def format(self, record: logging.LogRecord) -> str:
        session_id = getattr(record, "session_id", None)
        if session_id is None:
            session_id = current_session_id.get()
        entry: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "session_id": session_id,
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _utc(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def make_handler(log_format: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with SessionFilter and the formatter for
    `log_format` ("text" or "json")."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(SessionFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return handler


def configure_logging(
    log_format: str = "text", level: str | int = "INFO", stream: IO[str] | None = None
) -> logging.Handler:
    """Make the root logger log at `level` through one handler of make_handler() (replacing the
    handlers it had); returns that handler."""
    handler = make_handler(log_format, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
