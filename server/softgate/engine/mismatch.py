"""Train/inference mismatch weights v = exp(old - rollout) (stop-gradient), per token or per
sequence (exp of the masked sum, or at level geometric of the masked mean), clamped to [floor,
cap] (TIS; floor 0 by default) or zeroed outside [lo, hi] ("IcePop"), or per token and zeroed in
the sequences whose geometric-mean weight (exp of the masked mean) is outside [lo, hi]
(seq_mask: OpenRLHF's seq-mask-tis).

The log-weight is not clamped: exp may overflow to inf, which the truncation (min with cap) or
the window (inf > hi: zeroed) turns into the spec's finite weight, and a very negative one
underflows to 0, as exp does. seq_mask bounds only its sequences' means: a kept token's own
weight is unbounded, and one that overflows makes the loss refused as an `overflow`. v
multiplies the policy objective's per-token loss (and so its gradient); the KL term is not
weighted. `batch_norm_factor` is the mean that verl's rollout_is_batch_normalize divides the
weights by. (How far the sampler is from the trainer, the rollout_kl and rollout_k3_kl metrics,
the loss kernel sums whenever rollout_logp is sent, correction or not: kernel.token_terms.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from softgate.engine.segments import Segments


def sequence_log_weights(lv_raw: Tensor, seg: Segments, trained: Tensor, mean: bool) -> Tensor:
    """Per sequence ([B]) from lv_raw = old - rollout (0 on masked tokens): the masked sum (log v
    at sequence level), or with `mean` the masked mean over its `trained` tokens (log v at level
    geometric, seq_mask's filter; 0 for a sequence without any)."""
    return seg.mean(lv_raw, trained) if mean else seg.sum(lv_raw)


def mismatch_weights(
    mode: str, lv: Tensor, prm: dict[str, Tensor], lgeo: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(v, changed) per token from the log-weight; `changed` marks tokens whose weight was
    clamped to [prm["floor"], prm["cap"]] ('truncate') or zeroed outside [prm["vlo"],
    prm["vhi"]] ('mask'), or zeroed because their sequence's geometric-mean weight exp(lgeo)
    (per token) is outside that window ('seq_mask')."""
    v = torch.exp(lv)
    if mode == "truncate":
        floor, cap = prm["floor"], prm["cap"]
        changed = (v > cap) | (v < floor)
        return torch.clamp(v, min=floor, max=cap), changed
    w = v if lgeo is None else torch.exp(lgeo)
    changed = (w < prm["vlo"]) | (w > prm["vhi"])
    return torch.where(changed, torch.zeros_like(v), v), changed


def batch_norm_factor(
    level: str,
    mode: str,
    lv_sent: Tensor,
    sent: Tensor,
    seg: Segments,
    sent_counts: Tensor,
    lvseq: Tensor | None,
    prm: dict[str, Tensor],
) -> Tensor:
    """verl's rollout_is_batch_normalize: the mean of the weights v (as the kernel makes them,
    mismatch_weights) over the trained tokens `sent` of the batch as sent (seq_mask: those
    rejection left, the caller's choice; token level) or over
    its sequences with any (sequence and geometric levels), as a float64 0-d tensor; 1 when that
    mean is at most 1e-8 (verl's) or nothing is trained. `lv_sent` is old - rollout on `sent` (0
    off it), `lvseq` the [B] log-weight of a sequence, geometric or seq_mask correction."""
    f64 = torch.float64
    if level != "token":
        assert lvseq is not None
        v, _ = mismatch_weights(mode, lvseq, prm)
        some = sent_counts > 0
        total, count = torch.where(some, v, torch.zeros_like(v)).sum(dtype=f64), some.sum()
    else:
        lgeo = seg.expand(lvseq) if lvseq is not None else None
        v, _ = mismatch_weights(mode, lv_sent, prm, lgeo)
        total, count = torch.where(sent, v, torch.zeros_like(v)).sum(dtype=f64), sent_counts.sum()
    mean = total / count.clamp(min=1)
    # an infinite mean (seq_mask's unbounded weight on a trained token) is NaN: the loss is then
    # refused as `overflow`, never silently 0 (w / inf)
    factor = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
    return torch.where(torch.isfinite(mean), factor, torch.full_like(mean, math.nan))


def applied_weights(
    level: str,
    mode: str,
    lv_sent: Tensor,
    seg: Segments,
    lvseq: Tensor | None,
    norm: Tensor | None,
    prm: dict[str, Tensor],
) -> Tensor:
    """v at every token ([N]) as the loss applies it, from `lv_sent` = old - rollout on the
    tokens as sent (0 off them), `lvseq` the [B] log-weight of a sequence (sequence and
    geometric levels, seq_mask; else None) and batch_normalize's factor `norm` (None without
    it): what optimal_token_baseline squares and the variance proxy reads (verl's
    rollout_is_weights)."""
    if level == "token":
        v, _ = mismatch_weights(mode, lv_sent, prm, None if lvseq is None else seg.expand(lvseq))
    else:
        assert lvseq is not None
        v = seg.expand(mismatch_weights(mode, lvseq, prm)[0])
    return v if norm is None else v / norm.to(v.dtype)
