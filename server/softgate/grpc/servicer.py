"""The softgate.v1.LossService servicer: decode -> Engine -> encode, nothing else.

Each RPC takes one slot of a counter capped at `max_concurrent_rpcs` (past it:
RESOURCE_EXHAUSTED at once, never a queue that hangs); decoding, the engine call and encoding
run together in a thread pool so the event loop stays responsive (health checks, other calls,
cancellation). Deadlines are checked before work starts and bound the wait for it; a cancelled
or expired call stops its thread at the next phase boundary. Telemetry hooks get the run label
from the `softgate-run` metadata key; a call's batch is recorded only once it ends OK.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
import torch
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb
from softgate_client.proto.softgate.v1 import softgate_pb2_grpc as pb_grpc

from softgate.engine import Engine
from softgate.engine.batch import Batch
from softgate.engine.compiled import never_compile_here
from softgate.engine.config import AdvantageConfig, LossConfig
from softgate.engine.engine import ONE_THREAD_MAX_TOKENS
from softgate.engine.errors import FieldViolation, InputError, is_device_error
from softgate.engine.result import AdvantageResult, LossResult
from softgate.engine.validation import compute_dtype, validate_config
from softgate.grpc import catalogue, codec
from softgate.grpc.errors import SERVER_BUSY, Cancelled, DeadlineExceeded, exhausted, failure_for
from softgate.grpc.response_buffer import gradient_response
from softgate.logging import get_logger
from softgate.settings import DEFAULT_STREAM_IDLE_TIMEOUT_S
from softgate.telemetry import Telemetry
from softgate.threads import one_thread, single_threaded_here

DEFAULT_INLINE_MAX_TOKENS = ONE_THREAD_MAX_TOKENS  # (equal: see engine.ONE_THREAD_MAX_TOKENS)
INLINE_BUDGET_S = 0.01
INLINE_STREAK = 3
# a StreamLoss of more chunks joins them in the pool whatever its tokens: joining costs per
# chunk (30,000 empty chunks held the loop 0.6 s; an audit)
INLINE_MAX_CHUNKS = 64
# Deferred telemetry after a small call waits until no RPC has run for KICK_IDLE_S (a trainer's
# next back-to-back call then does not queue behind the last one's recording), or until
# KICK_BACKLOG calls wait; after a large call (more than inline_max_tokens) it starts at once.
# Nothing is lost or late to a reader: every metrics read records what is queued first.
KICK_IDLE_S = 0.002
KICK_BACKLOG = 32
RUN_METADATA_KEY = "softgate-run"
DEFAULT_RUN = "default"
MAX_RUN_CHARS = 128
SERVICE_NAME = "softgate.v1.LossService"

log = get_logger("grpc")
SHUTTING_DOWN = "server shutting down; retry (another replica will answer)"
T = TypeVar("T")


_NEVER_CANCELLED = threading.Event()


class _PastDeadline(threading.Event):
    """The cancel event of work run inline: nothing can set it while the work holds the loop,
    so it reads as set once the call's deadline has passed (a call that overran records nothing)."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline

    def is_set(self) -> bool:
        return time.perf_counter() >= self.deadline


def _timed(fn: Callable[[threading.Event], T], note: Callable[[float], None], cancel: threading.Event) -> T:
    """A small call in a pool thread: one intra-op thread (see softgate.threads), timed."""
    t0 = time.perf_counter()
    try:
        with one_thread():
            return fn(cancel)
    finally:
        note(time.perf_counter() - t0)


