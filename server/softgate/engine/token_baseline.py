"""The optimal token baseline (verl's `optimal_token_baseline` and `tir_optimal_token_baseline`;
Li et al. 2026, arXiv 2602.07078): a token's advantage is its return G_t less a baseline that
the tokens at the same position of its group's members share,

    B_p = sum_i G_p^i W_p^i / (sum_i W_p^i + eps),   W_t = sum_{u <= t} w_u,
    w_u = 1 - 2 pi_u + sum_pi_squared_u   (times v_u^2 under a mismatch correction),

pi_u = exp(old_logp_u) the old policy's probability of the token, sum_pi_squared_u the sum of
squared probabilities of its distribution over the vocabulary (the trainer's, from the logits),
v_u the mismatch weight the loss applies. w and W count trained tokens only; a w below 0 (a
sum_pi_squared rounded below pi^2) counts as 0. A token's position p is its index in its
sequence (`position="token"`, verl's optimal_token_baseline) or among its sequence's trained
tokens (`"trained"`, verl's tir_optimal_token_baseline, for multi-turn masks). A group's
members are its sequences with a trained token; in a group with fewer than two, the baseline
is 0 (A = G). `zero_tail` (verl's handle_zero_tail): a member with more trained tokens than
every other member of its group has baseline 0 from the second-longest member's count on.

Vectorised over the ragged batch: each group gets a table of as many positions as its longest
member (all tables together at most N entries), summed into by np.bincount on the host and by a
segmented reduction over the tokens sorted by entry on CUDA: the same bits on every call.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from softgate.engine.returns import discounted_sums
from softgate.engine.segments import Segments, host_shortcuts, segment_sum

F64 = torch.float64


def optimal_token_baseline(
    returns: Tensor,
    old: Tensor,
    sum_pi_squared: Tensor,
    member: Tensor,
    seg: Segments,
    group_ids: Tensor,
    position: str,
    zero_tail: bool,
    eps: float,
    is_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(advantages G - B [N] float64, 0 off `member`; [G] bool, the groups with fewer than two
    members) from the returns G [N], old log-probs and sum_pi_squared [N], `member` [N] bool (the
    trained tokens of the sequences with a reward) and the [B] group ids; `is_weight` [N]: v."""
    n = seg.num_tokens
    dev = returns.device
    w = torch.exp(old.to(F64)).mul_(-2.0).add_(1.0).add_(sum_pi_squared.to(F64)).clamp_(min=0.0)
    if is_weight is not None:
        w.mul_(is_weight.to(F64).square())
    w = torch.where(member, w, 0.0)
    big_w = _prefix_sums(w, seg)
    counts = seg.count(member)  # [B] trained tokens of each sequence
    _, inv = torch.unique(group_ids, return_inverse=True)
    g = int(inv.max()) + 1 if inv.numel() else 0
    has = counts > 0
    members = torch.zeros(g, dtype=torch.int64, device=dev).index_add_(0, inv, has.to(torch.int64))
    lone = members < 2
    if position == "token":
        pos = torch.arange(n, device=dev) - seg.expand(seg.offsets[:-1])
        size = seg.lengths.to(dev)
    else:
        c = torch.cumsum(member, 0)  # (int64)
        before = torch.cat([c.new_zeros(1), c])[seg.offsets[:-1]]
        pos = c.sub_(1).sub_(seg.expand(before))
        size = counts
    longest = torch.zeros(g, dtype=torch.int64, device=dev).scatter_reduce_(
        0, inv, torch.where(has, size, 0), "amax"
    )
    start = torch.cumsum(longest, 0).sub_(longest)  # each group's table in one of sum(longest)
    total = int(longest.sum())
    idx = member.nonzero()[:, 0]
    key = (seg.expand(start[inv]) + pos)[idx]
    gw = (returns * big_w)[idx]
    num = _table_sums(gw, key, total)
    den = _table_sums(big_w[idx], key, total)
    base = num[key] / (den[key] + eps)
    none = seg.expand(lone[inv])[idx]
    if zero_tail:
        top = torch.zeros(g, dtype=torch.int64, device=dev).scatter_reduce_(
            0, inv, torch.where(has, counts, 0), "amax"
        )
        at_top = has & (counts == top[inv])
        n_top = torch.zeros(g, dtype=torch.int64, device=dev).index_add_(0, inv, at_top.to(torch.int64))
        second = torch.zeros(g, dtype=torch.int64, device=dev).scatter_reduce_(
            0, inv, torch.where(has & ~at_top, counts, 0), "amax"
        )
        tail = at_top & (n_top[inv] == 1) & ~lone[inv]  # [B]: the member alone at its group's longest
        none = none | (seg.expand(tail)[idx] & (pos[idx] >= seg.expand(second[inv])[idx]))
    base = torch.where(none, 0.0, base)
    out = torch.zeros(n, dtype=F64, device=dev)
    out[idx] = returns[idx] - base
    return out, lone


def _prefix_sums(x: Tensor, seg: Segments) -> Tensor:
    """sum_{u <= t} x_u within each token's sequence ([N] float64 -> [N]): one prefix sum on the
    host, a sequence's total less its doubling-scan suffix sums elsewhere (a GPU's float cumsum
    is not bitwise reproducible)."""
    if host_shortcuts(x.device):
        c = torch.cumsum(x, 0)
        return c.sub_(seg.expand(torch.cat([c.new_zeros(1), c])[seg.offsets[:-1]]))
    return seg.expand(seg.sum(x)).sub_(discounted_sums(x, seg, 1.0)).add_(x)


def _table_sums(x: Tensor, key: Tensor, size: int) -> Tensor:
    """Sums of `x` by table entry `key` ([M] -> [size], 0 where no key), in a fixed order."""
    if host_shortcuts(x.device):
        return torch.from_numpy(np.bincount(key.numpy(), weights=x.numpy(), minlength=size))
    order = torch.argsort(key, stable=True)
    offsets = torch.nn.functional.pad(torch.cumsum(torch.bincount(key, minlength=size), 0), (1, 0))
    return segment_sum(x[order], offsets)
