"""LossServicer's own rules, driven directly (a stand-in grpc context) or on an in-process
server: admission while closing, the inline path's guards and deadlines, how cut calls are
counted, a stream's limits, byte counts and summary."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch
from conftest import RecordingTelemetry as Finished
from conftest import StandInContext as Context
from conftest import f32_batch_msg
from softgate.engine import Batch, Engine, LossConfig
from softgate.grpc.errors import Cancelled, DeadlineExceeded
from softgate.grpc.servicer import RUN_METADATA_KEY, LossServicer, _Call
from softgate.telemetry import Telemetry
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb
from softgate_client.proto.softgate.v1 import softgate_pb2_grpc as pb_grpc


def _servicer(pool: ThreadPoolExecutor, telemetry: Telemetry | None = None, **kw: Any) -> LossServicer:
    return LossServicer(Engine(device="cpu", compile=False), pool, telemetry, **kw)


# ---------------------------------------------------------------- admission


def test_a_closing_server_refuses_every_new_call_with_unavailable(inprocess_server: Any) -> None:
    """`closing` (set by a graceful stop) refuses ComputeLoss, StreamLoss and
    ListAlgorithms with UNAVAILABLE "server shutting down", so a client retries elsewhere."""
    srv = inprocess_server()
    stub = pb_grpc.LossServiceStub(srv.channel())
    assert stub.ListAlgorithms(pb.ListAlgorithmsRequest(), timeout=10).limits.max_message_bytes > 0
    srv.grpc_server.servicer.closing = True
    calls = [
        lambda: stub.ListAlgorithms(pb.ListAlgorithmsRequest(), timeout=10),
        lambda: stub.ComputeLoss(pb.ComputeLossRequest(batch=f32_batch_msg(2, 4, 0)), timeout=10),
        lambda: list(stub.StreamLoss(iter([pb.StreamLossRequest(chunk=f32_batch_msg(2, 4, 0))]), timeout=10)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as ei:
            call()
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (ei.value.details() or "")
    assert srv.grpc_server.servicer.in_flight == 0
    srv.grpc_server.servicer.closing = False


def test_an_empty_run_label_is_the_default_run() -> None:
    """a `softgate-run` of only spaces is the run "default" in every hook (and log line)."""
    tel = Finished()

    async def go(s: LossServicer) -> None:
        for md in ((("softgate-run", "   "),), (("softgate-run", b""),), ()):
            ctx = Context(metadata=md)  # type: ignore[arg-type]
            call = await s._admit("ComputeLoss", ctx)
            assert call.run == "default", md
            s._finish(call, ctx)

    with ThreadPoolExecutor(1) as pool:
        asyncio.run(go(_servicer(pool, tel)))
    assert [f[1] for f in tel.finished] == ["default"] * 3


# ---------------------------------------------------------------- the inline path


def test_a_call_runs_inline_only_when_it_is_alone_in_flight() -> None:
    """with a fast streak, a small call runs on the loop only when it is the one call in
    flight; with another call in flight it goes to the pool (the loop must stay free)."""
    from softgate.grpc import servicer as sv

    with ThreadPoolExecutor(1) as pool:
        s = _servicer(pool)
        s._fast_streak = sv.INLINE_STREAK
        s.in_flight = 1
        assert s._inline(10)
        for busy in (0, 2, 5):
            s.in_flight = busy
            assert not s._inline(10), busy
        s.in_flight = 1
        assert not s._inline(s.inline_max_tokens + 1)
        assert not s._inline(None)


def _inline_ready(s: LossServicer) -> None:
    from softgate.grpc import servicer as sv

    s._fast_streak = sv.INLINE_STREAK
    s.in_flight = 1
    # as if this thread were already set up for inline work: the setup (one intra-op thread,
    # no compiles) is per thread and would stay on pytest's thread for every later test
    s._loop_single_threaded = threading.get_ident()


def test_an_expired_deadline_runs_no_work_even_inline() -> None:
    """a call whose deadline has passed before its work starts raises DeadlineExceeded
    and never runs the work, on the pool path and on the inline one."""
    ran: list[str] = []

    def work(cancel: threading.Event) -> str:
        ran.append(threading.current_thread().name)
        return "done"

    async def go(s: LossServicer, inline: bool) -> None:
        if inline:
            _inline_ready(s)
        call = _Call("ComputeLoss", "default")
        call.deadline = time.perf_counter() - 0.01
        with pytest.raises(DeadlineExceeded):
            await s._run(call, work, 8)

    with ThreadPoolExecutor(1) as pool:
        for inline in (True, False):
            asyncio.run(go(_servicer(pool), inline))
        pool.submit(lambda: None).result()  # anything the pool was given has run
    assert ran == []


def test_an_inline_call_that_overruns_its_deadline_is_deadline_exceeded() -> None:
    """work run inline cannot be cut; one that ends past the call's deadline is still
    DEADLINE_EXCEEDED (the client has given up on it), as the pool path's is."""

    def slow(cancel: threading.Event) -> str:
        time.sleep(0.15)
        return "late"

    async def go(s: LossServicer) -> None:
        _inline_ready(s)
        call = _Call("ComputeLoss", "default")
        call.deadline = time.perf_counter() + 0.05
        with pytest.raises(DeadlineExceeded):
            await s._run(call, slow, 8)
        # and one within its deadline returns its result
        call = _Call("ComputeLoss", "default")
        call.deadline = time.perf_counter() + 30
        assert await s._run(call, lambda c: "ok", 8) == "ok"

    with ThreadPoolExecutor(1) as pool:
        asyncio.run(go(_servicer(pool)))


