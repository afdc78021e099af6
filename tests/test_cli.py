"""The `softgate` command: version, serve flags, and a real `softgate serve --grpc-port 0`
subprocess: the bound port is logged, SIGTERM with calls in flight lets them complete and
exits 0, the admin HTTP server shares the loop and the shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import needs_compile
from grpc_health.v1 import health_pb2, health_pb2_grpc
from softgate import __version__
from softgate.cli import main
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb
from softgate_client.proto.softgate.v1 import softgate_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`softgate` with no command is a usage error: help on stdout, exit 2."""
    assert main([]) == 2
    assert "serve" in capsys.readouterr().out


def test_demo_is_handed_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """`softgate demo ARGS` runs softgate.demo.main(ARGS) and exits with what it returns."""
    seen: list[list[str]] = []
    fake = types.ModuleType("softgate.demo")
    fake.main = lambda argv: seen.append(list(argv)) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "softgate.demo", fake)
    assert main(["demo", "--steps", "2"]) == 3
    assert seen == [["--steps", "2"]]


def test_serve_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["serve", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--grpc-port",
        "--admin-port",
        "--config",
        "--tls-client-ca",
        "--max-concurrent-rpcs",
        "--no-warmup",
    ):
        assert flag in out
    assert "SOFTGATE_GRPC_PORT" in out


