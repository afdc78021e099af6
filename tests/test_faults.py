"""Faults: clients that cancel mid-stream, disconnect, exceed deadlines, send half a stream or
stall; raw TCP connections that never speak HTTP/2; SIGTERM under load; an engine failure
(simulated device OOM) on one request among concurrent good ones.

After each fault the server must still answer health checks SERVING and serve correct
replies, and must not have leaked a concurrency slot: `max_concurrent_rpcs` concurrent calls
succeed afterwards (a leaked slot would turn one of them into RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from conftest import grpc_health
from softgate.grpc.server import DRAIN_S
from softgate_client._channel import SHUTDOWN_CANCELLED
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

LIMIT = 4
_ident = lambda b: b  # noqa: E731


@pytest.fixture(scope="module")
def work(load_bench: Any) -> list[Any]:
    return list(load_bench.build_workloads(2, small=2, large=2, streamed=2, large_seqs=32, large_len=256))


@pytest.fixture(scope="module")
def big_request(load_bench: Any) -> bytes:
    """A ComputeLoss request large enough to take a good fraction of a second on a CPU."""
    rng = np.random.default_rng(5)
    a = load_bench.random_batch_arrays(rng, 256, 1024)
    req = pb.ComputeLossRequest(config=load_bench._config_msg(pb, "sapo"), batch=load_bench._batch_msg(pb, a))
    return bytes(req.SerializeToString())


@pytest.fixture(scope="module")
def server(load_bench: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from conftest import ServerProcess

    sp = ServerProcess(
        settings={"max_concurrent_rpcs": LIMIT, "engine_workers": 2, "grace_seconds": 5},
        log_path=tmp_path_factory.mktemp("faults") / "server.log",
    )
    sp.start()
    yield sp
    sp.stop()


def _stream_chunks(w: Any) -> list[bytes]:
    assert w.kind == "stream"
    return list(w.payload)


def assert_healthy_and_no_leak(lb: Any, server: Any, work: list[Any]) -> None:
    """Health SERVING; then exactly LIMIT concurrent clients all get correct OK replies."""
    with server.channel() as ch:
        assert grpc_health(ch) == "SERVING"
    # in-flight counters are decremented as the server notices the fault; give it a moment
    deadline = time.monotonic() + 10
    while True:
        rep = lb.run_load(server.target, work, clients=LIMIT, seconds=1.0, allowed=frozenset({"OK"}))
        if not rep.errors or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not rep.wrong, rep.wrong[:3]
    assert not rep.errors, f"after the fault: {rep.errors[:3]} {dict(rep.codes)}"
    assert rep.requests > 0


class Health:
    """Polls the gRPC health check in a thread for the duration of a `with` block."""

    def __init__(self, server: Any, every: float = 0.1) -> None:
        self.server, self.every = server, every
        self.seen: Counter[str] = Counter()
        self._stop = threading.Event()

    def __enter__(self) -> Health:
        def loop() -> None:
            with self.server.channel() as ch:
                while not self._stop.is_set():
                    try:
                        self.seen[grpc_health(ch, timeout=5.0)] += 1
                    except grpc.RpcError as e:
                        self.seen[e.code().name] += 1
                    self._stop.wait(self.every)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(10)

    def assert_serving(self) -> None:
        assert self.seen["SERVING"] > 0 and set(self.seen) == {"SERVING"}, dict(self.seen)


# ---------------------------------------------------------------- client-side faults


def test_cancel_mid_stream(load_bench: Any, server: Any, work: list[Any]) -> None:
    """StreamLoss cancelled after some chunks (and, separately, while waiting for the reply)."""
    w = next(x for x in work if x.kind == "stream")
    chunks = _stream_chunks(w)
    with Health(server) as h, server.channel() as ch:
        method = ch.stream_stream(
            load_bench.STREAM_METHOD, request_serializer=_ident, response_deserializer=_ident
        )
        for _ in range(3 * LIMIT):
            gate = threading.Event()

            def gen(gate: threading.Event = gate) -> Iterator[bytes]:
                yield chunks[0]
                yield chunks[1]
                gate.wait(10)  # never half-closes before the cancel

            call = method(gen(), timeout=30)
            time.sleep(0.05)
            call.cancel()
            gate.set()
            with pytest.raises(grpc.RpcError) as ei:
                list(call)
            assert ei.value.code() == grpc.StatusCode.CANCELLED
        # cancel while the server computes the whole stream
        for _ in range(LIMIT + 1):
            call = method(iter(chunks), timeout=30)
            time.sleep(0.01)
            call.cancel()
            with pytest.raises(grpc.RpcError):
                list(call)
    h.assert_serving()
    assert_healthy_and_no_leak(load_bench, server, work)


def test_disconnect_mid_call(load_bench: Any, server: Any, work: list[Any], big_request: bytes) -> None:
    """Clients whose connection goes away while their unary / streamed call is in progress."""
    w = next(x for x in work if x.kind == "stream")
    chunks = _stream_chunks(w)
    with Health(server) as h:
        for k in range(2 * LIMIT):
            ch = server.channel()
            if k % 2:
                fut = ch.unary_unary(
                    load_bench.LOSS_METHOD, request_serializer=_ident, response_deserializer=_ident
                ).future(big_request, timeout=30)
            else:
                gate = threading.Event()

                def gen(gate: threading.Event = gate) -> Iterator[bytes]:
                    yield chunks[0]
                    gate.wait(10)

                fut = ch.stream_stream(
                    load_bench.STREAM_METHOD, request_serializer=_ident, response_deserializer=_ident
                )(gen(), timeout=30)
            time.sleep(0.1)
            ch.close()  # the connection goes away with the call in flight
            if k % 2 == 0:
                gate.set()
            # what the abandoned client object reports does not matter; the server's state does
            with contextlib.suppress(grpc.RpcError, ValueError):
                fut.result() if k % 2 else list(fut)
    h.assert_serving()
    assert_healthy_and_no_leak(load_bench, server, work)


def test_deadlines_exceeded(load_bench: Any, server: Any, work: list[Any], big_request: bytes) -> None:
    """Deadlines too short for the work (unary) and a stream that stalls past its deadline."""
    w = next(x for x in work if x.kind == "stream")
    chunks = _stream_chunks(w)
    with Health(server) as h, server.channel() as ch:
        unary = ch.unary_unary(
            load_bench.LOSS_METHOD, request_serializer=_ident, response_deserializer=_ident
        )
        stream = ch.stream_stream(
            load_bench.STREAM_METHOD, request_serializer=_ident, response_deserializer=_ident
        )
        seen: Counter[str] = Counter()
        for t in (0.001, 0.005, 0.02, 0.05, 0.1) * 2:
            try:
                pb.ComputeLossResponse.FromString(unary(big_request, timeout=t))
                seen["OK"] += 1  # a fast machine may finish within 50 ms
            except grpc.RpcError as e:
                seen[e.code().name] += 1
        assert set(seen) <= {"OK", "DEADLINE_EXCEEDED"} and seen["DEADLINE_EXCEEDED"] >= 4, dict(seen)
        for _ in range(LIMIT + 1):
            gate = threading.Event()

            def gen(gate: threading.Event = gate) -> Iterator[bytes]:
                yield chunks[0]
                gate.wait(5)  # stalls past the deadline

            call = stream(gen(), timeout=0.3)
            with pytest.raises(grpc.RpcError) as ei:
                list(call)
            gate.set()
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    h.assert_serving()
    assert_healthy_and_no_leak(load_bench, server, work)


def test_half_stream_then_abandon(load_bench: Any, server: Any, work: list[Any]) -> None:
    """Clients that send some chunks and then stop sending forever (no half-close), holding
    their slot; the server keeps answering health and refuses the excess with
    RESOURCE_EXHAUSTED instead of hanging; once they go away the slots come back."""
    w = next(x for x in work if x.kind == "stream")
    chunks = _stream_chunks(w)
    gate = threading.Event()
    channels, calls = [], []

    def gen() -> Iterator[bytes]:
        yield chunks[0]
        gate.wait(60)

    with Health(server) as h:
        for _ in range(LIMIT):
            ch = server.channel()
            channels.append(ch)
            calls.append(
                ch.stream_stream(
                    load_bench.STREAM_METHOD, request_serializer=_ident, response_deserializer=_ident
                )(gen(), timeout=60)
            )
        time.sleep(0.5)
        with server.channel() as ch:
            unary = ch.unary_unary(
                load_bench.LOSS_METHOD, request_serializer=_ident, response_deserializer=_ident
            )
            small = next(x for x in work if x.kind == "unary")
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as ei:
                unary(small.payload, timeout=10)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.perf_counter() - t0 < 2.0, "RESOURCE_EXHAUSTED must come at once, not after a queue"
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
        gate.set()
    h.assert_serving()
    assert_healthy_and_no_leak(load_bench, server, work)


def test_stalled_and_garbage_connections(load_bench: Any, server: Any, work: list[Any]) -> None:
    """Raw TCP clients: connect and say nothing, send half an HTTP/2 preface, send random
    bytes, or send a valid preface and stall. None of them blocks other clients."""
    rng = np.random.default_rng(0)
    socks: list[socket.socket] = []
    port = server.grpc_port
    with Health(server) as h:
        for k in range(40):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
            if k % 4 == 1:
                s.sendall(b"PRI * HTTP/2.0\r\n")  # half the preface
            elif k % 4 == 2:
                s.sendall(rng.bytes(int(rng.integers(1, 4096))))
            elif k % 4 == 3:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        rep = load_bench.run_load(server.target, work, clients=2, seconds=1.5)
        assert not rep.errors and not rep.wrong and rep.requests > 0, rep.summary()
        for s in socks:
            s.close()
    h.assert_serving()
    assert_healthy_and_no_leak(load_bench, server, work)


# ---------------------------------------------------------------- SIGTERM under load


def _wait_all_admitted(srv: Any, calls: int, timeout: float = 30.0) -> None:
    """Wait until the server has admitted every ComputeLoss call and some are still in flight, read
    from its own /metrics (a fixed sleep is either too short under load or too long when quiet)."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        in_flight = finished = 0.0
        text = httpx.get(f"{srv.admin_url}/metrics", timeout=5).text
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                if smp.labels.get("rpc") != "ComputeLoss":
                    continue
                if smp.name == "softgate_in_flight_requests":
                    in_flight += smp.value
                elif smp.name == "softgate_requests_total":
                    finished += smp.value
        if in_flight + finished >= calls and in_flight >= 1:
            return
        time.sleep(0.005)
    raise AssertionError(f"the server did not admit {calls} calls within {timeout} s")


