"""The token selection of Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of
Reinforcement Learning for Reasoning Language Models"; verl's `clip_cov` / `kl_cov`).

A trained token's covariance is (A - mean A)(logp - mean logp), the means over the batch's
trained tokens: its share of the covariance between log-prob and advantage through which
policy-gradient training lowers the policy's entropy. Both objectives pick
k = max(1, floor(fraction n)) of the n trained tokens (fewer when fewer qualify):
- kl_cov: those of largest covariance;
- clip_cov: k drawn uniformly at random among the tokens GRPO's clip left alone whose
  covariance lies in (cov_low, cov_high).
The draw gives every token the key splitmix64(seed, index) and takes the largest keys. Ties go
to the lower index. The same batch and seed select the same tokens on every run, unary or
streamed (a stream is selected over its whole batch).

The selection is one pass of host-side torch over the batch (no compiled kernel): the means,
a top-k, and for ties a cumulative sum. The means and covariances are in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softgate.engine.config import ClipCov, KlCov

F64 = torch.float64
INT64_MIN = -(2**63)
# splitmix64's constants as signed 64-bit integers (torch's int64 arithmetic wraps)
_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def covariance_selection(
    obj: ClipCov | KlCov, logp: Tensor, old: Tensor, a: Tensor, m: Tensor, prm: dict[str, Tensor]
) -> Tensor:
    """The selected tokens, uint8 0 / 1 [N] (the kernel's `sel`). `a`: the advantages per
    token, `m` the mask (bool [N]), `prm` the kernel's parameters (clip_cov's bounds lo, hi and
    the clamp: the clip it leaves out is the kernel's)."""
    n = int(m.sum())
    k = max(1, int(obj.fraction * n))
    cov = torch.nan_to_num(_centred(a, m, n) * _centred(logp, m, n), nan=0.0)  # (inf times an exact 0)
    if isinstance(obj, KlCov):
        return top_k(cov, m, k).view(torch.uint8)
    d = torch.where(m, logp - old, 0.0).clamp(-prm["clamp"], prm["clamp"])
    ratio = torch.exp(d)
    clipped = ((a > 0) & (ratio > prm["hi"])) | ((a < 0) & (ratio < prm["lo"]))
    eligible = m & ~clipped & (cov > obj.cov_low) & (cov < obj.cov_high)
    return top_k(uniform_keys(obj.seed, logp.numel(), logp.device), eligible, k).view(torch.uint8)


def _centred(x: Tensor, m: Tensor, n: int) -> Tensor:
    """x - its mean over the n trained tokens, in float64, 0 on the others. The mean is shifted
    by the first trained value c (c + mean(x - c)): equal values centre to exactly 0. Values
    whose differences would overflow float64 are centred as x / max |x|, then scaled back."""
    if n == 0:
        return torch.zeros_like(x, dtype=F64)
    x = x.to(F64)
    c = x[torch.argmax(m.to(torch.uint8))]
    y = torch.where(m, x - c, 0.0)
    total = y.sum()
    if bool(torch.isfinite(total)):
        return torch.where(m, y - total / n, 0.0)
    scale = torch.where(m, x.abs(), 0.0).max()
    if not bool(torch.isfinite(scale)):  # a value not finite: the kernel refuses the batch
        return torch.zeros_like(x)
    return scale * _centred(x / scale, m, n)


def top_k(key: Tensor, eligible: Tensor, k: int) -> Tensor:
    """bool [N]: the k eligible entries of largest `key` (all of them when fewer), ties to the
    lower index."""
    k = min(k, int(eligible.sum()))
    if k == 0:
        return torch.zeros_like(eligible)
    # the others at the lowest key (an eligible one there too: `tie` below tells them apart)
    low = -float("inf") if key.dtype.is_floating_point else INT64_MIN
    key = torch.where(eligible, key, torch.full_like(key, low))
    kth = torch.topk(key, k, sorted=False).values.min()
    above = eligible & (key > kth)
    tie = eligible & (key == kth)
    need = k - int(above.sum())
    return above | (tie & (torch.cumsum(tie, 0, dtype=torch.int64) <= need))


def uniform_keys(seed: int, n: int, device: torch.device) -> Tensor:
    """int64 [n]: splitmix64 of the stream `seed` at positions 0..n-1 (seed + (i + 1) gamma,
    mixed), uniform over the 64-bit integers and the same on every device."""
    s = seed - 2**64 if seed >= 2**63 else seed
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device) * _GAMMA + s
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)
