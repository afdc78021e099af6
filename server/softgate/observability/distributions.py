"""Per-token distributions bucketed on the device, in bulk.

`bucket_tokens` turns the per-token ratio and gate weight of one LossResult into bucket
counts per advantage sign with one `torch.bucketize` and one `torch.bincount` per
quantity over the whole batch (masked-out tokens go to a discard slot instead of being
compacted, so nothing synchronises before the single small copy to the host at the end).
No Python code runs per token.

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

# Edges of the per-token ratio histogram: dense near 1 (GSPO's 3e-4 / 4e-4 band, GRPO's
# 0.2 / 0.28 band, SAPO's gate), coarse in the tails.
RATIO_EDGES: tuple[float, ...] = (
    0.1, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9997,
    1.0,
    1.0004, 1.001, 1.005, 1.01, 1.02, 1.05, 1.1, 1.2, 1.28, 1.5, 2.0, 5.0, 10.0,
)  # fmt: skip
# Gate weight w in [0, 1]; le=0 holds the hard-clipped tokens of clip objectives.
GATE_EDGES: tuple[float, ...] = (0.0, *(round(0.05 * k, 2) for k in range(1, 21)))

SIGNS: tuple[str, ...] = ("pos", "neg", "zero")
NUMPY_MAX_TOKENS = 1 << 16  # see Bucketer.__init__
_DISCARD = len(SIGNS)


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
    """Keeps the edge tensors on each device it has seen."""

    def __init__(self, cpu_sample_tokens: int | None = 1 << 15, *, numpy_on_cpu: bool = True) -> None:
        self.cpu_sample_tokens = cpu_sample_tokens
        # up to NUMPY_MAX_TOKENS CPU tokens are bucketed with numpy: the same counts in ~100 us
        # instead of ~165 us at 4k tokens (a dozen torch ops cost their dispatch, ~4-8 us each,
        # more than their work); above, torch's parallel kernels win (15M tokens: 652 vs 783 ms)
        self.numpy_on_cpu = numpy_on_cpu
        self._edges: dict[tuple[str, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _edges_for(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (str(device), dtype)
        e = self._edges.get(key)
        if e is None:
            e = (
                torch.tensor(RATIO_EDGES, dtype=dtype, device=device),
                torch.tensor(GATE_EDGES, dtype=dtype, device=device),
            )
            self._edges[key] = e
        return e

    def __call__(
        self, ratio: Tensor, gate: Tensor, advantages: Tensor, mask: Tensor, stride: int = 1
    ) -> TokenBuckets:
        return self.bucket(ratio, gate, advantages, mask, stride)

    @torch.no_grad()
    def bucket(
        self, ratio: Tensor, gate: Tensor, advantages: Tensor, mask: Tensor, stride: int = 1
    ) -> TokenBuckets:
        """`stride` > 1: the tensors are already every stride-th token of the batch (counts
        are scaled by it); else a CPU batch over cpu_sample_tokens is sampled here."""
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
        dtype = ratio.dtype if ratio.dtype in (torch.float32, torch.float64) else torch.float32
        ratio = ratio.to(dtype)
        gate = gate.to(dtype).contiguous()
        r_edges, g_edges = self._edges_for(ratio.device, dtype)
        if ratio.device.type == "cpu" and self.numpy_on_cpu and ratio.numel() <= NUMPY_MAX_TOKENS:
            counts = _counts_numpy(ratio, gate, advantages, mask, r_edges, g_edges)
        else:
            counts = _counts_torch(ratio, gate, advantages, mask, r_edges, g_edges)
        host = counts * float(stride)
        nr, ng, ns = len(RATIO_EDGES) + 1, len(GATE_EDGES) + 1, len(SIGNS) + 1
        o = 0
        rc = host[o : o + ns * nr].reshape(ns, nr)[: len(SIGNS)]
        o += ns * nr
        rs = host[o : o + ns][: len(SIGNS)]
        o += ns
        gc = host[o : o + ns * ng].reshape(ns, ng)[: len(SIGNS)]
        o += ns * ng
        gs = host[o : o + ns][: len(SIGNS)]
        return TokenBuckets(rc.copy(), rs.copy(), gc.copy(), gs.copy(), stride)


def _counts_torch(
    ratio: Tensor, gate: Tensor, advantages: Tensor, mask: Tensor, r_edges: Tensor, g_edges: Tensor
) -> np.ndarray:
    """[ratio bucket counts, ratio sums, gate bucket counts, gate sums] per sign (4 signs,
    the last discarded) as one float64 host vector: the one device -> host copy."""
    nr, ng, ns = r_edges.numel() + 1, g_edges.numel() + 1, len(SIGNS) + 1
    sign = (advantages < 0).to(torch.int32) + (advantages == 0).to(torch.int32) * 2
    sign = sign.masked_fill_(~mask.to(torch.bool), _DISCARD)
    kr = torch.bucketize(ratio, r_edges, out_int32=True).add_(sign * nr)
    kg = torch.bucketize(gate, g_edges, out_int32=True).add_(sign * ng)
    parts = [
        torch.bincount(kr, minlength=ns * nr).to(torch.float64),
        torch.bincount(sign, weights=ratio, minlength=ns).to(torch.float64),
        torch.bincount(kg, minlength=ns * ng).to(torch.float64),
        torch.bincount(sign, weights=gate, minlength=ns).to(torch.float64),
    ]
    return torch.cat(parts).cpu().numpy()


def _counts_numpy(
    ratio: Tensor, gate: Tensor, advantages: Tensor, mask: Tensor, r_edges: Tensor, g_edges: Tensor
) -> np.ndarray:
    """`_counts_torch` of CPU tensors, computed with numpy on views of their memory."""
    r, g, a = ratio.detach().numpy(), gate.detach().numpy(), advantages.detach().numpy()
    re_, ge_ = r_edges.numpy(), g_edges.numpy()
    nr, ng, ns = re_.size + 1, ge_.size + 1, len(SIGNS) + 1
    sign = (a < 0).astype(np.int32)
    sign += 2 * (a == 0)
    sign[~mask.detach().numpy().astype(bool, copy=False)] = _DISCARD
    # side="left" is torch.bucketize's (right=False): the first edge >= the value (le buckets)
    kr = np.searchsorted(re_, r, side="left") + sign * nr
    kg = np.searchsorted(ge_, g, side="left") + sign * ng
    return np.concatenate(
        [
            np.bincount(kr, minlength=ns * nr),
            np.bincount(sign, weights=r, minlength=ns),
            np.bincount(kg, minlength=ns * ng),
            np.bincount(sign, weights=g, minlength=ns),
        ]
    ).astype(np.float64)