def run_of(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == RUN_METADATA_KEY:
            run = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            run = run.strip()[:MAX_RUN_CHARS]
            return run or DEFAULT_RUN
    return DEFAULT_RUN


# a cancel this close to a call's deadline (at most half its time) is the client's deadline
# (see _Call.cut)
CUT_SLACK_S = 0.25
CUT_WAIT_S = 0.01  # how long a request stream that ended (empty, or small) waits for grpc to say it was cut


@dataclass
class _Call:
    rpc: str
    run: str
    t0: float = field(default_factory=time.perf_counter)
    code: str = "OK"
    tokens: int = 0
    sequences: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    started: bool = False
    error: str | None = None  # the failure's message (log_requests)
    # read at admission (log_requests): context.peer() of a cancelled call can crash grpc
    peer: str | None = None
    deadline: float | None = None  # perf_counter time; a call cut past it is DEADLINE_EXCEEDED
    released: bool = False  # its admission slot is given back (_release)
    has_done_callback: bool = False  # grpc calls _done when the call ends
    # (telemetry hook, config, result): recorded by _finish once the call ends OK, never from
    # the worker (a call cut after its work recorded a batch its trainer never got; an audit)
    observed: tuple[str, Any, Any] | None = None

    def cut(self) -> str:
        """The code of a call grpc cancelled: its deadline's, once that has (nearly) passed. A
        client cancels at its own deadline, which is earlier than the server's by the request's
        transit (tens of ms on a loaded box): that cancel is a deadline too."""
        if self.deadline is None:
            return "CANCELLED"
        slack = min(CUT_SLACK_S, (self.deadline - self.t0) / 2)  # (a short deadline: half of it)
        late = time.perf_counter() >= self.deadline - slack
        return "DEADLINE_EXCEEDED" if late else "CANCELLED"


def _clear_frames(exc: BaseException | None) -> None:
    """Drop the locals of the finished frames a failure's traceback (and its context's) holds:
    the request and its batch, which a cycle through them (a frame holding the future that holds
    the exception raised in it) kept until a full garbage collection (an audit)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # (frames still running are left as they are)
        exc = exc.__cause__ or exc.__context__


# a response's bytes besides its per-token outputs: loss, metrics map (~850 B), tensor headers,
# a stream's chunk fields and summary, a gradient's alignment padding (an upper bound)
RESPONSE_OVERHEAD = 4096


class _Guard:
    """LossServicer._guard's context manager (a class: contextlib's generator-based one cost
    ~10 us of a small call)."""

    __slots__ = ("call", "context", "rpc", "servicer")

    def __init__(self, servicer: LossServicer, rpc: str, context: Any) -> None:
        self.servicer, self.rpc, self.context = servicer, rpc, context

    async def __aenter__(self) -> _Call:
        self.call = await self.servicer._admit(self.rpc, self.context)
        return self.call

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        """True (the failure is answered: its status is set on the context, and the handler
        returns, without a response) for an Exception; else False (it propagates)."""
        try:
            # GeneratorExit: a StreamLoss whose client went away while a response was written;
            # grpc closes the handler's generator later, without a CancelledError
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                # cut by a stop past its grace: its client reads UNAVAILABLE ("Cancelling all calls")
                self.call.code = self.servicer._cut(self.call)
            elif isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
                self.servicer._fail(self.call, exc, self.context)
                _clear_frames(exc)
                return True
            return False
        finally:
            self.servicer._finish(self.call, self.context)


class LossServicer(pb_grpc.LossServiceServicer):
    """Thin adapter from softgate.v1 to `Engine`; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        executor: Executor,
        telemetry: Telemetry | None = None,
        *,
        max_concurrent_rpcs: int = 32,
        limits: codec.Limits | None = None,
        max_message_bytes: int = 512 << 20,
        inline_max_tokens: int = DEFAULT_INLINE_MAX_TOKENS,
        log_requests: bool = False,
        stream_idle_timeout_s: float | None = DEFAULT_STREAM_IDLE_TIMEOUT_S,
    ) -> None:
        self.engine = engine
        self.executor = executor
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.limits = limits or codec.Limits()
        self.max_message_bytes = max_message_bytes
        self.in_flight = 0
        self._catalogue = catalogue.build(self.limits, max_message_bytes)
        self.inline_max_tokens = inline_max_tokens
        self.log_requests = log_requests
        self.stream_idle_timeout_s = stream_idle_timeout_s or None  # (0: no limit)
        # consecutive small calls that took at most INLINE_BUDGET_S (see _run)
        self._fast_streak = 0
        self._loop_single_threaded: int | None = None
        self.last_finished = float("-inf")  # time.monotonic() of the last call's end
        self._unrecorded = 0  # calls ended since telemetry last recorded (see _kick)
        self._kick_timer: asyncio.TimerHandle | None = None
        self.closing = False  # set by a graceful stop: new calls are refused
        self.stopping = False  # set when that stop cuts the calls left (grace over, or a second signal)
        # told of a call's CUDA error other than out of memory (GrpcServer probes the device)
        self.on_device_error: Callable[[BaseException], None] | None = None

    # ------------------------------------------------------------ plumbing
    def _hook(self, name: str, *args: Any) -> None:
        try:
            getattr(self.telemetry, name)(*args)
        except Exception:  # telemetry must never fail an RPC
            log.warning("telemetry_error", hook=name, exc_info=True)

    async def _refuse(
        self, call: _Call, code: grpc.StatusCode, message: str, context: Any, trailing: Any = ()
    ) -> None:
        """Account for a call refused at admission, then abort it with `code` (and `trailing`
        metadata: a status's details). It is counted but not timed: busy refusals observed as
        0 s dragged the latency percentiles toward 0 exactly when the server was saturated."""
        call.code, call.error = code.name, message
        self._account(call, None)
        if trailing:
            context.set_trailing_metadata(trailing)
        await context.abort(code, message)

    def _new_call(self, rpc: str, context: Any) -> _Call:
        call = _Call(rpc, run_of(context))
        if self.log_requests:
            call.peer = context.peer()
        remaining = context.time_remaining()
        if remaining is not None:
            call.deadline = call.t0 + remaining
        return call

    async def _admit(self, rpc: str, context: Any) -> _Call:
        call = self._new_call(rpc, context)
        if self.closing:
            await self._refuse(call, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, context)
        if self.in_flight >= self.max_concurrent_rpcs:
            self._hook("busy", rpc)
            busy = exhausted(
                f"server busy: {self.in_flight} RPCs in flight (max_concurrent_rpcs={self.max_concurrent_rpcs}); "
                "retry with backoff",
                SERVER_BUSY,
            )
            await self._refuse(call, busy.code, busy.message, context, busy.trailing_metadata)
        self.in_flight += 1
        # the slot is given back when grpc ends the call, whatever the handler is doing then (a
        # StreamLoss cut while writing a response is closed after the call has ended: a callback
        # added at that point never ran, and the slot stayed taken until a restart)
        try:
            context.add_done_callback(lambda _context: self._done(call))
            call.has_done_callback = True
        except Exception:  # a context without callbacks: _finish calls _done
            pass
        return call

    def _release(self, call: _Call) -> None:
        if not call.released:
            call.released = True
            self.in_flight -= 1

    def _account(self, call: _Call, seconds: float | None) -> None:
        """Telemetry's request_finished for an ended call, and its log line (log_requests);
        `seconds` None: a call refused at admission, not timed (its log line reads 0)."""
        self._hook(
            "request_finished",
            call.rpc,
            call.run,
            call.code,
            seconds,
            call.bytes_in,
            call.bytes_out,
            call.tokens,
            call.sequences,
            call.started,
        )
        if self.log_requests:
            log.info(
                "rpc",
                rpc=call.rpc,
                run=call.run,
                code=call.code,
                seconds=round(seconds or 0.0, 6),
                tokens=call.tokens,
                sequences=call.sequences,
                bytes_in=call.bytes_in,
                bytes_out=call.bytes_out,
                peer=call.peer,
                error=call.error,
            )

    def _done(self, call: _Call) -> None:
        self._release(call)
        self._kick(call)

    def _kick(self, call: _Call) -> None:
        """A call has ended (its response is out): let the telemetry record what it deferred,
        at once after a large call or a backlog, else once the server is idle (KICK_IDLE_S)."""
        self._unrecorded += 1
        if call.tokens > self.inline_max_tokens or self._unrecorded >= KICK_BACKLOG:
            self._record()
        elif self._kick_timer is None:
            self._kick_timer = asyncio.get_running_loop().call_later(KICK_IDLE_S, self._kick_when_idle)

    def _kick_when_idle(self) -> None:
        self._kick_timer = None
        if self.in_flight:  # a call came in since: its own end looks again (_kick)
            return
        wait = self.last_finished + KICK_IDLE_S - time.monotonic()
        if wait > 0:  # one ended since: idle for KICK_IDLE_S after it
            self._kick_timer = asyncio.get_running_loop().call_later(wait, self._kick_when_idle)
        else:
            self._record()

    def _record(self) -> None:
        if self._kick_timer is not None:
            self._kick_timer.cancel()
            self._kick_timer = None
        self._unrecorded = 0
        self._hook("kick")

    def _start(self, call: _Call) -> None:
        if not call.started:
            call.started = True
            self._hook("request_started", call.rpc, call.run, call.tokens)

    def _note_small(self, seconds: float) -> None:
        self._fast_streak = self._fast_streak + 1 if seconds <= INLINE_BUDGET_S else 0

    def _inline(self, tokens: int | None) -> bool:
        """Whether to run a call's work on the event loop thread instead of the pool.

        Only a small call (at most `inline_max_tokens` tokens) that is the only call in flight,
        and only after INLINE_STREAK small calls in a row finished within INLINE_BUDGET_S:
        then the thread hop (~0.3-0.8 ms on 2 cores) is most of the cost, and the loop is blocked
        for about a millisecond. A slow engine (first compile, a stalled device) resets the
        streak, so such calls go back to the pool, where the loop stays free for health checks,
        admission and cancellation, and deadlines bound the wait."""
        return (
            tokens is not None
            and tokens <= self.inline_max_tokens
            and self.in_flight == 1
            and self._fast_streak >= INLINE_STREAK
        )

    async def _run(self, call: _Call, fn: Callable[[threading.Event], T], tokens: int | None = None) -> T:
        """Run `fn(cancel_event)` in the pool (or inline, see `_inline`), bounded by the call's
        deadline. `tokens`: the call's size, None for work that must never run inline."""
        remaining = None if call.deadline is None else call.deadline - time.perf_counter()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded()
        small = tokens is not None and tokens <= self.inline_max_tokens
        if small and self._inline(tokens):
            tid = threading.get_ident()
            if self._loop_single_threaded != tid:  # one intra-op thread for small work, this thread only
                single_threaded_here()
                never_compile_here()  # (a new "sync" configuration compiles in the background)
                self._loop_single_threaded = tid
            t0 = time.perf_counter()
            try:
                return fn(_NEVER_CANCELLED if call.deadline is None else _PastDeadline(call.deadline))
            finally:
                took = time.perf_counter() - t0
                self._note_small(took)
                if remaining is not None and took >= remaining:
                    raise DeadlineExceeded()
        cancel = threading.Event()
        if small:
            fn = functools.partial(_timed, fn, self._note_small)
        fut = asyncio.get_running_loop().run_in_executor(self.executor, fn, cancel)
        try:
            if remaining is None:
                return await fut
            return await asyncio.wait_for(fut, remaining)
        except asyncio.TimeoutError:
            cancel.set()
            raise DeadlineExceeded() from None
        except asyncio.CancelledError:
            cancel.set()
            raise

    def _cut(self, call: _Call) -> str:
        """The code of a call grpc cut: UNAVAILABLE when a stop past its grace (or a second
        signal) cut it, as its client reads it (it counted CANCELLED, "the client cancelled",
        and missed the error-rate alert; an audit); else its deadline's or a cancel's."""
        return "UNAVAILABLE" if self.stopping else call.cut()

    def _fail(self, call: _Call, exc: BaseException, context: Any) -> None:
        """Set the status of failure `exc` on the call; its handler then returns no response.
        Not context.abort: grpc keeps the AbortError it raises in a reference cycle with the
        call's state, and with it every frame it passed through and their locals, the request
        among them, until a full garbage collection (~400 MB a failed 210 MB request; an audit)."""
        f = failure_for(exc)
        call.code, call.error = f.code.name, f.message
        if isinstance(exc, Cancelled):  # (grpc cancels a call at its deadline too)
            call.code = self._cut(call)
        if f.reasons:
            self._hook("rejected", call.rpc, list(f.reasons))
        if f.log:
            log.error("rpc_internal_error", rpc=call.rpc, run=call.run, error_id=f.error_id, exc_info=exc)
            if self.on_device_error is not None and is_device_error(exc):
                self.on_device_error(exc)
        else:
            log.debug("rpc_failed", rpc=call.rpc, run=call.run, code=call.code, message=f.message)
        context.set_code(f.code)
        context.set_details(f.message)
        if f.trailing_metadata:
            context.set_trailing_metadata(f.trailing_metadata)

    def _finish(self, call: _Call, context: Any) -> None:
        if call.code == "OK" and context.cancelled():
            call.code = self._cut(call)
        if call.code == "OK" and call.observed is not None:  # (deferred: queued, cheap here)
            self._hook(call.observed[0], call.run, *call.observed[1:])
        call.observed = None
        # a large call keeps its slot until its response is out (_done): a slow or paused
        # client's response (and the request it was computed from) stays inside
        # max_concurrent_rpcs; deferred telemetry starts once the response is out too
        if call.tokens <= self.inline_max_tokens:
            self._release(call)
        self.last_finished = time.monotonic()
        if not call.has_done_callback:
            self._done(call)
        self._account(call, time.perf_counter() - call.t0)

    def _guard(self, rpc: str, context: Any) -> _Guard:
        """`async with` it: admit a call, map any failure to its status, always account for it."""
        return _Guard(self, rpc, context)

    def _sample_tokens(self, names: tuple[str, ...]) -> int | None:
        """Engine.loss's `sample_tokens`: what the telemetry reads of the ratio and gate weight,
        unless the request asked for per-token trust-region outputs (then all of them)."""
        if any(n in names for n in codec.TRUST_REGION_OUTPUTS):
            return None
        return getattr(self.telemetry, "sample_tokens", None)  # None: a telemetry that reads them all

    @staticmethod
    def _check(cancel: threading.Event) -> None:
        if cancel.is_set():
            raise Cancelled()

    def _response_too_large(
        self, itemsize: int, names: tuple[str, ...], parts: list[tuple[str, int]]
    ) -> list[FieldViolation]:
        """The parts (a stream's chunks, each named) whose response would hold more per-token
        output bytes (floats of `itemsize`) than this server may send (max_message_bytes bounds
        both directions), refused before any work: grpc would refuse it only after the engine
        ran, as RESOURCE_EXHAUSTED, which reads as "retry"."""
        per_token = sum(1 if name in codec.BOOL_OUTPUTS else itemsize for name in names)
        limit = self.max_message_bytes - RESPONSE_OVERHEAD
        return [
            FieldViolation(
                field,
                f"too_large: {'the' if field == 'outputs' else 'its'} response would hold {n * per_token} bytes"
                f" of per-token outputs ({', '.join(names)}), over the {limit} this server's max_message_bytes"
                f" {self.max_message_bytes} leaves them; ask for fewer outputs or send fewer tokens a message"
                " (StreamLoss chunks)",
            )
            for field, n in parts
            if n * per_token > limit
        ]

    # ------------------------------------------------------------ ComputeAdvantages
    async def ComputeAdvantages(
        self, request: pb.ComputeAdvantagesRequest | AsyncIterator[Any], context: Any
    ) -> pb.ComputeAdvantagesResponse | None:
        """`request` is a stream of one when it came through `loss_service_handler` (read once
        the call is admitted), a plain message otherwise. None: failed, the status says why."""
        async with self._guard("ComputeAdvantages", context) as call:
            msg = request
            if not isinstance(msg, (pb.ComputeAdvantagesRequest, codec.CorruptMessage)):
                msg = await _first(msg, self.stream_idle_timeout_s, call.deadline)
            if isinstance(msg, codec.CorruptMessage):
                raise InputError([msg.violation("request")])
            assert isinstance(msg, pb.ComputeAdvantagesRequest)
            call.sequences = codec.claimed_rows(msg.rewards)
            call.bytes_in = msg.ByteSize()
            self._start(call)
            # sized by the values its tensors hold, not the rows claimed: [B, K] rewards are K
            # times the work of B, and group ids (or token counts) longer than the rewards are
            # read whole (torch.unique) before their length is refused
            size = max(codec.stored_elements(x) for x in (msg.rewards, msg.group_ids, msg.token_counts))
            config, result, resp = await self._run(call, lambda cancel: self._advantages(msg, cancel), size)
            call.observed = ("observe_advantages", config, result)
            call.bytes_out = resp.ByteSize()
            return resp
        return None  # (the guard answered a failure)

    def _advantages(
        self, request: pb.ComputeAdvantagesRequest, cancel: threading.Event
    ) -> tuple[AdvantageConfig, AdvantageResult, pb.ComputeAdvantagesResponse]:
        v: list[FieldViolation] = []
        n = codec.claimed_rows(request.rewards)  # ([B] or [B, K])
        lim = self.limits
        if lim.max_sequences and n > lim.max_sequences:
            v.append(
                FieldViolation(
                    "rewards",
                    f"too_large: {n} sequences exceed this server's max_sequences {lim.max_sequences}",
                )
            )
            raise InputError(v)
        rewards = codec.decode_tensor(request.rewards, "rewards", v) if request.HasField("rewards") else None
        group_ids = (
            codec.decode_tensor(request.group_ids, "group_ids", v) if request.HasField("group_ids") else None
        )
        token_counts = (
            codec.decode_tensor(request.token_counts, "token_counts", v)
            if request.HasField("token_counts")
            else None
        )
        if not request.HasField("rewards"):
            v.append(FieldViolation("rewards", "missing: rewards are required"))
        if not request.HasField("group_ids"):
            v.append(FieldViolation("group_ids", "missing: group_ids are required"))
        config = codec.decode_advantage_config(request.config, "config.", v)
        codec.unknown_fields(request, "", v)
        if v:
            raise InputError(v)
        assert rewards is not None and group_ids is not None
        # the response's [B] advantages (FLOAT64 for FLOAT64 rewards, else FLOAT32) must fit the
        # message limit: 1- or 2-byte rewards and group ids make a response larger than its request
        out_bytes = n * (8 if rewards.dtype == torch.float64 else 4)
        if out_bytes > self.max_message_bytes - RESPONSE_OVERHEAD:
            why = (
                f"too_large: the response's advantages would hold {out_bytes} bytes, over the "
                f"{self.max_message_bytes - RESPONSE_OVERHEAD} this server's max_message_bytes "
                f"{self.max_message_bytes} leaves them; send fewer sequences a call"
            )
            raise InputError([FieldViolation("rewards", why)])
        probe = Batch(logp=rewards, offsets=torch.zeros(1, dtype=torch.int64), group_ids=group_ids)
        codec.check_groups(probe, lim, "group_ids", v)
        if v:
            raise InputError(v)
        self._check(cancel)
        try:
            result = self.engine.advantages(rewards, group_ids, config, token_counts)
        except InputError as e:
            raise codec.rename(e, _advantages_field) from None
        self._check(cancel)
        resp = pb.ComputeAdvantagesResponse()
        codec.encode_tensor(result.advantages, resp.advantages)
        resp.metrics.update(codec.metrics_map(result.metrics))
        return config, result, resp

    # ------------------------------------------------------------ ComputeLoss
    async def ComputeLoss(
        self, request: pb.ComputeLossRequest | codec.Received | AsyncIterator[Any], context: Any
    ) -> pb.ComputeLossResponse | codec.Encoded | None:
        """`request` is a stream of one Received when it came through `loss_service_handler`
        (read once the call is admitted; the response is then an Encoded), a plain message
        otherwise (e.g. the generated registration). None: failed, the status says why."""
        async with self._guard("ComputeLoss", context) as call:
            if not isinstance(request, (pb.ComputeLossRequest, codec.Received, codec.CorruptMessage)):
                request = await _first(request, self.stream_idle_timeout_s, call.deadline)
            if isinstance(request, codec.CorruptMessage):
                raise InputError([request.violation("request")])
            msg, wire = codec.unwrap(request)
            call.tokens = codec.claimed_elements(msg.batch.logp)
            call.sequences = max(codec.claimed_elements(msg.batch.offsets) - 1, 0)
            call.bytes_in = wire.nbytes if wire is not None else msg.ByteSize()
            self._start(call)
            config, result, resp = await self._run(
                call, lambda cancel: self._loss(msg, cancel, wire), call.tokens
            )
            call.observed = ("observe_loss", config, result)
            call.bytes_out = len(resp) if isinstance(resp, codec.Encoded) else resp.ByteSize()
            return resp
        return None  # (the guard answered a failure)

    def _loss(
        self,
        request: pb.ComputeLossRequest,
        cancel: threading.Event,
        wire: codec.Received | None = None,
    ) -> tuple[LossConfig, LossResult, pb.ComputeLossResponse | codec.Encoded]:
        v: list[FieldViolation] = []
        if not request.HasField("batch"):
            raise InputError([FieldViolation("batch", "missing: the batch is required")])
        codec.unknown_fields(request, "", v, deep=False)  # (the config's: decode_loss_config)
        codec.unknown_fields(request.batch, "batch.", v, deep=False)
        if request.HasField("outputs"):
            codec.unknown_fields(request.outputs, "outputs.", v)
        codec.check_batch_limits(request.batch, "batch.", self.limits, v)
        if v:
            raise InputError(v)
        batch = codec.decode_batch(request.batch, "batch.", v, wire.views if wire is not None else None)
        if wire is not None:
            wire.views.clear()  # the batch holds what it needs of the received bytes (a copy, or them)
        config = codec.decode_loss_config(request.config, v)
        if batch is not None:
            codec.check_groups(batch, self.limits, "batch.group_ids", v)
        if v:
            raise InputError(v)
        assert batch is not None
        self._check(cancel)
        names = codec.selected_outputs(request.outputs if request.HasField("outputs") else None)
        v = self._response_too_large(compute_dtype(batch).itemsize, names, [("outputs", batch.logp.numel())])
        if v:
            raise InputError(v)
        # a large gradient-only response: the engine writes the gradient into its bytes
        out = gradient_response(batch, names, self.engine.device_for(batch)) if wire is not None else None
        try:
            result = self.engine.loss(
                batch,
                config,
                sample_tokens=self._sample_tokens(names),
                grad_out=out.grad if out is not None else None,
            )
        except InputError as e:
            raise codec.rename(
                e, lambda f: FieldViolation(codec.request_field(f.field), f.reason, f.index)
            ) from None
        self._check(cancel)  # (a call cut meanwhile stops here: nothing more to encode)
        if out is not None:
            return config, result, out.encode(result)
        if wire is not None and codec.LITTLE_ENDIAN:
            return config, result, codec.encode_loss_response(result, codec.host_result(result, names), names)
        resp = pb.ComputeLossResponse(
            loss=result.loss, policy_loss=result.policy_loss, kl_loss=result.kl_loss
        )
        resp.metrics.update(codec.metrics_map(result.metrics))
        codec.fill_outputs(resp.outputs, codec.host_result(result, names), names)
        return config, result, resp

    # ------------------------------------------------------------ StreamLoss
    async def StreamLoss(
        self, request_iterator: AsyncIterator[pb.StreamLossRequest | codec.Received], context: Any
    ) -> AsyncIterator[pb.StreamLossResponse | codec.Encoded]:
        async with self._guard("StreamLoss", context) as call:
            request_iterator = _idle_bounded(request_iterator, self.stream_idle_timeout_s)
            config: LossConfig | None = None  # (decoded from the first message)
            names: tuple[str, ...] = ()
            # each chunk is decoded (in the pool) while the next one arrives; a failure is
            # reported in chunk order (an earlier chunk's problem first), as when sequential
            decoding: list[asyncio.Task[Batch]] = []
            chunks: list[Batch] = []
            encoded = codec.LITTLE_ENDIAN
            try:
                async for item in request_iterator:
                    i = len(decoding)
                    most = self.limits.max_stream_chunks
                    if most and i >= most:  # (each chunk costs ~4 KB and ~1 ms, however small)
                        await _settle(decoding)
                        too_many = f"too_large: more than {most} chunks in one stream (max_stream_chunks)"
                        raise InputError(
                            [FieldViolation(f"chunk[{i}]", f"{too_many}; send fewer, larger chunks")]
                        )
                    if isinstance(item, codec.CorruptMessage):
                        await _settle(decoding)
                        raise InputError([item.violation(f"chunk[{i}]")])
                    msg, wire = codec.unwrap(item)
                    encoded = encoded and wire is not None
                    call.bytes_in += wire.nbytes if wire is not None else msg.ByteSize()
                    v: list[FieldViolation] = []
                    codec.unknown_fields(msg, f"chunk[{i}]", v, deep=False)
                    codec.unknown_fields(msg.chunk, f"chunk[{i}]", v, deep=False)
                    if config is None:
                        if msg.HasField("outputs"):
                            codec.unknown_fields(msg.outputs, "outputs.", v)
                        names = codec.selected_outputs(msg.outputs if msg.HasField("outputs") else None)
                        # the configuration is whole here: a bad one refused now, not once every
                        # chunk is uploaded (gigabytes, from a trainer in Go; an audit)
                        config = codec.decode_loss_config(msg.config, v)  # (its unknown fields too)
                        if not v:
                            v += [
                                FieldViolation(codec.request_field(f.field), f.reason, f.index)
                                for f in validate_config(config)
                            ]
                    elif msg.HasField("config") or msg.HasField("outputs"):
                        v.append(
                            FieldViolation(
                                f"chunk[{i}].{'config' if msg.HasField('config') else 'outputs'}",
                                "unexpected: config and outputs go in the first message only",
                            )
                        )
                    if not msg.HasField("chunk"):
                        v.append(FieldViolation(f"chunk[{i}]", "missing: every message carries a chunk"))
                    n, s = codec.check_batch_limits(
                        msg.chunk, f"chunk[{i}].", self.limits, v, call.tokens, call.sequences
                    )
                    v += self._response_too_large(
                        codec.chunk_itemsize(msg.chunk), names, [(f"chunk[{i}]", n)]
                    )
                    if v:
                        await _settle(decoding)
                        raise InputError(v)
                    call.tokens += n
                    call.sequences += s
                    views = wire.views if wire is not None else None
                    fn = functools.partial(_decode_chunk, msg.chunk, i, views)
                    decoding.append(asyncio.ensure_future(self._run(call, fn, n)))
                    del msg, item, wire, views, fn  # the decoded tensors are all that is kept
                    await asyncio.sleep(0)  # let the decode start (inline ones run here)
                chunks = [await t for t in decoding]
            finally:
                for t in decoding:
                    if t.done() and not t.cancelled():
                        t.exception()  # retrieved: no "never retrieved" warning
                    t.cancel()
                decoding.clear()
                await _close(request_iterator)  # (a failed chunk: the stream is read no further)
            if config is None:
                await _ended_empty(
                    call.deadline, FieldViolation("chunk", "missing: the stream carried no chunk")
                )
            # grpc's word of a cancel, if that is how the stream ended: work in the pool is told
            # later too (its cancel event), but a small stream computed inline next has no later
            # chance, so it waits as long as a stream that ended empty (a loaded CI run computed
            # a cancelled one: one loop turn was not enough)
            size = call.tokens if len(chunks) <= INLINE_MAX_CHUNKS else None  # (None: never inline)
            await asyncio.sleep(CUT_WAIT_S if size is not None and size <= self.inline_max_tokens else 0)
            if context.cancelled():  # (the client went away mid-upload: no loss for nobody)
                raise Cancelled()
            self._start(call)
            cfg = config
            result, responses = await self._run(
                call,
                lambda cancel: self._stream_loss(cfg, names, chunks, cancel, encoded),
                size,
            )
            chunks.clear()
            for r in responses:
                if context.cancelled():  # (nobody to send the rest to, nor to count it for)
                    raise Cancelled()
                size = len(r) if isinstance(r, codec.Encoded) else r.ByteSize()
                yield r
                call.bytes_out += size
            # recorded once every response is out and the call ends OK (_finish): grpc ends a
            # cancelled stream's requests as if the client had half-closed, so a trainer that
            # went away mid-upload got a loss computed on the chunks it had sent, and its run
            # recorded that partial batch
            call.observed = ("observe_loss", config, result)

    def _stream_loss(
        self,
        config: LossConfig,
        names: tuple[str, ...],
        chunks: list[Batch],
        cancel: threading.Event,
        encoded: bool = False,
    ) -> tuple[LossResult, list[pb.StreamLossResponse] | Iterator[codec.Encoded]]:
        """The loss of a stream's chunks, with the config and outputs its first message chose
        (each chunk's response size was checked as it came)."""
        v: list[FieldViolation] = []
        batch, tok_starts, seq_starts = _concatenate(chunks, v)
        if batch is not None:
            codec.check_groups(batch, self.limits, "chunk.group_ids", v)
        if v:
            raise InputError(v)
        assert batch is not None
        self._check(cancel)
        try:
            result = self.engine.loss(batch, config, sample_tokens=self._sample_tokens(names))
        except InputError as e:
            raise codec.rename(e, lambda f: _chunk_field(f, batch, tok_starts, seq_starts)) from None
        self._check(cancel)
        host: LossResult = codec.host_result(result, names)
        if encoded:
            return result, _encode_stream(result, host, names, tok_starts, seq_starts)
        out: list[pb.StreamLossResponse] = []
        for j in range(len(chunks)):
            r = pb.StreamLossResponse(chunk_index=j, token_start=tok_starts[j], sequence_start=seq_starts[j])
            codec.fill_outputs(r.outputs, host, names, tok_starts[j], tok_starts[j + 1])
            out.append(r)
        summary = out[-1].summary
        summary.loss, summary.policy_loss, summary.kl_loss = result.loss, result.policy_loss, result.kl_loss
        summary.metrics.update(codec.metrics_map(result.metrics))
        return result, out

    # ------------------------------------------------------------ ListAlgorithms
    async def ListAlgorithms(
        self, request: pb.ListAlgorithmsRequest, context: Any
    ) -> pb.ListAlgorithmsResponse:
        call = self._new_call("ListAlgorithms", context)
        if self.closing:
            await self._refuse(call, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, context)
        v: list[FieldViolation] = []
        if not isinstance(request, (pb.ListAlgorithmsRequest, codec.CorruptMessage)):
            try:  # (read as a stream of one: grpc's unary handler never answers a call sent none)
                request = await _first(request, self.stream_idle_timeout_s, call.deadline)
            except asyncio.CancelledError:  # (counted, as the other RPCs' cut calls are; a review)
                call.code = self._cut(call)
                self._account(call, time.perf_counter() - call.t0)
                raise
            except Exception as e:
                self._fail(call, e, context)
                self._account(call, time.perf_counter() - call.t0)
                return None  # type: ignore[return-value]
        if isinstance(request, codec.CorruptMessage):
            v.append(request.violation("request"))
        else:
            codec.unknown_fields(request, "", v)  # (it has no field: any is a newer client's)
        if v:
            self._fail(call, InputError(v), context)
            self._account(call, 0.0)
            return None  # type: ignore[return-value]  # (failed: no response, the status says why)
        resp = self._catalogue
        call.bytes_out = resp.ByteSize()
        self._account(call, time.perf_counter() - call.t0)
        return resp


