"""Structured logs: one line per event in both formats, whatever the event carries."""

from __future__ import annotations

import io
import json
import logging

import pytest
from softgate.logging import configure, get_logger


@pytest.fixture()
def restore_handlers():
    """configure() rewires these loggers (handlers, level, propagation); put them back, or
    later tests' caplog, which listens at the root, hears nothing."""
    names = ("softgate", "uvicorn", "uvicorn.error", "uvicorn.access")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def _events(fmt: str) -> list[str]:
    out = io.StringIO()
    configure(fmt, "INFO", stream=out)
    log = get_logger("test")
    log.info("grpc_listening", address="127.0.0.1:50051", tls=False, note="two words")
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        log.error("rpc_internal_error", rpc="ComputeLoss", exc_info=True)
    logging.getLogger("softgate.test").warning("compile failed (%s); eager", "line 1\nline 2")
    return out.getvalue().splitlines()


def test_text_logs_are_one_line_per_event(restore_handlers) -> None:
    lines = _events("text")
    assert len(lines) == 3, lines
    assert lines[0].split()[1:4] == ["INFO", "softgate.test", "grpc_listening"]
    assert 'address=127.0.0.1:50051 tls=false note="two words"' in lines[0]
    assert " rpc=ComputeLoss exc=" in lines[1]
    exc = json.loads(lines[1].split(" exc=", 1)[1])  # the traceback, escaped and quoted
    assert exc.startswith("Traceback") and exc.endswith("ValueError: first line\nsecond line")
    assert "compile failed (line 1\\nline 2); eager" in lines[2]


def test_json_logs_are_one_object_per_line(restore_handlers) -> None:
    docs = [json.loads(line) for line in _events("json")]
    assert [d["event"] for d in docs] == [
        "grpc_listening",
        "rpc_internal_error",
        "compile failed (line 1\nline 2); eager",
    ]
    assert docs[0]["address"] == "127.0.0.1:50051" and docs[0]["tls"] is False
    assert docs[1]["rpc"] == "ComputeLoss" and "ValueError: first line\nsecond line" in docs[1]["exc"]
