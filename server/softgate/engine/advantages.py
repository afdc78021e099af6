"""Outcome-reward advantage estimators over groups (grpo, dr_grpo, rloo, reinforce_pp_baseline,
opo, gpg, grpo_passk, gdpo), and REINFORCE++ (reinforce_pp), which reads no groups.

Rewards are [B], or [B, K]: K reward components per sequence. gdpo normalises each component
within its group, sums them weighted by `reward_weights` and whitens the sum (GDPO's
group-decoupled normalisation, TRL's normalize_then_sum); the others take the weighted sum
first (TRL's sum_then_normalize). With `skip_nan_components` a NaN component does not apply
to its sequence (TRL's nan-aware means): 0 in the sum, no member of its group's statistics;
a sequence none applies to has no reward: out of every statistic, advantage 0.

All group statistics are computed in float64 whatever the reward dtype. Groups are found with
torch.unique(return_inverse=True) and reduced with index_add_/scatter_reduce, so they need not
be contiguous; on CUDA the sums go through the rewards sorted by group and a segmented
reduction instead, which gives the same bits on every call (see segments.py). A group is
degenerate when it has one member, all its rewards are equal, or its unbiased std is below
`min_group_std`; every member of a degenerate group gets advantage 0, but under reinforce_pp,
which has no group baseline (its degenerate groups are still counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from softgate.engine.config import AdvantageConfig
from softgate.engine.segments import segment_sum, use_segment_reduce

DEFAULT_SCALE = {
    "grpo": "group",
    "dr_grpo": "none",
    "rloo": "none",
    "reinforce_pp_baseline": "none",
    "opo": "none",
    "gpg": "none",
    "grpo_passk": "group",
    "reinforce_pp": "none",
    "gdpo": "group",
    "optimal_token_baseline": "none",
}
# no group baseline here: reinforce_pp has none, optimal_token_baseline's is per token (token_baseline.py)
RAW = ("reinforce_pp", "optimal_token_baseline")
# whitened over the batch's trained tokens after the estimator (and its scale)
WHITENED = ("reinforce_pp_baseline", "reinforce_pp", "gdpo")


@dataclass
class GroupAdvantages:
    advantages: Tensor  # [B] float64
    degenerate: Tensor  # [B] bool, member of a degenerate group
    num_groups: int
    degenerate_group_frac: Tensor  # scalar float64
    rewards: Tensor  # [B] float64, the components' weighted sum (the rewards as given for [B])
    scored: Tensor | None = None  # [B] bool: has a reward (skip_nan_components; None: all have)

    def scored_rewards(self) -> Tensor:
        """The rewards of the sequences that have one (the reward metrics read these)."""
        return self.rewards if self.scored is None else self.rewards[self.scored]


def _unbiased_std(cnt: Tensor, dev_sq_sum: Tensor) -> Tensor:
    return torch.where(cnt > 1, dev_sq_sum / (cnt - 1).clamp(min=1), torch.zeros_like(dev_sq_sum)).sqrt()


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    cfg: AdvantageConfig,
    weights: Tensor | None = None,
    *,
    penalty: Tensor | None = None,
    whiten: bool = True,
) -> GroupAdvantages:
    """Per-sequence advantages from rewards [B] or [B, K]. `weights` (per sequence, e.g.
    trained-token counts) are the whitening weights of reinforce_pp_baseline, reinforce_pp and
    gdpo and opo's baseline weights; None weighs every sequence equally. `penalty` ([B]
    float64, not with gdpo) is subtracted from the (weighted) rewards before the estimator;
    `whiten=False` leaves the whitening to the caller (`whiten_tokens`)."""
    parts = rewards.to(torch.float64)
    parts = parts[:, None] if parts.dim() == 1 else parts
    # skip_nan_components: a NaN component does not apply (as 0 in the weighted sum, TRL's
    # nansum; left out of gdpo's group statistics); a sequence without any is unscored: left
    # out of every statistic, advantage 0 (TRL's unscorable completions)
    applies: Tensor | None = None
    scored: Tensor | None = None
    if cfg.skip_nan_components:
        applies = ~torch.isnan(parts)
        if bool(applies.all()):  # (one sync; none NaN: the same bits as without the setting)
            applies = None
        else:
            parts = parts.masked_fill(~applies, 0.0)
            scored = applies.any(1)
            # (an unscored sequence weighs nothing: opo's baseline, the whitening)
            w = scored.to(torch.float64)
            weights = w if weights is None else weights.to(torch.float64) * w
    wk = cfg.reward_weights
    if wk is None and parts.shape[1] == 1:
        r = parts[:, 0]
    else:  # the weighted sum (1 each by default)
        w_k = torch.tensor(wk if wk is not None else [1.0] * parts.shape[1], dtype=torch.float64)
        r = parts @ w_k.to(parts.device)
    b = r.numel()
    uniq, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    g = uniq.numel()
    z = torch.zeros(g, dtype=torch.float64, device=r.device)
    cnt = counts.to(torch.float64)
    if use_segment_reduce(r.device):
        order = torch.argsort(inv, stable=True)
        offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))

        def group_sum(x: Tensor) -> Tensor:
            return segment_sum(x[order], offsets)
    else:

        def group_sum(x: Tensor) -> Tensor:
            return z.clone().index_add_(0, inv, x)

    def stats(x: Tensor, ok: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x - its group's mean, each group's unbiased std, max and min, whether it is
        degenerate, and its members; over the members where `ok` (the others: 0, no weight)."""
        c = cnt if ok is None else group_sum(ok.to(torch.float64))
        x_ok = x if ok is None else x.masked_fill(~ok, 0.0)  # (the others weigh nothing in the mean)
        dev = x - (group_sum(x_ok) / c.clamp(min=1))[inv]
        if ok is not None:
            dev = dev.masked_fill(~ok, 0.0)
        std = _unbiased_std(c, group_sum(dev * dev))
        hi = x if ok is None else x.masked_fill(~ok, -math.inf)
        lo = x if ok is None else x.masked_fill(~ok, math.inf)
        gmax = z.clone().scatter_reduce_(0, inv, hi, "amax", include_self=False)
        gmin = z.clone().scatter_reduce_(0, inv, lo, "amin", include_self=False)
        return dev, std, gmax, gmin, (c <= 1) | (gmax == gmin) | (std < cfg.min_group_std), c

    if cfg.estimator == "gdpo":
        assert penalty is None
        a, degenerate_g = _gdpo_sum(parts, applies, wk, inv, stats, cfg)
        return _finish(a, degenerate_g, inv, r, cfg, weights, whiten, scored)
    given = r  # (the rewards metrics report)
    if penalty is not None:
        r = r - penalty
        # an unscored sequence has no reward to move: it stays 0, out of every statistic
        if scored is not None:
            r = r.masked_fill(~scored, 0.0)
    dev, std_g, gmax, gmin, degenerate_g, c = stats(r, scored)

    a = r if cfg.estimator in RAW else dev
    if cfg.estimator == "rloo":
        a = a * (c / (c - 1).clamp(min=1))[inv]
    elif cfg.estimator == "opo":
        # the baseline is the group's mean weighted by trained tokens, mean_g + sum_g w (R - mean_g)
        # / sum_g w (a group without weight: the plain mean)
        w = torch.ones_like(r) if weights is None else weights.to(torch.float64)
        sw = group_sum(w)
        a = a - torch.where(sw > 0, group_sum(w * dev) / sw.clamp(min=1e-300), 0.0)[inv]
    elif cfg.estimator == "gpg":
        # GPG's alpha = B / #(R != 0) over the batch (an unscored sequence's R: 0, not counted)
        n_scored = b if scored is None else scored.sum()
        a = a * (n_scored / torch.count_nonzero(r).clamp(min=1).to(torch.float64))
    elif cfg.estimator == "grpo_passk":
        # Pass@k: the group's best member alone gets R_max - R_second (a tie at the top: 0 for all)
        top = r == gmax[inv]
        top = top if scored is None else top & scored
        alone = group_sum(top.to(torch.float64))[inv] == 1
        rest = r.masked_fill(top, -torch.inf)
        rest = rest if scored is None else rest.masked_fill(~scored, -torch.inf)
        second = z.clone().scatter_reduce_(0, inv, rest, "amax", include_self=False)
        a = torch.where(top & alone, (gmax - second)[inv], torch.zeros_like(r))
    scale = cfg.scale or DEFAULT_SCALE[cfg.estimator]
    if scale == "group":
        a = a / (std_g[inv] + cfg.eps)
    elif scale == "leave_one_out":  # (rloo only)
        loo = _leave_one_out_std(r, dev, c, gmax, gmin, inv, counts, group_sum, scored)
        a = torch.where((loo > 0) & (loo >= cfg.min_group_std), a / (loo + cfg.eps), a)
    elif scale == "batch":
        rs = r if scored is None else r[scored]
        bstd = rs.std() if rs.numel() > 1 else torch.zeros((), dtype=torch.float64, device=r.device)
        # a batch of one reward value: every group is degenerate (0), and reinforce_pp's R
        # whitens to 0 (not R / 0 at eps 0)
        same = gmax.amax() == gmin.amin() if g > 0 else torch.ones((), dtype=torch.bool, device=r.device)
        a = torch.where(same, a, a / (bstd + cfg.eps))
    return _finish(a, degenerate_g, inv, given, cfg, weights, whiten, scored)


