"""The servicer's small-call fast path (inline on the event loop, one intra-op thread) and
deferred telemetry: same answers, only when safe, and reads see every result."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from softgate.engine import Batch, Engine, LossConfig, Sapo
from softgate.observability import PrometheusTelemetry
from softgate.settings import Settings
from softgate.threads import single_threaded_here
from softgate_client import SoftgateClient
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb
from softgate_client.proto.softgate.v1 import softgate_pb2_grpc as pb_grpc


class RecordingEngine(Engine):
    """The real engine; records the thread and intra-op thread count of each loss and
    advantages call."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(device="cpu", compile=False)
        self.delay = delay
        self.seen: list[tuple[str, int]] = []

    def loss(self, batch: Batch, config: LossConfig, **kw: Any) -> Any:
        self.seen.append((threading.current_thread().name, torch.get_num_threads()))
        if self.delay:
            time.sleep(self.delay)
        return super().loss(batch, config, **kw)

    def advantages(self, *args: Any, **kw: Any) -> Any:
        self.seen.append((threading.current_thread().name, torch.get_num_threads()))
        return super().advantages(*args, **kw)


def _call(client: SoftgateClient, n: int = 64) -> Any:
    rng = np.random.default_rng(n)
    logp = (-rng.random(n) - 0.1).astype(np.float32)
    return client.loss(
        logp, logp + 0.01, lengths=np.array([n // 2, n - n // 2]), advantages=np.array([1.0, -1.0])
    )


def test_small_calls_go_inline_once_the_engine_is_fast(inprocess_server: Any, monkeypatch: Any) -> None:
    import softgate.grpc.servicer as servicer

    monkeypatch.setattr(servicer, "INLINE_BUDGET_S", 5.0)  # the policy, not this host's speed
    eng = RecordingEngine()
    srv = inprocess_server(engine=eng)
    threads_before = torch.get_num_threads()
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        results = [_call(c) for _ in range(8)]
        big = _call(c, n=40000)  # over inline_max_tokens: the pool
    names = [name for name, _ in eng.seen]
    assert all(n.startswith("softgate-engine") for n in names[:3]), names  # first: the pool
    assert all(n == "inprocess-grpc" for n in names[4:8]), names  # then inline on the loop
    assert all(k == 1 for name, k in eng.seen[4:8]), eng.seen  # with one intra-op thread
    assert names[8].startswith("softgate-engine") and eng.seen[8][1] == threads_before
    assert torch.get_num_threads() == threads_before  # other threads unchanged
    for r in results[1:]:  # identical answers either way
        assert r.loss == results[0].loss and np.array_equal(r.grad, results[0].grad)
    assert big.grad.shape == (40000,)


def test_advantages_are_sized_by_their_reward_values_not_their_rows(
    inprocess_server: Any, monkeypatch: Any
) -> None:
    """[B, K] rewards are K values a row: 1024 rows of 64 components (65,536 values, over
    inline_max_tokens) go to the pool where 1024 rows of one went inline."""
    import softgate.grpc.servicer as servicer

    monkeypatch.setattr(servicer, "INLINE_BUDGET_S", 5.0)  # the policy, not this host's speed
    eng = RecordingEngine()
    srv = inprocess_server(engine=eng)
    rng = np.random.default_rng(0)
    ids = np.arange(1024) // 8
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        for _ in range(8):
            c.advantages(rng.random(1024), ids)
        c.advantages(rng.random((1024, 64)), ids, estimator="gdpo")
    names = [name for name, _ in eng.seen]
    assert all(n == "inprocess-grpc" for n in names[4:8]), names  # the rows alone: inline
    assert names[8].startswith("softgate-engine"), names


def test_a_malformed_advantages_call_is_sized_by_the_values_it_carries(
    inprocess_server: Any, monkeypatch: Any
) -> None:
    """One reward beside 40,000 group ids (a review: read whole by torch.unique before their
    length is refused, 0.3 s on the event loop at 8M) runs in the pool, and is refused."""
    import softgate.grpc.servicer as servicer

    monkeypatch.setattr(servicer, "INLINE_BUDGET_S", 5.0)
    seen: list[str] = []
    work = servicer.LossServicer._advantages

    def spy(self: Any, request: Any, cancel: Any) -> Any:
        seen.append(threading.current_thread().name)
        return work(self, request, cancel)

    monkeypatch.setattr(servicer.LossServicer, "_advantages", spy)
    srv = inprocess_server(engine=RecordingEngine())
    rng = np.random.default_rng(0)
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        for _ in range(8):
            c.advantages(rng.random(64), np.arange(64) // 8)
    request = pb.ComputeAdvantagesRequest(
        rewards=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], data=bytes(4)),
        group_ids=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[40000], data=bytes(8 * 40000)),
    )
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch, pytest.raises(grpc.RpcError) as e:
        pb_grpc.LossServiceStub(ch).ComputeAdvantages(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "group_ids" in (e.value.details() or "")
    assert all(n == "inprocess-grpc" for n in seen[4:8]), seen
    assert seen[8].startswith("softgate-engine"), seen


def test_a_new_configuration_never_compiles_on_the_event_loop(
    inprocess_server: Any, monkeypatch: Any
) -> None:
    """Found by an audit: a small call runs inline on the event loop, and in "sync" mode (CUDA's
    default; `softgate serve --compile`) a configuration not compiled yet compiled right there:
    seconds without health checks, admission or deadlines. It now runs eager on the loop and
    compiles in the background; later calls of it run compiled."""
    import softgate.grpc.servicer as servicer
    from softgate.engine.compiled import CompiledKernel
    from softgate.engine.kernel import token_terms

    monkeypatch.setattr(servicer, "INLINE_BUDGET_S", 5.0)
    eng = RecordingEngine()
    eng.kernel = CompiledKernel("sync")
    where: list[str] = []

    def fake_compile(example: Any, lock: Any) -> Any:
        where.append(threading.current_thread().name)
        return token_terms

    eng.kernel._compile = fake_compile
    srv = inprocess_server(engine=eng)
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        first = [_call(c) for _ in range(6)]  # the pool, compiled there; then inline
        assert where and where[0].startswith("softgate-engine"), where
        grpo = [
            c.loss(np.full(64, -0.5, np.float32), lengths=[32, 32], advantages=[1.0, -1.0], objective="grpo")
        ]
        assert eng.seen[-1][0] == "inprocess-grpc"  # inline, a configuration not compiled yet
        assert eng.kernel.wait(30)
        grpo.append(
            c.loss(np.full(64, -0.5, np.float32), lengths=[32, 32], advantages=[1.0, -1.0], objective="grpo")
        )
    assert where[1:] == ["softgate-compile"], where
    assert grpo[0].loss == grpo[1].loss and np.array_equal(grpo[0].grad, grpo[1].grad)
    assert all(r.loss == first[0].loss for r in first)


def test_slow_engine_stays_in_the_pool(inprocess_server: Any) -> None:
    eng = RecordingEngine(delay=0.02)  # over the inline budget (10 ms): a sleep never beats it
    srv = inprocess_server(engine=eng)
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        for _ in range(6):
            _call(c)
    assert all(name.startswith("softgate-engine") for name, _ in eng.seen), eng.seen


def test_inline_can_be_turned_off(inprocess_server: Any) -> None:
    eng = RecordingEngine()
    srv = inprocess_server(engine=eng, inline_max_tokens=0)
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        for _ in range(6):
            _call(c)
    assert all(name.startswith("softgate-engine") for name, _ in eng.seen), eng.seen


def test_single_threaded_here_is_per_thread() -> None:
    before = torch.get_num_threads()
    got: list[Any] = []

    def work() -> None:
        got.append((single_threaded_here(), torch.get_num_threads()))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert got == [(True, 1)] or before == 1
    assert torch.get_num_threads() == before and later == [before]


def _result(n: int = 256) -> Any:
    logp = -torch.rand(n, generator=torch.Generator().manual_seed(1)) - 0.1
    b = Batch(logp=logp, old_logp=logp + 0.01, offsets=torch.tensor([0, n]), advantages=torch.tensor([1.0]))
    return Engine(device="cpu").loss(b, LossConfig(objective=Sapo()))


def test_deferred_telemetry_is_seen_by_every_read() -> None:
    tel = PrometheusTelemetry(Settings(max_runs=3), defer=True)
    res = _result()
    for k in range(6):
        run = f"run-{k}"
        tel.request_started("ComputeLoss", run, 256)
        tel.observe_loss(run, LossConfig(), res)
        tel.request_finished("ComputeLoss", run, "OK", 0.01, 10, 20, 256, 1)
    text = tel.exposition().decode()  # waits for what is pending
    assert 'softgate_loss_batches_total{objective="sapo",run="run-3"} 1.0' in text, text
    assert 'run="run-2"' not in text, text  # evicted: dropped, in order
    assert [r["run"] for r in tel.runs_overview()][:2] == ["run-5", "run-4"]
    summary = tel.run_summary("run-5")
    assert summary is not None and summary["totals"]["loss_batches"] == 1
    tel.close()


def test_deferred_telemetry_is_recorded_by_the_kicking_thread_in_order() -> None:
    # the servicer kicks on the event loop once an RPC has ended: no second thread holds the GIL
    # against the next request, and a failing recording does not stop the ones after it
    tel = PrometheusTelemetry(Settings(), defer=True)
    seen: list[tuple[str, int]] = []
    tel._later(lambda: seen.append(("a", threading.get_ident())))
    tel._later(lambda: 1 / 0)
    tel._later(lambda: seen.append(("b", threading.get_ident())))
    assert seen == [] and len(tel._queue) == 3
    tel.kick()
    me = threading.get_ident()
    assert seen == [("a", me), ("b", me)] and not tel._queue
    tel.close()


def test_deferred_telemetry_failure_is_counted_not_raised() -> None:
    tel = PrometheusTelemetry(Settings(), defer=True)
    tel.observe_loss("r", LossConfig(), object())  # not a LossResult
    assert 'softgate_telemetry_errors_total{hook="observe_loss"} 1.0' in tel.exposition().decode()
    tel.close()


def test_deferred_telemetry_bounds_large_results() -> None:
    """At most one large result waits (it holds its per-token tensors); the next is recorded by
    its caller after it, in order."""
    tel = PrometheusTelemetry(Settings(), defer=True)
    big = _result(n=1 << 17)
    tel.observe_loss("r", LossConfig(), big)
    assert tel._big_pending == 1
    tel.observe_loss("r", LossConfig(), big)  # over the bound: flush, then record here
    assert tel._big_pending == 0 and not tel._queue
    assert 'softgate_loss_batches_total{objective="sapo",run="r"} 2.0' in tel.exposition().decode()
    tel.close()


class KwargsEngine(Engine):
    """The real engine; records the keyword arguments of each loss call."""

    def __init__(self) -> None:
        super().__init__(device="cpu", compile=False)
        self.kwargs: list[dict[str, Any]] = []

    def loss(self, batch: Batch, config: LossConfig, **kw: Any) -> Any:
        self.kwargs.append(kw)
        return super().loss(batch, config, **kw)


def test_trust_region_outputs_are_whole_only_when_asked(inprocess_server: Any) -> None:
    # a request for the gradient alone lets the engine skip writing ratio, gate weight and clip
    # mask (it samples what the telemetry reads); asking for any of them gets them whole
    eng = KwargsEngine()
    srv = inprocess_server(engine=eng)
    n = 3000
    rng = np.random.default_rng(0)
    logp = (-rng.random(n) - 0.1).astype(np.float32)
    old = logp + rng.normal(0, 0.2, n).astype(np.float32).clip(-0.05, 0.05)
    kw: dict[str, Any] = {"lengths": np.array([1000, 2000]), "advantages": np.array([1.0, -1.0])}
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        plain = c.loss(logp, old, **kw)
        asked = c.loss(logp, old, outputs=("ratio", "clip_mask"), **kw)
        streamed = c.loss(logp, old, outputs=("gate_weight",), stream=True, **kw)
    # the no-op telemetry reads 1 token
    assert [k.get("sample_tokens", "unset") for k in eng.kwargs] == [1, None, None]
    batch = Batch(
        logp=torch.from_numpy(logp),
        old_logp=torch.from_numpy(old),
        offsets=torch.tensor([0, 1000, 3000]),
        advantages=torch.tensor([1.0, -1.0]),
    )
    whole = Engine(device="cpu", compile=False).loss(batch, LossConfig())
    assert np.array_equal(plain.grad, whole.grad.numpy()) and plain.loss == asked.loss == whole.loss
    assert np.array_equal(asked.ratio, whole.ratio.numpy())
    assert np.array_equal(asked.clip_mask, whole.clip_mask.numpy())
    assert np.array_equal(streamed.gate_weight, whole.gate_weight.numpy())


def test_a_large_gradient_is_written_into_its_response(inprocess_server: Any) -> None:
    # a gradient-only call of 1 MiB and more: the engine writes into the response's bytes
    # (response_buffer); the client reads the same gradient as the in-process engine's
    eng = KwargsEngine()
    srv = inprocess_server(engine=eng)
    n = 1 << 18
    rng = np.random.default_rng(1)
    logp = (-rng.random(n) - 0.1).astype(np.float32)
    old = logp + rng.normal(0, 0.01, n).astype(np.float32)
    kw: dict[str, Any] = {"lengths": np.array([n // 4, 3 * n // 4]), "advantages": np.array([1.0, -1.0])}
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        large = c.loss(logp, old, **kw)
        small = c.loss(logp[:64], old[:64], lengths=np.array([32, 32]), advantages=np.array([1.0, -1.0]))
    assert [k.get("grad_out") is not None for k in eng.kwargs] == [True, False]
    batch = Batch(
        logp=torch.from_numpy(logp),
        old_logp=torch.from_numpy(old),
        offsets=torch.tensor([0, n // 4, n]),
        advantages=torch.tensor([1.0, -1.0]),
    )
    want = Engine(device="cpu", compile=False).loss(batch, LossConfig())
    assert np.array_equal(large.grad, want.grad.numpy()) and large.loss == want.loss
    assert large.metrics == pytest.approx(want.metrics, rel=0, abs=0)
    assert small.grad.shape == (64,)


def _soon(done: Any, within: float = 0.5) -> bool:
    """Whether `done()` holds within `within` seconds (well under the 1 s idle wait below):
    the servicer's kick runs once the response is out, maybe just after the client has it."""
    end = time.monotonic() + within
    while not done() and time.monotonic() < end:
        time.sleep(0.001)
    return bool(done())


class KickLog(PrometheusTelemetry):
    """Deferred Prometheus telemetry that notes when the servicer lets it record."""

    def __init__(self) -> None:
        super().__init__(Settings(), defer=True)
        self.kicks: list[float] = []

    def kick(self) -> None:
        self.kicks.append(time.monotonic())
        super().kick()


def test_telemetry_after_small_calls_waits_for_an_idle_server(
    inprocess_server: Any, monkeypatch: Any
) -> None:
    # back-to-back small calls do not queue behind the previous call's recording: it runs once
    # the server has been idle for KICK_IDLE_S, after KICK_BACKLOG calls, or at once after a large call
    import softgate.grpc.servicer as servicer

    monkeypatch.setattr(servicer, "KICK_IDLE_S", 1.0)  # calls a slow host makes back to back
    srv = inprocess_server()
    tel = KickLog()
    sv = srv.grpc_server.servicer
    sv.telemetry = tel
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        for _ in range(3):
            _call(c)
        assert tel.kicks == [] and tel._queue  # within KICK_IDLE_S of each other: waiting
        time.sleep(servicer.KICK_IDLE_S + 0.5)
        assert len(tel.kicks) == 1 and not tel._queue  # idle: recorded
        for _ in range(servicer.KICK_BACKLOG):
            _call(c)
        assert _soon(lambda: len(tel.kicks) == 2)  # the backlog did not wait for idle
        _call(c, n=sv.inline_max_tokens + 2)
        assert _soon(lambda: len(tel.kicks) == 3)  # a large call: at once, not after idle
        _call(c)
        text = tel.exposition().decode()  # a read records what still waits
    assert (
        f'softgate_loss_batches_total{{objective="sapo",run="default"}} {3 + servicer.KICK_BACKLOG + 2}.0'
        in text
    )


def test_telemetry_waits_while_a_call_is_in_flight(inprocess_server: Any, monkeypatch: Any) -> None:
    # the idle timer firing while another call runs records nothing; that call's end looks again
    import softgate.grpc.servicer as servicer

    monkeypatch.setattr(servicer, "KICK_IDLE_S", 0.2)
    eng = RecordingEngine()
    srv = inprocess_server(engine=eng)
    tel = KickLog()
    srv.grpc_server.servicer.telemetry = tel
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        _call(c)  # its idle timer fires while the slow call below is in flight
        eng.delay = 0.8
        slow = threading.Thread(target=_call, args=(c,))
        slow.start()
        time.sleep(0.5)
        assert tel.kicks == [] and slow.is_alive()
        slow.join()
        assert _soon(lambda: len(tel.kicks) == 1, within=1.0)  # once idle after the slow call
    assert len(tel.kicks) == 1 and not tel._queue


def test_a_large_call_keeps_its_slot_until_its_response_is_out() -> None:
    """Found by an audit: a unary call gave its max_concurrent_rpcs slot back when its handler
    returned, before gRPC had sent the response, so paused clients' 200 MB requests and
    responses piled up outside the limit. A large call now keeps it until the RPC is done; a
    small one (the inline path's `in_flight == 1`) still frees it at once."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import StandInContext as Context
    from softgate.grpc.servicer import LossServicer

    async def check(s: LossServicer) -> None:
        for tokens, held in ((s.inline_max_tokens + 1, True), (s.inline_max_tokens, False)):
            ctx = Context()
            call = await s._admit("ComputeLoss", ctx)
            assert s.in_flight == 1
            call.tokens = tokens
            s._finish(call, ctx)
            assert s.in_flight == (1 if held else 0)
            ctx.callbacks[0](ctx)  # the RPC is done: its response is out
            assert s.in_flight == 0
        # grpc may end the call before the handler does (a StreamLoss cut while it wrote a
        # response is closed later): the slot comes back at the call's end, once
        ctx = Context()
        call = await s._admit("StreamLoss", ctx)
        call.tokens = s.inline_max_tokens + 1
        ctx.callbacks[0](ctx)
        assert s.in_flight == 0
        s._finish(call, ctx)
        assert s.in_flight == 0

    with ThreadPoolExecutor(1) as pool:
        asyncio.run(check(LossServicer(Engine(device="cpu", compile=False), pool)))


class NoGradOut(KwargsEngine):
    """An engine that leaves `grad_out` alone (a test double, another device's engine)."""

    def loss(self, batch: Batch, config: LossConfig, **kw: Any) -> Any:
        kw = dict(kw)
        grad_out = kw.pop("grad_out", None)
        result = super().loss(batch, config, **kw)
        self.kwargs[-1]["grad_out"] = grad_out
        return result


def _large(n: int = 1 << 18) -> tuple[np.ndarray, np.ndarray, dict[str, Any], Batch]:
    rng = np.random.default_rng(3)
    logp = (-rng.random(n) - 0.1).astype(np.float32)
    old = logp + rng.normal(0, 0.01, n).astype(np.float32)
    kw: dict[str, Any] = {"lengths": np.array([n // 4, 3 * n // 4]), "advantages": np.array([1.0, -1.0])}
    batch = Batch(
        logp=torch.from_numpy(logp),
        old_logp=torch.from_numpy(old),
        offsets=torch.tensor([0, n // 4, n]),
        advantages=torch.tensor([1.0, -1.0]),
    )
    return logp, old, kw, batch


def test_a_large_gradient_an_engine_did_not_write_in_place_is_copied_in(inprocess_server: Any) -> None:
    """GradientResponse.encode copies the gradient in when the engine wrote its own tensor."""
    eng = NoGradOut()
    srv = inprocess_server(engine=eng)
    logp, old, kw, batch = _large()
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        r = c.loss(logp, old, stream=False, **kw)
    assert eng.kwargs[-1].get("grad_out") is not None  # the in-place path was offered
    want = Engine(device="cpu", compile=False).loss(batch, LossConfig())
    assert np.array_equal(r.grad, want.grad.numpy())


def test_a_large_unary_call_gets_every_output_it_asked_for(inprocess_server: Any) -> None:
    """only a gradient-only response is built in place; one of 2^18 tokens asking for
    more outputs gets them all."""
    srv = inprocess_server()
    logp, old, kw, batch = _large()
    with SoftgateClient(f"127.0.0.1:{srv.port}") as c:
        r = c.loss(logp, old, stream=False, outputs=("ratio",), **kw)
    want = Engine(device="cpu", compile=False).loss(batch, LossConfig())
    assert not r.streamed
    assert np.array_equal(r.grad, want.grad.numpy())
    assert r.ratio is not None and np.array_equal(r.ratio, want.ratio.numpy())
