"""Logging setup: module loggers, one format, job/study context from contextvars.

Ordinary logs never carry patient names, IDs or birth dates; identifiers of studies
and series (UIDs) are fine and are what an admin greps for.
"""

from __future__ import annotations

import contextvars
import logging
import sys

job_context: contextvars.ContextVar[str] = contextvars.ContextVar("job_context", default="")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = job_context.get()
        record.context = f" [{ctx}]" if ctx else ""
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s%(context)s: %(message)s"))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
