"""Errors the client raises: one `SoftgateError` subclass per gRPC status code, carrying the
code, the server's message and the `google.rpc.BadRequest` field violations of the trailing
status, so that a bad batch reads like `batch.logp[17]: non_finite: ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from softgate_client import _wire


@dataclass(frozen=True)
class FieldViolation:
    """One bad field as the server reported it: `field`, its path in the request (e.g.
    `batch.logp[17]`, `config.objective.sapo.tau_pos`), and `description` (`reason_code: human
    text`)."""

    field: str
    description: str

    @property
    def reason(self) -> str:
        """The short machine-readable reason code (the description up to its first colon)."""
        return self.description.split(":", 1)[0].strip()

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


_E = TypeVar("_E", bound="SoftgateError")


class SoftgateError(Exception):
    """Any failed softgate call. `code` is the grpc.StatusCode, `details` the server's message,
    `violations` the BadRequest field violations (empty when there are none), `error_reason`
    the reason of a google.rpc.ErrorInfo of domain "softgate" (RESOURCE_EXHAUSTED's
    SERVER_BUSY or OUT_OF_MEMORY), else None."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        violations: list[FieldViolation] | None = None,
        debug_info: str | None = None,
        error_reason: str | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.details = details
        self.violations = list(violations or [])
        self.debug_info = debug_info
        self.error_reason = error_reason
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

    def replaced(self: _E, details: str, violations: list[FieldViolation] | None = None) -> _E:
        """This error with other details (and violations), everything else kept."""
        return type(self)(
            details,
            code=self.code,
            violations=self.violations if violations is None else violations,
            debug_info=self.debug_info,
            error_reason=self.error_reason,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # (pickle, e.g. from a multiprocessing worker: the default rebuilds the error from `args`,
        # the rendered text, which then gets a second code prefix)
        return (
            _rebuild,
            (type(self), self.details, self.code, self.violations, self.debug_info, self.error_reason),
        )


def _rebuild(
    cls: type[SoftgateError],
    details: str,
    code: grpc.StatusCode,
    violations: list[FieldViolation],
    debug_info: str | None,
    error_reason: str | None = None,
) -> SoftgateError:
    return cls(details, code=code, violations=violations, debug_info=debug_info, error_reason=error_reason)


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
    status = _rich_status(err, code)
    if status is not None:
        message, violations, debug_info = status
        details = message or details
    cls = error_class(code)
    return cls(
        details or "", code=code, violations=violations, debug_info=debug_info, error_reason=error_reason(err)
    )


STATUS_DETAILS_KEY = "grpc-status-details-bin"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_DEBUG_INFO = "type.googleapis.com/google.rpc.DebugInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
ERROR_DOMAIN = "softgate"


def error_reason(err: Any) -> str | None:
    """The reason of the google.rpc.ErrorInfo of domain "softgate" in a failed call's status
    details (SERVER_BUSY, OUT_OF_MEMORY), or None: there is none (an older server, gRPC's own
    refusals), or it does not parse."""
    try:
        raw = _status_bytes(err)
        for any_msg in (
            _strings(raw).get(3, []) if raw is not None else ()
        ):  # Status.details: Any {type_url = 1, value = 2}
            fields = _strings(any_msg)
            if _text(fields.get(1, [b""])[0]) == _ERROR_INFO:
                info = _strings(bytes(fields.get(2, [b""])[0]))  # ErrorInfo {reason = 1, domain = 2}
                if _text(info.get(2, [b""])[0]) == ERROR_DOMAIN:
                    return _text(info.get(1, [b""])[0]) or None
    except Exception:  # a malformed status detail: no reason
        return None
    return None


def _status_bytes(err: Any) -> bytes | None:
    """The serialized google.rpc.Status in a failed call's trailing metadata, or None."""
    raw = next((v for k, v in err.trailing_metadata() or () if k == STATUS_DETAILS_KEY), None)
    return raw if isinstance(raw, bytes) else None


def _rich_status(err: Any, code: grpc.StatusCode) -> tuple[str, list[FieldViolation], str | None] | None:
    """(message, field violations, debug info) of the google.rpc.Status in the call's trailing
    metadata, or None when there is none, it does not parse, or its code is not the call's."""
    try:
        raw = _status_bytes(err)
        return None if raw is None else parse_status(raw, code)
    except Exception:  # a malformed status detail: keep the plain message
        return None


def parse_status(raw: bytes, code: grpc.StatusCode) -> tuple[str, list[FieldViolation], str | None] | None:
    """`_rich_status` of serialized google.rpc.Status bytes, read with the client's own wire
    reader (no googleapis-common-protos needed). Raises ValueError for bytes that do not parse."""
    buf = memoryview(raw)
    status_code, message = 0, ""
    violations: list[FieldViolation] = []
    debug: str | None = None
    for num, wire, _, a, b in _wire.fields(buf):
        if num == 1 and wire == _wire.VARINT:  # Status.code
            status_code = _wire.read_varint(buf, a)[0]
        elif num == 2 and wire == _wire.LEN:  # Status.message
            message = _text(buf[a:b])
        elif num == 3 and wire == _wire.LEN:  # Status.details: google.protobuf.Any {type_url = 1, value = 2}
            any_msg = _strings(buf[a:b])
            kind, value = _text(any_msg.get(1, [b""])[0]), bytes(any_msg.get(2, [b""])[0])
            if kind == _BAD_REQUEST:  # field_violations = 1: {field = 1, description = 2, ...}
                for fv in _strings(value).get(1, []):
                    f = _strings(fv)
                    violations.append(FieldViolation(_text(f.get(1, [b""])[0]), _text(f.get(2, [b""])[0])))
            elif kind == _DEBUG_INFO:  # stack_entries = 1, detail = 2
                d = _strings(value)
                debug = _text(d[2][0]) if 2 in d else "\n".join(_text(e) for e in d.get(1, []))
    if status_code != code.value[0]:
        return None
    return message, violations, debug or None


def _strings(msg: bytes | memoryview) -> dict[int, list[memoryview]]:
    """The length-delimited fields of a message, by field number, in order."""
    buf = memoryview(msg)
    out: dict[int, list[memoryview]] = {}
    for num, wire, _, a, b in _wire.fields(buf):
        if wire == _wire.LEN:
            out.setdefault(num, []).append(buf[a:b])
    return out


def _text(b: Any) -> str:
    return bytes(b).decode("utf-8", errors="replace")