# ---------------------------------------------------------------- helpers


async def _first(requests: AsyncIterator[Any], idle_s: float | None, deadline: float | None) -> Any:
    """The request of a unary call read as a stream (server.loss_service_handler), waited for
    at most `idle_s` (see `_next_request`). When none comes, the call ended before it arrived
    (its deadline, a cancel, a message over the size limit that grpc refused itself): accounted
    as cut, never as a rejected input the client did not see; or its client half-closed without
    sending it (a raw stream call), which is told so (it was told CANCELLED; an audit)."""
    try:
        return await _next_request(aiter(requests), idle_s)
    except StopAsyncIteration:
        pass
    finally:
        await _close(requests)
    await _ended_empty(deadline, FieldViolation("request", "missing: the call carried no request message"))


async def _ended_empty(deadline: float | None, missing: FieldViolation) -> NoReturn:
    """A request stream that ended before its first message: grpc ends a cut call's requests as
    a half-close, so one past its deadline, or whose cancel grpc delivers a moment later (a
    CancelledError in the sleep), was cut (Cancelled); else its client sent nothing (`missing`).
    (Both were counted bad input, reason missing, or all cut; audits.)"""
    if deadline is not None and time.perf_counter() >= deadline:
        raise Cancelled()
    await asyncio.sleep(CUT_WAIT_S)
    raise InputError([missing])


