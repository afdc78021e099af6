"""Rollout rejection sampling (verl's `rollout_rs`): tokens, or whole sequences, whose sampler
log-probs are too far from old_logp leave the loss mask before anything else is computed, so
they carry no loss and no gradient and are not in the normalisers (or in any metric but
`rejected_tokens`).

Each criterion takes a statistic of d = old - rollout per trained token, clamped at
log_ratio_clamp (k1 = -d, k2 = d^2 / 2, k3 = exp(d) - 1 - d; binary_kl: KPop's larger Bernoulli
KL of p_old and p_rollout, each probability clamped to [1e-6, 1 - 1e-6]), per token or summed,
averaged or maxed over the sequence's trained tokens, and bounds it: k1 within [log lower,
log upper], the others at most upper. A token stays trained when every criterion keeps it. A
token whose old_logp (logp, on-policy) is not a valid log-prob stays too, for the loss
kernel's check to refuse it, as it would without rejection.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from softgate.engine.batch import Batch
from softgate.engine.config import LossConfig, RejectionCriterion
from softgate.engine.segments import Segments
from softgate.engine.validation import LOGP_TOLERANCE, compute_dtype

BINARY_KL_EPS = 1e-6  # verl's clamp of both probabilities


def token_statistic(statistic: str, d: Tensor, old: Tensor, rollout: Tensor) -> Tensor:
    """A criterion's statistic per token from d = old - rollout (clamped)."""
    if statistic == "k1":
        return -d
    if statistic == "k2":
        return 0.5 * d * d
    if statistic == "k3":
        return torch.expm1(d) - d
    p = torch.exp(old).clamp(BINARY_KL_EPS, 1 - BINARY_KL_EPS)  # binary_kl
    q = torch.exp(rollout).clamp(BINARY_KL_EPS, 1 - BINARY_KL_EPS)
    fwd = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    rev = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    return torch.maximum(fwd, rev)


def rejected(c: RejectionCriterion, stat: Tensor) -> Tensor:
    """Where criterion `c` rejects (bool, per token): k1 outside [log lower, log upper], the
    others above upper."""
    assert c.upper is not None  # (validated)
    if c.statistic == "k1":
        lower = c.lower if c.lower is not None else 1.0 / c.upper
        return (stat < math.log(lower)) | (stat > math.log(c.upper))
    return stat > c.upper


def keep_mask(old: Tensor, rollout: Tensor, m: Tensor, seg: Segments, config: LossConfig) -> Tensor:
    """The tokens every criterion of `config.rejection` keeps (bool [N]; the masked ones
    too: the caller ANDs it with its mask). `m`: the loss mask as given."""
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    clamp = float(config.log_ratio_clamp)
    d = torch.where(m, old - rollout, zero).clamp(-clamp, clamp)
    trained = seg.count(m)
    keep = torch.ones(d.shape, dtype=torch.bool, device=d.device)
    for c in config.rejection:  # (a few criteria: the loop is over them, not over tokens)
        stat = token_statistic(c.statistic, d, old, rollout)
        if c.level == "seq_sum":
            stat = seg.expand(seg.sum(torch.where(m, stat, zero)))
        elif c.level == "seq_mean":
            stat = seg.expand(seg.mean(torch.where(m, stat, zero), trained))
        elif c.level == "seq_max":
            stat = seg.expand(seg.max(torch.where(m, stat, zero - math.inf)))
        keep &= ~rejected(c, stat)
    # a trained token whose old_logp is NaN, infinite or positive stays, for the kernel's check
    # to refuse it (as it would without rejection) rather than rejection to drop it unseen
    return keep | ~torch.isfinite(old) | (old > LOGP_TOLERANCE)


def apply_rejection(batch: Batch, config: LossConfig) -> tuple[Batch, Tensor]:
    """`batch` with the tokens rollout rejection rejects out of its mask, and how many trained
    tokens that took out (a float64 0-d tensor on the batch's device). Needs rollout_logp."""
    assert batch.rollout_logp is not None  # (validated)
    dt = compute_dtype(batch)
    dev = batch.logp.device
    logp = batch.logp.to(dt)
    old = logp if batch.old_logp is None else batch.old_logp.to(dt)
    n = logp.numel()
    seg = Segments(batch.offsets.to(device=dev, dtype=torch.int64), n)
    if batch.mask is None:
        m = torch.ones(n, dtype=torch.bool, device=dev)
    else:
        m = batch.mask.to(dev)
        m = m if m.dtype == torch.bool else m != 0
    kept = m & keep_mask(old, batch.rollout_logp.to(dt), m, seg, config)
    out = (m.sum() - kept.sum()).to(torch.float64)
    return dataclasses.replace(batch, mask=kept), out