def test_sigterm_under_load(load_bench: Any, serve_process: Any, work: list[Any]) -> None:
    """SIGTERM while calls are in flight: they finish OK within the grace period; calls after
    it are refused (UNAVAILABLE), never answered wrong; health leaves SERVING; exit code 0."""
    inflight_calls = 8
    # one worker: the 8 calls of 2M tokens each (~0.1 s of eager engine work each with
    # tcmalloc, more under load) run one after the other, so several are still queued or
    # computing when the signal comes, even on a fast machine
    rng = np.random.default_rng(6)
    a = load_bench.random_batch_arrays(rng, 2048, 1024)
    huge = pb.ComputeLossRequest(
        config=load_bench._config_msg(pb, "sapo"), batch=load_bench._batch_msg(pb, a)
    )
    big_request = bytes(huge.SerializeToString())
    srv = serve_process(max_concurrent_rpcs=16, engine_workers=1, grace_seconds=30)
    results: list[Any] = []
    lock = threading.Lock()
    started = threading.Barrier(inflight_calls + 1)

    def inflight() -> None:
        with srv.channel() as ch:
            unary = ch.unary_unary(
                load_bench.LOSS_METHOD, request_serializer=_ident, response_deserializer=_ident
            )
            started.wait()
            try:
                reply = unary(big_request, timeout=60)
                r = pb.ComputeLossResponse.FromString(reply)
                with lock:
                    results.append(("OK", bool(np.isfinite(r.loss)), time.monotonic()))
            except grpc.RpcError as e:
                with lock:
                    results.append((e.code().name, e.details(), time.monotonic()))

    threads = [threading.Thread(target=inflight) for _ in range(inflight_calls)]
    for t in threads:
        t.start()
    started.wait()
    _wait_all_admitted(srv, inflight_calls)
    t_sig = time.monotonic()
    srv.signal(signal.SIGTERM)
    # new calls after the signal: refused cleanly, never a wrong answer, never a hang
    after: list[tuple[str, float, str]] = []
    health: list[tuple[str, float]] = []
    small = next(x for x in work if x.kind == "unary")
    while True:
        with srv.channel() as ch:
            t0 = time.monotonic()
            try:
                reply = ch.unary_unary(
                    load_bench.LOSS_METHOD, request_serializer=_ident, response_deserializer=_ident
                )(small.payload, timeout=5)
                assert load_bench.check_unary(small, reply) is None
                after.append(("OK", t0 - t_sig, ""))
            except grpc.RpcError as e:
                after.append((e.code().name, t0 - t_sig, e.details() or ""))
            try:
                health.append((grpc_health(ch, timeout=5), time.monotonic() - t_sig))
            except grpc.RpcError as e:
                health.append((e.code().name, time.monotonic() - t_sig))
        if srv.proc.poll() is not None or time.monotonic() - t_sig > 40:
            break
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    code = srv.wait(30)
    assert code == 0, srv.logs()[-3000:]
    assert [r[0] for r in results] == ["OK"] * inflight_calls, [r for r in results if r[0] != "OK"]
    assert all(r[1] for r in results)
    assert max(r[2] for r in results) > t_sig, "every call finished before the signal: nothing was in flight"
    codes = {c for c, _, _ in after}
    assert codes <= {"UNAVAILABLE", "OK", "CANCELLED"}, after
    assert "UNAVAILABLE" in codes, f"no refusal seen after SIGTERM: {after}"
    # OK only in the instant before the server handled the signal. CANCELLED only for a call
    # that raced the signal or the start of gRPC's own shutdown, DRAIN_S after the last call in
    # flight finished (grpc-core cancels the calls arriving as it begins; CI saw one 1.98 s
    # after the signal), and only with the details the client retries
    last_done = max(r[2] for r in results) - t_sig
    late = [
        (c, round(dt, 3), d)
        for c, dt, d in after
        if (c == "OK" and dt >= 0.2)
        or (
            c == "CANCELLED"
            and (d != SHUTDOWN_CANCELLED or (dt >= 0.2 and abs(dt - last_done - DRAIN_S) > 0.3))
        )
    ]
    assert not late, f"answered or cancelled outside a shutdown's edges: {late}; first: {after[:8]}"
    # health leaves SERVING (NOT_SERVING, or the connection refused) while draining, and says
    # NOT_SERVING while calls are still in flight (what a Kubernetes gRPC probe then reads)
    serving = [round(dt, 3) for st_, dt in health if st_ == "SERVING" and dt >= 0.2]
    assert not serving, f"health SERVING this long after SIGTERM: {serving}; first: {health[:8]}"
    assert any(st_ == "NOT_SERVING" and dt < last_done for st_, dt in health), (health, last_done)
    assert "Traceback" not in srv.logs()


