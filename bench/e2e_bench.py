"""End-to-end benchmark: softgate's SAPO loss with gradient over loopback gRPC, against a
raw-bytes gRPC echo server moving the same bytes, in the same run.

Per size N (4k, 1M, 16M tokens): three float32 inputs in (logp, old_logp, per-token
advantages: 12 N bytes), the float32 gradient out (4 N bytes). The echo server gets the same
12 N bytes and sends back 4 N bytes (bench/echo_server.py: no protobuf, no compute). Both are
called through the same client-side path (numpy -> little-endian bytes -> gRPC), interleaved
(call by call from 1M tokens on, in blocks of 25 calls below), and batches above the stream
threshold are chunked the same way for both. The pairs of blocks alternate their order (ABBA:
softgate-echo, echo-softgate, ...), and every block starts after a 20 ms pause, from 1M tokens
on too: a server is still busy after its response (freeing the request, its deferred
telemetry, its threads winding down), and a random order with no pause there made the echo
follow softgate 3 times in 4 and absorb most of that work (an audit: it biased the ratio
toward softgate).

Also measured: the memory allocator of all three processes (glibc malloc vs jemalloc vs
tcmalloc through LD_PRELOAD; Debian packages libjemalloc2 and libtcmalloc-minimal4, installed
with apt-get when missing unless --no-install; tcmalloc with TCMALLOC_RELEASE_RATE=0 as
`softgate serve` runs it) and the StreamLoss chunk size.

    python bench/e2e_bench.py            # full: about 14-20 min on 2 shared cores
    python bench/e2e_bench.py --quick    # glibc + tcmalloc, one chunk size: 2 min (compiled kernel cached), longer on a fresh host
    python bench/e2e_bench.py --json out.json
    python bench/e2e_bench.py --compile false   # the eager engine (default: compiled, its CPU steady state)

Targets (issue 3): 16M-token throughput >= 80% of echo; 4k median latency <= 0.5 ms over echo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

MiB = 1 << 20
SEQ_LEN = 1024
# requests below SMALL_MAX_TOKENS are timed in alternating blocks of SMALL_BLOCK calls (see worker)
SMALL_MAX_TOKENS = 1 << 20
SMALL_BLOCK = 25
# a pause before each block: work a server defers until it is idle (softgate's telemetry after
# small calls, servicer.KICK_IDLE_S) or does after a response runs there, not in the block's calls
SETTLE_S = 0.02
SERVER_VARIANTS = (
    "cached",
    "notelemetry",
    "cached-notelemetry",
    "replay",
    "admission",
    "decode",
)  # see serve_variant
ALLOCATORS = {
    "glibc": None,
    "jemalloc": ("libjemalloc2", ["libjemalloc.so.2"]),
    "tcmalloc": ("libtcmalloc-minimal4", ["libtcmalloc_minimal.so.4"]),
}
LIB_DIRS = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/lib64"]


# ---------------------------------------------------------------- helpers


def find_lib(names: list[str]) -> str | None:
    for d in LIB_DIRS:
        for n in names:
            p = Path(d) / n
            if p.exists():
                return str(p)
    return None


def ensure_allocators(install: bool) -> dict[str, str | None]:
    """{name: LD_PRELOAD path or None for glibc}; missing ones are apt-get installed when allowed."""
    out: dict[str, str | None] = {"glibc": None}
    missing = []
    for spec in ALLOCATORS.values():
        if spec is None:
            continue
        pkg, libs = spec
        if find_lib(libs) is None:
            missing.append(pkg)
    if missing and install and shutil.which("apt-get"):
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        print(f"# installing {' '.join(missing)} with apt-get", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, timeout=300, check=False)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            env=env,
            timeout=600,
            check=False,
            stdout=subprocess.DEVNULL,
        )
    for name, spec in ALLOCATORS.items():
        if spec is None:
            continue
        path = find_lib(spec[1])
        if path is None:
            print(f"# {name}: not available (Debian package {spec[0]}), skipped", flush=True)
        else:
            out[name] = path
    return out


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit, so that the `finally` blocks stop the servers and workers
    a bench started (its default action ended the bench alone, and they ran on: an audit)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} not listening after {timeout}s")


def wait_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 600.0) -> None:
    """Until the server's health check says SERVING: `softgate serve` binds its port before
    it serves (a warm-up, where one runs, would compete with calls made during it)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server on port {port} not SERVING after {timeout}s")


