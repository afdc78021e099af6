"""A client shared with fork()ed workers (a DataLoader's, re-forked every epoch) while the parent
has a call in flight on a thread: each child's first call builds a channel of its own, and the
fork waits for the parent's call in flight. On the inherited channel, calls hung past their
timeout (its deadline timers run on threads the child does not have) or failed CANCELLED; on
a new one, with the parent mid-call at the fork, a few forks in a hundred hung or crashed
(an audit)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest
from softgate_client import SoftgateClient, _fork
from test_client_harness import ServerThread

LOGP = np.full((16, 64), -1.0, np.float32)
KW: dict[str, Any] = {"rewards": np.arange(16.0), "group_ids": np.repeat(np.arange(8), 2)}
CLIENT: SoftgateClient | None = None  # the parent's, inherited by the children


def _child_call(i: int) -> str:
    """In a forked worker: one call on the inherited client, unary or streamed."""
    assert CLIENT is not None
    try:
        r = CLIENT.loss(LOGP, **KW, timeout=8, stream=bool(i % 2))
        return "streamed" if r.streamed else "unary"
    except Exception as e:  # reported to the parent, which asserts
        return f"{type(e).__name__}: {e}"


@pytest.fixture()
def busy_parent():
    """A server, the parent's client, and a thread of the parent calling it without pause."""
    global CLIENT
    with ServerThread() as s:
        CLIENT = SoftgateClient(f"127.0.0.1:{s.port}", stream_chunk_bytes=2048, timeout=20)
        stop, calls, errors = threading.Event(), [0], []
        started = threading.Event()

        def calling() -> None:
            while not stop.is_set():
                try:
                    CLIENT.loss(LOGP, **KW, timeout=8, stream=bool(calls[0] % 2))  # type: ignore[union-attr]
                    calls[0] += 1
                except Exception as e:
                    errors.append(repr(e))
                started.set()

        th = threading.Thread(target=calling, daemon=True)
        th.start()
        assert started.wait(30)
        try:
            yield CLIENT
        finally:
            stop.set()
            th.join(20)
            CLIENT.close()
            CLIENT = None
        assert not th.is_alive() and errors == [] and calls[0] > 0


def test_forked_workers_call_the_inherited_client_while_the_parent_calls(busy_parent) -> None:
    ctx = mp.get_context("fork")
    for _ in range(4):  # as a DataLoader forks its workers again every epoch
        with ctx.Pool(2) as pool:
            pending = pool.map_async(_child_call, range(6))
            try:
                out = pending.get(timeout=40)  # each call's own timeout is 8 s
            except mp.TimeoutError:
                pool.terminate()
                pytest.fail("a forked worker's call hung past its timeout")
        assert out == ["unary", "streamed"] * 3
    assert busy_parent.loss(LOGP, **KW).loss == busy_parent.loss(LOGP, **KW, stream=True).loss


def _call_in_child(_: int) -> str:
    assert CLIENT is not None
    try:
        CLIENT.algorithms(timeout=5)
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def test_a_client_on_the_callers_channel_refuses_to_call_in_a_forked_child() -> None:
    """Its channel cannot be rebuilt from arguments the client never had: a clear error."""
    global CLIENT
    with ServerThread() as s:
        CLIENT = SoftgateClient(channel=grpc.insecure_channel(f"127.0.0.1:{s.port}"), timeout=5)
        try:
            assert CLIENT.algorithms().limits.max_message_bytes > 0
            with mp.get_context("fork").Pool(1) as pool:
                (out,) = pool.map_async(_call_in_child, [0]).get(timeout=30)
            assert out == (
                "RuntimeError: a SoftgateClient built with channel= cannot be used after fork(): "
                "build one in the child process"
            )
            CLIENT.algorithms()  # the parent's own still works
        finally:
            CLIENT.close()
            CLIENT = None


def _hold_a_call(entered: threading.Event, seconds: float) -> None:
    with _fork.in_flight():
        entered.set()
        time.sleep(seconds)


@pytest.mark.parametrize("wait_s, held_s", [(10.0, 0.5), (0.2, 1.0)])
def test_a_fork_waits_for_the_calls_in_flight(monkeypatch, wait_s: float, held_s: float) -> None:
    """gRPC's own fork handlers are skipped while a thread is in a call, and the child then
    inherits gRPC mid-call: a fork waits for the calls in flight (up to FORK_WAIT_S)."""
    monkeypatch.setattr(_fork, "FORK_WAIT_S", wait_s)
    entered = threading.Event()
    th = threading.Thread(target=_hold_a_call, args=(entered, held_s))
    th.start()
    assert entered.wait(10)
    t0 = time.monotonic()
    child = mp.get_context("fork").Process(target=time.sleep, args=(0,))
    child.start()  # (the fork happens here)
    waited = time.monotonic() - t0
    child.join(10)
    th.join(10)
    assert child.exitcode == 0
    assert min(wait_s, held_s) - 0.1 < waited < min(wait_s, held_s) + 1.0, waited
