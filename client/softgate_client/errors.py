"""Errors the client raises: one `SoftgateError` subclass per gRPC status code, carrying the
code, the server's message and the `google.rpc.BadRequest` field violations of the trailing
status, so that a bad batch reads like `logp[17]: non_finite: ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class FieldViolation:
    """One bad field as the server reported it: `field` (e.g. `logp[17]`,
    `objective.sapo.tau_pos`) and `description` (`reason_code: human text`)."""

    field: str
    description: str

    @property
    def reason(self) -> str:
        """The short machine-readable reason code (the description up to its first colon)."""
        return self.description.split(":", 1)[0].strip()

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class SoftgateError(Exception):
    """Any failed softgate call. `code` is the grpc.StatusCode, `details` the server's message,
    `violations` the BadRequest field violations (empty when there are none)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        violations: list[FieldViolation] | None = None,
        debug_info: str | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.details = details
        self.violations = list(violations or [])
        self.debug_info = debug_info
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"{self.code.name}: {self.details}" if self.details else self.code.name
        if not self.violations:
            return head
        body = "\n".join(f"  {v}" for v in self.violations)
        return f"{head}\n{body}"

    @property
    def reasons(self) -> list[str]:
        return [v.reason for v in self.violations]


class InvalidArgumentError(SoftgateError, ValueError):
    """The batch or the configuration was refused (see `violations`)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnavailableError(SoftgateError):
    """No server answered (after the client's retries)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(SoftgateError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhaustedError(SoftgateError):
    """E.g. a message over the size limit, or the server's admission control."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(SoftgateError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(SoftgateError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnimplementedError(SoftgateError):
    code = grpc.StatusCode.UNIMPLEMENTED


class FailedPreconditionError(SoftgateError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class InternalError(SoftgateError):
    code = grpc.StatusCode.INTERNAL


class CancelledError(SoftgateError):
    code = grpc.StatusCode.CANCELLED


_BY_CODE: dict[grpc.StatusCode, type[SoftgateError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        UnavailableError,
        DeadlineExceededError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnimplementedError,
        FailedPreconditionError,
        InternalError,
        CancelledError,
    )
}


def error_class(code: grpc.StatusCode) -> type[SoftgateError]:
    return _BY_CODE.get(code, SoftgateError)


def invalid_argument(field: str, description: str) -> InvalidArgumentError:
    """A client-side refusal shaped like the server's (raised before anything is sent)."""
    return InvalidArgumentError(
        "invalid input (checked by the client)", violations=[FieldViolation(field, description)]
    )


def from_rpc_error(err: grpc.RpcError) -> SoftgateError:
    """Turn a failed call into the matching SoftgateError, parsing the rich status
    (`grpc-status-details-bin`: google.rpc.Status with BadRequest / DebugInfo details)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    violations: list[FieldViolation] = []
    debug_info: str | None = None
    status = _rich_status(err)
    if status is not None:
        from google.rpc import error_details_pb2

        if status.message:
            details = status.message
        for any_msg in status.details:
            if any_msg.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                any_msg.Unpack(br)
                violations.extend(FieldViolation(v.field, v.description) for v in br.field_violations)
            elif any_msg.Is(error_details_pb2.DebugInfo.DESCRIPTOR):
                di = error_details_pb2.DebugInfo()
                any_msg.Unpack(di)
                debug_info = di.detail or "\n".join(di.stack_entries)
    cls = error_class(code)
    exc = cls(details or "", code=code, violations=violations, debug_info=debug_info)
    exc.__cause__ = err
    return exc


def _rich_status(err: Any) -> Any:
    """google.rpc.Status from the call's trailing metadata, or None."""
    if not hasattr(err, "trailing_metadata"):
        return None
    try:
        from grpc_status import rpc_status

        return rpc_status.from_call(err)
    except Exception:  # a malformed or mismatching status detail: keep the plain message
        return None
