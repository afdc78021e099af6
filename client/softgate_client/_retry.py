"""The client's retry loop: exponential backoff with full jitter inside one overall deadline."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from softgate_client._channel import RetryPolicy
from softgate_client.errors import from_rpc_error

T = TypeVar("T")


def call_with_retries(
    fn: Callable[[float | None], T],
    *,
    policy: RetryPolicy,
    timeout: float | None,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Run `fn(remaining_timeout)`; retry the codes in `policy.retry_on` up to
    `policy.max_attempts` attempts in all, never past `timeout` seconds from now. Every
    grpc.RpcError that ends the loop is raised as the matching SoftgateError."""
    rnd = rng or random
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return fn(remaining)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else None
            if not policy.retryable(code, details) or attempt >= policy.max_attempts:
                raise from_rpc_error(err) from None
            wait = rnd.uniform(0.0, policy.backoff(attempt))
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise from_rpc_error(err) from None
            sleep(wait)
