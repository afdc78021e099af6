"""Shared fixtures: free ports, test-time certificates (trustme), a softgate server in a
subprocess (real `softgate serve`, for RSS, signals and logs) or in this process (for
monkeypatching the engine).

Other test files may add fixtures here; keep each one self-contained.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
from softgate.engine.compiled import MIN_TORCH, compiles_ahead_of_time
from softgate.telemetry import Telemetry

REPO = Path(__file__).resolve().parent.parent
# engines built without an explicit `compile` stay eager in tests (CPU's default would queue
# background compiles); tests of compilation pass compile= themselves
os.environ.setdefault("SOFTGATE_ENGINE_COMPILE", "0")
# tests of the compiled kernels: pyproject admits torch 2.4, which runs the engine eager
needs_compile = pytest.mark.skipif(
    not compiles_ahead_of_time(), reason=f"the compiled kernels need torch >= {MIN_TORCH}"
)


def missing_tool(why: str) -> NoReturn:
    """A test's external tool (scripts/tools/*.sh, run by `make tools`) is missing: skip here,
    fail under CI (CI set), which ran `make tools`."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI runs make tools)")
    pytest.skip(why)


# ---------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now: all held open while the OS picks
    them (two free_port() calls in a row can return the same port, which then serves as both
    the gRPC and the admin port of one server, and its second bind fails)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@pytest.fixture
def port() -> int:
    return free_port()


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certs:
    """PEM files and bytes of a test PKI: a CA, a server certificate for localhost /
    127.0.0.1 signed by it, a client certificate signed by it, and a client certificate
    signed by an unrelated CA (must be refused by a mutual-TLS server)."""

    dir: Path
    ca_pem: bytes
    server_cert: Path
    server_key: Path
    ca_file: Path
    client_cert_pem: bytes
    client_key_pem: bytes
    other_ca_pem: bytes
    other_client_cert_pem: bytes
    other_client_key_pem: bytes

    @property
    def server_cert_pem(self) -> bytes:
        return self.server_cert.read_bytes()

    @property
    def server_key_pem(self) -> bytes:
        return self.server_key.read_bytes()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    client = ca.issue_cert("softgate-test-client@example.com")
    other_ca = trustme.CA()
    other_client = other_ca.issue_cert("intruder@example.com")
    server_cert = d / "server.pem"
    server_key = d / "server.key"
    ca_file = d / "ca.pem"
    server_cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server_key.write_bytes(server.private_key_pem.bytes())
    server_key.chmod(0o600)
    ca_file.write_bytes(ca.cert_pem.bytes())
    return Certs(
        dir=d,
        ca_pem=ca.cert_pem.bytes(),
        server_cert=server_cert,
        server_key=server_key,
        ca_file=ca_file,
        client_cert_pem=b"".join(blob.bytes() for blob in client.cert_chain_pems),
        client_key_pem=client.private_key_pem.bytes(),
        other_ca_pem=other_ca.cert_pem.bytes(),
        other_client_cert_pem=b"".join(blob.bytes() for blob in other_client.cert_chain_pems),
        other_client_key_pem=other_client.private_key_pem.bytes(),
    )


# ---------------------------------------------------------------- bench/


def bench_module(name: str) -> Any:
    """bench/NAME.py as a module (harnesses and figures the tests share with the benchmarks)."""
    import importlib.util

    key = f"softgate_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


def load_bench_module() -> Any:
    """bench/load_bench.py as a module (the load harness the tests share with the benchmark)."""
    return bench_module("load_bench")


@pytest.fixture(scope="session")
def load_bench() -> Any:
    return load_bench_module()


# ---------------------------------------------------------------- the engine's kernel