class SlowEngine(Engine):
    def __init__(self, delay: float) -> None:
        super().__init__(device="cpu", compile=False)
        self.delay = delay

    def loss(self, batch: Batch, config: LossConfig, **kw: Any) -> Any:
        time.sleep(self.delay)
        return super().loss(batch, config, **kw)


def test_an_inline_call_that_overran_its_deadline_records_no_batch() -> None:
    """Found by mutation testing: inline work got a cancel event nothing could set, so a call
    that ended past its deadline (its trainer got DEADLINE_EXCEEDED) still put its batch in the
    run's statistics. One within its deadline is recorded."""
    tel = Finished()
    request = pb.ComputeLossRequest(batch=f32_batch_msg(2, 4, 0))

    async def go(s: LossServicer, budget: float) -> None:
        _inline_ready(s)
        s.in_flight = 0  # (the call's admission takes the one slot in flight)
        await s.ComputeLoss(request, Context(((RUN_METADATA_KEY, "r"),), budget))

    with ThreadPoolExecutor(1) as pool:
        s = LossServicer(SlowEngine(0.15), pool, tel)
        asyncio.run(go(s, 0.05))
        assert tel.observed == []
        asyncio.run(go(s, 30.0))
        assert tel.observed == ["r"]
    assert [f[2] for f in tel.finished] == ["DEADLINE_EXCEEDED", "OK"]


