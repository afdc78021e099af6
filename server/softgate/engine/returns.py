"""Per-token returns within each sequence: REINFORCE++'s discounted return (OpenRLHF's
get_cumulative_returns, verl's reinforce_plus_plus with gamma = AdvantageConfig.gamma), with
reward_kl's penalty at level token.

G_t = gamma^(T_i - t) A_i - beta sum_{u >= t} gamma^(u - t) k_u: each sequence's advantage
A_i is its reward at T_i, its last token of the mask as sent (its last token without a
mask: where OpenRLHF and verl put the outcome reward), each token's KL estimate k (0 off
the mask as sent) a reward of its own. Returns run through masked tokens, as OpenRLHF's do
(verl's restart there). Tokens after T_i (untrained, or a sequence without a sent token)
carry A_i undiscounted, so that gamma = 1 gives A_i at every token.

All in float64, and the same bits on every call: the host sums undiscounted returns from one
prefix sum over the batch (sequential) while its rounding stays within PREFIX_SUM_TOLERANCE of
every sequence's own scale; otherwise (a huge k in one sequence would take the digits of the
later ones), discounted returns, and any on a GPU (whose float cumsum is not bitwise
reproducible), by a doubling scan of elementwise multiply-adds within each sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softgate.engine.segments import Segments, host_shortcuts

F64 = torch.float64
# The host's one prefix sum over the batch stands for each sequence's own sums while its
# rounding, at most 2^-52 x (|k| summed up to the sequence's end) per token of the sequence,
# stays within this share of the sequence's own scale, max(|A_i|, beta x its summed |k|)
# (float32's resolution: a neighbour's k of 1e38, or of 4e5 beside returns of 1e-12, would
# take the digits; then the doubling scan)
PREFIX_SUM_TOLERANCE = 2.0**-24


def token_returns(
    a_seq: Tensor,
    seg: Segments,
    gamma: float,
    k: Tensor | None = None,
    beta: float = 0.0,
    sent: Tensor | None = None,
    abs_sums: Tensor | None = None,
) -> Tensor:
    """G_t at every token ([B] advantages, [N] KL estimates or None -> [N] float64); `sent`:
    the mask as sent ([N] bool; None: every token), which places each sequence's outcome;
    `abs_sums`: each sequence's summed |k| when the caller has them ([B]; None: summed here)."""
    if seg.num_tokens == 0:
        return torch.zeros(0, dtype=F64, device=a_seq.device)
    a_seq = a_seq.to(F64)
    kl = k is not None and beta != 0.0
    if kl and gamma == 1.0 and host_shortcuts(a_seq.device):
        assert k is not None
        if _prefix_sum_exact(a_seq, seg.sum(k.abs()) if abs_sums is None else abs_sums, beta, seg):
            # one prefix sum c: A_i - beta sum_{u >= t} k_u = A_i - beta E_i + beta (c_t - k_t),
            # E_i = c at the sequence's last token (an empty sequence's is never read)
            c = torch.cumsum(k, 0)
            out = seg.expand(a_seq - beta * c[(seg.offsets[1:] - 1).clamp(min=0)])
            return out.add_(c.sub_(k), alpha=beta)
    out = seg.expand(a_seq)
    if gamma != 1.0:
        out = out.mul_(torch.pow(gamma, _steps_to_outcome(seg, sent)))
    if not kl:
        return out
    assert k is not None
    return out.sub_(beta * discounted_sums(k, seg, gamma))


def _prefix_sum_exact(a_seq: Tensor, abs_sums: Tensor, beta: float, seg: Segments) -> bool:
    """Whether one prefix sum over the batch's k (`abs_sums`: each sequence's summed |k|) keeps
    every sequence's returns within PREFIX_SUM_TOLERANCE of its own scale (the two roundings
    of beta E_i beside A_i included; a sequence with A_i and every k 0 gets 0 exactly)."""
    upto = torch.cumsum(abs_sums, 0)  # the most |c| reaches by each sequence's end
    rounding = abs(beta) * 2.0**-52 * upto * (seg.lengths + 2).to(F64)
    scale = torch.maximum(a_seq.abs(), abs(beta) * abs_sums)
    return bool(((rounding <= PREFIX_SUM_TOLERANCE * scale) | ((abs_sums == 0) & (a_seq == 0))).all())


def discounted_sums(x: Tensor, seg: Segments, gamma: float) -> Tensor:
    """sum_{u >= t} gamma^(u - t) x_u within each token's sequence ([N] -> [N]) by a doubling
    scan: log2 of the longest sequence passes of elementwise multiply-adds."""
    out = x.clone()
    longest = int(seg.lengths.max()) if seg.num_seqs else 0  # (one host sync on a GPU)
    if longest <= 1:
        return out
    after = _tokens_after(seg)
    d = 1
    while d < longest:  # after it, out[t] sums [t, t + 2d) within t's sequence
        far = torch.where(after[:-d] >= d, out[d:], 0.0)  # (a copy: read before the add below)
        out[:-d].add_(far, alpha=gamma**d)
        d *= 2
    return out


def _tokens_after(seg: Segments) -> Tensor:
    """The number of tokens after each token in its sequence ([N] int64)."""
    ends = seg.expand(seg.offsets[1:])
    return ends.sub_(torch.arange(1, seg.num_tokens + 1, device=ends.device))


def _steps_to_outcome(seg: Segments, sent: Tensor | None) -> Tensor:
    """T_i - t at each token t of sequence i, T_i its last token of the mask as sent, 0 past
    it ([N] float64)."""
    pos = torch.arange(seg.num_tokens, dtype=F64, device=seg.offsets.device)
    if sent is None:
        last = seg.offsets[1:].to(F64) - 1
    else:  # (-1 for a sequence without a sent token: every step clamps to 0)
        last = seg.max(torch.where(sent, pos, -1.0)).clamp(min=-1.0)
    return seg.expand(last).sub_(pos).clamp_(min=0.0)
