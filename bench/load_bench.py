"""Load harness and benchmark: many concurrent gRPC clients against one softgate server.

    python3 bench/load_bench.py                        # starts `softgate serve` on loopback (eager)
    python3 bench/load_bench.py --target host:50051    # an already running server
    python3 bench/load_bench.py --clients 1,4,16,64 --seconds 10 --mix small

Each client is a thread with its own channel (its own HTTP/2 connection) that sends
pre-serialised requests in a closed loop: unary ComputeLoss and streamed StreamLoss, small
(~512 tokens) and large (~32K tokens) batches. Every reply is checked against the loss and
gradient the in-process engine computes for the same request (decoded by the server's own
codec), so a reply that belongs to another request, or a corrupted one, counts as wrong.
The report has requests/s and tokens/s, latency percentiles, status codes, and (for a local
server) the server's RSS over time from /proc/<pid>/status.

The server it starts (`start_server`) runs the eager engine (SOFTGATE_ENGINE_COMPILE=0 unless
the environment sets it; `--setting compile=true` compiles) with `max_concurrent_rpcs=256`, and
logs to a temporary file that is removed after a clean run and kept, its path printed, after a
failed one. Of the caller's SOFTGATE_* variables it passes on SOFTGATE_ENGINE_COMPILE and
SOFTGATE_ALLOCATOR only; its settings and `--setting` give the rest.

A call's latency is the RPC alone: the client checks the reply after taking it (a check takes
0.1-0.3 ms). In the closed loop the check still comes between a client's calls, so req/s at
one client includes it.

`run_load` is also what tests/test_load.py runs (shorter, with assertions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent

LOSS_METHOD = "/softgate.v1.LossService/ComputeLoss"
STREAM_METHOD = "/softgate.v1.LossService/StreamLoss"
_ident: Callable[[bytes], bytes] = lambda b: b  # noqa: E731 - identity (de)serializer


# ---------------------------------------------------------------- workloads


@dataclass
class Workload:
    """One request (unary or streamed, pre-serialised) and the reply it must get."""

    name: str
    kind: str  # "unary" or "stream"
    payload: bytes | list[bytes]  # ComputeLossRequest, or the StreamLossRequest messages
    tokens: int
    sequences: int
    loss: float
    grad: np.ndarray  # float32 / float64, length tokens


OBJECTIVES = ("sapo", "grpo", "gspo", "cispo")
# the kinds of request each size of `build_workloads` comes in (small ones are unary only)
KINDS = {"small": frozenset({"unary"}), "large": frozenset({"unary", "stream"})}
KINDS["all"] = KINDS["small"] | KINDS["large"]


def _tensor(pb: Any, a: np.ndarray) -> Any:
    dt = {
        np.dtype(np.float32): pb.DTYPE_FLOAT32,
        np.dtype(np.float64): pb.DTYPE_FLOAT64,
        np.dtype(np.int64): pb.DTYPE_INT64,
        np.dtype(np.bool_): pb.DTYPE_BOOL,
    }[a.dtype]
    return pb.Tensor(
        dtype=dt, shape=[a.size], data=np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
    )


def random_batch_arrays(
    rng: np.random.Generator, seqs: int, mean_len: int, group: int = 4
) -> dict[str, np.ndarray]:
    """A realistic ragged batch: logp near -1, old_logp a small perturbation, 90% trained,
    rewards in {0, 1} per sequence, groups of `group` sequences."""
    lengths = rng.integers(max(1, mean_len // 2), mean_len * 3 // 2 + 1, size=seqs)
    n = int(lengths.sum())
    offsets = np.zeros(seqs + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    logp = (-np.abs(rng.normal(1.0, 0.8, n))).astype(np.float32)
    old = np.minimum(logp + rng.normal(0, 0.15, n), 0.0).astype(np.float32)
    return {
        "logp": logp,
        "old_logp": old,
        "mask": rng.random(n) < 0.9,
        "offsets": offsets,
        "rewards": rng.integers(0, 2, seqs).astype(np.float32),
        "group_ids": (np.arange(seqs) // group).astype(np.int64),
    }


def _batch_msg(pb: Any, arrs: dict[str, np.ndarray], s0: int = 0, s1: int | None = None) -> Any:
    off = arrs["offsets"]
    s1 = len(off) - 1 if s1 is None else s1
    t0, t1 = int(off[s0]), int(off[s1])
    b = pb.Batch()
    b.offsets.CopyFrom(_tensor(pb, off[s0 : s1 + 1] - t0))
    for k in ("logp", "old_logp", "mask"):
        getattr(b, k).CopyFrom(_tensor(pb, arrs[k][t0:t1]))
    for k in ("rewards", "group_ids"):
        getattr(b, k).CopyFrom(_tensor(pb, arrs[k][s0:s1]))
    return b


def _config_msg(pb: Any, objective: str) -> Any:
    c = pb.LossConfig()
    getattr(c.objective, objective).SetInParent()
    return c


def expected_reply(request: Any) -> tuple[float, np.ndarray]:
    """Loss and gradient the server must send for a ComputeLossRequest: the server's own
    codec and a CPU engine, in this process."""
    import torch
    from softgate.engine import Engine
    from softgate.grpc import codec

    v: list[Any] = []
    batch = codec.decode_batch(request.batch, "batch.", v)
    config = codec.decode_loss_config(request.config, v)
    assert batch is not None and not v, v
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Engine(device="cpu", compile=False)
    r = _ENGINE.loss(batch, config)
    g = r.grad.detach().cpu()
    return float(r.loss), g.numpy().copy() if g.dtype != torch.bfloat16 else g.float().numpy()


_ENGINE: Any = None


def build_workloads(
    seed: int = 0,
    *,
    small: int = 6,
    large: int = 4,
    streamed: int = 3,
    large_seqs: int = 64,
    large_len: int = 512,
) -> list[Workload]:
    """A pool of requests with their expected replies: small unary (8 x ~64 tokens), large unary
    (`large_seqs` x ~`large_len` tokens) and large streamed in 4 chunks, objectives rotating."""
    from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

    rng = np.random.default_rng(seed)
    out: list[Workload] = []
    specs = (
        [("small", "unary", 8, 64)] * small
        + [("large", "unary", large_seqs, large_len)] * large
        + [("large", "stream", large_seqs, large_len)] * streamed
    )
    for i, (size, kind, seqs, mean_len) in enumerate(specs):
        obj = OBJECTIVES[i % len(OBJECTIVES)]
        arrs = random_batch_arrays(rng, seqs, mean_len)
        req = pb.ComputeLossRequest(config=_config_msg(pb, obj), batch=_batch_msg(pb, arrs))
        loss, grad = expected_reply(req)
        n = int(arrs["offsets"][-1])
        payload: bytes | list[bytes]
        if kind == "unary":
            payload = req.SerializeToString()
        else:
            cuts = np.linspace(0, seqs, 5).astype(int)
            msgs = []
            for k in range(4):
                m = pb.StreamLossRequest(chunk=_batch_msg(pb, arrs, int(cuts[k]), int(cuts[k + 1])))
                if k == 0:
                    m.config.CopyFrom(req.config)
                msgs.append(m.SerializeToString())
            payload = msgs
        out.append(Workload(f"{size}-{kind}-{obj}", kind, payload, n, seqs, loss, grad))
    return out


# ---------------------------------------------------------------- checking replies


def check_unary(w: Workload, reply: bytes) -> str | None:
    """None if `reply` (a serialised ComputeLossResponse) is w's answer, else what differs."""
    from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

    r = pb.ComputeLossResponse.FromString(reply)
    return _compare(w, r.loss, [r.outputs.gradient], dict(r.metrics))


