"""verl's gradient-variance proxy (`compute_variance_proxy_metrics`), from each token's score
energy

    w_t = 1 - 2 pi_t + sum_pi_squared_t = ||e_{y_t} - pi||^2,

the squared norm of the gradient of log pi(y_t) with respect to the logits, pi_t = exp(old_logp)
the token's probability. Per sequence i, over its trained tokens: W_i = sum_t w_t v_t^2 (v the
mismatch weight the loss applies, 1 without a correction), A_i the mean advantage and rho_i the
mean of v. Over the batch's B sequences (empty ones included, with W = A = 0):

    variance_proxy_w          = mean_i W_i                             (verl's expected_w)
    variance_proxy_a_squared  = mean_i A_i^2                           (expected_a_squared)
    variance_proxy_total_power = mean_i rho_i^2 A_i^2 max(W'_i, 0)     (proxy2_total_power)

W'_i = sum_t w_t min(1, v_t^2 / 1e-10), verl's W recovered from the weighted one (so a token
of v = 0 counts 0); W' = W without a correction. total_power estimates E||g_i||^2, the
per-sequence gradient's squared norm through the logits; with the step's gradient norm ||g||
a trainer gets verl's pure-noise proxy (total_power - ||g||^2) / (B - 1). A value past
float64's range (advantages near 1e200) reads as the largest float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softgate.engine.segments import Segments

F64 = torch.float64

# verl's floor under v^2 when it divides the weighted W back (rollout_is_weights**2 clamped)
V2_FLOOR = 1e-10

# the metrics `variance_proxy` returns, in its order
NAMES = ("variance_proxy_w", "variance_proxy_a_squared", "variance_proxy_total_power")


def score_energy(old: Tensor, sum_pi_squared: Tensor) -> Tensor:
    """w = 1 - 2 exp(old) + sum_pi_squared per token ([N] float64): ||e_y - pi||^2, >= 0 but
    for rounding (sum_pi_squared may fall below pi^2 by its tolerance)."""
    return torch.exp(old.to(F64)).mul_(-2.0).add_(1.0).add_(sum_pi_squared.to(F64))


def variance_proxy(
    w: Tensor,
    adv: Tensor,
    adv_per_token: bool,
    trained: Tensor,
    seg: Segments,
    counts: Tensor,
    v: Tensor | None = None,
) -> Tensor:
    """The metrics NAMES (float64 [3]) from the score energy w [N], the advantages
    ([N] with `adv_per_token`, else [B]), the trained tokens [N] bool, their count per
    sequence [B] and the applied mismatch weights v [N] (None: no correction)."""
    b = seg.num_seqs
    if b == 0:
        return torch.zeros(3, dtype=F64, device=w.device)
    # (each [N] float64 term is one buffer, filled in place and summed before the next: a call
    # holds two at most)
    off = ~trained
    n = counts.to(F64).clamp(min=1.0)  # (a sequence without trained tokens sums 0)
    if adv_per_token:
        a = seg.sum(adv.to(F64, copy=True).masked_fill_(off, 0.0)) / n
    else:
        a = torch.where(counts > 0, adv.to(F64), 0.0)
    a2 = a.square()
    if v is None:
        big_w = seg.sum(w.masked_fill(off, 0.0))
        power = a2 * big_w.clamp(min=0.0)
    else:
        v2 = v.to(F64, copy=True).square_()
        # (a rejected token's own v may be inf, seq_mask's: 0 * inf there would make W NaN)
        big_w = seg.sum(torch.mul(w, v2).masked_fill_(off, 0.0))
        unweighted = seg.sum(v2.div_(V2_FLOOR).clamp_(max=1.0).mul_(w.masked_fill(off, 0.0)))
        del v2
        rho = seg.sum(v.to(F64, copy=True).masked_fill_(off, 0.0)) / n
        power = rho.square() * a2 * unweighted.clamp(min=0.0)
    # an inf (advantages of 1e200 squared) becomes float64's largest value here, where
    # to_floats would make it 0; a term 0 * inf is a sequence with no gradient (v = 0): 0
    out = torch.stack([big_w.mean(), a2.mean(), torch.where(power.isnan(), 0.0, power).mean()])
    return out.nan_to_num(nan=0.0)