def kernel_args(batch: Any, cfg: Any, sample_tokens: int | None = None) -> tuple[Any, ...]:
    """kernel.token_terms' arguments for `batch` as compute_loss builds them."""
    from softgate.engine.kernel import token_terms
    from softgate.engine.loss import compute_loss

    seen: list[tuple[Any, ...]] = []

    def capture(*args: Any) -> Any:
        seen.append(args)
        return token_terms(*args)

    compute_loss(batch, cfg, kernel=capture, sample_tokens=sample_tokens)
    return seen[0]


# ---------------------------------------------------------------- health


def grpc_health(channel: Any, timeout: float = 2.0) -> str:
    """The gRPC health status ("SERVING", ...) of the whole server ("" service name)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    resp = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=timeout
    )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


# ---------------------------------------------------------------- log records


class LogRecords(logging.Handler):
    """Every record a logger hands it, kept in `records`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def fields(self, event: str) -> list[dict[str, Any]]:
        """The structured fields of each record of `event`, in order."""
        return [dict(getattr(r, "fields", {})) for r in self.records if r.getMessage() == event]


@contextlib.contextmanager
def log_records(name: str, level: int = logging.DEBUG) -> Iterator[LogRecords]:
    """The records of logger `name` at `level` and above while the block runs, whatever
    softgate.logging.configure() did to propagation."""
    logger = logging.getLogger(name)
    handler, saved = LogRecords(), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


# ---------------------------------------------------------------- a server in a subprocess


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS of /proc/<pid>/status), bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class ServerProcess:
    """`softgate serve` running in a subprocess on loopback; stdout+stderr go to `log_path`.

    Settings travel as SOFTGATE_* environment variables (the Settings loader reads them),
    so this works whatever the CLI's flag spelling."""

    settings: dict[str, Any]
    log_path: Path
    grpc_port: int = 0
    admin_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # channel() keywords for the start-up health check of a TLS server: root=, cert=, key=
    health_creds: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTGATE_")}
        env.update(self.extra_env)
        env.setdefault("SOFTGATE_ENGINE_COMPILE", "0")
        env["PYTHONUNBUFFERED"] = "1"
        for k, v in self.settings.items():
            env["SOFTGATE_" + k.upper()] = "none" if v is None else str(v)
        return env

    def start(self, timeout: float = 60.0) -> ServerProcess:
        grpc_port, admin_port = free_ports(2)
        self.grpc_port = int(self.settings.setdefault("grpc_port", grpc_port))
        self.settings.setdefault("grpc_host", "127.0.0.1")
        self.settings.setdefault("admin_host", "127.0.0.1")
        if "admin_port" not in self.settings:
            self.settings["admin_port"] = admin_port if admin_port != self.grpc_port else free_ports(2)[1]
        ap = self.settings["admin_port"]
        self.admin_port = None if ap in (None, -1, "none") else int(ap)
        self.settings.setdefault("device", "cpu")
        self.settings.setdefault("warmup", "false")
        self.settings.setdefault("compile", "false")
        logf = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "softgate.cli", "serve"],
            env=self.env(),
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self._logf = logf
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        import grpc

        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"softgate serve exited with {self.proc.returncode}:\n{self.logs()[-4000:]}"
                )
            try:
                with self.channel(**self.health_creds) as ch:
                    if grpc_health(ch, timeout=1.0) == "SERVING":
                        return
            except grpc.RpcError as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"softgate serve not serving after {timeout}s ({last}):\n{self.logs()[-4000:]}")

    def channel(self, **kw: Any) -> Any:
        """A channel to the server: plaintext, or TLS trusting `root` (PEM bytes) when given."""
        import grpc

        root = kw.pop("root", None)
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        if root is None:
            return grpc.insecure_channel(self.target, options=opts)
        creds = grpc.ssl_channel_credentials(
            root_certificates=root, private_key=kw.pop("key", None), certificate_chain=kw.pop("cert", None)
        )
        return grpc.secure_channel(self.target, creds, options=opts)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(Exception):
            self._logf.close()
        return self.proc.returncode


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Any]:
    """Factory: `serve_process(max_concurrent_rpcs=4, ...)` starts `softgate serve` with
    those settings on free loopback ports; every server started is stopped at teardown."""
    started: list[ServerProcess] = []

    def start(
        log_name: str = "server.log", env: dict[str, str] | None = None, **settings: Any
    ) -> ServerProcess:
        sp = ServerProcess(settings=dict(settings), log_path=tmp_path / log_name, extra_env=dict(env or {}))
        started.append(sp)
        return sp.start()

    yield start
    for sp in started:
        sp.stop()


