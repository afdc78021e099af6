"""Exceptions -> gRPC statuses.

- `InputError` -> INVALID_ARGUMENT with a `google.rpc.BadRequest` (one field violation per
  problem: field "batch.logp[3]", reason "NON_FINITE", description "non_finite: value is nan")
  in the status details;
- torch out-of-memory (and host MemoryError) -> RESOURCE_EXHAUSTED with a `google.rpc.ErrorInfo`
  (domain "softgate", reason OUT_OF_MEMORY; a server at its concurrency limit: SERVER_BUSY), so
  that a client in any language can tell the two apart without reading the message;
- `DeadlineExceeded` (the server saw the deadline pass) -> DEADLINE_EXCEEDED;
- anything else -> INTERNAL with a generic message and an error id; the traceback is logged
  server-side only.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from softgate.engine.errors import FieldViolation, InputError, is_out_of_memory

# A response's BadRequest lists the violations that fit MAX_DETAIL_BYTES, each field,
# description and reason cut at MAX_FIELD_BYTES of UTF-8 (its message lists those that fit
# MAX_MESSAGE_CHARS, and the count of the rest). The status goes in the trailers twice (the
# message, and the status with the message and the details, base64): ~6.4 KB at most for the
# server's own ASCII texts, under gRPC's 8 KiB soft limit on metadata, past which a client may
# drop it and read RESOURCE_EXHAUSTED (an audit: 100 violations made 19 KB)
MAX_DETAIL_BYTES = 3000
MAX_FIELD_BYTES = 500
MAX_MESSAGE_CHARS = 1000


class DeadlineExceeded(Exception):
    """The call's deadline passed before its work finished; with a message, another time limit
    did (the message says which)."""


class Cancelled(Exception):
    """The call was cancelled; raised inside worker threads to stop between phases."""


@dataclass(frozen=True)
class Failure:
    """What to send back for an exception: status code, message, trailing metadata."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()
    reasons: tuple[str, ...] = ()  # for InputError, the rejected-input reason codes
    log: bool = False  # log with traceback (unexpected failures)
    error_id: str = ""


def violation_field(v: FieldViolation) -> str:
    return v.field if v.index is None else f"{v.field}[{v.index}]"


def violation_reason(v: FieldViolation) -> str:
    """BadRequest.FieldViolation.reason: the reason code in UPPER_SNAKE_CASE (AIP-193), e.g.
    NON_FINITE for the description "non_finite: value is NaN"."""
    return v.code.upper()


def _listed(vs: list[FieldViolation]) -> str:
    """As many violations as fit MAX_MESSAGE_CHARS, then how many more there are (the count
    was cut off with the rest: 100 violations of realistic names never fit)."""
    budget = MAX_MESSAGE_CHARS - len("invalid input: ") - len(f"; and {len(vs)} more")
    parts: list[str] = []
    size = 0
    for v in vs:
        s = str(v)
        if size + len(s) > budget:
            if not parts:  # one violation longer than the whole message
                parts.append(s[: budget - 3] + "...")
            break
        parts.append(s)
        size += len(s) + 2
    more = f"; and {len(vs) - len(parts)} more" if len(parts) < len(vs) else ""
    return "; ".join(parts) + more


def _cut(s: str) -> str:
    """`s` within MAX_FIELD_BYTES bytes of UTF-8 (the server's own texts are ASCII)."""
    b = s.encode()
    if len(b) <= MAX_FIELD_BYTES:
        return s
    return b[: MAX_FIELD_BYTES - 3].decode(errors="ignore") + "..."


def bad_request(err: InputError) -> Failure:
    vs = err.violations
    detail = error_details_pb2.BadRequest()
    size = 0
    for v in vs:
        fv = error_details_pb2.BadRequest.FieldViolation(
            field=_cut(violation_field(v)), description=_cut(v.reason), reason=_cut(violation_reason(v))
        )
        size += fv.ByteSize() + 3  # (its tag and length)
        if size > MAX_DETAIL_BYTES and detail.field_violations:
            break
        detail.field_violations.append(fv)
    any_detail = any_pb2.Any()
    any_detail.Pack(detail)
    message = "invalid input: " + _listed(vs)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[any_detail])
    st = rpc_status.to_status(status)
    return Failure(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        message=message,
        trailing_metadata=tuple(st.trailing_metadata),
        reasons=tuple(err.reasons),
    )


ERROR_DOMAIN = "softgate"
SERVER_BUSY = "SERVER_BUSY"  # at max_concurrent_rpcs: retry with backoff
OUT_OF_MEMORY = "OUT_OF_MEMORY"  # the batch did not fit the device: split it (one retry at most)


def exhausted(message: str, reason: str) -> Failure:
    """RESOURCE_EXHAUSTED with a google.rpc.ErrorInfo naming why (SERVER_BUSY or OUT_OF_MEMORY):
    the message is for people, the reason for code (a request over gRPC's own size limit is
    refused by gRPC before softgate sees it, without one)."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[info])
    trailing = tuple(rpc_status.to_status(status).trailing_metadata)
    return Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=trailing)


def failure_for(exc: BaseException) -> Failure:
    if isinstance(exc, InputError):
        return bad_request(exc)
    if isinstance(exc, DeadlineExceeded):
        return Failure(
            grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded before the loss was computed"
        )
    if isinstance(exc, Cancelled):
        return Failure(grpc.StatusCode.CANCELLED, "cancelled")
    if is_out_of_memory(exc):
        _free_device_cache()
        return exhausted(
            "out of memory computing this batch; send smaller batches (or StreamLoss chunks of a smaller batch)",
            OUT_OF_MEMORY,
        )
    error_id = uuid.uuid4().hex[:12]
    return Failure(
        grpc.StatusCode.INTERNAL,
        f"internal error (id {error_id}); the server log has the details",
        log=True,
        error_id=error_id,
    )


def _free_device_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass
