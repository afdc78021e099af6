"""KL penalty to the reference policy per token, x = ref - logp (SPEC: k1, k2, k3).

k1_st, k3_st and abs_st are straight-through (verl's "k1+", "k3+", "abs+"): k1's, k3's or
abs's value, k2's gradient -x, the gradient whose expectation is the KL's (k1's and k3's values
are unbiased estimates of the KL, their gradients are not; J. Schulman, "Approximating KL
divergence").

A weight w (KLConfig.weight) makes the term w k with w's own gradient, w (k + d k / d logp),
w the token's ratio to old (`ratio`), to the sampler (`sampler_ratio`), each exp(clamp(logp -
q, +-log_ratio_clamp)) with derivative w also past the clamp, or 1 (`score`, exp(logp -
sg[logp])). k3_is is k3 with the ratio: DeepSeek-V3.2's unbiased KL estimate for tokens
sampled from the old policy, TRL's `use_bias_correction_kl`. For k3, k + d k / d logp = -x:
k2's gradient, weighted (k3's value clamped, its gradient not by x; the exact derivative of a
clamped w k3 is w k3 itself past the clamp, e^20 - 21 at w = 1, a push of logp further away).

k3_is_seq is k3 weighted by its sequence's ratio s_i = exp(clamp(the mean over the sequence's
trained tokens of logp - old)), s_i's gradient included (TRL's `use_bias_correction_kl` with
importance_sampling_level="sequence"): per token s_i k3 with gradient s_i d k3 / d logp, plus
s_i's own, which spreads over the sequence, beta s_i / |y_i| sum_u w_u k3_u at each trained
token (w the KL term's aggregation weight); the kernel adds that one from the sequence's sum,
computed before it (sequence_kl). Past the clamp s_i keeps the derivative s_i, as GSPO's does,
and k3's x (clamped from above, as k3's) keeps k3's derivative there, 1 - exp(clamp).

k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1, abs = |x| (verl's); d k / d logp = 1, -x,
1 - exp(x), -sign(x) (0 at x = 0, autograd's choice). Only k3 clamps x (k3_st's and k3_is's
values too, not their gradients), and only from above, at
log_ratio_clamp (so exp(x) stays finite in float32; its gradient is 0 where it clamped, the
clamp's derivative). Below,
exp(x) only underflows to 0: a token far more likely under the policy than under the reference
keeps k3's full pull (gradient ~1), as k1 and k2 keep theirs for every finite x (as TRL's and
verl's k1 / k2 do).

A value bound c (KLConfig.value_clamp; verl's low_var_kl clamps k3 to [-10, 10], OpenRLHF
every estimator) clamps k, or a weighted w k, to [-c, c] with gradient 0 where |k| > c
(torch.clamp's: the bound itself keeps it); the straight-through estimators clamp their value
only, their gradient stays k2's. Such a token counts as clamped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from softgate.engine.config import KLConfig
from softgate.engine.segments import Segments

K3_SERIES_BELOW = 0.1  # |x| under which k3 is its series
_K3_SERIES = tuple(1 / math.factorial(n) for n in range(2, 9))  # exp(x) - 1 - x = sum x^n / n!


def kernel_kl(kl: KLConfig | None) -> tuple[str, str] | None:
    """The kernel's KL, (estimator, weight); k3_is as ("k3", "ratio"), the same compiled kernel."""
    if kl is None:
        return None
    return ("k3", "ratio") if kl.estimator == "k3_is" else (kl.estimator, kl.weight)


