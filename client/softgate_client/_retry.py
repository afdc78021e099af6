"""The client's retry loop: capped exponential backoff with full jitter, within a retry budget
and one overall deadline."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from softgate_client._channel import RetryPolicy
from softgate_client.errors import SoftgateError, error_reason, from_rpc_error

T = TypeVar("T")
# a call still retrying after this long logs one warning: a wrong address fails only after the
# whole retry budget (60 s), which would otherwise look like a hang
WARN_AFTER_S = 5.0
# the time the last attempt keeps when the call's deadline cuts the last wait (one with none
# could only time out)
LAST_ATTEMPT_S = 0.1
_log = logging.getLogger("softgate_client")


def call_with_retries(
    fn: Callable[[float | None], T],
    *,
    policy: RetryPolicy,
    timeout: float | None,
    target: str = "the server",
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Run `fn(remaining_timeout)`; retry the codes `policy` retries until `policy.budget`
    seconds from now, or LAST_ATTEMPT_S before `timeout` seconds from now if that is earlier
    (the last wait cut to end there; at most `policy.attempts(...)` attempts). Every grpc.RpcError that ends the loop is raised as
    the matching SoftgateError; one that was retried, or ran out of budget, says so: "(after 7
    attempts over 12.3s)". A call still retrying after WARN_AFTER_S logs a warning, once."""
    rnd = rng or random
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    budget_end = start + policy.budget
    end = budget_end if deadline is None else min(budget_end, deadline - LAST_ATTEMPT_S)
    warned = False
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else None
            retryable = policy.retryable(code, details)
            now = time.monotonic()
            if retryable and now < end and attempt < policy.attempts(code, details, error_reason(err)):
                wait = min(rnd.uniform(0.0, policy.backoff(attempt)), end - now)
                if not warned and now - start >= WARN_AFTER_S:
                    warned = True
                    _log.warning(_still_retrying(code, details, target, now - start, policy, timeout))
                sleep(wait)
                continue
            error = from_rpc_error(err)
            if attempt > 1 or (retryable and now >= budget_end):
                error = _retried(error, attempt, now - start)
            raise error from None


def _still_retrying(
    code: grpc.StatusCode | None,
    details: str | None,
    target: str,
    seconds: float,
    policy: RetryPolicy,
    timeout: float | None,
) -> str:
    """The warning of a call still retrying `seconds` after it started."""
    name = code.name if code is not None else "an error"
    limit, why = policy.budget, "retry_budget"
    if timeout is not None and timeout < limit:
        limit, why = timeout, "timeout"
    end = f"giving up after {round(limit, 1):g}s ({why})"
    if not math.isfinite(limit):
        end = "retrying until it answers (no retry_budget, no timeout)"
    return f"still retrying {name} to {target} after {seconds:.1f}s: {details}; {end}"


def _retried(e: SoftgateError, attempts: int, seconds: float) -> SoftgateError:
    """`e` with how long the client tried appended to its details."""
    tried = f"(after {attempts} attempt{'s' if attempts != 1 else ''} over {seconds:.1f}s)"
    details = f"{e.details} {tried}" if e.details else tried
    return e.replaced(details)