def _leave_one_out_std(
    r: Tensor,
    dev: Tensor,
    c: Tensor,
    gmax: Tensor,
    gmin: Tensor,
    inv: Tensor,
    counts: Tensor,
    group_sum: Any,
    ok: Tensor | None,
) -> Tensor:
    """[B] the unbiased std of each member's others in its group (NeMo-RL's leave-one-out std),
    over the members where `ok`: the group's squared deviations less the member's share,
    S - dev^2 n / (n - 1), over n - 2; 0 with fewer than two others, and exactly 0 where the
    others are all equal (the member alone at the group's max or min, the rest at the other).
    Where the member's share is nearly all of S (one member far from close others: the
    difference loses its digits) the others' squares are summed again, pair by pair."""
    sel = torch.ones_like(r, dtype=torch.bool) if ok is None else ok
    n = c[inv]
    total = group_sum(dev * dev)[inv]
    rest = (total - dev * dev * n / (n - 1).clamp(min=1)).clamp(min=0)
    # where the difference keeps fewer than ~13 of float64's digits (at most one member per
    # group of 3 or more holds over 3/4 of S: the pairs are at most B)
    lost = sel & (n > 2) & (rest <= 1e-3 * total) & (total > 0)
    if bool(lost.any()):  # (one host sync, with this scale only)
        rest = rest.index_put((lost.nonzero()[:, 0],), _others_squares(r, lost, inv, counts, sel))
    std = torch.where(n > 2, rest / (n - 2).clamp(min=1), torch.zeros_like(r)).sqrt()
    at_max, at_min = (r == gmax[inv]) & sel, (r == gmin[inv]) & sel
    n_max, n_min = group_sum(at_max.to(torch.float64))[inv], group_sum(at_min.to(torch.float64))[inv]
    others_equal = (at_max & (n_max == 1) & (n_min == n - 1)) | (at_min & (n_min == 1) & (n_max == n - 1))
    return torch.where(others_equal | ~sel, torch.zeros_like(std), std)


