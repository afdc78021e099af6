"""Per-token distributions: bucket counts of the ratio and gate weight per advantage sign.

The engine's kernel writes a one-byte bucket code per token (`softgate.engine.buckets`) when
the ratio and gate it returns are no more than telemetry buckets; counting them is one
bincount per quantity (observe_loss of a 4k-token call: 169 -> 103 us; of a 16M-token batch
as the server calls the engine: ~3 -> 0.4 ms). Otherwise (e.g. a request that asked for the ratio, or a larger
batch on CUDA) the codes are computed here, with one search per quantity. Masked tokens go
to a discard slot instead of being compacted, so nothing synchronises before the single
small copy to the host at the end. No Python code runs per token; CPU values are counted
with numpy (a dozen torch ops cost more in dispatch than in work at these sizes).

On CUDA every token is bucketed. On a CPU device a batch larger than `cpu_sample_tokens`
is bucketed through an evenly strided sample (every k-th token), its counts and sums
scaled by k: the shape of the distribution is kept at a few percent of the cost. The
token counters and per-batch fractions are exact in both cases (they come from the
engine's metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from softgate.engine.buckets import (
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

    def __call__(
        self,
        ratio: Tensor,
        gate: Tensor,
        advantages: Tensor,
        mask: Tensor,
        stride: int = 1,
        codes: tuple[Tensor, Tensor] | None = None,
    ) -> TokenBuckets:
        return self.bucket(ratio, gate, advantages, mask, stride, codes)

    @torch.no_grad()
    def bucket(
        self,
        ratio: Tensor,
        gate: Tensor,
        advantages: Tensor,
        mask: Tensor,
        stride: int = 1,
        codes: tuple[Tensor, Tensor] | None = None,
    ) -> TokenBuckets:
        """`stride` > 1: the tensors are already every stride-th token of the batch (counts
        are scaled by it); else a CPU batch over cpu_sample_tokens is sampled here. `codes`:
        the engine's bucket codes of these ratio and gate values (LossResult.ratio_bucket,
        gate_bucket), if it computed them."""
        n = int(ratio.numel())
        if (
            stride == 1
            and ratio.device.type == "cpu"
            and self.cpu_sample_tokens
            and n > self.cpu_sample_tokens
        ):
            stride = -(-n // self.cpu_sample_tokens)
            ratio, gate = ratio[::stride].contiguous(), gate[::stride].contiguous()
            advantages, mask = advantages[::stride], mask[::stride]
            codes = (codes[0][::stride], codes[1][::stride]) if codes is not None else None
        if ratio.dtype not in (torch.float32, torch.float64):
            ratio, gate = ratio.float(), gate.float()
        gate = gate.to(ratio.dtype)
        if codes is not None and codes[0].numel() != ratio.numel():
            codes = None  # not computed (an empty tensor)
        edges = bucket_edges(ratio.dtype, ratio.device)
        if ratio.device.type == "cpu":
            r, g = ratio.numpy(), gate.numpy()
            if codes is not None:
                cr, cg = codes[0].numpy(), codes[1].numpy()
            else:
                cr, cg = _codes_numpy(r, g, advantages.numpy(), mask.numpy(), edges)
            host = _counts_numpy(r, g, cr, cg)
        else:
            if codes is None:
                m = mask.to(torch.bool)
                codes = bucket_codes(ratio, gate, m & (advantages > 0), m & (advantages < 0), m, edges)
            host = _counts_torch(ratio, gate, *codes)
        host *= float(stride)
        ns = len(SIGNS)
        o = ns * RATIO_SLOTS
        rc, rs = host[:o].reshape(ns, RATIO_SLOTS), host[o : o + ns]
        o += ns
        gc, gs = host[o : o + ns * GATE_SLOTS].reshape(ns, GATE_SLOTS), host[o + ns * GATE_SLOTS :]
        return TokenBuckets(rc.copy(), rs.copy(), gc.copy(), gs.copy(), stride)


def _counts_torch(ratio: Tensor, gate: Tensor, rcode: Tensor, gcode: Tensor) -> np.ndarray:
    """[ratio bucket counts, ratio sums, gate bucket counts, gate sums] per sign (the discard
    slot dropped) as one float64 host vector: the one device -> host copy."""
    slots = DISCARD + 1
    rcode, gcode = rcode.long(), gcode.long()
    sign = torch.div(rcode, RATIO_SLOTS, rounding_mode="floor")
    parts = [
        torch.bincount(rcode, minlength=slots * RATIO_SLOTS)[: DISCARD * RATIO_SLOTS].to(torch.float64),
        torch.bincount(sign, weights=ratio.to(torch.float64), minlength=slots)[:DISCARD],
        torch.bincount(gcode, minlength=slots * GATE_SLOTS)[: DISCARD * GATE_SLOTS].to(torch.float64),
        torch.bincount(sign, weights=gate.to(torch.float64), minlength=slots)[:DISCARD],
    ]
    return torch.cat(parts).cpu().numpy()


def _codes_numpy(
    r: np.ndarray, g: np.ndarray, a: np.ndarray, mask: np.ndarray, edges: tuple[Tensor, Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """buckets.bucket_codes of CPU values (strided views are fine), for a LossResult that
    carries no codes."""
    r_edges, g_edges = edges[0].numpy(), edges[1].numpy()
    sign = (a < 0).astype(np.uint8)
    sign[a == 0] = 2
    sign[~mask.astype(bool, copy=False)] = DISCARD
    # side="left" is torch.bucketize's (right=False): the number of edges below the value
    cr = np.searchsorted(r_edges, r, side="left").astype(np.uint8) + sign * RATIO_SLOTS
    cg = np.searchsorted(g_edges, g, side="left").astype(np.uint8) + sign * GATE_SLOTS
    return cr, cg


def _counts_numpy(r: np.ndarray, g: np.ndarray, cr: np.ndarray, cg: np.ndarray) -> np.ndarray:
    """`_counts_torch` of CPU values and codes, with numpy."""
    slots = DISCARD + 1
    sign = cr // RATIO_SLOTS
    return np.concatenate(
        [
            np.bincount(cr, minlength=slots * RATIO_SLOTS)[: DISCARD * RATIO_SLOTS],
            np.bincount(sign, weights=r, minlength=slots)[:DISCARD],
            np.bincount(cg, minlength=slots * GATE_SLOTS)[: DISCARD * GATE_SLOTS],
            np.bincount(sign, weights=g, minlength=slots)[:DISCARD],
        ]
    ).astype(np.float64)