# ---------------------------------------------------------------- engine failure on one request


OOM_TOKENS = 777  # a request with exactly this many tokens makes the engine "run out of memory"


def _oom_engine() -> Any:
    from softgate.engine import Engine

    class OomEngine(Engine):
        def loss(self, batch: Any, config: Any, **kw: Any) -> Any:
            if batch.logp.numel() == OOM_TOKENS:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (simulated)")
            return super().loss(batch, config, **kw)

    return OomEngine(device="cpu", compile=False)


def test_engine_oom_fails_that_request_alone(load_bench: Any, inprocess_server: Any, work: list[Any]) -> None:
    srv = inprocess_server(engine=_oom_engine(), max_concurrent_rpcs=8, engine_workers=2)
    rng = np.random.default_rng(3)
    a = load_bench.random_batch_arrays(rng, 7, 111)
    off = np.round(np.linspace(0, OOM_TOKENS, 8)).astype(np.int64)
    a["offsets"] = off
    for k in ("logp", "old_logp", "mask"):
        a[k] = np.resize(a[k], OOM_TOKENS)
    bad = pb.ComputeLossRequest(config=load_bench._config_msg(pb, "sapo"), batch=load_bench._batch_msg(pb, a))
    bad_stream = [pb.StreamLossRequest(config=bad.config, chunk=bad.batch).SerializeToString()]
    stop = threading.Event()
    codes: Counter[str] = Counter()
    messages: list[str] = []

    def hammer_bad() -> None:
        with srv.channel() as ch:
            unary = ch.unary_unary(
                load_bench.LOSS_METHOD, request_serializer=_ident, response_deserializer=_ident
            )
            stream = ch.stream_stream(
                load_bench.STREAM_METHOD, request_serializer=_ident, response_deserializer=_ident
            )
            k = 0
            while not stop.is_set():
                try:
                    if k % 2:
                        list(stream(iter(bad_stream), timeout=30))
                    else:
                        unary(bad.SerializeToString(), timeout=30)
                    codes["OK"] += 1
                except grpc.RpcError as e:
                    codes[e.code().name] += 1
                    messages.append(e.details() or "")
                k += 1

    t = threading.Thread(target=hammer_bad)
    t.start()
    try:
        with Health(srv) as h:
            rep = load_bench.run_load(srv.target, work, clients=3, seconds=3.0)
    finally:
        stop.set()
        t.join(30)
    h.assert_serving()
    assert not rep.wrong and not rep.errors and rep.requests > 0, rep.summary()
    assert set(codes) == {"RESOURCE_EXHAUSTED"}, dict(codes)
    assert codes["RESOURCE_EXHAUSTED"] >= 2
    assert all("out of memory" in m and "80.00 GiB" not in m for m in messages), messages[:2]


