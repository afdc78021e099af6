"""`softgate serve` in this process: start-up (the engine and telemetry it makes, warm-up
before SERVING, the admin and allocator events) and shutdown (a stop during warm-up, signal
handlers given back, the engine's background torch.compile still running, /readyz while
draining)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import softgate.serve as serve
import torch
from conftest import LogRecords, log_records
from softgate.allocator import Decision
from softgate.engine import Engine
from softgate.engine.config import OBJECTIVES
from softgate.observability import PrometheusTelemetry
from softgate.settings import Settings


def _settings(**kw: Any) -> Settings:
    """Settings of a server on a free loopback port, on the CPU, without admin or warm-up."""
    base: dict[str, Any] = dict(grpc_host="127.0.0.1", grpc_port=0, admin_port=None, device="cpu")
    base.update(warmup=False, compile=False)
    base.update(kw)
    return Settings(**base)


@pytest.fixture()
def serve_log() -> Iterator[LogRecords]:
    """The records of the softgate.serve logger while the test runs."""
    with log_records("softgate.serve") as records:
        yield records


# ---------------------------------------------------------------- start-up


def test_make_engine_resolves_auto_and_passes_engine_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """device auto (the default) and "" pick the engine's default device; host_max_tokens and
    max_compiled_kernels reach the engine."""
    want = "cuda" if torch.cuda.is_available() else "cpu"
    for device in ("auto", ""):
        assert serve.make_engine(_settings(device=device)).device.type == want
    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve, "Engine", lambda **kw: seen.update(kw))
    serve.make_engine(_settings(host_max_tokens=123, max_compiled_kernels=7))
    assert seen["host_max_tokens"] == 123 and seen["max_compiled_kernels"] == 7


def test_serve_telemetry_is_deferred() -> None:
    """`softgate serve` records a result's per-run statistics after its response (defer=True)."""
    tel = serve.make_telemetry(_settings())
    assert isinstance(tel, PrometheusTelemetry) and tel.defer is True


class _Warming(Engine):
    """A CPU engine whose warm-up is only recorded in `calls` (then runs `on_warmup`)."""

    def __init__(self, calls: list[Any], on_warmup: Any = None) -> None:
        super().__init__(device="cpu", compile=False)
        self.calls, self.on_warmup = calls, on_warmup

    def warmup(self, *a: Any, **kw: Any) -> None:
        self.calls.append("warmup")
        if self.on_warmup is not None:
            self.on_warmup()


def _recording_grpc_server(calls: list[Any]) -> type:
    """serve's GrpcServer, recording each set_serving(serving) in `calls`."""

    class Recording(serve.GrpcServer):  # type: ignore[misc, name-defined]
        async def set_serving(self, serving: bool) -> None:
            calls.append(("serving", serving))
            await super().set_serving(serving)

    return Recording


def test_warmup_runs_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """With warmup on, the engine warms up before health turns SERVING."""
    calls: list[Any] = []
    monkeypatch.setattr(serve, "make_engine", lambda s: _Warming(calls))
    monkeypatch.setattr(serve, "GrpcServer", _recording_grpc_server(calls))

    async def go() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(serve.serve(_settings(warmup=True), stop=stop))
        for _ in range(1000):
            if ("serving", True) in calls or task.done():
                break
            await asyncio.sleep(0.01)
        stop.set()
        return await task

    assert asyncio.run(go()) == 0
    assert calls[:2] == ["warmup", ("serving", True)]


def test_admin_listening_says_whether_a_token_is_required(serve_log: LogRecords) -> None:
    """The admin_listening event's auth field is whether admin_token is set."""

    async def go(token: str | None) -> int:
        stop = asyncio.Event()
        stop.set()
        s = _settings(admin_host="127.0.0.1", admin_port=0, admin_token=token)
        return await serve.serve(s, stop=stop)

    assert asyncio.run(go("t0ken")) == 0
    assert asyncio.run(go(None)) == 0
    assert [f["auth"] for f in serve_log.fields("admin_listening")] == [True, False]