def check_stream(w: Workload, replies: Sequence[bytes]) -> str | None:
    from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

    rs = [pb.StreamLossResponse.FromString(b) for b in replies]
    if [r.chunk_index for r in rs] != list(range(len(w.payload))):
        return f"chunk indices {[r.chunk_index for r in rs]}"
    return _compare(w, rs[-1].summary.loss, [r.outputs.gradient for r in rs], dict(rs[-1].summary.metrics))


def _compare(w: Workload, loss: float, grads: list[Any], metrics: dict[str, float]) -> str | None:
    if not np.isfinite(loss) or any(not np.isfinite(x) for x in metrics.values()):
        return f"non-finite loss or metric: {loss}"
    data = b"".join(g.data for g in grads)
    got = np.frombuffer(data, dtype=w.grad.dtype.newbyteorder("<"))
    if got.shape != w.grad.shape:
        return f"gradient length {got.size}, expected {w.grad.size}"
    if not np.all(np.isfinite(got)):
        return "non-finite gradient"
    if not abs(loss - w.loss) <= 1e-5 * max(1.0, abs(w.loss)):
        return f"loss {loss!r}, expected {w.loss!r}"
    scale = float(np.abs(w.grad).max()) if w.grad.size else 0.0
    err = float(np.abs(got - w.grad).max()) if w.grad.size else 0.0
    if err > 1e-5 * scale + 1e-12:
        return f"gradient off by {err:.3g} (scale {scale:.3g})"
    return None


