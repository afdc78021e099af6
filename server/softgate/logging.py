"""Structured logs: one line per event, as `key=value` text or as one JSON object.

    from softgate.logging import configure, get_logger
    configure("json", "INFO")
    log = get_logger("grpc")
    log.info("grpc_listening", address="127.0.0.1:50051", tls=False)

prints `{"ts": "...", "level": "info", "logger": "softgate.grpc", "event": "grpc_listening",
"address": "127.0.0.1:50051", "tls": false}`. uvicorn's loggers are routed through the same
handler. Secrets are never passed to a log call (settings are logged via `redacted()`).

With JSON logs `softgate serve` also turns what native code writes to file descriptor 2
(gRPC's C-core: a failed bind, a failed TLS handshake; torch's C++ warnings; child processes)
into events of the `softgate.native` logger (`NativeStderr`), so that every line is JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import re
import sys
import threading
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


def _not_a_cancellation(record: logging.LogRecord) -> bool:
    """grpc logs a call it cancels at the grace period's end as an exception: it is not one
    (the server's own `grpc_stopping` / `grpc_stopped` events say that calls were cut). Nor is
    a status or response that could not be sent because grpc had already ended the call (its
    deadline passed while the engine computed, its client cancelled while a stream's responses
    were written; the client got DEADLINE_EXCEEDED / CANCELLED, and the call is accounted so)."""
    exc = record.exc_info[1] if record.exc_info else None
    if not record.name.startswith("grpc") or exc is None:
        return True
    if isinstance(exc, asyncio.CancelledError):
        return False
    text = str(exc)  # (a batch of send operations only: nothing was lost but what nobody reads)
    return not (type(exc).__name__ == "ExecuteBatchError" and "Send" in text and "Receive" not in text)


# asyncio logs "socket.accept() out of system resource" once for every connection its accept
# loop finds no descriptor for (2048 a pass): a burst of connections past the process's limit
# wrote ~8,000 lines, a traceback each, in 2 s (an audit). One a second tells as much.
_ACCEPT_FAILED = "socket.accept() out of system resource"
_last_accept_failure = [0.0]


def _one_accept_failure_a_second(record: logging.LogRecord) -> bool:
    if record.name != "asyncio" or not str(record.msg).startswith(_ACCEPT_FAILED):
        return True
    if record.created - _last_accept_failure[0] < 1.0:
        return False
    _last_accept_failure[0] = record.created
    return True


# uvicorn warns of every request with an Upgrade header (websocket; curl --http2's h2c), advising
# a WebSocket library the admin API does not need, and of every request that is not valid HTTP:
# whoever reaches the port, token or not, could flood the log (an audit: 600 lines for 400 requests)
_UVICORN_NOISE = (
    "Unsupported upgrade request",
    "No supported WebSocket library",
    "Invalid HTTP request received",
)


def _demote_uvicorn_noise(record: logging.LogRecord) -> bool:
    """uvicorn's warnings about a client's request (`_UVICORN_NOISE`) as DEBUG records, kept
    only where its logger logs DEBUG."""
    if record.levelno != logging.WARNING or not str(record.msg).startswith(_UVICORN_NOISE):
        return True
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_uvicorn_noise() -> None:
    """Log uvicorn's warnings about malformed or Upgrade requests at DEBUG (idempotent)."""
    logger = logging.getLogger("uvicorn.error")
    if _demote_uvicorn_noise not in logger.filters:
        logger.addFilter(_demote_uvicorn_noise)


def configure(log_format: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Install the one handler on the `softgate` and uvicorn loggers, and on the root logger
    for other libraries' warnings and errors (idempotent)."""
    fmt: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(fmt)
    handler.addFilter(_not_a_cancellation)
    handler.addFilter(_one_accept_failure_a_second)
    lvl = getattr(logging, str(level).upper(), logging.INFO)
    # grpc's, asyncio's, torch's records (the root's level, WARNING) as events too, not as
    # Python's last-resort handler writes them: a bare message, a traceback over several lines
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    root.addHandler(handler)
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


# absl's line prefix, as gRPC's C-core and torch's C++ write it: `Lmmdd hh:mm:ss.uuuuuu thread
# file:line] message` (torch's in brackets: `[W1202 ... file.cpp:83] Warning: ...`)
_NATIVE_LINE = re.compile(r"\[?([IWEF])\d{4} [\d:.]+ +\d+ ([^\]\s]+)\] ?(.*)")
_END = b"\0softgate: end of native stderr\n"
_NATIVE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


class _QuietHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The native lines' handler: a failed write is dropped, not reported on stderr (which is
    the pipe this handler's lines come from: a report would feed itself)."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class NativeStderr:
    """File descriptor 2 as a pipe that a thread reads line by line, each line one event of the
    `softgate.native` logger (`native_log` with the absl line's level, `source` and `message`;
    any other line `stderr` at warning, with the `line`); the structured handler itself writes
    to the original stderr. A line native code writes in the instant before the process aborts
    may be lost: `--log-format text` leaves stderr alone."""

    def __init__(self) -> None:
        main = logging.getLogger("softgate")
        handler = next((h for h in main.handlers if h.get_name() == _HANDLER_NAME), None)
        if not isinstance(handler, logging.StreamHandler):
            raise RuntimeError("softgate.logging.configure() first")
        self._fd = os.dup(2)  # the original stderr: where every event is written
        out = open(self._fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        handler.setStream(out)
        if faulthandler.is_enabled():  # a crash's traceback must not wait in the pipe
            faulthandler.enable(out)
        quiet = _QuietHandler(out)
        quiet.setFormatter(handler.formatter)
        quiet.lock = handler.lock  # one writer at a time, so lines never interleave
        self.logger = logging.getLogger("softgate.native")
        self.logger.handlers[:] = [quiet]
        self.logger.propagate = False
        read, write = os.pipe()
        sys.stderr.flush()
        os.dup2(write, 2)  # (inheritable: child processes write into the pipe too)
        os.close(write)
        self._thread = threading.Thread(target=self._pump, args=(read,), name="native-stderr", daemon=True)
        self._thread.start()

    def _pump(self, fd: int) -> None:
        try:
            with open(fd, "rb") as pipe:
                for raw in pipe:
                    if raw == _END:
                        return
                    with contextlib.suppress(Exception):  # one odd line must not stop the pump
                        self._emit(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        finally:  # however it ends, nothing may block on a full pipe that nobody reads
            os.dup2(self._fd, 2)

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        m = _NATIVE_LINE.match(line)
        if m is None:
            self.logger.warning("stderr", extra={"fields": {"line": line}})
            return
        level, source, message = m.groups()
        fields = {"source": source, "message": message}
        self.logger.log(_NATIVE_LEVELS[level], "native_log", extra={"fields": fields})

    def stop(self, timeout: float = 1.0) -> None:
        """Give file descriptor 2 back to the original stderr once what the pipe holds is written
        out (waiting up to `timeout`)."""
        sys.stderr.flush()
        with contextlib.suppress(OSError):  # (the pump may have ended and given fd 2 back)
            os.write(2, _END)  # every line before it is written out when the thread reaches it
        self._thread.join(timeout)
        os.dup2(self._fd, 2)