@pytest.mark.parametrize("rpc", ["ComputeLoss", "ComputeAdvantages"])
def test_calls_refused_at_the_limit_never_hold_their_requests(tmp_path: Any, rpc: str) -> None:
    """Found by an audit: admission ran once gRPC had read a unary request whole, so calls
    refused at max_concurrent_rpcs held their requests meanwhile (12 refused 201 MB calls:
    +3.8 GB, each refusal seconds late), enough to OOM-kill a pod sized as deploy/ says. The
    request is now read after admission; a refused one is never read."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import ServerProcess

    sp = ServerProcess(
        settings={"max_concurrent_rpcs": 1, "max_message_bytes": 64 << 20}, log_path=tmp_path / "log"
    )
    sp.start()
    try:
        with sp.channel(options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            n = 4 << 20  # 48 MB of request a call
            logp = np.full(n, -0.5, np.float32)
            batch = pb.Batch(
                logp=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=logp.tobytes()),
                old_logp=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=logp.tobytes()),
                advantages=pb.Tensor(
                    dtype=pb.DTYPE_FLOAT32, shape=[n], data=np.ones(n, np.float32).tobytes()
                ),
                offsets=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2], data=np.array([0, n]).tobytes()),
            )
            if rpc == "ComputeLoss":
                big = pb.ComputeLossRequest(batch=batch).SerializeToString()
            else:  # 4M rewards and group ids: 48 MB too
                big = pb.ComputeAdvantagesRequest(
                    rewards=batch.logp,
                    group_ids=pb.Tensor(
                        dtype=pb.DTYPE_INT64, shape=[n], data=np.zeros(n, np.int64).tobytes()
                    ),
                ).SerializeToString()
            unary = ch.unary_unary(f"/softgate.v1.LossService/{rpc}")
            held = ch.stream_stream("/softgate.v1.LossService/StreamLoss")
            gate = threading.Event()

            def requests() -> Iterator[bytes]:  # one chunk, then the stream stays open: the slot is held
                yield pb.StreamLossRequest(
                    chunk=pb.Batch(logp=batch.logp, offsets=batch.offsets)
                ).SerializeToString()
                gate.wait(60)

            stream = held(requests(), timeout=60)
            time.sleep(1.0)
            before = sp.rss()

            def call(_: int) -> str:
                try:
                    unary(big, timeout=30)
                    return "OK"
                except grpc.RpcError as e:
                    return e.code().name

            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(call, range(8)))
            grew = sp.rss() - before
            gate.set()
            with contextlib.suppress(grpc.RpcError):
                list(stream)
        assert codes == ["RESOURCE_EXHAUSTED"] * 8
        assert grew < 100 << 20, f"8 refused 48 MB {rpc} calls grew the server by {grew >> 20} MiB"
    finally:
        sp.stop()