# ---------------------------------------------------------------- a servicer without a server


class StandInContext:
    """What LossServicer reads of grpc's servicer context: metadata, deadline, cancel state,
    done callbacks (run them to end the call), a failure's status (`code`, `details`), abort
    (a refusal at admission: raises Aborted)."""

    class Aborted(Exception):
        pass

    def __init__(self, metadata: tuple[tuple[str, Any], ...] = (), remaining: float | None = None) -> None:
        self.metadata = metadata
        self.remaining = remaining
        self.is_cancelled = False
        self.callbacks: list[Any] = []
        self.aborted: tuple[Any, str] | None = None
        self.code: Any = None
        self.details: str | None = None
        self.trailing_metadata: Any = ()

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return self.remaining

    def add_done_callback(self, fn: Any) -> None:
        self.callbacks.append(fn)

    def cancelled(self) -> bool:
        return self.is_cancelled

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing_metadata = metadata

    async def abort(self, code: Any, message: str, trailing_metadata: Any = ()) -> None:
        self.aborted = (code, message)
        raise StandInContext.Aborted(code)


class RecordingTelemetry(Telemetry):
    """The servicer's telemetry hooks as events; `finished`: each call's (rpc, run, code,
    bytes_out); `observed`: the run of each loss batch recorded."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.finished: list[tuple[str, str, str, int]] = []
        self.observed: list[str] = []

    def request_started(self, rpc: str, run: str, tokens: int) -> None:
        self.events.append(("started", rpc, run, tokens))

    def request_finished(
        self,
        rpc: str,
        run: str,
        code: str,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        tokens: int,
        sequences: int,
        started: bool = True,
    ) -> None:
        self.events.append(("finished", rpc, run, code, tokens, sequences, bytes_in > 0))
        self.finished.append((rpc, run, code, bytes_out))

    def rejected(self, rpc: str, reasons: list[str]) -> None:
        self.events.append(("rejected", rpc, tuple(reasons)))

    def observe_loss(self, run: str, config: Any, result: Any) -> None:
        self.events.append(("loss", run, type(result).__name__))
        self.observed.append(run)

    def observe_advantages(self, run: str, config: Any, result: Any) -> None:
        self.events.append(("advantages", run))


def loss_result(n: int = 256, seed: int = 0, **metrics: float) -> Any:
    """A `LossResult` of `n` random tokens with hand-set engine metrics (`metrics` overrides
    them) and no bucket codes (telemetry buckets the tensors itself)."""
    import torch
    from softgate.engine import LossResult

    g = torch.Generator().manual_seed(seed)
    ratio = torch.exp(torch.randn(n, generator=g) * 0.1)
    adv = torch.randn(n, generator=g)
    p = torch.sigmoid(ratio - 1)
    mask = torch.rand(n, generator=g) > 0.1
    pos, neg = float((mask & (adv > 0)).sum()), float((mask & (adv < 0)).sum())
    m = {
        "num_tokens": float(mask.sum()),
        "num_seqs": 8.0,
        "num_groups": 2.0,
        "tokens_pos": pos,
        "tokens_neg": neg,
        "tokens_zero": 0.0,
        "clip_low": 0.1,
        "clip_high": 0.05,
        "dual_clip": 0.0,
        "gate_mean_pos": 0.9,
        "gate_mean_neg": 0.8,
        "gate_saturation_pos": 0.02,
        "gate_saturation_neg": 0.3,
        "grad_retained": 0.85,
        "approx_kl": 0.002,
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "clamped_tokens": 0.0,
        "adv_mean": 0.0,
        "adv_std": 1.0,
        "degenerate_group_frac": 0.5,
        "reward_mean": 0.4,
        "reward_std": 0.2,
    }
    m.update(metrics)
    return LossResult(
        loss=0.0,
        policy_loss=0.0,
        kl_loss=0.0,
        grad=torch.zeros(n),
        advantages=adv,
        ratio=ratio,
        gate_weight=4 * p * (1 - p),
        clip_mask=torch.zeros(n, dtype=torch.bool),
        mask=mask,
        metrics=m,
    )


def f32_batch_msg(seqs: int, length: int, seed: int) -> Any:
    """A `softgate.v1.Batch` of `seqs` float32 sequences of `length` tokens (logp, old_logp,
    per-sequence advantages, offsets), random by `seed`."""
    import numpy as np
    from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

    rng = np.random.default_rng(seed)
    n = seqs * length
    logp = (-rng.random(n) - 0.5).astype(np.float32)

    def t(a: Any, dtype: int) -> Any:
        return pb.Tensor(dtype=dtype, shape=[a.size], data=a.tobytes())

    return pb.Batch(
        logp=t(logp, pb.DTYPE_FLOAT32),
        old_logp=t(logp + np.float32(0.01), pb.DTYPE_FLOAT32),
        advantages=t(rng.standard_normal(seqs).astype(np.float32), pb.DTYPE_FLOAT32),
        offsets=t(np.arange(0, n + 1, length, dtype=np.int64), pb.DTYPE_INT64),
    )


# ---------------------------------------------------------------- a server in this process


@dataclass
class InProcessServer:
    """`softgate.grpc.GrpcServer` on its own event loop in a background thread (plaintext,
    loopback); its engine may be replaced or monkeypatched by the test."""

    grpc_server: Any
    loop: Any
    thread: Any
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> Any:
        import grpc

        return grpc.insecure_channel(
            self.target,
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self.loop.is_running():
            with contextlib.suppress(Exception):
                self.call(self.grpc_server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def inprocess_server() -> Iterator[Any]:
    """Factory: `inprocess_server(engine=..., max_concurrent_rpcs=4)` -> a SERVING InProcessServer."""
    import asyncio
    import threading

    from softgate.engine import Engine
    from softgate.grpc.server import GrpcServer
    from softgate.settings import Settings

    started: list[InProcessServer] = []

    def start(engine: Any = None, **settings: Any) -> InProcessServer:
        settings.setdefault("grpc_host", "127.0.0.1")
        settings.setdefault("grpc_port", 0)
        settings.setdefault("admin_port", None)
        settings.setdefault("device", "cpu")
        settings.setdefault("warmup", False)
        s = Settings(**settings)
        eng = engine if engine is not None else Engine(device="cpu", compile=False)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="inprocess-grpc", daemon=True)
        thread.start()
        gs = GrpcServer(s, eng)

        async def boot() -> int:
            port = await gs.start()
            await gs.set_serving(True)
            return int(port)

        port = asyncio.run_coroutine_threadsafe(boot(), loop).result(30)
        srv = InProcessServer(gs, loop, thread, port)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def self_signed(
    tmp_path: Path,
    key: Any,
    *,
    days: tuple[float, float] = (0, 1),
    key_format: str = "PKCS8",
    password: bytes | None = None,
) -> dict[str, str]:
    """A self-signed certificate of `key` (a `cryptography` private key), valid from `days[0]`
    to `days[1]` days from now, and the key (`key_format`, encrypted with `password`), as files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .sign(key, None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else SHA256())
    )
    paths = {"tls_cert": str(tmp_path / "cert.pem"), "tls_key": str(tmp_path / "key.pem")}
    Path(paths["tls_cert"]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(paths["tls_key"]).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            getattr(serialization.PrivateFormat, key_format),
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption(),
        )
    )
    return paths
