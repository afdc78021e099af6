"""Rollout rejection sampling (verl's `rollout_rs`): tokens, or whole sequences, whose sampler
log-probs are too far from old_logp leave the loss mask before anything else is computed, so
they carry no loss and no gradient and are not in the normalisers (or in any metric but
`rejected_tokens`, `rejected_seqs` and the sampler's KL, `rollout_*`, which reads the mask as sent).

Each criterion takes a statistic of d = old - rollout per trained token, clamped at
log_ratio_clamp (k1 = -d, k2 = d^2 / 2, k3 = exp(d) - 1 - d, k3_reverse = exp(-d) - 1 + d, k3 of
the inverse ratio, AReaL's kl_k3; binary_kl: KPop's larger Bernoulli KL of p_old and p_rollout,
each probability clamped to [1e-6, 1 - 1e-6]), per token, or its
sum, mean, largest or smallest over the sequence's trained tokens, and bounds it: k1 within
[log lower, log upper], the others at most upper. (k1's largest bounds every token from one
side: upper 1 / tau is verl's veto, a sequence dropped for one token whose ratio is below tau.)
A token stays trained when every criterion keeps it. A token whose logp or old_logp is
positive stays too, for the loss kernel's check to refuse it, as it would without rejection.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from softgate.engine.config import LossConfig, RejectionCriterion
from softgate.engine.segments import Segments
from softgate.engine.validation import LOGP_TOLERANCE

BINARY_KL_EPS = 1e-6  # verl's clamp of both probabilities


def token_statistic(statistic: str, d: Tensor, old: Tensor, rollout: Tensor) -> Tensor:
    """A criterion's statistic per token from d = old - rollout (clamped)."""
    if statistic == "k1":
        return -d
    if statistic == "k2":
        return 0.5 * d * d
    if statistic == "k3":
        return torch.expm1(d).sub_(d)
    if statistic == "k3_reverse":
        return torch.expm1(-d).add_(d)
    p = torch.exp(old).clamp(BINARY_KL_EPS, 1 - BINARY_KL_EPS)  # binary_kl
    q = torch.exp(rollout).clamp(BINARY_KL_EPS, 1 - BINARY_KL_EPS)
    fwd = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    rev = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    return torch.maximum(fwd, rev)


def rejected(c: RejectionCriterion, stat: Tensor, k1_of_d: bool = False) -> Tensor:
    """Where criterion `c` rejects (bool, per token or per sequence): k1 outside [log lower,
    log upper] (lower 0 and upper +inf: no bound), the others above upper. `k1_of_d`: `stat`
    is d itself, k1's negation (one pass less: the bounds are negated instead)."""
    assert c.upper is not None  # (validated)
    if c.statistic == "k1":
        lower = c.lower if c.lower is not None else 1.0 / c.upper
        lo, hi = (math.log(lower) if lower > 0 else -math.inf), math.log(c.upper)
        if k1_of_d:
            # where clamping d into [-hi, -lo] moves it: on the CPU a float comparison costs
            # about three arithmetic passes, two and an or ~1.7 ms per 1M tokens, this ~0.9
            return stat.clamp(-hi, -lo).sub_(stat).to(torch.bool)
        return (stat < lo) | (stat > hi)
    return stat > c.upper


def keep_mask(
    old: Tensor, rollout: Tensor, m: Tensor, seg: Segments, config: LossConfig, logp: Tensor | None = None
) -> Tensor:
    """The tokens every criterion of `config.rejection` keeps (bool [N]; masked ones may be
    either: the caller ANDs it with its mask). `m`: the loss mask as given; `logp`: checked as
    old is (below), when old is not logp itself."""
    clamp = float(config.log_ratio_clamp)
    # masked tokens may hold garbage: a token-level statistic of theirs is ANDed away, a
    # sequence's reads its trained tokens only
    d = (old - rollout).clamp_(-clamp, clamp)
    trained: Tensor | None = None
    keep: Tensor | None = None
    for c in config.rejection:  # (a few criteria: the loop is over them, not over tokens)
        if c.level == "token":
            k1 = c.statistic == "k1"
            bad = rejected(c, d if k1 else token_statistic(c.statistic, d, old, rollout), k1_of_d=k1)
        else:  # decided per sequence, then its bool expanded to the tokens
            stat = token_statistic(c.statistic, d, old, rollout)
            if c.level == "seq_max":
                per_seq = seg.max(torch.where(m, stat, -math.inf))
            elif c.level == "seq_min":  # minus the largest of -stat
                per_seq = seg.max(torch.where(m, stat.neg_(), -math.inf)).neg_()
            else:
                # zeroed off the mask by multiplying by its bytes (on the CPU ~3x faster than a
                # select against 0): every statistic is finite, d being clamped (binary_kl: its
                # probabilities)
                stat = stat.mul_(m.view(torch.uint8))
                if c.level == "seq_mean":
                    trained = seg.count(m) if trained is None else trained
                    per_seq = seg.mean(stat, trained)
                else:
                    per_seq = seg.sum(stat)
            bad = seg.expand(rejected(c, per_seq))
        keep = ~bad if keep is None else keep.logical_and_(~bad)
    assert keep is not None  # (apply_rejection runs with criteria only)
    # a trained token whose logp or old_logp is positive (or NaN) stays, for the kernel's check
    # to refuse it by name, as it would without rejection, rather than rejection to drop it
    # unseen (the kernel refuses a non-finite log-prob on any token, masked or not)
    for x in (old,) if logp is None else (old, logp):
        if x.numel() and not float(x.max()) <= LOGP_TOLERANCE:  # (one pass and a sync each)
            keep |= ~(x <= LOGP_TOLERANCE)
    return keep