def env_with(preload: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.pop("TCMALLOC_RELEASE_RATE", None)
    if preload:
        env["LD_PRELOAD"] = preload
        if "tcmalloc" in preload:  # what `softgate serve` and its images set (softgate.allocator),
            env["TCMALLOC_RELEASE_RATE"] = "0"  # in all three processes alike
    # `softgate serve` picks its own allocator (tcmalloc when installed): pin the one measured
    env["SOFTGATE_ALLOCATOR"] = preload or "system"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_servers(
    preload: str | None, max_message_bytes: int, compile: str = "true", device: str = "cpu"
) -> tuple[list[subprocess.Popen[bytes]], int, int]:
    env = env_with(preload)
    sg_port, echo_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if compile in SERVER_VARIANTS:  # softgate's gRPC server with one part changed (serve_variant)
            variant = f"{sg_port}:{max_message_bytes}:{compile}:{device}"
            cmd = [sys.executable, __file__, "--serve-variant", variant]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
        else:
            procs.append(_softgate_serve(sg_port, max_message_bytes, compile, device, env))
        echo_cmd = [sys.executable, str(ROOT / "bench" / "echo_server.py"), "--port", str(echo_port)]
        cmd = [*echo_cmd, "--max-message-bytes", str(max_message_bytes)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
        sg, echo = procs
        wait_port(echo_port, echo)
        wait_port(sg_port, sg)
        wait_serving(sg_port, sg)
    except BaseException:  # Ctrl-C or SIGTERM (exit_on_sigterm) too: never leave them listening
        stop(procs)
        raise
    return procs, sg_port, echo_port


def _softgate_serve(
    sg_port: int, max_message_bytes: int, compile: str, device: str, env: dict[str, str]
) -> Any:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "softgate.cli",
            "serve",
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            str(sg_port),
            "--admin-port",
            "-1",
            "--device",
            device,
            "--max-message-bytes",
            str(max_message_bytes),
            {"true": "--compile", "false": "--no-compile"}.get(compile, "--log-format=text"),
            # no warm-up: with --compile it compiled all seven objectives, ~4 min a server on 2
            # cores (three servers: --quick took 14 min, not its 6-7); the worker's untimed
            # first call compiles the one configuration timed, SAPO's
            "--no-warmup",
            "--log-level",
            "WARNING",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )


def first_answer(fn: Any, size: Any) -> Any:
    """`fn`, answering every call after the first of a size with that first call's answer."""
    answers: dict[Any, Any] = {}

    def answer(*args: Any, **kw: Any) -> Any:
        key = size(*args)
        if key not in answers:
            answers[key] = fn(*args, **kw)
        return answers[key]

    return answer


def cached_loss(loss: Any) -> Any:
    """Engine.loss `loss`, computing each batch size once and answering with that result after.
    A later call's `grad_out` (a large response's gradient bytes) becomes its result's gradient,
    left unwritten: a real engine writes it there and the response copies nothing, which this
    result's gradient would make it do (4 MB at 1M tokens). Only the first response of a size
    holds the gradient then."""
    first = first_answer(loss, lambda b, *_: (b.num_tokens, b.num_seqs))

    def answer(*args: Any, grad_out: Any = None, **kw: Any) -> Any:
        r = first(*args, grad_out=grad_out, **kw)
        return r if grad_out is None else dataclasses.replace(r, grad=grad_out)

    return answer


def serve_variant(port: int, max_message_bytes: int, variant: str, device: str = "cpu") -> None:
    """softgate's gRPC server (servicer, codec, telemetry: what `softgate serve` runs) with one
    part changed. "cached": an engine that computes each batch size once and then returns that
    result (`cached_loss`), so the rows show what the server path costs on top of the
    transport. "notelemetry": the compiled engine with no telemetry, so the rows show what
    recording the metrics costs.
    "cached-notelemetry": both. "replay": no servicer at all, ComputeLoss answers a request of
    a size it has seen with the bytes it answered then (bench/latency_ladder.py: what the
    client and the message sizes cost over the echo). Between replay and cached-notelemetry
    (the ladder's finer rows): "admission", the servicer's ComputeLoss (admission, deadline,
    inline run, accounting) around the answer its `_loss` gave first for the size, so no
    decoding; "decode", cached-notelemetry whose response is the first one encoded for the
    size, so no encoding."""
    import asyncio

    import torch
    from softgate.engine import Engine
    from softgate.grpc import codec
    from softgate.grpc.server import GrpcServer
    from softgate.observability.telemetry import DEFAULT_CPU_SAMPLE_TOKENS
    from softgate.serve import make_telemetry
    from softgate.settings import Settings
    from softgate.telemetry import Telemetry

    class Replay:
        """ComputeLoss through the servicer once per request size, then the same bytes back."""

        def __init__(self, servicer: Any) -> None:
            self.servicer, self.answers = servicer, {}

        def __getattr__(self, name: str) -> Any:
            return getattr(self.servicer, name)

        async def ComputeLoss(self, requests: Any, context: Any) -> Any:
            # the unary call's one request, read as a stream (server.loss_service_handler)
            request = await anext(aiter(requests))
            size = request.nbytes
            if size not in self.answers:
                self.answers[size] = await self.servicer.ComputeLoss(request, context)
            return self.answers[size]

    async def run() -> None:
        settings = Settings(
            grpc_host="127.0.0.1",
            grpc_port=port,
            admin_port=None,
            device=device,
            warmup=False,
            max_message_bytes=max_message_bytes,
        )
        cached = variant.startswith("cached") or variant in ("replay", "admission", "decode")
        engine = Engine(device=device, compile=not cached)
        if cached:  # each batch size computed once, then that result again
            engine.loss = cached_loss(engine.loss)  # type: ignore[method-assign]
        if variant == "cached":
            telemetry = make_telemetry(settings)
        else:  # nothing recorded, but the engine asked for what serve's telemetry reads (the
            # no-op's default, a 2-token sample, ran a cheaper, differently compiled kernel)
            telemetry = Telemetry()
            telemetry.sample_tokens = DEFAULT_CPU_SAMPLE_TOKENS
        server = GrpcServer(settings, engine, telemetry)
        if variant == "replay":
            server.servicer = Replay(server.servicer)  # type: ignore[assignment]
        elif variant == "admission":
            loss = first_answer(server.servicer._loss, lambda request, *_: request.ByteSize())
            server.servicer._loss = loss  # type: ignore[method-assign]
        elif variant == "decode":
            codec.encode_loss_response = first_answer(
                codec.encode_loss_response, lambda result, *_: result.grad.numel()
            )
        await server.start()
        await server.set_serving(True)
        stop_ev = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop_ev.set)
        await stop_ev.wait()
        await server.stop(1)

    torch.set_grad_enabled(False)  # as `softgate serve` runs its loop (serve._run)
    asyncio.run(run())


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------- the worker (client side)