@pytest.mark.parametrize("how", ["ok", "pool", "inline", "cancelled", "stream_cancelled"])
def test_only_a_call_answered_ok_records_its_batch(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: the batch was recorded in the worker, before its response was
    encoded, so a call whose deadline passed (pool or inline) or whose client went away after
    that was counted DEADLINE_EXCEEDED / CANCELLED with its batch in the run's metrics (a
    trainer's retry counted it twice). Each case holds the work after its last cancel check."""
    from softgate.grpc import codec
    from softgate.grpc import servicer as sv

    tel = Finished()
    release = threading.Event()
    ctx = Context(((sv.RUN_METADATA_KEY, "r"),), {"pool": 0.2, "inline": 0.5}.get(how))
    host_result = codec.host_result

    def late(*args: Any) -> Any:  # (the response's encoding, after the worker's last check)
        if how == "pool":
            assert release.wait(30)  # the call's deadline fires on the loop meanwhile
        elif how == "inline":
            time.sleep(0.8)
        elif how != "ok":
            ctx.is_cancelled = True  # the client goes away
        return host_result(*args)

    monkeypatch.setattr(codec, "host_result", late)

    async def go(s: LossServicer) -> None:
        if how == "inline":
            s._fast_streak = sv.INLINE_STREAK
            s._loop_single_threaded = threading.get_ident()  # (see _inline_ready)
        if how == "stream_cancelled":  # (the cancel seen before the first response: none sent)
            assert len([r async for r in s.StreamLoss(_chunks(2), ctx)]) == 0
        else:
            await s.ComputeLoss(pb.ComputeLossRequest(batch=f32_batch_msg(2, 4, 0)), ctx)

    with ThreadPoolExecutor(1) as pool:
        s = _servicer(pool, tel)
        asyncio.run(go(s))
        release.set()
    code = {"ok": "OK", "pool": "DEADLINE_EXCEEDED", "inline": "DEADLINE_EXCEEDED"}.get(how, "CANCELLED")
    assert [f[2] for f in tel.finished] == [code]
    assert tel.observed == (["r"] if how == "ok" else [])


def test_a_stream_whose_requests_ended_in_a_cancel_computes_nothing() -> None:
    """grpc ends a cancelled stream's requests as a half-close does: the engine computed the
    chunks sent so far for nobody, and their responses counted as bytes sent (an audit). A
    stream that really half-closed is served."""
    tel = Finished()
    calls: list[int] = []

    class Counting(Engine):
        def loss(self, batch: Batch, config: LossConfig, **kw: Any) -> Any:
            calls.append(batch.num_tokens)
            return super().loss(batch, config, **kw)

    def requests(ctx: Context, cut: bool) -> Any:
        async def gen() -> Any:
            for i in range(3):
                yield pb.StreamLossRequest(chunk=f32_batch_msg(2, 4, i))
            ctx.is_cancelled = cut  # (grpc's cancel, known once the requests have ended)

        return gen()

    async def go(s: LossServicer) -> list[int]:
        got = []
        for cut in (True, False):
            ctx = Context(((RUN_METADATA_KEY, "r"),))
            got.append(len([r async for r in s.StreamLoss(requests(ctx, cut), ctx)]))
            for fn in ctx.callbacks:
                fn(ctx)
        return got

    with ThreadPoolExecutor(1) as pool:
        s = LossServicer(Counting(device="cpu", compile=False), pool, tel)
        s._loop_single_threaded = threading.get_ident()  # (see _inline_ready: pytest's thread as it is)
        got = asyncio.run(go(s))
    assert got == [0, 3] and calls == [24]
    assert [(f[2], f[3] > 0) for f in tel.finished] == [("CANCELLED", False), ("OK", True)]
    assert tel.observed == ["r"]


# ---------------------------------------------------------------- accounting of cut calls


def test_a_cancel_at_the_deadline_is_accounted_deadline_exceeded() -> None:
    """a Cancelled failure (a unary call whose request never came: grpc cut it) of a
    call at its deadline is counted DEADLINE_EXCEEDED, one with time left CANCELLED."""

    async def go(s: LossServicer) -> list[str]:
        codes = []
        for remaining in (0.0, 60.0):
            ctx = Context(remaining=remaining)
            call = await s._admit("ComputeLoss", ctx)
            s._fail(call, Cancelled(), ctx)
            codes.append(call.code)
            s._finish(call, ctx)
        return codes

    with ThreadPoolExecutor(1) as pool:
        assert asyncio.run(go(_servicer(pool))) == ["DEADLINE_EXCEEDED", "CANCELLED"]


def test_a_call_cancelled_after_its_handler_returned_is_not_counted_ok() -> None:
    """a call whose handler returned but which grpc reports cancelled (the client went
    away before the response was out) is counted as cut, not OK."""
    tel = Finished()

    async def go(s: LossServicer) -> None:
        ctx = Context()
        call = await s._admit("ComputeLoss", ctx)
        ctx.is_cancelled = True
        s._finish(call, ctx)
        ctx = Context()
        call = await s._admit("ComputeLoss", ctx)
        s._finish(call, ctx)

    with ThreadPoolExecutor(1) as pool:
        asyncio.run(go(_servicer(pool, tel)))
    assert [f[2] for f in tel.finished] == ["CANCELLED", "OK"]


# ---------------------------------------------------------------- StreamLoss


def test_stream_limits_count_the_whole_stream(inprocess_server: Any) -> None:
    """max_tokens / max_sequences bound a stream's chunks together, not each chunk."""
    srv = inprocess_server(max_tokens=100, max_sequences=20)
    stub = pb_grpc.LossServiceStub(srv.channel())
    ok = [pb.StreamLossRequest(chunk=f32_batch_msg(4, 10, i)) for i in range(2)]  # 80 tokens, 8 seqs
    assert len(list(stub.StreamLoss(iter(ok), timeout=30))) == 2
    for chunks, field in (
        ([f32_batch_msg(4, 15, i) for i in range(2)], "chunk[1].logp"),  # 60 + 60 tokens
        ([f32_batch_msg(12, 1, i) for i in range(2)], "chunk[1].offsets"),  # 12 + 12 sequences
    ):
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.StreamLoss(iter([pb.StreamLossRequest(chunk=c) for c in chunks]), timeout=30))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (ei.value.details() or ""), ei.value.details()
        assert "too_large" in (ei.value.details() or "")