async def _next_request(requests: AsyncIterator[T], idle_s: float | None) -> T:
    """The next message of a request stream (StopAsyncIteration at its end), waited for at most
    `idle_s` seconds (None: no limit), else DeadlineExceeded: a call that sends nothing must give
    its max_concurrent_rpcs slot back (it held it until its connection's max age; an audit)."""
    if idle_s is None:
        return await anext(requests)
    try:
        if sys.version_info >= (3, 11):  # (no task a message: ~2 us, where wait_for's cost ~25 us)
            async with asyncio.timeout(idle_s):
                return await anext(requests)
        return await asyncio.wait_for(anext(requests), idle_s)
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"no request message for {idle_s:g} s (stream_idle_timeout_s)") from None


def _idle_bounded(requests: AsyncIterator[T], idle_s: float | None) -> AsyncIterator[T]:
    """`requests`, each next message waited for at most `idle_s` (see `_next_request`)."""
    return requests if idle_s is None else _each_within(aiter(requests), idle_s)


async def _each_within(requests: AsyncIterator[T], idle_s: float) -> AsyncIterator[T]:
    try:
        while True:
            try:
                item = await _next_request(requests, idle_s)
            except StopAsyncIteration:
                return
            yield item
    finally:
        await _close(requests)


async def _close(requests: AsyncIterator[Any]) -> None:
    """Close a request stream read no further: grpc's receiver is a generator in a reference
    cycle with its owner, suspended holding the request it yielded last, which only a full
    garbage collection would free (a closed or finished one holds nothing)."""
    close = getattr(aiter(requests), "aclose", None)
    if close is not None:
        with contextlib.suppress(RuntimeError):  # (one being iterated elsewhere: left to grpc)
            await close()


