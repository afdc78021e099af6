"""Per-token distributions: bucket counts of the ratio and gate weight per advantage sign.

The engine's kernel writes a one-byte bucket code per token (`softgate.engine.buckets`) and
each histogram's sum per sign when the ratio and gate it returns are no more than telemetry
buckets; counting them is one bincount per quantity (observe_loss of a 4k-token call:
169 -> 67 us; of a 16M-token batch as the server calls the engine: ~2 -> 0.16 ms). Otherwise
(e.g. a request that asked for the ratio, or a larger batch on CUDA) the codes are computed
here, with one torch.bucketize per quantity (on the CPU 3x faster than numpy's searchsorted
for a 32K-token sample). Masked tokens go to a discard slot instead of being compacted, so
nothing synchronises before the single small copy to the host at the end. No Python code
runs per token; CPU codes are counted with numpy (cheaper to call than torch at these sizes).

On CUDA every token is bucketed. On a CPU device a batch larger than `cpu_sample_tokens`
is bucketed through an evenly strided sample (every k-th token), its counts and sums
scaled by k: the shape of the distribution is kept at a few percent of the cost. The
token counters and per-batch fractions are exact in both cases (they come from the
engine's metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softgate.engine.buckets import (
    BUCKET_SUMS,
    DISCARD,
    GATE_EDGES,
    GATE_SLOTS,
    RATIO_EDGES,
    RATIO_SLOTS,
    SIGNS,
    bucket_codes,
    bucket_edges,
)

__all__ = ["GATE_EDGES", "RATIO_EDGES", "SIGNS", "Bucketer", "TokenBuckets"]


@dataclass
class TokenBuckets:
    """Host-side result for one batch: [sign, bucket] counts (the last bucket is +Inf)
    and per-sign sums, for the ratio and the gate weight."""

    ratio_counts: np.ndarray  # [3, len(RATIO_EDGES) + 1]
    ratio_sums: np.ndarray  # [3]
    gate_counts: np.ndarray  # [3, len(GATE_EDGES) + 1]
    gate_sums: np.ndarray  # [3]
    stride: int


class Bucketer:
    """Bucket counts of LossResults' ratio and gate weight, sampled on the CPU."""

    def __init__(self, cpu_sample_tokens: int | None = 1 << 15) -> None:
        self.cpu_sample_tokens = cpu_sample_tokens

    def bucket(
        self,
        ratio: Tensor,
        gate: Tensor,
        advantages: Tensor,
        mask: Tensor,
        stride: int = 1,
        codes: tuple[Tensor, Tensor, Sequence[float]] | None = None,
    ) -> TokenBuckets:
        """`stride` > 1: the tensors are already every stride-th token of the batch (counts
        are scaled by it); else a CPU batch over cpu_sample_tokens is sampled here. `codes`:
        the engine's bucket codes of these ratio and gate values and their sums per sign
        (LossResult.ratio_bucket, gate_bucket, bucket_sums), if it computed them."""
        n = int(ratio.numel())
        if codes is not None and (codes[0].numel() != n or len(codes[2]) != len(BUCKET_SUMS)):
            codes = None  # not computed (empty)
        if (
            stride == 1
            and ratio.device.type == "cpu"
            and self.cpu_sample_tokens
            and n > self.cpu_sample_tokens
        ):
            stride = -(-n // self.cpu_sample_tokens)
            # contiguous copies: each pass over a strided view would miss the cache per token
            ratio, gate = ratio[::stride].contiguous(), gate[::stride].contiguous()
            advantages, mask = advantages[::stride].contiguous(), mask[::stride].contiguous()
            codes = None  # (the engine's sums are of every token)
        cpu = ratio.device.type == "cpu"
        if codes is not None:
            rcode, gcode, sums = codes[0], codes[1], np.asarray(codes[2], dtype=np.float64)
        else:
            if ratio.dtype not in (torch.float32, torch.float64):
                ratio, gate = ratio.float(), gate.float()
            gate = gate.to(ratio.dtype)
            m = mask.to(torch.bool)
            edges = bucket_edges(ratio.dtype, ratio.device)
            rcode, gcode, on_device = bucket_codes(
                ratio, gate, m & (advantages > 0), m & (advantages < 0), m, edges
            )
            sums = on_device.detach().cpu().numpy()  # (no autograd context here: ~5 us a call)
        rc, gc = (_counts_numpy if cpu else _counts_torch)(rcode, gcode)
        rs, gs = sums[: len(SIGNS)], sums[len(SIGNS) :]
        if stride == 1:
            return TokenBuckets(rc, rs, gc, gs, 1)
        k = float(stride)
        return TokenBuckets(rc * k, rs * k, gc * k, gs * k, stride)

    __call__ = bucket


# codes per quantity, the discard slot included
_NR, _NG = (DISCARD + 1) * RATIO_SLOTS, (DISCARD + 1) * GATE_SLOTS


def _counts_torch(rcode: Any, gcode: Any) -> tuple[np.ndarray, np.ndarray]:
    """[sign, bucket] counts (the discard slot dropped) of ratio and gate codes on a device."""
    both = torch.cat(
        [torch.bincount(rcode.long(), minlength=_NR), torch.bincount(gcode.long(), minlength=_NG)]
    )
    return _split(both.cpu().numpy())


def _counts_numpy(rcode: Any, gcode: Any) -> tuple[np.ndarray, np.ndarray]:
    """`_counts_torch` of CPU codes, with numpy (C-level calls only: this runs after every
    small call, where numpy's Python-level wrappers cost ~10 us each)."""
    return _signs(np.bincount(_numpy(rcode), minlength=_NR), RATIO_SLOTS), _signs(
        np.bincount(_numpy(gcode), minlength=_NG), GATE_SLOTS
    )


def _numpy(x: Any) -> np.ndarray:
    return x.numpy() if isinstance(x, Tensor) else np.asarray(x)  # (np.asarray of a tensor: ~10 us cold)


def _split(both: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _signs(both[:_NR], RATIO_SLOTS), _signs(both[_NR:], GATE_SLOTS)


def _signs(counts: np.ndarray, slots: int) -> np.ndarray:
    """[sign, bucket] float64 counts of one quantity's code counts (the discard slot dropped)."""
    return counts[: DISCARD * slots].reshape(DISCARD, slots).astype(np.float64)
