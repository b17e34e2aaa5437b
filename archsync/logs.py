"""Structured logging: one JSON object a line on stderr (``ARCHSYNC_LOG_FORMAT=text`` for humans)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Render a record and the ``extra=`` fields given to it as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def configure_logging(level: str | None = None) -> None:
    """Send archsync's logs to stderr, as JSON unless ``ARCHSYNC_LOG_FORMAT=text``."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("ARCHSYNC_LOG_FORMAT", "json") == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("ARCHSYNC_LOG_LEVEL", "INFO")).upper())
    for noisy in ("aiokafka", "kafka", "mode", "faust"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