# ---------------------------------------------------------------- the load loop


@dataclass
class LoadReport:
    clients: int
    seconds: float
    requests: int = 0  # answered OK and correct
    tokens: int = 0  # tokens of the OK requests
    codes: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # unexpected status codes, with details
    latencies: list[float] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (t, bytes) of the server
    health: Counter[str] = field(default_factory=Counter)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def latency_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests": self.requests,
            "req_per_s": round(self.rps, 1),
            "tokens_per_s": round(self.tps),
            "p50_ms": round(self.latency_ms(0.5), 1),
            "p99_ms": round(self.latency_ms(0.99), 1),
            "codes": dict(self.codes),
            "wrong": len(self.wrong),
            "errors": self.errors[:5],
            "health": dict(self.health),
            "rss_mib": [round(b / 2**20, 1) for _, b in self.rss[:: max(1, len(self.rss) // 10)]],
        }


def _read_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_load(
    target: str,
    workloads: Sequence[Workload],
    *,
    clients: int,
    seconds: float,
    channel_factory: Callable[[], grpc.Channel] | None = None,
    server_pid: int | None = None,
    allowed: frozenset[str] = frozenset({"OK"}),
    kinds: frozenset[str] = frozenset({"unary", "stream"}),
    timeout: float = 60.0,
    health_every: float = 0.25,
    rss_every: float = 0.2,
) -> LoadReport:
    """`clients` threads in a closed loop for `seconds`, each on its own channel, cycling through
    the workloads of the given kinds (client k starts at workload k). Status codes outside
    `allowed` are recorded in `errors`; replies that differ from the expected ones in `wrong`.
    A monitor thread checks gRPC health and samples the server's RSS."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def default_channel() -> grpc.Channel:
        return grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )

    make = channel_factory or default_channel
    pool = [w for w in workloads if w.kind in kinds]
    assert pool, "no workload of the requested kinds"
    rep = LoadReport(clients=clients, seconds=seconds)
    lock = threading.Lock()
    stop = threading.Event()
    start_barrier = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        ch = make()
        unary = ch.unary_unary(LOSS_METHOD, request_serializer=_ident, response_deserializer=_ident)
        stream = ch.stream_stream(STREAM_METHOD, request_serializer=_ident, response_deserializer=_ident)
        i = k
        local_lat: list[float] = []
        try:
            start_barrier.wait()
            while not stop.is_set():
                w = pool[i % len(pool)]
                i += 1
                t0 = time.perf_counter()
                code = "OK"
                try:
                    if w.kind == "unary":
                        assert isinstance(w.payload, bytes)
                        reply: Any = unary(w.payload, timeout=timeout)
                    else:
                        assert isinstance(w.payload, list)
                        reply = list(stream(iter(w.payload), timeout=timeout))
                except grpc.RpcError as e:
                    code = e.code().name
                    detail = f"{w.name}: {code}: {e.details()}"
                    with lock:
                        rep.codes[code] += 1
                        if code not in allowed:
                            rep.errors.append(detail)
                    if code == "RESOURCE_EXHAUSTED":
                        time.sleep(0.005)  # a client's backoff
                    continue
                dt = time.perf_counter() - t0  # (the check below is the client's work, not the call's)
                problem = check_unary(w, reply) if w.kind == "unary" else check_stream(w, reply)
                with lock:
                    rep.codes[code] += 1
                    if problem is not None:
                        rep.wrong.append(f"{w.name}: {problem}")
                    else:
                        rep.requests += 1
                        rep.tokens += w.tokens
                local_lat.append(dt)
        finally:
            with lock:
                rep.latencies.extend(local_lat)
            ch.close()

    def monitor() -> None:
        ch = make()
        stub = health_pb2_grpc.HealthStub(ch)
        next_h = next_r = time.monotonic()
        t_start = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if server_pid is not None and now >= next_r:
                with contextlib.suppress(OSError):
                    rep.rss.append((now - t_start, _read_rss(server_pid)))
                next_r = now + rss_every
            if now >= next_h:
                try:
                    st = stub.Check(health_pb2.HealthCheckRequest(), timeout=5.0).status
                    rep.health[health_pb2.HealthCheckResponse.ServingStatus.Name(st)] += 1
                except grpc.RpcError as e:
                    rep.health[e.code().name] += 1
                next_h = now + health_every
            stop.wait(min(health_every, rss_every) / 2)
        ch.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start_barrier.wait()
    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    t0 = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(timeout + 10)
    rep.seconds = time.perf_counter() - t0
    mon.join(10)
    return rep


# ---------------------------------------------------------------- a local server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# the caller's SOFTGATE_* variables a started server gets (the module's docstring)
PASSED_ON = ("SOFTGATE_ENGINE_COMPILE", "SOFTGATE_ALLOCATOR")


def start_server(settings: dict[str, Any], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`softgate serve` on loopback with SOFTGATE_* settings; returns once it reports SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTGATE_") or k in PASSED_ON}
    base = {
        "grpc_host": "127.0.0.1",
        "grpc_port": port,
        "admin_port": "none",
        "device": "cpu",
        "warmup": "false",
    }
    for k, v in {**base, **settings}.items():
        env["SOFTGATE_" + k.upper()] = str(v)
    env.setdefault("SOFTGATE_ENGINE_COMPILE", "0")
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    proc = None
    try:
        with open(log_path, "wb") as logf:  # (the child writes to its own copy of the descriptor)
            cmd = [sys.executable, "-m", "softgate.cli", "serve"]
            proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with grpc.insecure_channel(target) as ch:
                    stub = health_pb2_grpc.HealthStub(ch)
                    st = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if st == health_pb2.HealthCheckResponse.SERVING:
                        return proc, target
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not start")
    except BaseException:  # Ctrl-C and SIGTERM too: never leave it running (an audit)
        if proc is not None:
            proc.kill()
            proc.wait()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--target", help="an already running server (default: start one)")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--mix", choices=("small", "large", "all"), default="all")
    ap.add_argument("--kinds", default="unary,stream")
    ap.add_argument("--json", help="write the reports here")
    ap.add_argument("--setting", action="append", default=[], help="k=v server setting (SOFTGATE_K)")
    args = ap.parse_args(argv)
    kinds = frozenset(args.kinds.split(","))
    if not kinds <= KINDS["all"]:
        ap.error(f"--kinds {args.kinds}: expected a comma-separated subset of unary,stream")
    mixes = [m for m in ("small", "large") if args.mix in (m, "all") and kinds & KINDS[m]]
    if not mixes:  # (a bare AssertionError from run_load, after the server had started: an audit)
        ap.error(f"--mix {args.mix} --kinds {args.kinds}: the small requests are unary only")
    if args.mix == "all" and mixes != ["small", "large"]:
        print(f"--kinds {args.kinds}: the small requests are unary only; large only", file=sys.stderr)
    # SIGTERM raises SystemExit, so that the `finally` below stops the server (an audit)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    print("building workloads and expected replies ...", file=sys.stderr)
    work = build_workloads(0)
    proc, log_path, failed = None, None, True
    rows = []
    try:
        if args.target:
            target = args.target
        else:
            settings = {"max_concurrent_rpcs": 256}
            settings.update(dict(s.split("=", 1) for s in args.setting))
            # one file a run (a fixed name was overwritten by concurrent runs: an audit)
            fd, name = tempfile.mkstemp(prefix="softgate-load-bench-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
            proc, target = start_server(settings, log_path)
            print(f"server pid {proc.pid} on {target}, settings {settings}, log {log_path}", file=sys.stderr)
        for mix in mixes:
            pool = [w for w in work if w.name.startswith(mix)]
            for c in (int(x) for x in args.clients.split(",")):
                rep = run_load(
                    target,
                    pool,
                    clients=c,
                    seconds=args.seconds,
                    server_pid=proc.pid if proc else None,
                    kinds=kinds,
                )
                s = rep.summary()
                s["mix"] = mix
                rows.append(s)
                print(json.dumps(s), file=sys.stderr)
        failed = any(s["wrong"] or s["errors"] for s in rows)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log_path is not None and failed:
            print(f"server log kept: {log_path}", file=sys.stderr)
        elif log_path is not None:
            log_path.unlink(missing_ok=True)
    print()
    print(
        "| mix | clients | req/s | tokens/s | p50 ms | p99 ms | codes | wrong | server RSS MiB (start..end) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for s in rows:
        rss = s["rss_mib"]
        rss_s = f"{rss[0]}..{rss[-1]}" if rss else "n/a"
        codes = ", ".join(f"{k} {v}" for k, v in sorted(s["codes"].items()))
        print(
            f"| {s['mix']} | {s['clients']} | {s['req_per_s']:.1f} | {s['tokens_per_s']:,} | {s['p50_ms']} | "
            f"{s['p99_ms']} | {codes} | {s['wrong']} | {rss_s} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