async def _settle(tasks: list[asyncio.Task[Batch]]) -> None:
    """Wait for the chunk decodes started so far, raising the first failure in chunk order."""
    for t in tasks:
        await t


def _advantages_field(f: FieldViolation) -> FieldViolation:
    name = f.field
    if name.startswith("advantages."):
        name = "config." + name[len("advantages.") :]
    return FieldViolation(name, f.reason, f.index)


def _encode_stream(
    result: LossResult, host: LossResult, names: tuple[str, ...], tok_starts: list[int], seq_starts: list[int]
) -> Iterator[codec.Encoded]:
    """The StreamLossResponses as wire bytes (one copy of each chunk's outputs), built one at a
    time as the handler sends them: chunk j+1 is encoded while gRPC writes chunk j."""
    last = len(tok_starts) - 2
    for j in range(last + 1):
        head = pb.StreamLossResponse(chunk_index=j, token_start=tok_starts[j], sequence_start=seq_starts[j])
        pieces = codec.encode_outputs(4, host, names, tok_starts[j], tok_starts[j + 1]).parts
        parts = [head.SerializeToString(), *pieces]
        if j == last:
            summary = pb.StreamLossResponse()
            s = summary.summary
            s.loss, s.policy_loss, s.kl_loss = result.loss, result.policy_loss, result.kl_loss
            s.metrics.update(codec.metrics_map(result.metrics))
            parts.append(summary.SerializeToString())  # field 5 only
        yield codec.Encoded(b"".join(parts))


