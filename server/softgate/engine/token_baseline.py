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

from softgate.engine.chunked import CHUNK_TOKENS
from softgate.engine.errors import FieldViolation, InputError
from softgate.engine.segments import Segments, host_shortcuts, segment_sum

F64 = torch.float64


def optimal_token_baseline(
    returns: Tensor,
    energy: Tensor,
    member: Tensor,
    seg: Segments,
    group_ids: Tensor,
    position: str,
    zero_tail: bool,
    eps: float,
    is_weight: Tensor | None = None,
) -> Tensor:
    """The advantages G - B ([N] float64, 0 off `member`) from the returns G [N], the score
    energy 1 - 2 pi + sum_pi_squared [N] float64 (variance_proxy.score_energy), `member` [N]
    bool (the trained tokens of the sequences with a reward) and the [B] group ids;
    `is_weight` [N]: v (a W it makes infinite is refused as an `overflow` of `mismatch`)."""
    n = seg.num_tokens
    dev = returns.device
    # (the [N] float64 steps below work in place on few buffers: a call holds ~3 [N] tensors at
    # its peak, not ~9; every value the same bits)
    w = energy.clamp(min=0.0)
    weighs = member
    if is_weight is not None:  # (w 0 stays 0 whatever v: an infinite v would make it NaN)
        weighs = member & (w > 0)
        w.mul_(is_weight.to(F64, copy=True).square_())
    big_w = _prefix_sums_(w.masked_fill_(~weighs, 0.0), seg)
    del w, weighs
    if is_weight is not None and not bool(torch.isfinite(big_w).all()):
        why = "overflow: a mismatch weight squared makes optimal_token_baseline's W infinite in float64"
        raise InputError([FieldViolation("mismatch", why)])
    counts = seg.count(member)  # [B] trained tokens of each sequence
    _, inv = torch.unique(group_ids, return_inverse=True)
    g = int(inv.max()) + 1 if inv.numel() else 0

    def per_group(x: Tensor, how: str) -> Tensor:
        z = torch.zeros(g, dtype=torch.int64, device=dev)
        return z.index_add_(0, inv, x) if how == "sum" else z.scatter_reduce_(0, inv, x, "amax")

    has = counts > 0
    lone = per_group(has.to(torch.int64), "sum") < 2
    longest = per_group(torch.where(has, seg.lengths.to(dev) if position == "token" else counts, 0), "amax")
    total = int(longest.sum())
    if total == 0:  # (no member: every advantage 0)
        return torch.zeros(n, dtype=F64, device=dev)
    start = (torch.cumsum(longest, 0) - longest)[inv]  # [B]: each group's table in one of `total` entries
    # the position from which a sequence's baseline is 0: 0 in a lone group, the second-longest
    # member's count on the lone longest member's tail (zero_tail), else none
    cut = torch.where(lone[inv], 0, torch.iinfo(torch.int64).max - total)
    if zero_tail:
        top = per_group(torch.where(has, counts, 0), "amax")[inv]
        at_top = has & (counts == top)
        second = per_group(torch.where(has & ~at_top, counts, 0), "amax")[inv]
        tail = at_top & (per_group(at_top.to(torch.int64), "sum")[inv] == 1) & ~lone[inv]
        cut = torch.where(tail, second, cut)
    # each token's table entry, start + its position (a member's: within its group's table; the
    # others' weigh 0, clamped into the tables)
    if position == "token":
        key = torch.arange(n, device=dev).add_(seg.expand(start - seg.offsets[:-1]))
    else:
        c = torch.cumsum(member, 0)  # (int64)
        first = seg.offsets[:-1]
        before = torch.where(first > 0, c[(first - 1).clamp(min=0)], 0)  # members before each sequence
        key = c.add_(seg.expand(start - before - 1))
    key.clamp_(0, total - 1)
    # (now, beside 2 [N] tensors: after the gather its [N] int64 temporary would add to 3)
    zero = key >= seg.expand(start + cut)
    off = ~member
    wm = big_w.masked_fill_(off, 0.0)  # W on the members
    den = _table_sums(wm, key, total).add_(eps)
    gw = wm.mul_(returns).masked_fill_(off, 0.0)  # G W on the members (0 elsewhere, whatever G)
    table = _table_sums(gw, key, total)
    del big_w, wm, gw
    # (0 / 0 with eps 0, where no member has weight yet: no baseline there)
    base = table.div_(den).masked_fill_(~(den > 0), 0.0)[key]
    del key
    base.masked_fill_(zero, 0.0)  # no baseline from `cut` on: G - 0 is G, to the bit
    return torch.sub(returns, base, out=base).masked_fill_(off, 0.0)


def _prefix_sums_(x: Tensor, seg: Segments) -> Tensor:
    """sum_{u <= t} x_u within each token's sequence ([N] float64, in place; returns x) by a
    doubling scan: log2 of the longest sequence passes, each sum of the sequence's own values
    alone. (A cumsum over the batch less each sequence's start lost W's digits: W early in a
    sequence can be 1e-10 where the batch's running sum is 1e4; and a GPU's float cumsum is not
    reproducible.) On the host a pass goes CHUNK_TOKENS tokens at a time, from the batch's end
    back: its [N] copy is one slice's, and each token's sum the same bits."""
    n = seg.num_tokens
    longest = int(seg.lengths.max()) if seg.num_seqs else 0  # (one host sync on a GPU)
    if longest <= 1:
        return x
    # each token's index in its sequence (int32 where it fits: half the bytes)
    idx = torch.int32 if n < 2**31 else torch.int64
    pos = torch.arange(n, dtype=idx, device=x.device).sub_(seg.expand(seg.offsets[:-1].to(idx)))
    step = CHUNK_TOKENS if host_shortcuts(x.device) else n
    d = 1
    while d < longest:  # after it, x[t] sums (t - 2d, t] within t's sequence
        # a slice reads the d tokens before it, which no slice after it has changed yet
        for e in range(n, d, -step):
            s = max(e - step, d)
            near = torch.where(pos[s:e] >= d, x[s - d : e - d], 0.0)  # (a copy: read before the add)
            x[s:e].add_(near)
        d *= 2
    return x


def _table_sums(x: Tensor, key: Tensor, size: int) -> Tensor:
    """Sums of `x` by table entry `key` ([M] -> [size], 0 where no key), in a fixed order."""
    if host_shortcuts(x.device):
        return torch.from_numpy(np.bincount(key.numpy(), weights=x.numpy(), minlength=size))
    order = torch.argsort(key, stable=True)
    offsets = torch.nn.functional.pad(torch.cumsum(torch.bincount(key, minlength=size), 0), (1, 0))
    return segment_sum(x[order], offsets)