def make_batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logp = (-rng.random(n, dtype=np.float32) * 3 - 0.01).astype(np.float32)
    old = (logp + rng.standard_normal(n, dtype=np.float32) * 0.05).clip(max=-1e-4).astype(np.float32)
    adv = rng.standard_normal(n, dtype=np.float32)
    b = max(1, n // SEQ_LEN)
    lengths = np.full(b, n // b, dtype=np.int64)
    lengths[-1] += n - int(lengths.sum())
    return {"logp": logp, "old_logp": old, "advantages": adv, "lengths": lengths}


def sapo_loss(sg: Any, b: dict[str, np.ndarray], **kw: Any) -> Any:
    """The benchmarks' call: SAPO loss and gradient of `make_batch`'s batch `b` through
    SoftgateClient `sg` (`kw`: more of `SoftgateClient.loss`'s arguments)."""
    return sg.loss(
        b["logp"], b["old_logp"], lengths=b["lengths"], advantages=b["advantages"], objective="sapo", **kw
    )


class EchoClient:
    """Sends the same bytes as the softgate request (12 N) and receives 4 N bytes back,
    chunked like StreamLoss when the batch is above the stream threshold."""

    def __init__(self, port: int, max_message_bytes: int, threshold: int, chunk: int) -> None:
        import grpc
        from echo_server import STREAM, UNARY

        opts = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self.ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
        self.unary = self.ch.unary_unary(UNARY)
        self.stream = self.ch.stream_stream(STREAM)
        self.threshold = threshold
        self.chunk = chunk

    def call(self, b: dict[str, np.ndarray]) -> np.ndarray:
        # the same cheapest path as the softgate client: one join of the arrays' memory
        from softgate_client._tensors import from_le_bytes
        from softgate_client._wire import _le_view

        arrays = [b["logp"], b["old_logp"], b["advantages"]]
        n = b["logp"].shape[0]
        total = sum(a.nbytes for a in arrays)
        if total <= self.threshold:
            out = 4 * n
            req = b"".join([out.to_bytes(8, "little"), *(_le_view(a) for a in arrays)])
            return from_le_bytes(self.unary(req), np.float32)
        tok = max(1, self.chunk // 12)

        def reqs():
            for s in range(0, n, tok):
                e = min(n, s + tok)
                yield b"".join([(4 * (e - s)).to_bytes(8, "little"), *(_le_view(a[s:e]) for a in arrays)])

        return from_le_bytes(b"".join(self.stream(reqs())), np.float32)

    def close(self) -> None:
        self.ch.close()


def abba(pairs: int, seed: int) -> list[bool]:
    """Whose turn each of `pairs` pairs of blocks is (True: softgate), the pairs' orders alternating
    from a seeded random first one: each arm is first in half the pairs and follows each arm alike.
    (A fixed order made the later of two identical servers 0.12 ms slower: bench/latency_ladder.py.)"""
    first = random.Random(seed).random() < 0.5
    return [turn for i in range(pairs) for turn in (first ^ (i % 2 == 1), first ^ (i % 2 == 0))]


def worker(args: argparse.Namespace) -> None:
    from softgate_client import SoftgateClient

    sizes = [int(s) for s in args.sizes.split(",")]
    reps = {int(k): int(v) for k, v in (kv.split(":") for kv in args.reps.split(","))}
    threshold = args.stream_threshold or int(0.9 * args.max_message_bytes)
    stream = {"auto": None, "unary": False, "stream": True}[args.stream_mode]
    if stream is True:
        threshold = 0  # the echo client streams too
    elif stream is False:
        threshold = args.max_message_bytes
    sg = SoftgateClient(
        f"127.0.0.1:{args.sg_port}",
        max_message_bytes=args.max_message_bytes,
        stream_threshold_bytes=max(threshold, 1),
        stream_chunk_bytes=args.chunk_bytes,
        run="e2e-bench",
        timeout=600,
    )
    echo = EchoClient(args.echo_port, args.max_message_bytes, threshold, args.chunk_bytes)
    results = []
    for n in sizes:
        b = make_batch(n)

        def sg_call(b: dict[str, np.ndarray] = b) -> Any:
            return sapo_loss(sg, b, stream=stream)

        def echo_call(b: dict[str, np.ndarray] = b) -> Any:
            return echo.call(b)

        # untimed calls of each size first: a trainer sends the same size again and again, and
        # the first calls of a size pay the first touch of every buffer in all three processes
        # (16M tokens with tcmalloc, one client: 1231, 501, 696, then 320-340 ms); glibc malloc
        # pays it on every call. Small calls: the server's inline path needs a few fast calls,
        # and a fresh server's first ~500 4k calls read ~0.06 ms slower than its later ones
        # (as bench/latency_ladder.py, 200 untimed calls)
        for _ in range(3 if n >= 1 << 20 else 200):
            sg_call()
            echo_call()
        k = reps.get(n, 3)
        t_sg, t_echo = [], []
        r = g = None
        # alternating blocks, so that noise from shared cores hits both alike. A block of small
        # calls, not one call each: softgate's server records telemetry after each response (up
        # to ~0.4 ms of work at 4k tokens on 2 cores), which a single echo call right after ran
        # against; one call each made the echo ~0.2 ms slower and softgate look that much better.
        # A pause before every block lets that work end; the ABBA order shares what is left alike
        block = SMALL_BLOCK if n < SMALL_MAX_TOKENS else 1
        for sg_turn in abba(-(-k // block), seed=n):
            time.sleep(SETTLE_S)
            for _ in range(block):
                # the previous answer freed before the clock starts, not inside it (64 MB at 16M
                # tokens: 2-4 ms under glibc; an audit)
                if sg_turn:
                    r = None
                    t0 = time.perf_counter()
                    r = sg_call()
                    t_sg.append(time.perf_counter() - t0)
                else:
                    g = None
                    t0 = time.perf_counter()
                    g = echo_call()
                    t_echo.append(time.perf_counter() - t0)
        assert (
            r is not None
            and g is not None
            and r.grad.shape == (n,)
            and np.isfinite(r.loss)
            and g.shape == (n,)
        )
        # the last answers are right (a fast wrong answer would have passed for a fast one; an
        # audit): the echo's is the request's first array, softgate's the eager engine's loss and
        # gradient (the served kernel may round otherwise: compiled, one fused loop). Not for a
        # cached engine, whose later answers leave the gradient unwritten (cached_loss)
        np.testing.assert_array_equal(g, b["logp"])
        if not args.no_check:
            want = _reference(n)
            np.testing.assert_allclose(r.loss, want.loss, rtol=1e-4)
            scale = float(np.abs(want.grad).max())
            np.testing.assert_allclose(r.grad, want.grad, rtol=1e-4, atol=1e-5 * scale)
        res = {
            "tokens": n,
            "reps": k,
            "streamed": bool(r.streamed),
            "chunks": int(r.chunks),
            "softgate_median_s": statistics.median(t_sg),
            "echo_median_s": statistics.median(t_echo),
            "softgate_min_s": min(t_sg),
            "echo_min_s": min(t_echo),
        }
        res["throughput_ratio"] = res["echo_median_s"] / res["softgate_median_s"]
        res["latency_diff_ms"] = (res["softgate_median_s"] - res["echo_median_s"]) * 1e3
        res["softgate_mtok_s"] = n / res["softgate_median_s"] / 1e6
        res["echo_mtok_s"] = n / res["echo_median_s"] / 1e6
        results.append(res)
    sg.close()
    echo.close()
    print("RESULT " + json.dumps(results), flush=True)


def _reference(n: int) -> Any:
    """The eager in-process engine's SAPO loss and gradient of `make_batch(n)` (numpy gradient)."""
    from softgate.engine import Engine, LossConfig

    r = Engine(device="cpu", compile=False).loss(engine_batch(n), LossConfig())
    return dataclasses.replace(r, grad=r.grad.numpy())


def engine_batch(n: int) -> Any:
    """`make_batch(n)` as the engine's Batch (its tensors share the arrays' memory)."""
    import torch
    from softgate.engine import Batch

    b = make_batch(n)
    return Batch(
        logp=torch.from_numpy(b["logp"]),
        old_logp=torch.from_numpy(b["old_logp"]),
        advantages=torch.from_numpy(b["advantages"]),
        offsets=Batch.offsets_from_lengths(torch.from_numpy(b["lengths"])),
    )


def engine_only(n: int, reps: int, compile: str = "true", device: str = "cpu") -> float:
    """Median seconds of the in-process engine on the same batch, called as the server calls it
    for a gradient-only request (ratio and gate weight for the telemetry's CPU sample only),
    the gradient copied back to the host as the server sends it."""
    from softgate.engine import Engine, LossConfig
    from softgate.engine.transfer import to_host
    from softgate.observability.telemetry import DEFAULT_CPU_SAMPLE_TOKENS

    batch = engine_batch(n)
    mode: bool | str | None = {"true": True, "false": False, "auto": None}.get(compile, compile)
    eng = Engine(device=device, compile=mode)
    cfg, k = LossConfig(), DEFAULT_CPU_SAMPLE_TOKENS

    def call() -> None:
        to_host([eng.loss(batch, cfg, sample_tokens=k).grad])

    call()
    eng.wait_compiled(600)  # a background compile: measure what follows it
    call()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def engine_subprocess(
    n: int, reps: int, preload: str | None, compile: str = "true", device: str = "cpu"
) -> float:
    """`engine_only` in a fresh process running on `preload`'s allocator (one warm-up call first)."""
    out = subprocess.run(
        [sys.executable, __file__, "--engine-only", f"{n}:{reps}:{compile}:{device}"],
        env=env_with(preload),
        capture_output=True,
        text=True,
        timeout=900,
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"engine-only run failed:\n{out.stderr[-3000:]}")
    return float(line.split()[1])


# ---------------------------------------------------------------- orchestration


def run_config(
    name: str,
    preload: str | None,
    chunk: int,
    sizes: list[int],
    reps: str,
    args: argparse.Namespace,
    mode: str = "auto",
    engine: str | None = None,
) -> list[dict[str, Any]]:
    procs, sg_port, echo_port = start_servers(
        preload, args.max_message_bytes, engine or args.compile, args.device
    )
    try:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--sg-port",
            str(sg_port),
            "--echo-port",
            str(echo_port),
            "--sizes",
            ",".join(map(str, sizes)),
            "--reps",
            reps,
            "--chunk-bytes",
            str(chunk),
            "--max-message-bytes",
            str(args.max_message_bytes),
            "--stream-mode",
            mode,
        ]
        if args.stream_threshold:
            cmd += ["--stream-threshold", str(args.stream_threshold)]
        if (engine or "").startswith("cached"):
            cmd.append("--no-check")
        out = subprocess.run(cmd, env=env_with(preload), capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"worker failed ({name}):\n{out.stderr[-3000:]}")
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
        res = json.loads(line[len("RESULT ") :])
        for r in res:
            r["allocator"] = name
            r["chunk_bytes"] = chunk
        return res
    finally:
        stop(procs)


def fmt_row(r: dict[str, Any]) -> str:
    call = f"stream, {r['chunk_bytes'] // MiB} MiB x {r['chunks']}" if r["streamed"] else "unary"
    return (
        f"| {r['allocator']} | {r['tokens']:,} | {call} | "
        f"{r['softgate_median_s'] * 1e3:.2f} | {r['echo_median_s'] * 1e3:.2f} | "
        f"{r['throughput_ratio'] * 100:.0f}% | {r['latency_diff_ms']:+.2f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description="softgate end-to-end loopback benchmark vs a raw-bytes echo server"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions and configurations (~2 min on 2 cores with the kernel cache warm)",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--no-install", action="store_true", help="never apt-get install allocators")
    p.add_argument(
        "--server-path",
        action="store_true",
        help="also in --quick: the server path with a cached engine (always in the full run)",
    )
    p.add_argument(
        "--compile",
        default="true",
        choices=["true", "false", "auto"],
        help="the server's engine compile setting (default true: the steady state of the CPU default, "
        "auto = serve's background compile, which starts at the first call: the timings then include "
        "eager calls and calls beside the compile, ~25 s on 2 cores; an audit)",
    )
    p.add_argument(
        "--device", default="cpu", help="the server's engine device (cpu, cuda, cuda:N); default cpu"
    )
    p.add_argument(
        "--allocators",
        default="",
        help="comma-separated subset of glibc,jemalloc,tcmalloc (default: all found)",
    )
    p.add_argument("--no-sweep", action="store_true", help="skip the StreamLoss chunk-size sweep")
    p.add_argument("--no-server-path", action="store_true", help="skip the server-path rows of the full run")
    p.add_argument("--max-message-bytes", type=int, default=512 * MiB)
    p.add_argument(
        "--stream-threshold", type=int, default=0, help="0: the client default (90%% of the limit)"
    )
    p.add_argument(
        "--chunk-bytes", type=int, default=0, help="chunk size of the allocator sweep (0: client default)"
    )
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine-only", default="", help=argparse.SUPPRESS)
    p.add_argument("--serve-variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--sg-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--echo-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    p.add_argument("--reps", default="", help=argparse.SUPPRESS)
    p.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--stream-mode", default="auto", choices=["auto", "unary", "stream"], help=argparse.SUPPRESS
    )
    args = p.parse_args()
    unknown = sorted(set(args.allocators.split(",")) - set(ALLOCATORS)) if args.allocators else []
    if unknown:  # (a misspelt one measured glibc: an audit)
        p.error(
            f"--allocators: unknown {', '.join(map(repr, unknown))}; expected a subset of {', '.join(ALLOCATORS)}"
        )
    exit_on_sigterm()
    if args.serve_variant:
        port_s, limit_s, variant, device = args.serve_variant.split(":", 3)
        serve_variant(int(port_s), int(limit_s), variant, device)
        return
    if args.engine_only:  # TOKENS:REPS:COMPILE[:DEVICE] (bench/RESULTS.md quotes it without the device)
        fields = args.engine_only.split(":", 3)
        if len(fields) < 3 or not (fields[0].isdigit() and fields[1].isdigit()):
            p.error(f"--engine-only {args.engine_only!r}: expected TOKENS:REPS:COMPILE[:DEVICE]")
        device = fields[3] if len(fields) == 4 else "cpu"
        print(f"RESULT {engine_only(int(fields[0]), int(fields[1]), fields[2], device)}", flush=True)
        return
    if args.worker:
        worker(args)
        return

    from softgate_client.client import DEFAULT_CHUNK_BYTES

    default_chunk = args.chunk_bytes or DEFAULT_CHUNK_BYTES
    t_start = time.monotonic()
    k4, m1, m16 = 4096, 1 << 20, 16 << 20
    if args.quick:  # glibc and tcmalloc only, one streamed chunk size
        sizes, reps = [k4, m1, m16], f"{k4}:200,{m1}:2,{m16}:1"
        chunk_sweep = [16 * MiB]
        sweep_reps = f"{m16}:1"
    else:
        sizes, reps = [k4, m1, m16], f"{k4}:1000,{m1}:8,{m16}:8"
        chunk_sweep = [4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB, 64 * MiB]
        sweep_reps = f"{m16}:2"
    allocs = ensure_allocators(not args.no_install)
    wanted = args.allocators.split(",") if args.allocators else ["glibc", "tcmalloc"] if args.quick else []
    if wanted:
        missing = [k for k in wanted if k not in allocs]
        allocs = {k: v for k, v in allocs.items() if k in wanted}
        if missing:  # (a GPU host without tcmalloc: measure on glibc rather than nothing)
            print(f"# allocators not installed here: {missing}", flush=True)
            allocs = allocs or {"glibc": None}
    # the shipped default: softgate serve preloads tcmalloc when installed (softgate.allocator),
    # else glibc's malloc; a subset with neither is summarised on the allocator it has
    shipped = next(a for a in ("tcmalloc", "glibc", *allocs) if a in allocs)
    default = " (the default)" if shipped != "jemalloc" else ""
    from softgate.engine.engine import DEFAULT_HOST_MAX_TOKENS

    # a CUDA server computes calls up to this on the host (its environment is the bench's)
    host_max = int(os.environ.get("SOFTGATE_HOST_MAX_TOKENS", DEFAULT_HOST_MAX_TOKENS))
    host = "" if args.device == "cpu" else f" (calls up to {host_max:,} tokens on the host CPU)"
    print(
        f"# python {sys.version.split()[0]}, {os.cpu_count()} cores, engine on {args.device}{host}; "
        f"allocators: {list(allocs)}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for name, preload in allocs.items():
        print(f"# allocator {name} ...", flush=True)
        res = run_config(name, preload, default_chunk, sizes, reps, args)
        rows.extend(res)
        for r in res:
            print(fmt_row(r), flush=True)
    # the best allocator at 16M, then the StreamLoss chunk sweep under it (16M forced to stream)
    big = [r for r in rows if r["tokens"] == m16]
    best_alloc = min(big, key=lambda r: r["softgate_median_s"])["allocator"]
    print(f"# chunk sweep, 16M streamed, {best_alloc} ...", flush=True)
    res = []
    for chunk in [] if args.no_sweep else chunk_sweep:
        out = run_config(best_alloc, allocs[best_alloc], chunk, [m16], sweep_reps, args, mode="stream")
        res.extend(out)
        for r in out:
            print(fmt_row(r), flush=True)
    rows.extend(res)
    # the server path alone: softgate's server with an engine that costs nothing (computes each
    # size once, then returns that result): what softgate adds to the transport, engine aside
    path_rows: list[dict[str, Any]] = []
    if (not args.quick or args.server_path) and not args.no_server_path:
        label = f"{shipped}, no engine"
        print(f"# server path with a cached engine, {shipped} ...", flush=True)
        path_rows += run_config(label, allocs[shipped], default_chunk, sizes, reps, args, engine="cached")
        path_rows += run_config(
            label, allocs[shipped], default_chunk, [m16], sweep_reps, args, mode="stream", engine="cached"
        )
        # the whole server but the telemetry: what recording the metrics costs a caller
        print(f"# compiled engine without telemetry, {shipped} ...", flush=True)
        path_rows += run_config(
            f"{shipped}, no telemetry",
            allocs[shipped],
            default_chunk,
            [k4, m1],
            reps,
            args,
            engine="notelemetry",
        )
        for r in path_rows:
            print(fmt_row(r), flush=True)
    # the engine alone, in a process with the same allocator as the server it is compared with
    eng = engine_subprocess(m16, 3 if args.quick else 5, allocs[shipped], args.compile, args.device)
    eng1m = engine_subprocess(m1, 5, allocs[shipped], args.compile, args.device)
    elapsed = time.monotonic() - t_start

    print()
    print("| allocator | tokens | call | softgate ms | echo ms | throughput vs echo | latency diff ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows + path_rows:
        print(fmt_row(r))
    base16 = next(
        r
        for r in rows
        if r["tokens"] == m16 and r["allocator"] == shipped and r["chunk_bytes"] == default_chunk
    )
    base4k = next(r for r in rows if r["tokens"] == k4 and r["allocator"] == shipped)
    best16 = min((r for r in rows if r["tokens"] == m16), key=lambda r: r["softgate_median_s"])
    best4k = min((r for r in rows if r["tokens"] == k4), key=lambda r: r["latency_diff_ms"])
    print()
    print(
        f"16M tokens, {shipped}{default}, {'stream' if base16['streamed'] else 'unary'}: softgate {base16['softgate_mtok_s']:.2f} Mtok/s, "
        f"echo {base16['echo_mtok_s']:.2f} Mtok/s -> {base16['throughput_ratio'] * 100:.1f}% of echo (target >= 80%)"
    )
    print(
        f"4k tokens, {shipped}: median latency softgate {base4k['softgate_median_s'] * 1e3:.2f} ms, echo "
        f"{base4k['echo_median_s'] * 1e3:.2f} ms -> {base4k['latency_diff_ms']:+.2f} ms over echo (target <= 0.5 ms)"
    )
    print(
        f"in-process engine alone, as served ({shipped}, {args.device}, same batch): 16M {eng * 1e3:.0f} ms, 1M {eng1m * 1e3:.1f} ms; "
        f"16M transport+codec overhead over the engine: {(base16['softgate_median_s'] - eng) * 1e3:.0f} ms"
    )
    print(
        f"best 16M: {best16['allocator']}, "
        f"{'stream ' + str(best16['chunk_bytes'] // MiB) + ' MiB chunks' if best16['streamed'] else 'unary'} "
        f"({best16['softgate_median_s'] * 1e3:.0f} ms, {best16['throughput_ratio'] * 100:.0f}% of echo); "
        f"best 4k latency: {best4k['allocator']} ({best4k['latency_diff_ms']:+.2f} ms)"
    )
    for r in path_rows:
        if r["allocator"].endswith("no telemetry") and r["tokens"] == k4:
            print(f"without telemetry (compiled engine), 4,096 tokens unary: {r['latency_diff_ms']:+.2f} ms")
        elif r["tokens"] in (k4, m16):
            print(
                f"server path alone (cached engine), {r['tokens']:,} tokens "
                f"{'stream' if r['streamed'] else 'unary'}: {r['throughput_ratio'] * 100:.0f}% of echo, "
                f"{r['latency_diff_ms']:+.2f} ms"
            )
    print(f"bench wall time {elapsed:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "server_path_rows": path_rows,
                    "engine_16m_s": eng,
                    "engine_1m_s": eng1m,
                    "elapsed_s": elapsed,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