def test_a_streams_bytes_out_are_all_its_responses(inprocess_server: Any) -> None:
    """a stream's bytes_out (request_finished, the response-size metric) is the sum of
    every response it sent, not the last one's."""
    tel = Finished()
    srv = inprocess_server()
    srv.grpc_server.servicer.telemetry = tel
    ch = srv.channel()
    raw = ch.stream_stream(
        "/softgate.v1.LossService/StreamLoss",
        request_serializer=pb.StreamLossRequest.SerializeToString,
        response_deserializer=lambda b: b,
    )
    reqs = [pb.StreamLossRequest(chunk=f32_batch_msg(3, 50, i)) for i in range(3)]
    got = list(raw(iter(reqs), timeout=30))
    assert len(got) == 3
    deadline = time.monotonic() + 5
    while not tel.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    ((rpc, _, code, bytes_out),) = tel.finished
    assert (rpc, code) == ("StreamLoss", "OK")
    assert bytes_out == sum(len(b) for b in got)


def test_a_non_wire_stream_puts_the_summary_in_its_last_response() -> None:
    """the message path of StreamLoss (a big-endian host, or requests that are not wire
    bytes) carries the loss summary in the last response only, as the wire path does."""
    eng = Engine(device="cpu", compile=False)
    g = torch.Generator().manual_seed(0)
    chunks = [
        Batch(
            logp=-torch.rand(8, generator=g) - 0.1,
            offsets=torch.tensor([0, 3, 8]),
            advantages=torch.tensor([1.0, -1.0]),
        )
        for _ in range(3)
    ]
    whole = Batch(
        logp=torch.cat([c.logp for c in chunks]),
        offsets=torch.tensor([0, 3, 8, 11, 16, 19, 24]),
        advantages=torch.tensor([1.0, -1.0] * 3),
    )
    want = eng.loss(whole, LossConfig())
    with ThreadPoolExecutor(1) as pool:
        s = LossServicer(eng, pool)
        result, out = s._stream_loss(LossConfig(), ("gradient",), chunks, threading.Event(), encoded=False)
    assert [r.chunk_index for r in out] == [0, 1, 2]
    assert [r.HasField("summary") for r in out] == [False, False, True]
    assert out[-1].summary.loss == pytest.approx(float(result.loss))
    assert out[-1].summary.loss == pytest.approx(float(want.loss), rel=1e-6)


def _chunks(n: int, read: list[int] | None = None) -> Any:
    """A request stream of `n` one-token chunks; `read`: the index of each one taken."""

    async def gen() -> Any:
        for i in range(n):
            if read is not None:
                read.append(i)
            yield pb.StreamLossRequest(chunk=f32_batch_msg(1, 1, i))

    return gen()