def test_an_unavailable_allocator_is_logged_as_a_warning(serve_log: LogRecords) -> None:
    """log_allocator: a Decision with a warning gives an allocator_unavailable warning event."""
    serve.log_allocator(Decision("tcmalloc", "glibc", "glibc", None, None, "tcmalloc is not installed"))
    (rec,) = [r for r in serve_log.records if r.getMessage() == "allocator_unavailable"]
    assert rec.levelno == logging.WARNING
    assert rec.fields["requested"] == "tcmalloc" and rec.fields["reason"] == "tcmalloc is not installed"  # type: ignore[attr-defined]


def test_an_admin_port_in_use_fails_start_up_with_exit_code_1() -> None:
    """uvicorn ends a failed bind with sys.exit(3) in its task, which escaped asyncio.run; serve
    binds the admin socket itself and reports the failure like the gRPC port's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        settings = _settings(admin_host="127.0.0.1", admin_port=sock.getsockname()[1])
        assert asyncio.run(serve.serve(settings)) == 1


def test_a_failed_warm_up_is_one_startup_failed_event_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, serve_log: LogRecords
) -> None:
    """An audit: a warm-up that raised (a CUDA error, a device out of memory) logged `stopped
    exit_code=0`, then a raw traceback, and the process exited 1."""

    def broken(self: Engine, halt: Any = None) -> None:
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(Engine, "warmup", broken)
    assert asyncio.run(serve.serve(_settings(warmup=True))) == 1
    (failed,) = [r for r in serve_log.records if r.getMessage() == "startup_failed"]
    assert failed.fields["error"] == (  # type: ignore[attr-defined]
        "RuntimeError: CUDA error: no kernel image is available for execution on the device"
    )
    (stopped,) = [r for r in serve_log.records if r.getMessage() == "stopped"]
    assert stopped.fields["exit_code"] == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("sticky", [True, False, "hung"])
def test_a_device_lost_for_good_stops_the_server_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, sticky: Any
) -> None:
    """An audit: after a sticky CUDA fault (an illegal address, an uncorrectable ECC error)
    every call failed INTERNAL while health stayed SERVING, and no probe restarted the pod.
    A CUDA error now has the device probed: one that fails stops the server, exit 1 (a
    restart); one that passes was that call's alone, and the server serves on."""
    from softgate_client import SoftgateClient
    from softgate_client.errors import InternalError

    error = "CUDA error: an illegal memory access was encountered"

    def broken(self: Engine, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(error)

    wedged = threading.Event()

    def probe(self: Engine) -> str | None:
        if sticky == "hung":  # (a wedged device: torch.cuda.synchronize never returns; a review)
            wedged.wait(30)
        return f"RuntimeError: {error}" if sticky else None

    monkeypatch.setattr(Engine, "loss", broken)
    monkeypatch.setattr(Engine, "device_problem", probe)
    monkeypatch.setattr("softgate.grpc.server.PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setitem(serve._exit_now, "hard", False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    box: dict[str, Any] = {}

    def trainer() -> None:
        # (the client retries UNAVAILABLE until the server serves)
        with SoftgateClient(f"127.0.0.1:{port}") as c, pytest.raises(InternalError):
            c.loss([-1.0, -2.0], advantages=[1.0], lengths=[2], timeout=30)
        box["called"] = True
        if not sticky:
            time.sleep(0.5)  # (the probe's verdict in the log)
            box["loop"].call_soon_threadsafe(box["stop"].set)

    async def go() -> int:
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        threading.Thread(target=trainer, daemon=True).start()
        return await asyncio.wait_for(serve.serve(_settings(grpc_port=port), stop=box["stop"]), 60)

    try:
        with log_records("softgate.grpc") as grpc_log:
            assert asyncio.run(go()) == (1 if sticky else 0)
    finally:
        wedged.set()
    assert box.get("called")
    # (a failed device skips the interpreter's exit: an engine thread stuck on it would hold it)
    assert serve._exit_now["hard"] is bool(sticky)
    events = {r.getMessage(): r for r in grpc_log.records}
    if sticky == "hung":
        assert "the probe did not end in 0.5 s" in events["device_failed"].fields["probe"]  # type: ignore[attr-defined]
    elif sticky:
        assert events["device_failed"].fields["probe"] == f"RuntimeError: {error}"  # type: ignore[attr-defined]
    else:
        assert "device_error" in events and "device_failed" not in events


def test_device_errors_are_told_from_a_batch_too_large_and_from_bugs() -> None:
    from softgate.engine.errors import is_device_error

    assert is_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_error(RuntimeError("CUDA error: uncorrectable ECC error encountered"))
    assert is_device_error(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    assert not is_device_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    # (cuBLAS's failed allocation is a full device, not a broken one; a review)
    assert not is_device_error(
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")
    )
    assert not is_device_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_device_error(RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"))
    assert not is_device_error(ValueError("CUDA error"))


def test_the_device_probe_passes_on_a_working_device_and_a_full_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe that finds the device out of memory (the calls in flight hold it) is no failure:
    it read as a lost context, and the server exited (a review)."""
    engine = Engine(device="cpu", compile=False)
    assert engine.device_problem() is None

    def full(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(torch, "arange", full)
    assert engine.device_problem() is None


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_admin_host_in_brackets_binds_and_is_logged_in_brackets(serve_log: LogRecords) -> None:
    """admin_host `[::1]`, as grpc_host takes it, failed start-up ("Name or service not
    known"), and `::1` was logged as `::1:8080` (an audit): both now as grpc_listening does."""

    async def go(host: str) -> int:
        stop = asyncio.Event()
        stop.set()
        return await serve.serve(_settings(admin_host=host, admin_port=0), stop=stop)

    assert asyncio.run(go("[::1]")) == 0
    assert asyncio.run(go("::1")) == 0
    addresses = [f["address"] for f in serve_log.fields("admin_listening")]
    assert len(addresses) == 2 and all(a.startswith("[::1]:") for a in addresses), addresses


# ---------------------------------------------------------------- shutdown


def test_a_stop_during_warmup_never_turns_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal while the engine warms up: the server shuts down without ever being SERVING."""
    calls: list[Any] = []
    box: dict[str, Any] = {}

    def signal_now() -> None:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        time.sleep(0.05)  # (the event loop sets it before warmup returns)

    monkeypatch.setattr(serve, "make_engine", lambda s: _Warming(calls, signal_now))
    monkeypatch.setattr(serve, "GrpcServer", _recording_grpc_server(calls))

    async def go() -> int:
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        return await serve.serve(_settings(warmup=True), stop=box["stop"])

    assert asyncio.run(go()) == 0
    assert "warmup" in calls and ("serving", True) not in calls


def test_the_engine_warmup_stops_between_configurations_once_halted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine.warmup(halt) checks `halt` before each configuration it runs."""
    engine = Engine(device="cpu", compile=False, host_max_tokens=0)
    halt = threading.Event()
    runs: list[Any] = []

    def one_run(*args: Any) -> None:
        runs.append(args)
        halt.set()

    monkeypatch.setattr(engine, "_loss", one_run)
    engine.warmup(halt)
    assert len(runs) == 1
    halt.clear()
    engine.warmup()
    assert len(runs) == 1 + len(OBJECTIVES)


class _Halting(Engine):
    """A CPU engine whose warm-up stops the server, then runs until halted (or, ignoring the
    halt, until `release` is set); `halted` says whether it saw the halt."""

    def __init__(self, box: dict[str, Any], obey: bool) -> None:
        super().__init__(device="cpu", compile=False)
        self.box, self.obey = box, obey
        self.release, self.halted = threading.Event(), False

    def warmup(self, halt: threading.Event | None = None) -> None:
        self.box["loop"].call_soon_threadsafe(self.box["stop"].set)
        if self.obey and halt is not None:
            self.halted = halt.wait(10)
        else:
            self.release.wait(10)


@pytest.mark.parametrize("obey", [True, False])
def test_a_stop_during_a_long_warmup_halts_it_or_exits_without_it(
    monkeypatch: pytest.MonkeyPatch, serve_log: LogRecords, obey: bool
) -> None:
    """A compile warm-up (minutes) answered SIGTERM only once it ended (an audit): a stop now
    halts it between configurations; one still compiling after COMPILE_EXIT_WAIT_S asks run()
    for an immediate exit, as a background compile does. Exit code 0 either way."""
    box: dict[str, Any] = {}
    engine = _Halting(box, obey)
    monkeypatch.setattr(serve, "make_engine", lambda s: engine)
    monkeypatch.setattr(serve, "COMPILE_EXIT_WAIT_S", 0.2)
    monkeypatch.setitem(serve._exit_now, "hard", False)

    async def go() -> int:
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        return await serve.serve(_settings(warmup=True), stop=box["stop"])

    try:
        assert asyncio.run(go()) == 0
    finally:
        engine.release.set()
    events = [r.getMessage() for r in serve_log.records]
    assert "warmup_interrupted" in events and "serving" not in events
    assert engine.halted is obey and serve._exit_now["hard"] is not obey
    assert ("compile_in_progress" in events) is not obey


def test_serve_gives_the_signal_handlers_back() -> None:
    """Once serve returns, SIGTERM has the handler it had before (an embedding caller's)."""

    async def go() -> tuple[Any, Any]:
        before = signal.getsignal(signal.SIGTERM)  # (asyncio.run has its own SIGINT handler)
        stop = asyncio.Event()
        stop.set()
        assert await serve.serve(_settings(), stop=stop) == 0
        return before, signal.getsignal(signal.SIGTERM)

    before, after = asyncio.run(go())
    assert after == before


def test_the_cli_server_ignores_signals_once_stopped() -> None:
    """With ignore_signals_after (run's), SIGTERM, SIGINT and SIGHUP are ignored once serve
    returns: a second signal while the process tore down killed it by that signal, right after
    its `stopped exit_code=0` (an audit)."""

    async def go() -> list[Any]:
        stop = asyncio.Event()
        stop.set()
        assert await serve.serve(_settings(), stop=stop, ignore_signals_after=True) == 0
        return [signal.getsignal(sig) for sig in serve.SIGNALS]

    saved = {sig: signal.getsignal(sig) for sig in serve.SIGNALS}
    try:
        assert asyncio.run(go()) == [signal.SIG_IGN] * len(serve.SIGNALS)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_readyz_says_stopping_while_the_server_drains() -> None:
    """/readyz during a shutdown read "engine warming up or gRPC not serving yet", status
    "starting" (an audit): the admin app serve makes says "stopping" once a stop is set."""
    import httpx
    from softgate.admin.server import ThreadedAdminServer

    stop = asyncio.Event()
    settings = _settings(admin_host="127.0.0.1", admin_port=0)
    server = serve._make_admin_server(settings, serve.make_telemetry(settings), lambda: False, stop.is_set)
    with ThreadedAdminServer(server.config.app) as srv, httpx.Client(base_url=srv.url, timeout=5) as c:
        assert c.get("/readyz").json()["error"]["status"] == "starting"
        stop.set()
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["status"] == "stopping", r.json()
    assert "shutting down" in r.json()["error"]["message"]


def test_exit_does_not_wait_forever_for_a_background_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile thread still running at interpreter exit aborts the process (std::terminate):
    serve waits a bounded time for it, then asks run() for an immediate exit."""
    waited: list[float | None] = []

    class Compiling(Engine):
        def wait_compiled(self, timeout: float | None = None) -> bool:
            waited.append(timeout)
            return False  # still compiling after the wait

    monkeypatch.setattr(serve, "make_engine", lambda s: Compiling(device="cpu", compile=False))
    monkeypatch.setitem(serve._exit_now, "hard", False)

    async def go() -> int:
        stop = asyncio.Event()
        stop.set()
        return await serve.serve(_settings(), stop=stop)

    assert asyncio.run(go()) == 0
    assert waited == [serve.COMPILE_EXIT_WAIT_S] and serve._exit_now["hard"] is True


def test_run_serves_with_grad_off_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` serves with autograd off in its thread (the engine then skips its no_grad
    contexts) and leaves an embedding caller's grad mode as it found it."""
    seen: list[bool] = []

    async def fake_serve(settings: Settings, **kw: Any) -> int:
        seen.append(torch.is_grad_enabled())
        return 0

    monkeypatch.setattr(serve, "serve", fake_serve)
    monkeypatch.setattr(serve, "configure", lambda *a: None)  # (the test process's logging stays)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert serve.run(_settings()) == 0
            assert torch.is_grad_enabled() is grad
    assert seen == [False, False]
