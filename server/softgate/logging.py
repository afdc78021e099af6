"""Structured logs: one line per event, as `key=value` text or as one JSON object.

    from softgate.logging import configure, get_logger
    configure("json", "INFO")
    log = get_logger("grpc")
    log.info("grpc_listening", address="127.0.0.1:50051", tls=False)

prints `{"ts": "...", "level": "info", "logger": "softgate.grpc", "event": "grpc_listening",
"address": "127.0.0.1:50051", "tls": false}`. uvicorn's loggers are routed through the same
handler. Secrets are never passed to a log call (settings are logged via `redacted()`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {"message", "asctime"}
_HANDLER_NAME = "softgate-structured"


def _ts(created: float) -> str:
    t = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(created % 1 * 1000):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = getattr(record, "fields", None)
    out = dict(extra) if isinstance(extra, dict) else {}
    for k, v in vars(record).items():
        if k not in _RESERVED and k not in ("fields", "color_message") and not k.startswith("_"):
            out.setdefault(k, v)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for k, v in _fields(record).items():
            doc.setdefault(k, v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def _text_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False)
    if isinstance(v, str) and (not s or any(c in s for c in ' ="\n')):
        s = json.dumps(s, ensure_ascii=False)
    return s


class TextFormatter(logging.Formatter):
    """`<ts> <LEVEL> <logger> <event> key=value ...`, one line per event: a traceback is the
    last field, `exc="..."`, its newlines escaped (log shippers split events at newlines)."""

    def format(self, record: logging.LogRecord) -> str:
        event = record.getMessage().replace("\n", "\\n")  # (e.g. a compiler's error text)
        parts = [_ts(record.created), record.levelname, record.name, event]
        parts += [f"{k}={_text_value(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={_text_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class EventLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """`log.info("event", key=value, ...)`: keyword arguments become the event's fields."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        std = {k: kwargs.pop(k) for k in ("exc_info", "stack_info", "stacklevel", "extra") if k in kwargs}
        extra = dict(std.pop("extra", None) or {})
        extra["fields"] = {**extra.get("fields", {}), **kwargs}
        std["extra"] = extra
        return msg, std


def get_logger(name: str) -> EventLogger:
    full = name if name.startswith("softgate") else f"softgate.{name}"
    return EventLogger(logging.getLogger(full), {})


def configure(log_format: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Install the one handler on the `softgate` and uvicorn loggers (idempotent)."""
    fmt: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(fmt)
    lvl = getattr(logging, str(level).upper(), logging.INFO)
    for name in ("softgate", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if h.get_name() == _HANDLER_NAME or name.startswith("uvicorn"):
                lg.removeHandler(h)
        lg.addHandler(handler)
        lg.setLevel(lvl)
        lg.propagate = False
    # request lines of the admin API are noise next to the metrics; keep them at debug
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.addHandler(handler)
    access.setLevel(max(lvl, logging.WARNING))
    access.propagate = False
