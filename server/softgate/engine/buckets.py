"""Histogram buckets of the per-token ratio and gate weight, per advantage sign.

The kernel writes one byte per token and quantity, `sign * slots + bucket`: `bucket` is the
number of edges below the value (Prometheus' `le` buckets, the last one +Inf), `sign` 0 / 1 / 2
for A > 0 / A < 0 / A = 0 and 3 (DISCARD) for a masked token. Telemetry then only counts
bytes (a bincount) instead of searching the edges for every token again after the call.
Edges compare in the tensor's dtype.
"""

from __future__ import annotations

import functools

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
DISCARD = len(SIGNS)  # the sign slot of masked tokens
RATIO_SLOTS = len(RATIO_EDGES) + 1  # buckets per sign, with +Inf
GATE_SLOTS = len(GATE_EDGES) + 1
assert (DISCARD + 1) * max(RATIO_SLOTS, GATE_SLOTS) <= 256  # codes fit a uint8


# bucket_codes' sums, in order: the ratio's and the gate's per sign
BUCKET_SUMS: tuple[str, ...] = tuple(f"{q}_sum_{s}" for q in ("ratio", "gate") for s in SIGNS)


def bucket_codes(
    ratio: Tensor, gate: Tensor, pos: Tensor, neg: Tensor, m: Tensor, edges: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 codes (ratio, gate) of tokens with values `ratio`, `gate`, advantage sign masks
    `pos`, `neg` (both False: A = 0) and loss mask `m` (all bool, masked tokens discarded),
    and the float64 sums of both per sign (BUCKET_SUMS: a histogram's `_sum`); `edges`:
    bucket_edges of the values' dtype and device."""
    zero = m & ~pos & ~neg
    sums = torch.stack(
        [torch.where(s, x, 0.0).sum(dtype=torch.float64) for x in (ratio, gate) for s in (pos, neg, zero)]
    )
    return (*_codes(ratio, gate, pos, neg, m, edges), sums)


def _codes(
    ratio: Tensor, gate: Tensor, pos: Tensor, neg: Tensor, m: Tensor, edges: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    r_edges, g_edges = edges
    if torch.compiler.is_compiling():
        # one vectorised compare per edge, counted in the values' float dtype: ~2 ms per
        # million tokens on 2 CPU cores, where uint8 arithmetic (not vectorised) took 79 and
        # inductor's bucketize, a scalar binary search, is not vectorised either. The edges
        # come in as one tensor: as Python floats, dynamo made each a 0-d tensor argument
        # built on every call (~200 us)
        one, zero = torch.ones_like(ratio), torch.zeros_like(ratio)
        sign = torch.where(pos, zero, torch.where(neg, one, torch.where(m, one + 1, one + 2)))
        kr = functools.reduce(
            torch.add, [torch.where(ratio > r_edges[i], one, zero) for i in range(RATIO_SLOTS - 1)]
        )
        kg = functools.reduce(
            torch.add, [torch.where(gate > g_edges[i], one, zero) for i in range(GATE_SLOTS - 1)]
        )
        return (kr + sign * RATIO_SLOTS).to(torch.uint8), (kg + sign * GATE_SLOTS).to(torch.uint8)
    # eager: one op each, not one per edge
    sign = torch.where(pos, 0, torch.where(neg, 1, torch.where(m, 2, DISCARD))).to(torch.uint8)
    kr = torch.bucketize(ratio, r_edges, out_int32=True).to(torch.uint8)
    kg = torch.bucketize(gate, g_edges, out_int32=True).to(torch.uint8)
    return kr + sign * RATIO_SLOTS, kg + sign * GATE_SLOTS


@functools.lru_cache(maxsize=16)
def bucket_edges(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(RATIO_EDGES, GATE_EDGES) as tensors of `dtype` on `device` (shared, read-only)."""
    return (
        torch.tensor(RATIO_EDGES, dtype=dtype, device=device),
        torch.tensor(GATE_EDGES, dtype=dtype, device=device),
    )
