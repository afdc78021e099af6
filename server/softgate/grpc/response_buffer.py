"""GradientResponse: a gradient-only ComputeLossResponse whose bytes exist before the engine runs.

The gradient is most of a response (4 bytes a token), and `codec.encode_loss_response` copies
it into the response's bytes after the engine wrote it to a tensor of its own: at 16M tokens
a 64 MB tensor and a 64 MB copy (~10 ms of a ~60 ms engine call on 2 cores). Here the
response's bytes come first, at their final size, and the engine's kernel stores the gradient
straight into them (`Engine.loss`'s `grad_out`); the scalar fields are packed in after.

gRPC sends a `bytes` object, and Python makes one only by copying memory into it. An
uninitialised one comes from the C API's `PyBytes_FromStringAndSize(NULL, size)`, whose
contract is that its maker fills it in before anyone else sees it: that is what this does,
through ctypes. Every view of the memory keeps the bytes object alive.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from softgate_client import _wire

from softgate.engine.batch import Batch
from softgate.engine.metrics import METRIC_NAMES
from softgate.engine.result import LossResult
from softgate.engine.validation import compute_dtype
from softgate.grpc import codec

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype, _new_bytes.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_data = ctypes.pythonapi.PyBytes_AsString
_bytes_data.restype, _bytes_data.argtypes = ctypes.c_void_p, (ctypes.py_object,)

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}  # the compute dtypes
_METRICS = tuple(METRIC_NAMES)  # a result's metrics, in order
_GRADIENT = ("gradient",)
_MIN_TOKENS = _wire.ALIGN_MIN_BYTES // 4  # a float32 gradient of 1 MiB
_GRADIENT_FIELD = 1  # TokenOutputs.gradient
_OUTPUTS_FIELD = 5  # ComputeLossResponse.outputs


class _Hole:
    """A piece of a layout that is only a length: where the gradient's data goes."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class GradientResponse:
    """The response's bytes, its `grad` tensor (a view of the gradient's place in them) for
    Engine.loss's `grad_out`, and `encode(result)` to finish them."""

    def __init__(self, n: int, dtype: torch.dtype) -> None:
        nbytes = n * np.dtype(_NUMPY[dtype]).itemsize
        head = codec.loss_fields_size(_METRICS)

        def tensor(at: int) -> _wire.Pieces:
            p = _wire.Pieces()
            p.add(_wire.tensor_head(codec.TORCH_TO_PB[dtype], n, nbytes, at))
            p.add(_Hole(nbytes))
            return p

        def outputs(at: int) -> _wire.Pieces:
            p = _wire.Pieces()
            _wire.placed(p, _GRADIENT_FIELD, tensor, at)
            return p

        layout = _wire.Pieces()
        layout.add(bytes(head))  # the loss fields, packed in by `encode`
        _wire.placed(layout, _OUTPUTS_FIELD, outputs, 0)
        prefix = b"".join(layout.parts[:-1])
        self.data: bytes = _new_bytes(None, layout.size)
        self._address: int = _bytes_data(self.data)
        ctypes.memmove(self._address, prefix, len(prefix))
        memory = (ctypes.c_char * layout.size).from_address(self._address)
        memory.owner = self.data  # type: ignore[attr-defined]  # (the views keep the bytes alive)
        self.grad = torch.from_numpy(
            np.frombuffer(memoryview(memory).cast("B"), dtype=_NUMPY[dtype], count=n, offset=len(prefix))
        )

    def encode(self, result: LossResult) -> codec.Encoded:
        """The response of `result`. An engine that left `grad` alone (a test double, another
        device) gets its gradient copied in; a result of another shape is encoded as usual."""
        grad = result.grad
        if (
            tuple(result.metrics) != _METRICS
            or grad.dtype != self.grad.dtype
            or grad.numel() != self.grad.numel()
        ):
            return codec.encode_loss_response(result, codec.host_result(result, _GRADIENT), _GRADIENT)
        if grad.data_ptr() != self.grad.data_ptr():
            self.grad.copy_(grad.reshape(-1))
        fields = codec.loss_fields(result)
        ctypes.memmove(self._address, fields, len(fields))
        return codec.Encoded(self.data)


def gradient_response(batch: Batch, names: tuple[str, ...], device: torch.device) -> GradientResponse | None:
    """A GradientResponse for a CPU engine's gradient-only call of 2^18 tokens or more (a
    gradient of 1 MiB and more, the size from which the client aligns its requests too; below
    it the copy costs little, and a small response stays free of Tensor.padding). None
    otherwise (~0.3 us, a small call)."""
    n = batch.logp.numel()
    if n < _MIN_TOKENS or names != _GRADIENT or device.type != "cpu" or not codec.LITTLE_ENDIAN:
        return None
    out = GradientResponse(n, compute_dtype(batch))
    if out.grad.data_ptr() % _wire.ALIGN:  # (not seen: CPython's bytes data is 16-byte aligned)
        return None
    return out
