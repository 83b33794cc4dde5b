"""Structured (JSON lines) logs for the ranks of a gang.

A rank is a plain Ray actor, outside Serve's logging setup, so it gets its own handler: one JSON object
per line on stderr (Ray stores it in the session's ``worker-*.err`` files and forwards it to the driver)
with the rank, its replica's gang and, for per-request lines, ``request_id`` — the same id the ingress
and the server log (``<cmpl|chatcmpl>-<Serve request id>``). Prompt and output text is never logged.
"""

from __future__ import annotations

import json
import logging
import time

_FIELDS = ("rank", "world_size", "request_id", "request_ids")


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict):
        super().__init__()
        self.static = static

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage(), **self.static}
        entry.update({k: getattr(record, k) for k in _FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_rank_logging(rank: int, world_size: int, level: int = logging.INFO) -> None:
    """Send the ``raytp`` loggers of this process to stderr as JSON lines tagged with the rank (idempotent)."""
    log = logging.getLogger("raytp")
    for h in list(log.handlers):
        if isinstance(h.formatter, JsonFormatter):
            log.removeHandler(h)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter({"rank": rank, "world_size": world_size}))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


class ClientErrorFilter(logging.Filter):
    """Serve logs every exception a replica's method raises as ``ERROR Request failed.`` with a traceback.
    An error that is the client's (a ``RaytpError`` with a 4xx status: bad input, unknown model, queue full)
    is no server fault: it becomes one INFO line without a traceback. Server faults stay ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info:
            return True
        from raytp.errors import RaytpError

        err = record.exc_info[1]
        err = err if isinstance(err, RaytpError) else getattr(err, "cause", None)
        if isinstance(err, RaytpError) and err.status_code < 500:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "Request failed: %s (%d): %s", (type(err).__name__, err.status_code, err.message)
            record.exc_info = record.exc_text = None
        return True


def quiet_client_errors() -> None:
    """Install ``ClientErrorFilter`` on Serve's replica logger in this process (idempotent)."""
    log = logging.getLogger("ray.serve")
    if not any(isinstance(f, ClientErrorFilter) for f in log.filters):
        log.addFilter(ClientErrorFilter())