def _others_squares(r: Tensor, which: Tensor, inv: Tensor, counts: Tensor, sel: Tensor) -> Tensor:
    """For each member where `which`, the squared deviations of its group's other members
    (where `sel`) from their own mean, summed over the pairs (member, other): [which.sum()]."""
    who = which.nonzero()[:, 0]
    order = torch.argsort(inv, stable=True)  # the members, group by group
    starts = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))[inv[who]]
    size = counts[inv[who]]
    owner = torch.repeat_interleave(torch.arange(who.numel(), device=r.device), size)
    first = torch.repeat_interleave(torch.cumsum(size, 0) - size, size)
    other = order[starts[owner] + torch.arange(owner.numel(), device=r.device) - first]
    keep = (other != who[owner]) & sel[other]
    owner, other = owner[keep], other[keep]  # (owner ascending: runs, one a member)
    z = torch.zeros(who.numel(), dtype=torch.float64, device=r.device)
    if use_segment_reduce(r.device):  # (CUDA's index_add_ adds float64 in no fixed order)
        runs = torch.nn.functional.pad(torch.cumsum(torch.bincount(owner, minlength=who.numel()), 0), (1, 0))

        def owner_sum(x: Tensor) -> Tensor:
            return segment_sum(x, runs)
    else:

        def owner_sum(x: Tensor) -> Tensor:
            return z.clone().index_add_(0, owner, x)

    mean = owner_sum(r[other]) / owner_sum(torch.ones_like(r[other])).clamp(min=1)
    return owner_sum((r[other] - mean[owner]) ** 2)