def _decode_chunk(
    m: pb.Batch, i: int, views: dict[str, memoryview] | None = None, cancel: threading.Event | None = None
) -> Batch:
    v: list[FieldViolation] = []
    b = codec.decode_batch(m, f"chunk[{i}].", v, views)
    if views:
        views.clear()  # the received bytes are free to go
    if b is not None:
        _check_chunk(b, i, v)
    if v:
        raise InputError(v)
    assert b is not None
    return b


def _check_chunk(b: Batch, i: int, v: list[FieldViolation]) -> None:
    """A chunk must be whole sequences: its own offsets from 0 to its token count; its tensors
    1-D (they are concatenated with the other chunks')."""
    p = f"chunk[{i}]."
    flat = True
    for name in _STREAM_TENSORS:
        x = getattr(b, name)
        if x is not None and x.dim() != 1:
            v.append(
                FieldViolation(p + name, f"bad_shape: expected a 1-D tensor, got shape {tuple(x.shape)}")
            )
            flat = False
    if not flat:
        return
    off, n = b.offsets, b.logp.numel()
    if off.dtype.is_floating_point or off.dtype is torch.bool or off.dim() != 1 or off.numel() < 1:
        v.append(
            FieldViolation(
                p + "offsets", "bad_offsets: offsets must be a 1-D integer tensor of length B+1 >= 1"
            )
        )
        return
    if int(off[0]) != 0:
        v.append(FieldViolation(p + "offsets", f"bad_offsets: offsets[0] = {int(off[0])}, must be 0", 0))
    diffs = off[1:] - off[:-1]
    if diffs.numel() and bool((diffs < 0).any()):
        v.append(
            FieldViolation(
                p + "offsets",
                "bad_offsets: offsets must be non-decreasing",
                int(torch.nonzero(diffs < 0)[0, 0]) + 1,
            )
        )
    if int(off[-1]) != n:
        v.append(
            FieldViolation(
                p + "offsets",
                f"bad_offsets: offsets[B] = {int(off[-1])} must equal the chunk's token count {n}",
                off.numel() - 1,
            )
        )
        return
    # lengths are checked here, where the chunk at fault is known (on the concatenated batch
    # the engine could only name `chunk.<field>`)
    sizes = {
        name: ("token count", n)
        for name in ("old_logp", "ref_logp", "rollout_logp", "mask", "sum_pi_squared")
    }
    sizes["rewards"] = sizes["group_ids"] = ("sequence count", off.numel() - 1)
    for name, (what, want) in sizes.items():
        x = getattr(b, name)
        if x is None:
            continue
        if x.dim() != 1:  # (rewards [B, K] are ComputeAdvantages' input)
            v.append(
                FieldViolation(p + name, f"bad_shape: shape {tuple(x.shape)}; a chunk's tensors are 1-D")
            )
        elif x.numel() != want:
            v.append(
                FieldViolation(
                    p + name, f"length_mismatch: length {x.numel()}, expected {want}, the chunk's {what}"
                )
            )
    # advantages of a given level: the chunk's own B or N (inferred ones are checked by _level)
    adv, level = b.advantages, b.advantage_level
    if adv is not None and adv.dim() == 1 and level is not None:
        want, what = (off.numel() - 1, "sequence count") if level == "sequence" else (n, "token count")
        if adv.numel() != want:
            v.append(
                FieldViolation(
                    p + "advantages",
                    f"length_mismatch: length {adv.numel()}, expected {want}, the chunk's {what} ({level} advantages)",
                )
            )


