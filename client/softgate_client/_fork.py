"""Forks: a child keeps the channels it inherited untouched, and a fork() waits (up to
FORK_WAIT_S) for this process's softgate calls in flight to end while new calls wait for it
(each within its own timeout: then DEADLINE_EXCEEDED, raised here); the calls a wait ran out
on, later forks do not wait for again (they still wait for any other call).
With a call in flight, gRPC skips its own fork handlers ("Other threads are currently calling
into gRPC") and the child inherits gRPC's state mid-call: a worker forked then (a DataLoader's,
while a thread of the trainer calls) could hang or crash even on a channel of its own (an
audit; a few forks in a hundred)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from softgate_client.errors import DeadlineExceededError

FORK_WAIT_S = 10.0  # the longest a fork waits for the calls in flight (then it goes on)


class _Gate:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.started = 0  # calls ever counted, each numbered by its start
        self.live: set[int] = set()  # the calls in flight, by number
        self.stuck: set[int] = set()  # those a fork gave up waiting for
        self.forks = 0  # forks waiting or under way
        self.rebuild = threading.Lock()  # a forked child's clients rebuild their channels under it


_gate = _Gate()
# channels a forked child inherited: kept referenced, never closed nor collected there, since
# either would act on the parent's gRPC state (its sockets, its locks)
_inherited: list[object] = []


def keep_inherited(channel: object) -> None:
    """Keep a channel this child inherited from its parent, unused and untouched."""
    _inherited.append(channel)


def rebuild_lock() -> threading.Lock:
    """The lock a forked child's clients rebuild their channels under (a new one in each child:
    a thread of the parent may have held the parent's at the fork)."""
    return _gate.rebuild


@contextlib.contextmanager
def in_flight(timeout: float | None = None) -> Iterator[None]:
    """Count one attempt of a call as in flight for its duration, after any fork under way
    (waited for at most `timeout` seconds, the call's time left: then DeadlineExceededError)."""
    gate = _gate
    with gate.cond:
        # entering gRPC with the fork still under way is what the wait is for: fail here
        if not gate.cond.wait_for(lambda: gate.forks == 0, timeout=timeout):
            raise DeadlineExceededError(f"waited {timeout:.1f}s for a fork in progress (os.fork)")
        n = gate.started
        gate.started += 1
        gate.live.add(n)
    try:
        yield
    finally:
        with gate.cond:
            gate.live.discard(n)
            gate.stuck.discard(n)
            gate.cond.notify_all()


def _before_fork() -> None:
    gate = _gate
    with gate.cond:
        gate.forks += 1
        # the calls an earlier fork gave up on are not waited for again: each fork waited the full
        # FORK_WAIT_S again for the same long call (an audit); any other call is
        if not gate.cond.wait_for(lambda: gate.live <= gate.stuck, timeout=FORK_WAIT_S):
            gate.stuck |= gate.live


def _after_fork_in_parent() -> None:
    gate = _gate
    with gate.cond:
        gate.forks -= 1
        gate.cond.notify_all()


def _after_fork_in_child() -> None:
    global _gate
    _gate = _Gate()  # the parent's calls are not in the child (nor any lock its threads held)


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
    )