def kl_terms(
    estimator: str,
    x_raw: Tensor,
    clamp: Tensor,
    weight: Tensor | float | None = None,
    cap: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(k, d k / d logp, clamped) per token from x_raw = ref - logp (0 on masked tokens);
    `weight`: w per token (or 1.0 for all) of a weighted k1, k2, k3 or abs, w k with w's
    gradient (k3_is comes as k3 with its ratio: kernel_kl), or k3_is_seq's sequence ratio s_i at each token
    (d k / d logp: the token's own part, without s_i's gradient); `cap`: the value bound c on
    k or w k (not with k3_is_seq)."""
    if cap is not None:
        k, dk, clamped = kl_terms(estimator, x_raw, clamp, weight)
        over = k.abs() > cap
        if not estimator.endswith("_st"):
            dk = torch.where(over, torch.zeros_like(dk), dk)
        return k.clamp(-cap, cap), dk, clamped | over
    if estimator == "k3_is_seq":
        assert weight is not None
        k, dk, clamped = kl_terms("k3", x_raw, clamp)
        # past the clamp k3's derivative at the clamped x, not the clamp's 0: it still offsets
        # s_i's share (a one-token sequence: -min(x, clamp) s_i, where 0 would leave +k3 s_i,
        # a push further from the reference)
        dk = torch.where(clamped, 1 - torch.exp(clamp), dk)
        return weight * k, weight * dk, clamped
    if weight is not None:  # w k with w's own gradient: w (k + dk), k3's -x (also past its clamp)
        k, dk, clamped = kl_terms(estimator, x_raw, clamp)
        return weight * k, weight * (-x_raw if estimator == "k3" else k + dk), clamped
    if estimator.endswith("_st"):  # the value of k1 / k3 / abs, the gradient of k2 (never clamped)
        k, _, clamped = kl_terms(estimator.removesuffix("_st"), x_raw, clamp)
        return k, -x_raw, clamped
    if estimator == "k1":
        return -x_raw, torch.ones_like(x_raw), torch.zeros_like(x_raw, dtype=torch.bool)
    if estimator == "k2":
        return 0.5 * x_raw * x_raw, -x_raw, torch.zeros_like(x_raw, dtype=torch.bool)
    if estimator == "abs":  # (sign(0) = 0: autograd's subgradient of |x| at 0)
        return x_raw.abs(), -torch.sign(x_raw), torch.zeros_like(x_raw, dtype=torch.bool)
    if estimator != "k3":
        raise ValueError(f"unknown KL estimator {estimator!r}")
    x = torch.clamp(x_raw, max=clamp)
    clamped = x_raw > clamp
    # near 0 (a policy close to its reference), exp(x) - x - 1 cancels: float32 gave k3 of
    # x = 1e-4 as -2e-10 instead of 5e-9. There its Taylor series (to x^8: 6e-13 relative at
    # |x| = 0.1), not expm1, which inductor's CPU code computes as exp(x) - 1.
    p = x * _K3_SERIES[-1] + _K3_SERIES[-2]
    for c in reversed(_K3_SERIES[:-2]):  # (Horner, over the 7 coefficients: no loop over tokens)
        p = p * x + c
    small = x.abs() < K3_SERIES_BELOW
    ex = torch.exp(x)
    k = torch.where(small, x * x * p, ex - x - 1)
    dk = torch.where(small, -(x + k), 1 - ex)  # (1 - exp(x) = -(x + k): exact near 0 only)
    return k, torch.where(clamped, torch.zeros_like(k), dk), clamped


def sequence_kl(
    x_raw: Tensor,
    d_raw: Tensor,
    m: Tensor | None,
    seg: Segments,
    trained: Tensor,
    weight: Tensor,
    clamp: float,
) -> tuple[Tensor, Tensor]:
    """k3_is_seq's per-sequence inputs ([B] each): s_i = exp(clamp(mean over the trained tokens
    of d_raw = logp - old)), and the gradient s_i's own derivative adds at each trained token,
    s_i / |y_i| sum_u w_u k3_u (`weight`: the KL term's aggregation weight, [B] or 0-d; `m`
    the mask, None: every token trained). k3's sum is expm1(x) - x in float64 (x clamped from
    above as k3's): one pass, where the kernel's series (eager, a pass per term) took 3x longer."""
    if m is not None:
        x_raw, d_raw = torch.where(m, x_raw, 0.0), torch.where(m, d_raw, 0.0)
    n = trained.clamp(min=1).to(torch.float64)
    s = torch.exp((seg.sum(d_raw.to(torch.float64)) / n).clamp(-clamp, clamp))
    x = x_raw.to(torch.float64).clamp(max=clamp)
    k_sum = seg.sum(torch.expm1(x) - x)
    dt = x_raw.dtype
    return s.to(dt), (s * weight.to(torch.float64) * k_sum / n).to(dt)
