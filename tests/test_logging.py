"""Structured logs: one line per event in both formats, whatever the event carries."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from typing import Any

import pytest
from conftest import log_records
from softgate.logging import NativeStderr, configure, get_logger


@pytest.fixture()
def restore_handlers():
    """configure() rewires these loggers (handlers, level, propagation); put them back, or
    later tests' caplog, which listens at the root, hears nothing."""
    names = ("", "softgate", "uvicorn", "uvicorn.error", "uvicorn.access")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(list(lg.handlers), list(lg.filters), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, filters, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.filters[:] = filters
        lg.setLevel(level)
        lg.propagate = propagate


def _json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    """The objects of a JSON log, one a line."""
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _events(fmt: str) -> list[str]:
    out = io.StringIO()
    configure(fmt, "INFO", stream=out)
    log = get_logger("test")
    log.info("grpc_listening", address="127.0.0.1:50051", tls=False, note="two words", query="a=b")
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
    # a value with a space or an "=" is quoted, so that the line splits back unambiguously
    assert 'address=127.0.0.1:50051 tls=false note="two words" query="a=b"' in lines[0]
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
    # ts: ISO 8601 UTC to the millisecond, with a Z
    for d in docs:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", d["ts"]), d["ts"]


def test_fields_never_override_the_envelope(restore_handlers) -> None:
    """An event's own `ts` or `logger` field does not replace the record's."""
    out = io.StringIO()
    configure("json", "INFO", stream=out)
    get_logger("test").info("evt", ts="fake", logger="fake")
    (doc,) = _json_lines(out)
    assert (doc["ts"] != "fake", doc["logger"], doc["event"]) == (True, "softgate.test", "evt")


def test_level_names_are_case_insensitive(restore_handlers) -> None:
    """configure(level="debug") is DEBUG."""
    out = io.StringIO()
    configure("json", "debug", stream=out)
    get_logger("test").debug("evt")
    assert [d["event"] for d in _json_lines(out)] == ["evt"]


def test_other_libraries_records_are_events_and_grpc_cancellations_are_not(restore_handlers) -> None:
    """Found by an audit: a stream cut at the grace period's end left grpc's logging of the
    cancellation on stderr as Python's last resort writes it, a traceback over three lines.
    Only grpc's cancellations are left out: another library's is still an event."""
    out = io.StringIO()
    configure("json", "INFO", stream=out)
    try:
        raise asyncio.CancelledError()
    except asyncio.CancelledError as e:
        logging.getLogger("grpc._cython.cygrpc").exception(e)  # as grpc's aio server does
    # the status of a call grpc already ended (its deadline passed mid-compute; found by an audit)
    batch_error = type("ExecuteBatchError", (Exception,), {})
    try:
        raise batch_error('Failed "execute_batch": (<SendStatusFromServerOperation object at 0x1>,)')
    except Exception as e:
        logging.getLogger("grpc._cython.cygrpc").exception(e)
    # a stream's response written after its client cancelled (seen once in a storm; an audit)
    try:
        raise batch_error('Failed "execute_batch": (SendInitialMetadataOperation, SendMessageOperation)')
    except Exception as e:
        logging.getLogger("grpc._cython.cygrpc").exception(e)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
    logging.getLogger("asyncio").error("task cancelled", exc_info=asyncio.CancelledError())
    logging.getLogger("torch._inductor").info("below the root's WARNING: not written")
    docs = _json_lines(out)
    assert [(d["logger"], d["level"], d["event"]) for d in docs] == [
        ("asyncio", "error", "Task exception was never retrieved"),
        ("asyncio", "error", "task cancelled"),
    ]
    assert docs[0]["exc"].endswith("ValueError: boom")


def test_uvicorn_color_message_is_not_a_field(restore_handlers) -> None:
    """uvicorn's ANSI-coloured copy of a message is left out of the event."""
    out = io.StringIO()
    configure("json", "INFO", stream=out)
    logging.getLogger("uvicorn.error").info("Started", extra={"color_message": "\x1b[32mStarted\x1b[0m"})
    (doc,) = _json_lines(out)
    assert doc["event"] == "Started" and "color_message" not in doc


def test_access_lines_stay_below_warning(restore_handlers) -> None:
    """uvicorn's access lines are not written at INFO (nor at DEBUG)."""
    out = io.StringIO()
    configure("json", "DEBUG", stream=out)
    logging.getLogger("uvicorn.access").info("GET /metrics 200")
    assert out.getvalue() == ""


_NATIVE_SCRIPT = r"""
import os, subprocess, sys
from softgate.logging import NativeStderr, configure, get_logger
configure("json", "INFO")
native = NativeStderr()
get_logger("test").info("before")
os.write(2, b"E1202 13:27:17.572915   28819 add_port.cc:83] Failed to add port: Address already in use\n")
os.write(2, b"[W1202 13:27:18.000001 28819 Module.cpp:9] Warning: a torch warning\n")
os.write(2, b"I1202 13:27:19.000001 28819 ssl_transport_security.cc:2563] Handshake failed\n")
print("Traceback (most recent call last):", file=sys.stderr)
subprocess.run([sys.executable, "-c", "import sys; print('from a child', file=sys.stderr)"], check=True)
get_logger("test").info("after")
native.stop()
os.write(2, b"raw again\n")
"""


def test_native_stderr_lines_become_json_events_in_order() -> None:
    """What native code and child processes write to fd 2 (gRPC C-core's absl lines, torch's
    C++ warnings, anything else) comes out as JSON events of softgate.native, in order, and
    stop() gives fd 2 back after writing out what the pipe held."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _NATIVE_SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    lines = out.stderr.splitlines()
    assert lines[-1] == "raw again", lines
    docs = [json.loads(line) for line in lines[:-1]]
    assert [d["event"] for d in docs if d["logger"] == "softgate.test"] == ["before", "after"]
    docs = [d for d in docs if d["logger"] == "softgate.native"]  # (in order; the test's own
    # events, written straight out, may overtake them)
    assert [(d["level"], d["event"]) for d in docs] == [
        ("error", "native_log"),
        ("warning", "native_log"),
        ("info", "native_log"),
        ("warning", "stderr"),
        ("warning", "stderr"),
    ]
    assert docs[0]["source"] == "add_port.cc:83"
    assert docs[0]["message"] == "Failed to add port: Address already in use"
    assert docs[1]["message"] == "Warning: a torch warning"
    assert docs[3]["line"] == "Traceback (most recent call last):"
    assert docs[4]["line"] == "from a child"


def test_native_lines_blank_ones_dropped_and_fatal_is_critical() -> None:
    """NativeStderr: a blank line is no event; an absl F line is critical."""
    native = object.__new__(NativeStderr)  # (no fd 2 redirection: its line parsing only)
    native.logger = logging.getLogger("softgate.native.test")
    with log_records(native.logger.name) as h:
        native._emit("   ")
        native._emit("F1202 13:27:17.572915   28819 server.cc:1] fatal")
    assert [(r.levelno, r.getMessage()) for r in h.records] == [(logging.CRITICAL, "native_log")]


def test_upgrade_and_invalid_requests_write_no_warnings(restore_handlers) -> None:
    """An audit: every admin request with an `Upgrade:` header (websocket, curl --http2's h2c)
    wrote two uvicorn WARNING lines, one advising `pip install 'uvicorn[standard]'`, and every
    request that is not valid HTTP one more, token or not: anyone who reaches the port could
    flood the log. They are DEBUG lines now; the requests get their usual answers."""
    import socket
    import threading

    from softgate import serve
    from softgate.settings import Settings
    from softgate.telemetry import Telemetry

    logging.getLogger("uvicorn.error").filters.clear()  # (one an earlier test's server added)
    out = io.StringIO()
    configure("json", "DEBUG", stream=out)
    settings = Settings(admin_host="127.0.0.1", admin_port=0, admin_token="tok", log_level="DEBUG")
    server = serve._make_admin_server(settings, Telemetry(), lambda: True, lambda: False)
    sock = serve._admin_socket(settings)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    requests = (
        b"GET /v1/config HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    answers = []
    try:
        for _ in range(150):
            if server.started:
                break
            threading.Event().wait(0.02)
        for i in range(50):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(requests[i % 2])
                answers.append(s.recv(100).split(b"\r\n")[0])
    finally:
        server.should_exit = True
        thread.join(10)
    assert set(answers) == {b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 400 Bad Request"}
    lines = _json_lines(out)
    assert not [x for x in lines if x["level"] == "warning"], [x for x in lines if x["level"] == "warning"][
        :3
    ]
    events = [x["event"] for x in lines if x["level"] == "debug" and x["logger"] == "uvicorn.error"]
    assert events.count("Unsupported upgrade request.") == 25
    assert events.count("Invalid HTTP request received.") == 25


def test_a_burst_of_accept_failures_is_one_line_a_second(restore_handlers) -> None:
    """An audit: a burst of connections past the process's descriptors had asyncio log
    "socket.accept() out of system resource", a traceback each, ~8,000 times in 2 s."""
    out = io.StringIO()
    configure("json", "INFO", stream=out)
    asyncio_log = logging.getLogger("asyncio")
    for _ in range(500):
        asyncio_log.error("socket.accept() out of system resource\nsocket: %s", "<fd=13>")
    asyncio_log.error("Task exception was never retrieved")  # (asyncio's others pass)
    events = [e["event"].split("\n")[0] for e in _json_lines(out)]
    assert events == ["socket.accept() out of system resource", "Task exception was never retrieved"]
