"""The one error type the engine raises for bad input: a list of field violations."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: its name (e.g. `logp`, `objective.sapo.tau_pos`), the offending
    element index when there is one, and a human-readable reason."""

    field: str
    reason: str
    index: int | None = None

    @property
    def code(self) -> str:
        """The short machine-readable reason code: `reason` up to its first colon."""
        return self.reason.split(":", 1)[0].strip()

    def __str__(self) -> str:
        where = self.field if self.index is None else f"{self.field}[{self.index}]"
        return f"{where}: {self.reason}"


class InputError(ValueError):
    """Raised for every invalid batch or configuration; adapters map it to
    gRPC INVALID_ARGUMENT (google.rpc.BadRequest) or HTTP 422."""

    def __init__(self, violations: list[FieldViolation]):
        self.violations = list(violations)
        super().__init__("; ".join(str(v) for v in self.violations))

    def __reduce__(self) -> tuple[type[InputError], tuple[list[FieldViolation]]]:
        """Rebuilt from its violations (pickle, copy: a worker process's error), not from its
        message, which __init__ would read as violations, one per character."""
        return (type(self), (self.violations,))

    @property
    def reasons(self) -> list[str]:
        """Short machine-readable reason codes, for the rejected-inputs metric."""
        return [v.code for v in self.violations]


def is_device_error(exc: BaseException) -> bool:
    """Whether `exc` is a CUDA error other than out of memory ("CUDA error: an illegal memory
    access was encountered", a cuBLAS or cuDNN failure): one that may have left the device's
    context unusable for every later call (`Engine.device_problem` tells)."""
    if is_out_of_memory(exc) or not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return type(exc).__name__ == "AcceleratorError" or any(
        mark in text for mark in ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error")
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is the device (or host) out of memory: the batch is too large, nothing
    is broken."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)  # (cuBLAS's failed allocation is memory too: CUBLAS_STATUS_ALLOC_FAILED)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)
