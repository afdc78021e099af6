"""The client's retry loop: capped exponential backoff with full jitter, within a retry budget
and one overall deadline."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from softgate_client._channel import RetryPolicy
from softgate_client.errors import SoftgateError, from_rpc_error

T = TypeVar("T")


def call_with_retries(
    fn: Callable[[float | None], T],
    *,
    policy: RetryPolicy,
    timeout: float | None,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Run `fn(remaining_timeout)`; retry the codes `policy` retries until `policy.budget`
    seconds from now (and at most `policy.attempts(...)` attempts), never past `timeout`
    seconds from now. Every grpc.RpcError that ends the loop is raised as the matching
    SoftgateError; one that was retried says so: "(after 7 attempts over 12.3s)"."""
    rnd = rng or random
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    stop = start + policy.budget if deadline is None else min(deadline, start + policy.budget)
    attempt = 0
    while True:
        attempt += 1
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return fn(remaining)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else None
            retryable = policy.retryable(code, details)
            if retryable and attempt < policy.attempts(code, details):
                wait = rnd.uniform(0.0, policy.backoff(attempt))
                if time.monotonic() + wait < stop:  # (a wait past it would leave no attempt)
                    sleep(wait)
                    continue
            error = from_rpc_error(err)
            if retryable or attempt > 1:
                error = _retried(error, attempt, time.monotonic() - start)
            raise error from None


def _retried(e: SoftgateError, attempts: int, seconds: float) -> SoftgateError:
    """`e` with how long the client tried appended to its details."""
    tried = f"(after {attempts} attempt{'s' if attempts != 1 else ''} over {seconds:.1f}s)"
    details = f"{e.details} {tried}" if e.details else tried
    return type(e)(details, code=e.code, violations=e.violations, debug_info=e.debug_info)
