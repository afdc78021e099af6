"""`softgate serve`: the gRPC server and the admin HTTP server in ONE asyncio loop, one
signal path for both.

Start-up: logging, telemetry (`softgate.observability.PrometheusTelemetry` when importable,
else the no-op `Telemetry`), the engine on its device, gRPC bound (health NOT_SERVING), the
admin app under uvicorn (when `admin_port` is set and `softgate.admin` is importable), engine
warm-up in a worker thread, then health SERVING and readiness true.

Shutdown on SIGTERM, SIGINT or SIGHUP: readiness false and health NOT_SERVING for every
service, new RPCs refused, in-flight RPCs get `grace_seconds` to finish, then the admin server
stops and the process exits 0. A second signal during the grace period cuts it short (in-flight
RPCs are cancelled) and still exits 0. uvicorn's own signal handlers are disabled. A device
that fails its probe after a CUDA error stops the server the same way, exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Generator
from typing import Any

import torch

from softgate import __version__
from softgate.allocator import Decision, loaded_allocator, mapped_allocators
from softgate.engine import Engine
from softgate.engine.compiled import COMPILE_EXIT_WAIT_S
from softgate.grpc.server import GrpcServer, TlsFilesError
from softgate.logging import NativeStderr, configure, get_logger, quiet_uvicorn_noise
from softgate.settings import Settings, bind_tcp, host_port, unknown_variables
from softgate.status import remove_status, write_status
from softgate.telemetry import Telemetry
from softgate.threads import cpu_quota, on_daemon_thread, threads_for

log = get_logger("serve")
# on shutdown serve waits up to COMPILE_EXIT_WAIT_S (the engine's own wait at exit) for a
# torch.compile of the engine to finish: a thread still compiling when the interpreter
# finalises aborts the process (std::terminate, exit status -6 instead of 0); past that wait
# the process exits at once instead (os._exit)
_exit_now = {"hard": False}
# the signals that shut the server down gracefully: SIGHUP too (a closed terminal, or a
# supervisor's reload signal), which killed the process without a word and left its status
# file behind (an audit)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def make_telemetry(settings: Settings) -> Telemetry:
    try:
        from softgate.observability import PrometheusTelemetry
    except Exception as e:  # not there yet, or prometheus_client missing
        log.warning("telemetry_disabled", reason=f"{type(e).__name__}: {e}")
        return Telemetry()
    # no `_created` sample beside every counter and histogram: ~140 series a replica that
    # Prometheus stores and nothing reads (an audit; process-wide, so the server's only)
    import prometheus_client

    prometheus_client.disable_created_metrics()
    # deferred: a result's per-run statistics are recorded after its response has gone out
    return PrometheusTelemetry(settings, defer=True)  # type: ignore[no-any-return]


def make_engine(settings: Settings) -> Engine:
    device = None if settings.device in ("", "auto") else settings.device
    return Engine(
        device=device,
        compile=settings.compile,
        host_max_tokens=settings.host_max_tokens,
        max_compiled_kernels=settings.max_compiled_kernels,
    )


def _device_description(engine: Engine) -> dict[str, Any]:
    dev = engine.device
    out: dict[str, Any] = {"device": str(dev), "torch": torch.__version__}
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        out["device_name"] = torch.cuda.get_device_name(idx)
        out["host_max_tokens"] = engine.host_max_tokens  # smaller batches run on the host
    out["threads"] = torch.get_num_threads()  # (the host's intra-op threads)
    return out


def _make_admin_server(
    settings: Settings, telemetry: Telemetry, is_ready: Any, is_stopping: Any
) -> Any | None:
    """A uvicorn.Server for `softgate.admin.create_app`, or None (disabled / not importable)."""
    if settings.admin_port is None:
        return None
    try:
        import uvicorn

        from softgate.admin import create_app
        from softgate.admin.server import guard_connections
    except Exception as e:
        log.warning("admin_disabled", reason=f"softgate.admin not importable: {type(e).__name__}: {e}")
        return None

    class _Server(uvicorn.Server):
        """Our signal handler owns shutdown: uvicorn installs none."""

        def install_signal_handlers(self) -> None:  # uvicorn < 0.29
            return None

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:  # uvicorn >= 0.29
            yield

    app = create_app(settings, telemetry, is_ready, is_stopping)
    config = uvicorn.Config(
        app,
        host=settings.admin_host,
        port=settings.admin_port,
        lifespan="off",
        access_log=False,
        log_config=None,  # our handler (softgate.logging.configure) formats uvicorn's records
        log_level=settings.log_level.lower(),
    )
    quiet_uvicorn_noise()
    return _Server(guard_connections(config))


def _admin_socket(settings: Settings) -> socket.socket:
    """The admin port, bound here rather than by uvicorn: uvicorn reports a bind failure with
    sys.exit(3) inside its task, which escapes the event loop with two tracebacks."""
    assert settings.admin_port is not None  # (only called with the admin port on)
    return bind_tcp(settings.admin_host, settings.admin_port, "admin")


def _bound_admin_address(server: Any, settings: Settings) -> tuple[str, int]:
    try:
        sock = server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return str(host), int(port)
    except Exception:
        return settings.admin_host, int(settings.admin_port or 0)


async def _warm_up(engine: Engine, stop: asyncio.Event) -> None:
    """Warm the engine up unless `stop` is set meanwhile: then halt it between configurations,
    wait up to COMPILE_EXIT_WAIT_S for the one compiling, and past that ask run() for an
    immediate exit (a compile warm-up ignored SIGTERM until it ended, minutes; an audit)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    halt = threading.Event()
    warm = on_daemon_thread(lambda: engine.warmup(halt), "softgate-warmup")
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((warm, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if warm.done():
        warm.result()
        log.info("engine_warmed_up", seconds=round(loop.time() - t0, 3))
        return
    halt.set()
    log.info("warmup_interrupted", seconds=round(loop.time() - t0, 3))
    done, _ = await asyncio.wait((warm,), timeout=COMPILE_EXIT_WAIT_S)
    if not done:
        log.warning("compile_in_progress", action="exiting without waiting for the warm-up")
        _exit_now["hard"] = True
    else:
        warm.exception()  # (retrieved: one that failed as it halted; the server stops anyway)


async def serve(
    settings: Settings, *, stop: asyncio.Event | None = None, ignore_signals_after: bool = False
) -> int:
    """Run until SIGTERM / SIGINT / SIGHUP (or until `stop` is set); returns the exit code.
    The signals' handlers are the caller's again when it returns, or ignored with
    `ignore_signals_after` (a process that exits next)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    signals_seen = 0
    background: set[asyncio.Task[Any]] = set()
    started: list[GrpcServer] = []  # (the one _serve starts)

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        log.info("signal_received", signal=sig.name, count=signals_seen)
        stop.set()
        for grpc_server in started if signals_seen > 1 else ():
            if grpc_server.server is not None:  # a second signal: cut the grace period short
                grpc_server.servicer.stopping = True  # (the calls cut: their clients read UNAVAILABLE)
                task = loop.create_task(grpc_server.server.stop(0))
                background.add(task)
                task.add_done_callback(background.discard)

    # before anything starts: a signal while the engine is made (CUDA's start-up takes
    # seconds) stops the server as soon as it has started, rather than killing it
    installed: dict[signal.Signals, Any] = {}
    for sig in SIGNALS:
        previous = signal.getsignal(sig)
        if sig == signal.SIGHUP and previous == signal.SIG_IGN:
            continue  # `nohup softgate serve`: a closed terminal must not stop it
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed[sig] = previous
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            pass
    try:
        return await _serve(settings, stop, started)
    finally:
        # a second signal while the process tears down (asyncio.run's exit, the interpreter's)
        # killed it by that signal after its `stopped exit_code=0`, the default action (an
        # audit): with ignore_signals_after they are ignored, and blocked meanwhile, since
        # remove_signal_handler sets that default action before SIG_IGN replaces it
        block = ignore_signals_after and bool(installed)
        if block:
            signal.pthread_sigmask(signal.SIG_BLOCK, installed)
        for sig, previous in installed.items():
            loop.remove_signal_handler(sig)  # (which sets SIG_DFL: the caller's handler, again)
            if ignore_signals_after:
                signal.signal(sig, signal.SIG_IGN)
            elif previous is not None:  # (None: one not set from Python, which SIG_DFL now is)
                signal.signal(sig, previous)
        if block:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, installed)  # (one pending is ignored)


async def _serve(settings: Settings, stop: asyncio.Event, started: list[GrpcServer]) -> int:
    """serve's body: start everything, run until `stop` is set, stop everything (the gRPC
    server made is appended to `started`, for a second signal to hurry)."""
    log.info("starting", version=__version__, settings=settings.redacted())
    for problem in unknown_variables(os.environ):
        log.warning("unknown_variable", problem=problem)
    telemetry = make_telemetry(settings)
    try:
        engine = make_engine(settings)
    except ValueError as e:  # a device this host lacks (the CLI checks it first): a setting, 2
        log.error("startup_failed", error=str(e))
        return 2
    log.info("engine_ready", **_device_description(engine), compile=engine.compile_mode)
    telemetry.watch_engine(engine.kernel.states)

    grpc_server = GrpcServer(settings, engine, telemetry)
    grpc_server.on_device_failed = stop.set  # (then exit 1: a restart gets a working device)
    started.append(grpc_server)
    telemetry.watch_server(lambda: grpc_server.servicer.in_flight, lambda: grpc_server.tls_not_after)
    await grpc_server.start()
    ready = False

    def is_ready() -> bool:
        return ready and grpc_server.serving

    admin = _make_admin_server(settings, telemetry, is_ready, stop.is_set)
    admin_task: asyncio.Task[Any] | None = None
    admin_address: tuple[str, int] | None = None
    code = 0
    try:
        if admin is not None:
            admin_task = asyncio.create_task(admin.serve([_admin_socket(settings)]), name="softgate-admin")
            while not admin.started:
                if admin_task.done():
                    exc = admin_task.exception() if not admin_task.cancelled() else None
                    where = host_port(settings.admin_host, settings.admin_port)
                    raise OSError(f"admin server failed to start on {where}: {exc!r}")
                await asyncio.sleep(0.01)
            admin_address = _bound_admin_address(admin, settings)
            host, port = admin_address
            log.info("admin_listening", address=host_port(host, port), auth=bool(settings.admin_token))
        if settings.status_file:
            try:
                write_status(
                    settings.status_file, (settings.grpc_host, int(grpc_server.port or 0)), admin_address
                )
            except OSError as e:  # the health check then says so; the service itself is fine
                log.warning("status_file_not_written", path=settings.status_file, error=str(e))

        if settings.warmup and not stop.is_set():
            await _warm_up(engine, stop)
        if not stop.is_set():
            await grpc_server.set_serving(True)
            ready = True
            log.info("serving", grpc=grpc_server.address)
        await stop.wait()
    except (OSError, SystemExit) as e:
        log.error("startup_failed", error=str(e))
        code = 1
    except Exception as e:  # the warm-up's (a CUDA error, a device out of memory): one event, exit 1
        log.error("startup_failed", error=f"{type(e).__name__}: {e}", exc_info=True)
        code = 1  # (it logged `stopped exit_code=0`, then a raw traceback, and exited 1; an audit)
    finally:
        ready = False
        await grpc_server.stop(settings.grace_seconds)
        if admin is not None and admin_task is not None:
            admin.should_exit = True
            with contextlib.suppress(Exception, SystemExit, asyncio.CancelledError):
                await asyncio.wait_for(admin_task, timeout=max(settings.grace_seconds, 1.0) + 5)
        waiter = getattr(engine, "wait_compiled", None)
        if callable(waiter) and not _exit_now["hard"]:
            with contextlib.suppress(Exception):
                if not await asyncio.to_thread(waiter, COMPILE_EXIT_WAIT_S):
                    log.warning("compile_in_progress", action="exiting without waiting for it")
                    _exit_now["hard"] = True
        close = getattr(telemetry, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
        if settings.status_file:
            remove_status(settings.status_file)
        if grpc_server.device_failed is not None:
            code = code or 1  # (even when a signal began the stop: the device is what failed)
            _exit_now["hard"] = True  # (an engine thread stuck on the device would hold the exit)
        log.info("stopped", exit_code=code)
    return code


def log_allocator(decision: Decision | None) -> None:
    """One `allocator` event: which malloc this process runs with, and why."""
    name = loaded_allocator()
    lib = mapped_allocators().get(name)
    if decision is not None and decision.library and decision.loaded == decision.library:
        name, lib = "other", decision.library  # (given by path, of no known name)
    requested = decision.requested if decision is not None else "n/a"
    log.info(
        "allocator",
        allocator=name,
        library=lib,
        requested=requested,
        reexecuted=bool(decision and decision.reexecuted),
    )
    if decision is not None and decision.warning:
        log.warning("allocator_unavailable", requested=requested, reason=decision.warning, allocator=name)


def run(settings: Settings, *, allocator: Decision | None = None) -> int:
    """Configure logging and run `serve` in a fresh event loop (`allocator`: what the CLI
    decided about the malloc, logged). SIGTERM, SIGINT and SIGHUP are ignored once serve has
    returned: the process is on its way out."""
    configure(settings.log_format, settings.log_level)
    native = NativeStderr() if settings.log_format == "json" else None
    try:
        code = _run(settings, allocator)
    finally:
        if native is not None:
            native.stop()
    if _exit_now["hard"]:  # a compile thread is still running: skip interpreter finalisation
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def fit_threads_to_cpu_quota() -> None:
    """A container's CPU quota (`docker run --cpus`) caps torch's intra-op threads unless
    OMP_NUM_THREADS says otherwise: OpenMP starts one per host core, and the quota throttles them."""
    quota = cpu_quota()
    n = threads_for(quota, torch.get_num_threads(), os.environ)
    if n is not None:
        torch.set_num_threads(n)
        log.info("threads_fitted", cpu_quota=round(quota or 0, 2), threads=n)


def _run(settings: Settings, allocator: Decision | None) -> int:
    log_allocator(allocator)
    fit_threads_to_cpu_quota()
    # a server records no autograd graph: with grad off in the event loop's thread, where small
    # calls run, the engine skips its own no_grad contexts (~6 us of a 4k call's ~170, hot)
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        return asyncio.run(serve(settings, ignore_signals_after=True))
    except OSError as e:
        log.error("startup_failed", error=str(e))
        return 2 if isinstance(e, TlsFilesError) else 1  # (2: a setting, as the start-up checks)
    finally:
        torch.set_grad_enabled(grad)  # (an embedding caller's thread, as it was)
