"""Logging to stderr, as text or one JSON object a line: journald and kubectl logs read both.

Master and workers share the stream; every line carries the pid and role so a reader can
follow one worker's life through the interleaving.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

ROLE = {"name": "master"}


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = ROLE["name"]
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "pid": record.process,
            "role": getattr(record, "role", ROLE["name"]),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class JournalFormatter(logging.Formatter):
    """Under journald: it adds time and unit[pid] itself, and reads the level from a
    `<N>` syslog prefix (SyslogLevelPrefix=yes), so `journalctl -p err` works."""

    PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(role)s pid %(process)d: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s hello-cluster[%(process)d] %(role)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own start/stop chatter repeats what our lifecycle lines say.
    logging.getLogger("uvicorn.error").setLevel("DEBUG" if level == "debug" else "WARNING")
    logging.getLogger("uvicorn.access").disabled = True