def test_bad_setting_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--grpc-port", "seventy"]) == 2
    assert "grpc_port" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["--device", "cuda:999"], "device"),
        (["--device", "foo"], "device"),
        (["--keepalive-time-s", "inf"], "keepalive_time_s"),
        (["--max-connection-age-s", "inf"], "max_connection_age_s"),
        (["--keepalive-time-s", "1e12"], "keepalive_time_s"),
        (["--max-message-bytes", "8589934592"], "max_message_bytes"),
        (["--tls-cert", "/no/such.crt", "--tls-key", "/no/such.key"], "tls_cert"),
        (["--warmup", "maybe"], "warmup"),
    ],
)
def test_settings_that_ended_in_a_traceback_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], setting: str
) -> None:
    assert main(["serve", "--grpc-port", "0", "--admin-port", "-1", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"softgate serve: {setting}") and err.count("\n") == 1, err


def test_a_cuda_device_on_a_host_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`softgate serve --device cuda` on a host without CUDA: one line naming the device, exit
    2. A server started without the CLI (serve.serve) is refused by the engine itself, which
    names the device too: exit 2, not a traceback (a CUDA engine without CUDA was made, then
    failed on its first large batch; an audit)."""
    import torch
    from softgate import serve
    from softgate.settings import Settings

    if torch.cuda.is_available():
        pytest.skip("a host without CUDA")
    assert main(["serve", "--grpc-port", "0", "--admin-port", "-1", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("softgate serve: device: 'cuda' is not available") and err.count("\n") == 1, err
    settings = Settings.load({"device": "cuda", "grpc_port": 0, "admin_port": -1, "warmup": False}, env={})

    async def start_and_stop() -> int:
        stop = asyncio.Event()
        stop.set()  # (a server that started stops at once, exit 0)
        return await serve.serve(settings, stop=stop)

    assert asyncio.run(start_and_stop()) == 2


@pytest.mark.parametrize(
    ("args", "compile", "warmup"),
    [
        ([], False, True),
        (["--compile"], True, True),
        (["--compile", "true"], True, True),
        (["--compile", "false"], False, True),
        (["--no-compile"], False, True),
        (["--compile", "auto"], None, True),
        (["--compile", "--warmup"], True, True),
        (["--warmup", "false", "--compile", "auto"], None, False),
        (["--no-warmup"], False, False),
    ],
)
def test_boolean_flags_take_a_value_or_none(
    monkeypatch: pytest.MonkeyPatch, args: list[str], compile: bool | None, warmup: bool
) -> None:
    """docs/server.md: `compile` is true, false or auto; a bare `--compile` is true."""
    from softgate.cli import build_parser, load_settings

    for var in [v for v in os.environ if v.startswith("SOFTGATE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SOFTGATE_COMPILE", "false")  # a flag overrides it, `--compile auto` too
    s = load_settings(build_parser().parse_args(["serve", *args]))
    assert (s.compile, s.warmup) == (compile, warmup)


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C before serve's handlers are in (torch imports for seconds) printed a
    KeyboardInterrupt traceback (an audit): one line now, exit 130 as for any interrupted
    command (nothing was serving yet)."""

    def interrupted(args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("softgate.cli.load_settings", interrupted)
    try:
        code = main(["serve"])
    except KeyboardInterrupt:  # (not raised at pytest, which would end the whole run)
        pytest.fail("KeyboardInterrupt escaped softgate serve")
    assert code == 130
    assert capsys.readouterr().err == "softgate serve: interrupted\n"


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_health_refuses_a_timeout_that_is_not_positive_seconds(
    timeout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-1, nan and inf ended in a traceback, and 0 read a healthy server as unhealthy (an
    audit): a usage error (exit 2) naming the flag."""
    with pytest.raises(SystemExit) as ei:
        main(["health", "--status-file", str(tmp_path / "status.json"), f"--timeout={timeout}"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "argument --timeout" in err and "seconds above 0" in err and "Traceback" not in err
    assert main(["health", "--status-file", str(tmp_path / "status.json"), "--timeout", "0.5"]) == 1


def test_a_status_file_that_cannot_be_written_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A directory at the status file's path: the error, and no `<name>.<pid>.tmp` beside it
    (one was left behind; an audit)."""
    from softgate.status import write_status

    (tmp_path / "status").mkdir()
    with pytest.raises(OSError):
        write_status(str(tmp_path / "status"), ("127.0.0.1", 1), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status"]


def test_help_shows_the_values_of_boolean_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """The boolean flags' values, and defaults as settings spell them: true/false, compile's
    None as auto."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--compile [true|false|auto]" in out and "--no-compile" in out
    assert "--warmup [true|false]" in out and "--no-warmup" in out
    words = " ".join(out.split())
    assert "[default: true; env SOFTGATE_WARMUP]" in words
    assert "[default: auto; env SOFTGATE_COMPILE]" in words


# ---------------------------------------------------------------- a real subprocess


class Serve:
    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None, prelude: str = "") -> None:
        self.log_path = tmp / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTGATE_")} | (env or {})
        env["PYTHONUNBUFFERED"] = "1"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                prelude + "import sys; from softgate.cli import main; sys.exit(main())",
                "serve",
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def wait_event(self, name: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if e.get("event") == name:
                    return e
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} event; log:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[Serve] = []

    def start(*args: str, env: dict[str, str] | None = None, prelude: str = "") -> Serve:
        s = Serve(tmp_path, *args, env=env, prelude=prelude)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def _f32(x: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(x, dtype="<f4")
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(a.shape), data=a.tobytes())


def _i64(x: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(x, dtype="<i8")
    return pb.Tensor(dtype=pb.DTYPE_INT64, shape=list(a.shape), data=a.tobytes())


def _chunk(seqs: int, length: int, seed: int) -> pb.Batch:
    rng = np.random.default_rng(seed)
    n = seqs * length
    logp = -rng.random(n) - 0.1
    return pb.Batch(
        logp=_f32(logp),
        offsets=_i64(np.arange(seqs + 1) * length),
        old_logp=_f32(logp + 0.01 * rng.standard_normal(n)),
        rewards=_f32(rng.integers(0, 2, seqs).astype(np.float32)),
        group_ids=_i64(np.arange(seqs) // 2 + 100 * seed),
    )


def _wait_serving(target: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service="softgate.v1.LossService"), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"{target} never SERVING")


def test_sigterm_with_calls_in_flight_completes_them_and_exits_0(serve: Any) -> None:
    s = serve(
        "--grpc-port", "0", "--grpc-host", "127.0.0.1", "--admin-port", "-1",
        "--log-format", "json", "--device", "cpu", "--no-warmup", "--grace-seconds", "20",
    )  # fmt: skip
    ev = s.wait_event("grpc_listening")
    port = int(ev["port"])
    assert port > 0 and ev["address"] == f"127.0.0.1:{port}"
    assert s.wait_event("engine_ready")["device"] == "cpu"
    target = f"127.0.0.1:{port}"
    _wait_serving(target)

    release = threading.Event()
    first_sent = threading.Event()

    def requests() -> Iterator[pb.StreamLossRequest]:
        yield pb.StreamLossRequest(config=pb.LossConfig(), chunk=_chunk(4, 5, 1))
        first_sent.set()
        release.wait(20)
        yield pb.StreamLossRequest(chunk=_chunk(6, 3, 2))

    result: dict[str, Any] = {}

    def stream() -> None:
        with grpc.insecure_channel(target) as ch:
            try:
                result["responses"] = list(pb_grpc.LossServiceStub(ch).StreamLoss(requests(), timeout=30))
            except grpc.RpcError as e:
                result["error"] = e

    t = threading.Thread(target=stream)
    t.start()
    assert first_sent.wait(10)
    time.sleep(0.3)  # the first chunk is in the server: the call is in flight
    s.proc.send_signal(signal.SIGTERM)
    s.wait_event("grpc_stopping", timeout=10)
    # new calls are refused while the in-flight one finishes
    with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError):
        pb_grpc.LossServiceStub(ch).ListAlgorithms(pb.ListAlgorithmsRequest(), timeout=2)
    release.set()
    t.join(30)
    assert "error" not in result, result.get("error")
    resps = result["responses"]
    assert [r.chunk_index for r in resps] == [0, 1] and resps[-1].HasField("summary")
    assert len(resps[0].outputs.gradient.data) == 20 * 4 and len(resps[1].outputs.gradient.data) == 18 * 4
    assert s.proc.wait(30) == 0
    names = [e.get("event") for e in s.events()]
    assert "signal_received" in names and names[-1] == "stopped"


def test_a_second_signal_cuts_the_grace_period_short(serve: Any) -> None:
    """A second SIGTERM during the grace period cancels the calls in flight and exits 0 at once.
    Meanwhile /readyz says the server is stopping (it said "engine warming up"; an audit)."""
    httpx = pytest.importorskip("httpx")
    s = serve(
        "--grpc-port", "0", "--grpc-host", "127.0.0.1", "--admin-port", "0", "--admin-host", "127.0.0.1",
        "--log-format", "json", "--device", "cpu", "--no-warmup", "--no-compile", "--grace-seconds", "60",
    )  # fmt: skip
    target = f"127.0.0.1:{int(s.wait_event('grpc_listening')['port'])}"
    admin = s.wait_event("admin_listening")["address"]
    _wait_serving(target)
    release, sent = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def requests() -> Iterator[pb.StreamLossRequest]:
        yield pb.StreamLossRequest(config=pb.LossConfig(), chunk=_chunk(4, 5, 1))
        sent.set()
        release.wait(30)

    def stream() -> None:
        with grpc.insecure_channel(target) as ch:
            try:
                result["responses"] = list(pb_grpc.LossServiceStub(ch).StreamLoss(requests(), timeout=60))
            except grpc.RpcError as e:
                result["code"] = e.code()

    t = threading.Thread(target=stream)
    t.start()
    try:
        assert sent.wait(10)
        time.sleep(0.3)  # the first chunk is in the server
        s.proc.send_signal(signal.SIGTERM)
        s.wait_event("grpc_stopping", timeout=10)
        r = httpx.get(f"http://{admin}/readyz", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["status"] == "stopping", r.text
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(15) == 0
        assert time.monotonic() - t0 < 15
    finally:
        release.set()
        t.join(30)
    assert "responses" not in result


def test_sighup_drains_like_sigterm_and_later_signals_are_ignored(serve: Any, tmp_path: Path) -> None:
    """SIGHUP killed the server (exit -1, nothing logged, its status file left behind), and a
    second signal while it tore down killed it by that signal just after `stopped
    exit_code=0` (an audit): SIGHUP shuts down like SIGTERM, later signals are ignored, exit 0."""
    status = tmp_path / "status.json"
    s = serve(
        "--grpc-port", "0", "--grpc-host", "127.0.0.1", "--admin-port", "-1", "--log-format", "json",
        "--device", "cpu", "--no-warmup", "--no-compile", "--status-file", str(status),
        # (SIGHUP's default action, whatever this test inherits: under `nohup` it is ignored,
        # and so the server leaves it)
        prelude="import signal; signal.signal(signal.SIGHUP, signal.SIG_DFL); ",
    )  # fmt: skip
    _wait_serving(f"127.0.0.1:{int(s.wait_event('grpc_listening')['port'])}")
    s.proc.send_signal(signal.SIGHUP)
    s.wait_event("stopped")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # while the process tears down
        s.proc.send_signal(sig)
    assert s.proc.wait(30) == 0
    assert next(e["signal"] for e in s.events() if e.get("event") == "signal_received") == "SIGHUP"
    assert not status.exists() and "Traceback" not in s.log_path.read_text()


def test_a_server_started_with_sighup_ignored_keeps_serving_after_one(serve: Any) -> None:
    """`nohup softgate serve`: SIGHUP ignored by the parent stays ignored (a closed terminal
    must not stop the server); SIGTERM still shuts it down."""
    s = serve(
        "--grpc-port", "0", "--grpc-host", "127.0.0.1", "--admin-port", "-1", "--log-format", "json",
        "--device", "cpu", "--no-warmup", "--no-compile",
        prelude="import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); ",
    )  # fmt: skip
    target = f"127.0.0.1:{int(s.wait_event('grpc_listening')['port'])}"
    _wait_serving(target)
    s.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert s.proc.poll() is None
    _wait_serving(target)
    assert not [e for e in s.events() if e.get("event") == "signal_received"]
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0


@needs_compile
def test_sigterm_during_a_background_compile_exits_0_and_leaves_no_build_directory(
    serve: Any, tmp_path: Path
) -> None:
    # the CPU default compiles a new configuration in the background (an AOTInductor build in a
    # child process, ~15-20 s); SIGTERM meanwhile exits 0 without waiting for it (os._exit,
    # which skips the build's own cleanup), and the child removes the build's job directory
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    s = serve(
        "--grpc-port", "0", "--grpc-host", "127.0.0.1", "--admin-port", "-1",
        "--log-format", "json", "--device", "cpu", "--no-warmup",
        env={"TMPDIR": str(tmp)},
    )  # fmt: skip
    port = int(s.wait_event("grpc_listening")["port"])
    assert s.wait_event("engine_ready")["compile"] == "background"
    target = f"127.0.0.1:{port}"
    _wait_serving(target)
    with grpc.insecure_channel(target) as ch:
        pb_grpc.LossServiceStub(ch).ComputeLoss(pb.ComputeLossRequest(batch=_chunk(4, 5, 1)), timeout=30)

    def builds() -> list[Path]:
        return list(tmp.glob("softgate-aoti-*"))

    deadline = time.monotonic() + 20
    while not builds() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert builds(), "no build started"
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    if "compile_in_progress" not in [e.get("event") for e in s.events()]:  # (2 cores: 15-20 s)
        pytest.skip("the build finished within the server's 5 s wait: nothing was left to clean up")
    deadline = time.monotonic() + 10  # the child notices within about a second
    while builds() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not builds() and not list(tmp.glob("aotinductor_*"))


def test_log_requests_survives_streams_cancelled_mid_call(serve: Any) -> None:
    """Found by an audit: with --log-requests, a StreamLoss cancelled after its first chunks
    crashed the server (SIGSEGV in grpc: the log line read context.peer() of the cancelled
    call); 1-5 tries did it. Now the server serves on, one line a call, each with its peer."""
    s = serve(
        "--grpc-port", "0", "--grpc-host", "127.0.0.1", "--admin-port", "-1",
        "--log-format", "json", "--device", "cpu", "--no-compile", "--log-requests",
    )  # fmt: skip
    target = f"127.0.0.1:{int(s.wait_event('grpc_listening')['port'])}"
    _wait_serving(target)
    tries = 12

    async def cancel_streams() -> None:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.LossServiceStub(ch)
            for i in range(tries):
                call = stub.StreamLoss(timeout=30)
                await call.write(pb.StreamLossRequest(chunk=_chunk(3, 4, 2 * i)))
                await call.write(pb.StreamLossRequest(chunk=_chunk(3, 4, 2 * i + 1)))
                await asyncio.sleep(0.2)
                call.cancel()
                await stub.ComputeLoss(pb.ComputeLossRequest(batch=_chunk(3, 4, 0)), timeout=30)

    asyncio.run(cancel_streams())
    assert s.proc.poll() is None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [e for e in s.events() if e.get("event") == "rpc"]
        if len(lines) >= 2 * tries:
            break
        time.sleep(0.1)
    # (grpc ends a cancelled stream's reads as if the client had half-closed it; the line said
    # OK when the handler's generator was closed at a response's write without a CancelledError)
    streams = [e["code"] for e in lines if e["rpc"] == "StreamLoss"]
    assert streams == ["CANCELLED"] * tries, streams
    assert all(e["peer"].startswith("ipv4:127.0.0.1:") for e in lines)
    assert [e["code"] for e in lines if e["rpc"] == "ComputeLoss"] == ["OK"] * tries


def test_serve_with_admin_server_in_the_same_loop(serve: Any) -> None:
    pytest.importorskip("softgate.admin")
    httpx = pytest.importorskip("httpx")
    s = serve(
        "--grpc-port", "0", "--grpc-host", "127.0.0.1", "--admin-port", "0", "--admin-host", "127.0.0.1",
        "--log-format", "json", "--device", "cpu", "--no-warmup",
    )  # fmt: skip
    port = int(s.wait_event("grpc_listening")["port"])
    admin = s.wait_event("admin_listening")["address"]
    _wait_serving(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 10
    while True:
        r = httpx.get(f"http://{admin}/readyz", timeout=2)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.status_code == 200
    assert httpx.get(f"http://{admin}/healthz", timeout=2).status_code == 200
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{admin}/healthz", timeout=1)


def test_a_sigterm_before_the_servers_handlers_ends_the_process(serve: Any) -> None:
    """An audit: until serve set its handlers (torch's imports: seconds) SIGTERM kept its
    default action, which the kernel does not deliver to a container's PID 1: `docker stop`
    waited 10 s for its SIGKILL. softgate catches it from the start and exits 143."""
    s = serve(
        "--grpc-port", "0", "--grpc-host", "127.0.0.1", "--admin-port", "-1", "--device", "cpu",
        "--no-warmup", "--allocator", "system",  # (no re-exec, whose new image starts without it)
    )  # fmt: skip
    status = Path(f"/proc/{s.proc.pid}/status")
    deadline = time.monotonic() + 20
    while s.proc.poll() is None and time.monotonic() < deadline:  # (until SIGTERM is caught)
        caught = next((ln for ln in status.read_text().splitlines() if ln.startswith("SigCgt:")), "0")
        if int(caught.split()[-1], 16) >> (signal.SIGTERM - 1) & 1:
            break
        time.sleep(0.005)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(10) == 128 + signal.SIGTERM  # (killed by it: -15; served: 0)
    assert "serving" not in s.log_path.read_text()


def test_port_in_use_exits_nonzero(serve: Any) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        s = serve(
            "--grpc-port", str(busy), "--grpc-host", "127.0.0.1", "--admin-port", "-1", "--device", "cpu",
            "--no-warmup", "--log-format", "json",
        )  # fmt: skip
        assert s.proc.wait(30) == 1
    # every line JSON, gRPC C-core's own line too; the error says why (gRPC's only names
    # GRPC_VERBOSITY)
    events = [json.loads(line) for line in s.log_path.read_text().splitlines()]
    (failed,) = [e for e in events if e["event"] == "startup_failed"]
    assert failed["error"] == f"cannot bind gRPC on 127.0.0.1:{busy}: Address already in use", events
    assert any(e["event"] == "native_log" and "Address already in use" in e["message"] for e in events)


@pytest.mark.parametrize("where", ["port in use", "host that does not resolve"])
def test_admin_bind_failure_exits_1_with_one_line(serve: Any, where: str) -> None:
    """uvicorn's sys.exit(3) inside the admin task escaped the event loop: exit 3, two tracebacks."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        admin = ["--admin-host", "127.0.0.1", "--admin-port", str(busy)]
        if where != "port in use":
            admin = ["--admin-host", "no-such-host.invalid", "--admin-port", "0"]
        s = serve(
            "--grpc-port", "0", "--grpc-host", "127.0.0.1", "--device", "cpu", "--no-warmup",
            "--log-format", "json", *admin,
        )  # fmt: skip
        assert s.proc.wait(60) == 1
    log = s.log_path.read_text()
    assert "Traceback" not in log, log
    failed = [e for e in s.events() if e.get("event") == "startup_failed"]
    assert len(failed) == 1 and failed[0]["error"].startswith("cannot bind admin on "), log


@pytest.mark.parametrize("admin", [True, False])
def test_health_follows_the_ports_the_server_bound_and_fails_once_it_exits(
    serve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], admin: bool
) -> None:
    """`softgate health` reads the status file the server wrote (ports picked by flags, here
    0, which no environment variable tells), asks /healthz or, with the admin server off,
    connects to the gRPC port; after exit the file is gone and the check fails. The images'
    HEALTHCHECK polled SOFTGATE_ADMIN_PORT only: a port set by flag or config file, or
    `--admin-port none`, read as unhealthy (an audit)."""
    status = tmp_path / "status.json"
    assert main(["health", "--status-file", str(status)]) == 1  # not started
    assert "no status file" in capsys.readouterr().err
    s = serve(
        "--grpc-port", "0", "--grpc-host", "127.0.0.1", "--admin-port", "0" if admin else "none",
        "--admin-host", "127.0.0.1", "--log-format", "json", "--device", "cpu", "--no-warmup",
        "--status-file", str(status),
    )  # fmt: skip
    port = int(s.wait_event("grpc_listening")["port"])
    _wait_serving(f"127.0.0.1:{port}")
    written = json.loads(status.read_text())
    assert written["grpc"] == ["127.0.0.1", port] and (written["admin"] is not None) == admin
    assert main(["health", "--status-file", str(status)]) == 0
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    assert not status.exists()
    assert main(["health", "--status-file", str(status)]) == 1


def test_health_refuses_a_status_file_whose_server_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file left by a server killed with SIGKILL names a pid no longer running: unhealthy,
    even when something else took its port; without a file given at all: exit 2."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"pid": int(gone.stdout), "grpc": ["127.0.0.1", 1], "admin": None}))
    assert main(["health", "--status-file", str(status)]) == 1
    assert "is gone" in capsys.readouterr().err
    for bad in ("not json", "{}", '{"pid": 1, "grpc": 5, "admin": null}'):  # unreadable: 1, no traceback
        status.write_text(bad)
        assert main(["health", "--status-file", str(status)]) == 1
        assert "unreadable status file" in capsys.readouterr().err
    monkeypatch.delenv("SOFTGATE_STATUS_FILE", raising=False)
    assert main(["health"]) == 2


def test_health_reaches_a_wildcard_ipv6_listener_over_ipv4_loopback_too(tmp_path: Path) -> None:
    """A server bound to `::` is asked on ::1 and then on 127.0.0.1, which a dual-stack
    listener answers where IPv6 is off in the container (the images' check used 127.0.0.1; a
    review). Here only 127.0.0.1 listens, and the check still passes."""
    import socket

    from softgate.status import check

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        status = tmp_path / "status.json"
        status.write_text(
            json.dumps({"pid": os.getpid(), "grpc": ["::", sock.getsockname()[1]], "admin": None})
        )
        assert check(str(status), timeout=2) is None