_STREAM_TENSORS = tuple(name for name in codec.BATCH_TENSORS if name != "offsets")  # (a chunk's own)


def _level(b: Batch) -> str | None:
    """The advantage level of a chunk: given, or inferred like the engine does; "either" for a
    chunk that fits both (empty, or one-token sequences), which takes the other chunks' level."""
    if b.advantages is None:
        return None
    if b.advantage_level is not None:
        return b.advantage_level
    n_adv, bsz, n = b.advantages.numel(), b.num_seqs, b.num_tokens
    if n_adv == bsz and n_adv != n:
        return "sequence"
    if n_adv == n and n_adv != bsz:
        return "token"
    if n_adv == bsz == n:
        lengths = b.offsets[1:] - b.offsets[:-1]
        return "either" if bool((lengths == 1).all()) else "ambiguous"
    return "mismatch"


def _concatenate(chunks: list[Batch], v: list[FieldViolation]) -> tuple[Batch | None, list[int], list[int]]:
    """One Batch from the chunks (offsets rebased), exactly what a unary request would carry."""
    tok_starts, seq_starts = [0], [0]
    for b in chunks:
        tok_starts.append(tok_starts[-1] + b.num_tokens)
        seq_starts.append(seq_starts[-1] + b.num_seqs)
    ref = chunks[0]
    levels = [_level(b) for b in chunks]
    first = next((i for i, lvl in enumerate(levels) if lvl in ("sequence", "token")), None)
    for i, b in enumerate(chunks):
        for name in _STREAM_TENSORS:
            x, x0 = getattr(b, name), getattr(ref, name)
            if (x is None) != (x0 is None):
                state = "absent" if x is None else "present"
                v.append(
                    FieldViolation(
                        f"chunk[{i}].{name}",
                        f"inconsistent: {state} here but not in chunk 0; every chunk carries the same tensors",
                    )
                )
            elif x is not None and x0 is not None and x.dtype != x0.dtype:
                v.append(
                    FieldViolation(
                        f"chunk[{i}].{name}",
                        f"inconsistent: dtype {pb.Dtype.Name(codec.TORCH_TO_PB[x.dtype])} differs from "
                        f"chunk 0's {pb.Dtype.Name(codec.TORCH_TO_PB[x0.dtype])}",
                    )
                )
        lvl = levels[i]
        if lvl == "ambiguous" and first is None:  # (else another chunk gives the level)
            v.append(
                FieldViolation(
                    f"chunk[{i}].advantage_level",
                    "ambiguous: B == N in this chunk but its sequences are not one token each; "
                    "set advantage_level to 'sequence' or 'token'",
                )
            )
        elif lvl == "mismatch":
            assert b.advantages is not None
            v.append(
                FieldViolation(
                    f"chunk[{i}].advantages",
                    f"length_mismatch: length {b.advantages.numel()}, expected B = {b.num_seqs} or N = {b.num_tokens}",
                )
            )
        elif lvl in ("sequence", "token") and first is not None and lvl != levels[first]:
            v.append(
                FieldViolation(
                    f"chunk[{i}].advantage_level",
                    f"inconsistent: {lvl} advantages here, {levels[first]} in chunk {first}",
                )
            )
    if v:
        return None, tok_starts, seq_starts
    offsets = [chunks[0].offsets.to(torch.int64)]
    for i, b in enumerate(chunks[1:], start=1):
        offsets.append(b.offsets[1:].to(torch.int64) + tok_starts[i])
    cat: dict[str, Any] = {}
    for name in _STREAM_TENSORS:
        parts = [getattr(b, name) for b in chunks]
        cat[name] = None if parts[0] is None else (parts[0] if len(parts) == 1 else torch.cat(parts))
    # (every chunk "either": the engine infers the level of the whole, as for a unary call)
    level = (levels[first] if first is not None else None) if len(chunks) > 1 else ref.advantage_level
    batch = Batch(
        offsets=offsets[0] if len(offsets) == 1 else torch.cat(offsets), advantage_level=level, **cat
    )
    return batch, tok_starts, seq_starts


_SEQ_FIELDS = ("rewards", "group_ids", "offsets")


def _chunk_field(
    f: FieldViolation, batch: Batch, tok_starts: list[int], seq_starts: list[int]
) -> FieldViolation:
    """An engine violation on the concatenated batch, named after the chunk it lies in."""
    name = codec.request_field(f.field, batch_prefix="", config_prefix="config.")
    if name.startswith("config."):
        return FieldViolation(name, f.reason, f.index)
    root = name.split(".", 1)[0]
    if f.index is None:
        return FieldViolation(f"chunk.{name}" if name else "chunk", f.reason)
    per_seq = root in _SEQ_FIELDS or (
        root == "advantages" and batch.advantages is not None and batch.advantage_level == "sequence"
    )
    starts = seq_starts if per_seq else tok_starts
    j = 0
    while j + 2 < len(starts) and f.index >= starts[j + 1]:
        j += 1
    return FieldViolation(f"chunk[{j}].{name}", f.reason, f.index - starts[j])
