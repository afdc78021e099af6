"""Host <-> device copies of request and result tensors.

CUDA copies from ordinary (pageable) host memory go through a small driver staging buffer: on
the H200 host measured, three 64 MB inputs in and a 64 MB gradient out took 82 ms that way
(3.3 GB/s) and 8 ms through page-locked memory, the pinning copy included
(bench/transfer_bench.py, bench/RESULTS.md). Tensors of at least PIN_MIN_BYTES therefore
travel through page-locked buffers of torch's caching host allocator, which keeps them for
the next call; smaller ones are copied directly, where pinning costs more than it saves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

PIN_MIN_BYTES = 1 << 20


def _pinned(x: Tensor) -> bool:
    return x.numel() * x.element_size() >= PIN_MIN_BYTES


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """`x` on `device`; a large host tensor reaches a CUDA device through pinned memory (the copy
    is queued on the current stream, which orders it before the kernels that read it)."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu" and _pinned(x):
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def to_host(xs: Sequence[Tensor]) -> list[Tensor]:
    """The tensors on the CPU (detached); large CUDA ones through pinned memory, all copies
    queued first and waited for once."""
    out: list[Tensor] = []
    waits: set[torch.device] = set()
    for x in xs:
        x = x.detach()
        if x.device.type == "cuda" and _pinned(x):
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
            waits.add(x.device)
            out.append(host)
        else:
            out.append(x.cpu())
    for dev in waits:
        torch.cuda.current_stream(dev).synchronize()
    return out