def test_a_stream_of_many_chunks_never_joins_them_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: a StreamLoss's half-close work (joining the chunks, the loss, the
    responses) ran inline whenever its tokens were few, whatever its chunk count: 30,000 empty
    chunks held the event loop, and the health checks, for 0.6 s. Past INLINE_MAX_CHUNKS
    chunks it runs in the pool, as other never-inline work does."""
    from softgate.grpc import servicer as sv

    monkeypatch.setattr(sv, "INLINE_BUDGET_S", 60.0)  # (a slow decode on a busy box: still a streak)

    async def go(s: LossServicer, n: int) -> list[bool]:
        on_loop: list[bool] = []
        real = s._stream_loss
        loop_thread = threading.get_ident()

        def spy(*args: Any, **kw: Any) -> Any:
            on_loop.append(threading.get_ident() == loop_thread)
            return real(*args, **kw)

        s._stream_loss = spy  # type: ignore[method-assign]
        s._fast_streak = sv.INLINE_STREAK
        s._loop_single_threaded = loop_thread  # (see _inline_ready)
        ctx = Context()
        out = [r async for r in s.StreamLoss(_chunks(n), ctx)]
        assert (len(out), ctx.code) == (n, None), ctx.details
        return on_loop

    with ThreadPoolExecutor(1) as pool:
        s = _servicer(pool)
        assert asyncio.run(go(s, sv.INLINE_MAX_CHUNKS)) == [True]
        assert asyncio.run(go(s, sv.INLINE_MAX_CHUNKS + 1)) == [False]


def test_a_stream_of_more_chunks_than_max_stream_chunks_is_refused_at_the_first_past_it() -> None:
    """Found by an audit: nothing bounded a stream's chunk count (an empty chunk adds no tokens
    and costs the server ~4 KB and ~1 ms): 100,000 empty chunks held a slot for 66 s and
    400 MB. The chunk past max_stream_chunks is refused by name and the rest is not read;
    a stream of exactly max_stream_chunks is served."""
    from softgate.grpc.codec import Limits

    async def go(s: LossServicer, n: int, read: list[int]) -> tuple[int, Context]:
        ctx = Context()
        out = [r async for r in s.StreamLoss(_chunks(n, read), ctx)]
        return len(out), ctx

    with ThreadPoolExecutor(1) as pool:
        s = _servicer(pool, limits=Limits(max_stream_chunks=4))
        # (small streams may run inline on pytest's thread: its one-intra-op-thread setup would
        # stay for every later test; see _inline_ready)
        s._loop_single_threaded = threading.get_ident()
        read: list[int] = []
        n, ctx = asyncio.run(go(s, 4, read))
        assert (n, ctx.code) == (4, None), ctx.details
        read.clear()
        n, ctx = asyncio.run(go(s, 10, read))
        assert (n, ctx.code) == (0, grpc.StatusCode.INVALID_ARGUMENT)
        assert ctx.details == (
            "invalid input: chunk[4]: too_large: more than 4 chunks in one stream (max_stream_chunks); "
            "send fewer, larger chunks"
        )
        assert read == [0, 1, 2, 3, 4]
        assert s.in_flight == 0


# ---------------------------------------------------------------- a newer client's fields


def _with_unknown(msg: Any, number: int | None = None) -> Any:
    """`msg` plus an empty length-delimited field `number` (one its type does not have; None:
    one past its highest)."""
    known = {f.number for f in msg.DESCRIPTOR.fields}
    number = max(known, default=0) + 1 if number is None else number
    assert number not in known, f"{type(msg).__name__} has a field {number} now: pick another"
    tag, key = number << 3 | 2, bytearray()
    while tag > 0x7F:  # the key is a varint: past field 15 it takes two bytes
        key.append(tag & 0x7F | 0x80)
        tag >>= 7
    key.append(tag)
    return type(msg).FromString(msg.SerializeToString() + bytes(key) + b"\0")


def test_a_field_this_server_does_not_know_is_refused_by_name_not_ignored(inprocess_server: Any) -> None:
    """A client built from a newer softgate.v1 that sets a field this server lacks (a new
    objective kind, a new parameter, a new tensor, a new output) gets INVALID_ARGUMENT
    naming where, never a loss computed without it: an Objective of an unknown kind read as
    unset, i.e. SAPO with defaults, bit for bit (an audit)."""
    srv = inprocess_server()
    stub = pb_grpc.LossServiceStub(srv.channel())
    batch = f32_batch_msg(2, 4, 0)
    grpo = pb.LossConfig(objective=pb.Objective(grpo=pb.GrpoParams(eps_low=0.1)))
    assert stub.ComputeLoss(pb.ComputeLossRequest(config=grpo, batch=batch), timeout=30).HasField("outputs")

    def with_objective(objective: Any) -> Any:
        config = pb.LossConfig()
        config.objective.CopyFrom(objective)
        return config

    new_kind = with_objective(_with_unknown(pb.Objective(), 16))
    new_param = with_objective(pb.Objective(grpo=_with_unknown(pb.GrpoParams(eps_low=0.1), 4)))
    new_output = _with_unknown(pb.OutputSelection(ratio=True), 7)
    loss_cases = [
        (pb.ComputeLossRequest(config=new_kind, batch=batch), "config.objective", "softgate.v1.Objective"),
        (pb.ComputeLossRequest(config=new_param, batch=batch), "config.objective.grpo", "GrpoParams"),
        (_with_unknown(pb.ComputeLossRequest(batch=batch), 4), "request", "ComputeLossRequest"),
        (pb.ComputeLossRequest(batch=_with_unknown(batch, 12)), "batch", "softgate.v1.Batch"),
        (pb.ComputeLossRequest(batch=batch, outputs=new_output), "outputs", "OutputSelection"),
    ]
    stream_cases = [
        ([pb.StreamLossRequest(config=new_kind, chunk=batch)], "config.objective"),
        (
            [pb.StreamLossRequest(chunk=batch), pb.StreamLossRequest(chunk=_with_unknown(batch, 12))],
            "chunk[1]",
        ),
        ([_with_unknown(pb.StreamLossRequest(chunk=batch), 4)], "chunk[0]"),
        ([pb.StreamLossRequest(chunk=batch, outputs=new_output)], "outputs"),
    ]
    adv = pb.ComputeAdvantagesRequest(
        rewards=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=bytes(8)),
        group_ids=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2], data=bytes(16)),
        config=_with_unknown(pb.AdvantageConfig()),  # (6 until gamma took it)
    )
    calls = [(lambda r=r: stub.ComputeLoss(r, timeout=30), field, name) for r, field, name in loss_cases]
    calls += [(lambda c=c: list(stub.StreamLoss(iter(c), timeout=30)), f, "not in") for c, f in stream_cases]
    calls.append((lambda: stub.ComputeAdvantages(adv, timeout=30), "config", "AdvantageConfig"))
    for call, field, name in calls:
        with pytest.raises(grpc.RpcError) as ei:
            call()
        details = ei.value.details() or ""
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
        assert f"{field}: unknown_name: field number" in details and name in details, details


def test_the_unknown_field_walk_reads_lists_and_maps_of_messages() -> None:
    """No softgate.v1 request has a repeated message field yet; the walk must name an unknown
    field inside one, not fail on the container (a review)."""
    from google.protobuf import struct_pb2
    from softgate.engine.errors import FieldViolation
    from softgate.grpc.codec import unknown_fields

    inner = struct_pb2.Struct.FromString(bytes([15 << 3 | 2, 0]))
    outer = struct_pb2.Struct()
    outer.fields["a"].struct_value.CopyFrom(inner)
    outer.fields["b"].list_value.values.add().struct_value.CopyFrom(inner)
    found: list[FieldViolation] = []
    unknown_fields(outer, "config.", found)
    assert len(found) == 2 and all("field number 15" in f.reason for f in found), found


def _tensor(values: Any, dtype: Any) -> Any:
    """A softgate.v1 Tensor of `values` as numpy `dtype` (its Dtype by name)."""
    import numpy as np

    a = np.asarray(values, dtype=dtype)
    name = {"bool": "BOOL", "float16": "FLOAT16"}.get(a.dtype.name, a.dtype.name.upper())
    return pb.Tensor(dtype=pb.Dtype.Value(f"DTYPE_{name}"), shape=[a.size], data=a.tobytes())


def _refusal(call: Any) -> list[tuple[str, str, str]]:
    """(field, reason, description) of each violation of the INVALID_ARGUMENT `call()` raised."""
    from google.rpc import error_details_pb2, status_pb2

    with pytest.raises(grpc.RpcError) as ei:
        call()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    out = []
    for key, value in ei.value.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                br = error_details_pb2.BadRequest()
                detail.Unpack(br)
                out += [(f.field, f.reason, f.description) for f in br.field_violations]
    return out


def test_an_unknown_field_inside_a_tensor_or_a_list_algorithms_request_is_refused(
    inprocess_server: Any,
) -> None:
    """Found by an audit: the "never ignored" rule skipped Tensors (a newer contract's byte
    order or scale there would have been dropped and the bytes misread) and
    ListAlgorithmsRequest. Each is refused as unknown_name on the tensor that holds it, in
    every RPC, and on a large request read through views as on a small one."""
    srv = inprocess_server()
    stub = pb_grpc.LossServiceStub(srv.channel())
    big = f32_batch_msg(4, 1 << 16, 0)  # 1 MiB of logp: read through views
    small = f32_batch_msg(2, 4, 0)
    for batch in (small, big):
        batch.logp.CopyFrom(_with_unknown(batch.logp, 4))
    adv = pb.ComputeAdvantagesRequest(
        rewards=_with_unknown(_tensor([1.0, 0.0], "float32"), 4), group_ids=_tensor([0, 0], "int64")
    )
    cases = [
        (lambda: stub.ComputeLoss(pb.ComputeLossRequest(batch=small), timeout=30), "batch.logp"),
        (lambda: stub.ComputeLoss(pb.ComputeLossRequest(batch=big), timeout=60), "batch.logp"),
        (
            lambda: list(stub.StreamLoss(iter([pb.StreamLossRequest(chunk=small)]), timeout=30)),
            "chunk[0].logp",
        ),
        (lambda: stub.ComputeAdvantages(adv, timeout=30), "rewards"),
    ]
    for call, field in cases:
        ((name, reason, description),) = _refusal(call)
        assert (name, reason) == (field, "UNKNOWN_NAME"), description
        assert "field number 4 of softgate.v1.Tensor" in description
    ((name, reason, description),) = _refusal(
        lambda: stub.ListAlgorithms(_with_unknown(pb.ListAlgorithmsRequest(), 1), timeout=30)
    )
    assert (name, reason) == ("request", "UNKNOWN_NAME") and "ListAlgorithmsRequest" in description
    assert stub.ListAlgorithms(pb.ListAlgorithmsRequest(), timeout=30).metrics


def test_group_ids_beside_advantages_are_checked_but_not_counted(inprocess_server: Any) -> None:
    """Found by an audit: group ids sent beside advantages were not checked (float ones, or
    of the wrong length, passed) yet their distinct values counted against max_groups. They
    play no part then: any number of groups passes, a malformed tensor is refused by name,
    in ComputeLoss and in a StreamLoss chunk."""
    srv = inprocess_server(max_groups=3)
    stub = pb_grpc.LossServiceStub(srv.channel())

    def loss(group_ids: Any) -> Any:
        batch = f32_batch_msg(4, 3, 0)
        batch.group_ids.CopyFrom(group_ids)
        return stub.ComputeLoss(pb.ComputeLossRequest(batch=batch), timeout=30)

    def stream(*group_ids: Any) -> Any:
        chunks = [f32_batch_msg(4, 3, i) for i in range(2)]
        for c, g in zip(chunks, group_ids, strict=True):
            c.group_ids.CopyFrom(g)
        return list(stub.StreamLoss(iter([pb.StreamLossRequest(chunk=c) for c in chunks]), timeout=30))

    assert loss(_tensor([0, 1, 2, 3], "int64")).metrics["num_groups"] == 0.0
    assert len(stream(_tensor([0, 1, 2, 3], "int64"), _tensor([4, 5, 6, 7], "int64"))) == 2
    floats = _tensor([0.0, 1.0, 2.0, 3.0], "float32")
    short = _tensor([0, 1, 2], "int64")
    for group_ids, reason in ((floats, "BAD_DTYPE"), (short, "LENGTH_MISMATCH")):
        got = _refusal(lambda g=group_ids: loss(g))
        assert [(f, r) for f, r, _ in got] == [("batch.group_ids", reason)], got
    got = _refusal(lambda: stream(floats, floats))
    assert [(f, r) for f, r, _ in got] == [("chunk.group_ids", "BAD_DTYPE")], got
    got = _refusal(lambda: stream(_tensor([0, 1, 2, 3], "int64"), short))
    assert [(f, r) for f, r, _ in got] == [("chunk[1].group_ids", "LENGTH_MISMATCH")], got


def test_dtypes_in_error_descriptions_are_the_contracts_names(inprocess_server: Any) -> None:
    """Found by an audit: some descriptions named torch dtypes ("torch.float16", a stream's
    "dtype float32 differs from chunk 0's float64"), which mean nothing to a trainer in another
    language; they use softgate.v1's Dtype names. Integer rewards are accepted, and the
    refusal of boolean ones says so."""
    srv = inprocess_server()
    stub = pb_grpc.LossServiceStub(srv.channel())

    def loss(**tensors: Any) -> Any:
        batch = f32_batch_msg(2, 3, 0)
        for name, t in tensors.items():
            getattr(batch, name).CopyFrom(t)
        return stub.ComputeLoss(pb.ComputeLossRequest(batch=batch), timeout=30)

    f64 = f32_batch_msg(2, 3, 1)
    for name in ("logp", "old_logp", "advantages"):
        t = getattr(f64, name)
        a = torch.frombuffer(bytearray(t.data), dtype=torch.float32).double()
        t.CopyFrom(_tensor(a.numpy(), "float64"))
    stream = [pb.StreamLossRequest(chunk=f64), pb.StreamLossRequest(chunk=f32_batch_msg(2, 3, 2))]
    adv_free = f32_batch_msg(2, 3, 0)
    adv_free.ClearField("advantages")
    adv_free.group_ids.CopyFrom(_tensor([0, 0], "int64"))
    adv_free.rewards.CopyFrom(_tensor([True, False], "bool"))
    cases = [
        (lambda: loss(mask=_tensor([1] * 6, "float16")), "batch.mask", "DTYPE_FLOAT16; bool or 0/1 expected"),
        (lambda: loss(ref_logp=_tensor([-1] * 6, "int64")), "batch.ref_logp", "DTYPE_INT64 given, "),
        (lambda: loss(advantages=_tensor([1, -1], "int64")), "batch.advantages", "DTYPE_INT64 given, "),
        (
            lambda: stub.ComputeLoss(pb.ComputeLossRequest(batch=adv_free), timeout=30),
            "batch.rewards",
            "DTYPE_BOOL given, a float or integer dtype expected",
        ),
        (
            lambda: list(stub.StreamLoss(iter(stream), timeout=30)),
            "chunk[1].logp",
            "dtype DTYPE_FLOAT32 differs from chunk 0's DTYPE_FLOAT64",
        ),
    ]
    for call, field, text in cases:
        got = _refusal(call)
        assert got and got[0][0] == field and text in got[0][2], got
        assert not any("torch." in d or "float32 differs" in d for _, _, d in got), got


def test_the_catalogue_says_what_the_metrics_of_compute_advantages_mean() -> None:
    """Found by an audit: ListAlgorithms described adv_mean and adv_std "over tokens", as
    ComputeLoss computes them; ComputeAdvantages returns the same names over sequences. A
    description that speaks of tokens says what the name means there too."""
    from softgate.engine import AdvantageConfig
    from softgate.grpc import catalogue, codec

    got = Engine(device="cpu", compile=False).advantages(
        torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), AdvantageConfig()
    )
    described = {m.name: m.description for m in catalogue.build(codec.Limits(), 1 << 20).metrics}
    vague = [n for n in got.metrics if "token" in described[n] and "ComputeAdvantages" not in described[n]]
    assert not vague, {n: described[n] for n in vague}
