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
streamed (a stream is selected over its whole batch). The keys are the same on every device;
the covariances are float64 sums whose order a device picks, so a covariance within rounding
of a tie or of the window's ends may fall the other way on another device.

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
    obj: ClipCov | KlCov, logp: Tensor, old: Tensor, a: Tensor, mask: Tensor | None, prm: dict[str, Tensor]
) -> Tensor:
    """The selected tokens, uint8 0 / 1 [N] (the kernel's `sel`). `a`: the advantages per
    token, `mask` bool [N] (None: every token trained), `prm` the kernel's parameters
    (clip_cov's bounds lo, hi and the clamp: the clip it leaves out is the kernel's)."""
    every = mask is None
    m = torch.ones(1, dtype=torch.bool, device=logp.device).expand(logp.numel()) if mask is None else mask
    n = m.numel() if every else int(m.sum())
    if n == 0:
        return torch.zeros_like(logp, dtype=torch.uint8)
    k = max(1, int(obj.fraction * n))
    first = 0 if every else int(torch.argmax(m.view(torch.uint8)))
    cov = _centred(a, m, n, first, every) * _centred(logp, m, n, first, every)
    if logp.dtype == F64 or a.dtype == F64:  # (float32 values' products are finite in float64)
        cov = torch.nan_to_num(cov, nan=0.0)  # an infinity times an exact 0
    if isinstance(obj, KlCov):
        return top_k(cov, m, k, n).view(torch.uint8)
    d = torch.where(m, logp - old, 0.0).clamp(-prm["clamp"], prm["clamp"])
    ratio = torch.exp(d)
    clipped = ((a > 0) & (ratio > prm["hi"])) | ((a < 0) & (ratio < prm["lo"]))
    eligible = m & ~clipped & (cov > obj.cov_low) & (cov < obj.cov_high)
    count = int(eligible.sum())
    if count <= k:  # every one of them: no draw
        return eligible.view(torch.uint8)
    if count * 2 < eligible.numel():  # keys for those alone (hashing costs more than nonzero)
        idx = torch.nonzero(eligible).squeeze(1)
        keys = uniform_keys(obj.seed, idx, logp.device)
        sel = torch.zeros_like(eligible)
        sel[idx[top_k(keys, torch.ones_like(idx, dtype=torch.bool), k, count)]] = True
        return sel.view(torch.uint8)
    keys = uniform_keys(obj.seed, torch.arange(logp.numel(), device=logp.device), logp.device)
    return top_k(keys, eligible, k, count).view(torch.uint8)


def _centred(x: Tensor, m: Tensor, n: int, first: int, every: bool) -> Tensor:
    """x - its mean over the n trained tokens, in float64 (any value on the others). The mean
    is shifted by the first trained value c (c + mean(x - c)): equal values centre to exactly
    0. Values whose differences would overflow float64 are centred as x / max |x|, then
    scaled back."""
    x = x.to(F64)
    y = x - x[first]
    total = (y if every else torch.where(m, y, 0.0)).sum()
    if bool(torch.isfinite(total)):
        return y - total / n
    scale = (x.abs() if every else torch.where(m, x.abs(), 0.0)).max()
    if not bool(torch.isfinite(scale)):  # a value not finite: the kernel refuses the batch
        return torch.zeros_like(x)
    return scale * _centred(x / scale, m, n, first, every)


def top_k(key: Tensor, eligible: Tensor, k: int, count: int | None = None) -> Tensor:
    """bool [N]: the k eligible entries of largest `key` (all of them when fewer), ties to the
    lower index; `count`: the eligible entries, when the caller knows it."""
    count = int(eligible.sum()) if count is None else count
    if k >= count:
        return eligible.clone()
    if count < key.numel():
        # the others at the lowest key (an eligible one there too: `tie` below tells them apart)
        low = -float("inf") if key.dtype.is_floating_point else INT64_MIN
        key = torch.where(eligible, key, torch.full_like(key, low))
    vals, idx = torch.topk(key, k + 1)
    sel = torch.zeros_like(eligible)
    if bool(vals[k] < vals[k - 1]):  # no tie across the k-th: these k, whatever topk's order
        sel[idx[:k]] = True
        return sel
    kth = vals[k - 1]
    above = eligible & (key > kth)
    tie = eligible & (key == kth)
    need = k - int(above.sum())
    return above | (tie & (torch.cumsum(tie, 0, dtype=torch.int64) <= need))


def uniform_keys(seed: int, index: Tensor, device: torch.device) -> Tensor:
    """int64, one per index: splitmix64's outputs of the stream `seed` at these positions
    (seed + (i + 1) gamma, mixed), uniform over the 64-bit integers and the same on every
    device."""
    s = seed - 2**64 if seed >= 2**63 else seed
    z = (index.to(device=device, dtype=torch.int64) + 1) * _GAMMA + s
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)