def _finish(
    a: Tensor,
    degenerate_g: Tensor,
    inv: Tensor,
    r: Tensor,
    cfg: AdvantageConfig,
    weights: Tensor | None,
    whiten: bool = True,
    scored: Tensor | None = None,
) -> GroupAdvantages:
    """The estimator's advantages `a` whitened when it whitens (and `whiten`), and 0 for the
    members of its degenerate groups (`degenerate_g`, per group), whose share is a metric,
    and for the sequences without a reward (`scored` False; `weights` already weigh them 0)."""
    degenerate = degenerate_g[inv]
    # no baseline here: a member of an all-equal group keeps its R (reinforce_pp whitens it)
    zeroed = torch.zeros_like(degenerate) if cfg.estimator in RAW else degenerate
    if scored is not None:
        zeroed = zeroed | ~scored
    if cfg.estimator in WHITENED and whiten:
        a = _whiten(torch.where(zeroed, torch.zeros_like(a), a), weights, cfg.eps)
    a = torch.where(zeroed, torch.zeros_like(a), a)
    g = degenerate_g.numel()
    frac = (
        degenerate_g.to(torch.float64).mean()
        if g > 0
        else torch.zeros((), dtype=torch.float64, device=r.device)
    )
    return GroupAdvantages(a, degenerate, g, frac, r, scored)


def _gdpo_sum(
    parts: Tensor,
    applies: Tensor | None,
    wk: tuple[float, ...] | None,
    inv: Tensor,
    stats: Any,
    cfg: AdvantageConfig,
) -> tuple[Tensor, Tensor]:
    """GDPO before its whitening: each component centred in its group (and divided by its
    group std + eps: scale group, the default), 0 in a group where it is degenerate and where
    it does not apply (`applies`, [B, K] bool; None: everywhere), weighted and summed; and
    the groups degenerate in every component."""
    a = torch.zeros(parts.shape[0], dtype=torch.float64, device=parts.device)
    degenerate_g: Tensor | None = None
    for k in range(parts.shape[1]):  # (the few reward components, not the sequences)
        dev, std, _, _, deg, _ = stats(parts[:, k], None if applies is None else applies[:, k])
        ak = dev / (std[inv] + cfg.eps) if (cfg.scale or "group") == "group" else dev
        ak = torch.where(deg[inv], torch.zeros_like(ak), ak)
        a = a + (ak if wk is None else wk[k] * ak)
        degenerate_g = deg if degenerate_g is None else degenerate_g & deg
    assert degenerate_g is not None
    return a, degenerate_g


def whiten_tokens(a: Tensor, trained: Tensor | None, eps: float) -> Tensor:
    """Per-token float64 advantages [N] whitened over the `trained` tokens ([N] bool; None:
    all), in place, as `_whiten` whitens per-sequence ones weighted by their trained tokens:
    the unbiased std, the mean taken about the first trained value (equal values whiten to 0
    exactly), 0 for all without spread, `a` as it was when the spread overflows."""
    sel = a if trained is None else a[trained]
    if sel.numel() < 2:
        return torch.zeros_like(a)
    c = sel[0]
    d = sel - c
    var_t, mu_t = d.var(), d.mean()  # (torch.var_mean: 5x slower on the CPU, 1M tokens)
    var = float(var_t)  # (one host sync)
    if not math.isfinite(var):  # (refused as overflow after, as _whiten leaves it)
        return a
    if var <= 0:
        return torch.zeros_like(a)
    return a.sub_(c + mu_t).div_(math.sqrt(var) + eps)


def _whiten(a: Tensor, weights: Tensor | None, eps: float) -> Tensor:
    """(a - mu) / (std + eps), mu and the unbiased std over the trained tokens (each sequence
    weighing `weights`, its trained tokens; None: 1). Degenerate members enter with the 0 they
    get (a group caught by min_group_std alone still has non-zero R - mean_g)."""
    w = torch.ones_like(a) if weights is None else weights.to(torch.float64)
    sw = w.sum()
    # shifted by one weighted sequence's value: when every weighted value is the same, mu
    # is exactly that value and the whitened advantages exactly 0 (not rounding noise / eps)
    c = a[torch.argmax((w > 0).to(torch.int8))] if a.numel() > 0 else torch.zeros_like(sw)
    mu = c + (w * (a - c)).sum() / sw.clamp(min=1e-300)
    var = torch.where(sw > 1, (w * (a - mu) ** 2).sum() / (sw - 1).clamp(min=1e-300), torch.zeros_like(sw))
    # no spread among the weighted values (all equal, or none weighted): they whiten to 0,
    # and so do the sequences without trained tokens, not to (a - mu) / eps
    white = torch.where(var > 0, (a - mu) / (var.sqrt() + eps), torch.zeros_like(a))
    # an inf advantage (a spread that underflows, eps = 0) makes mu and var NaN: kept, so
    # that it is refused as `overflow` as the other estimators' are, not whitened to 0
    return torch.where(torch.isfinite(var), white, a)
