"""A KL penalty in the reward (LossConfig.reward_kl): verl's use_kl_in_reward, OpenRLHF's
init_kl_coef (REINFORCE++'s default).

Each token of the mask as sent carries the penalty beta * k, k an estimator of x = ref - old
(kl.kl_terms' value: k1 = -x, k2 = x^2 / 2, k3 = exp(x) - 1 - x with x clamped from above
at log_ratio_clamp, abs = |x|; then clamped to [-c, c], c = value_clamp, when it is set),
computed in float64 from the policy that sampled (old_logp, or logp on-policy): a constant of
the loss, so the gradient is the policy term's alone.

- level sequence: each reward less beta times its sequence's KL sum, before the estimator
  (verl, whose outcome estimators sum the token-level rewards: R - beta sum_t k_t);
- level token: each token's advantage less beta times the KL from that token to its
  sequence's end, A_t = A_i - beta sum_{u >= t} gamma^(u - t) k_u (returns.py), before the
  estimator's whitening (REINFORCE++'s return; OpenRLHF's for every estimator);
- level immediate: each token's advantage less beta times its own KL, A_t = A_i - beta k_t,
  before the whitening (NeMo-RL's REINFORCE++, slime's reinforce_plus_plus_baseline).

beta times a sequence's summed |k| must stay within validation.MAX_ABS_REWARD, as rewards do
(`check_bounded`): past it the group statistics' float64 squares overflow into silent zeros.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from softgate.engine.config import RewardKLConfig
from softgate.engine.errors import FieldViolation, InputError
from softgate.engine.kl import kl_terms
from softgate.engine.segments import Segments
from softgate.engine.validation import MAX_ABS_REWARD

F64 = torch.float64


def token_kl(rk: RewardKLConfig, old: Tensor, ref: Tensor, sent: Tensor | None, clamp: float) -> Tensor:
    """k per token [N] float64, 0 off the mask as sent (`sent`, [N] bool; None: every token)."""
    x = ref.to(F64) - old  # (old promoted in the same pass)
    # k1, k2, abs: kl_terms' values written in place here, without the gradient and clamp flags
    # it also builds (3.9 -> 1.6 ms per 1M tokens); k3 keeps its series and clamp from there
    if rk.estimator == "k1":
        k = x.neg_()
    elif rk.estimator == "k2":
        k = x.square_().mul_(0.5)
    elif rk.estimator == "abs":
        k = x.abs_()
    else:
        k, _, _ = kl_terms(rk.estimator, x, torch.tensor(clamp, dtype=F64, device=x.device))
    if rk.value_clamp is not None:
        k = k.clamp_(-rk.value_clamp, rk.value_clamp)
    return k if sent is None else k.masked_fill_(~sent, 0.0)  # (a masked token's garbage, NaN too)


def sequence_sums(rk: RewardKLConfig, k: Tensor, seg: Segments) -> tuple[Tensor, Tensor]:
    """Each sequence's sum of k, and of |k| (the same sums for the estimators >= 0: all but k1)."""
    total = seg.sum(k)
    return total, seg.sum(k.abs()) if rk.estimator == "k1" else total


def check_bounded(beta: float, abs_sums: Tensor) -> None:
    """InputError (`overflow`, on reward_kl.beta) when beta times some sequence's summed |k|, the
    most its reward or a token's return can move, is not finite or beyond MAX_ABS_REWARD."""
    if abs_sums.numel() == 0:
        return
    moved = beta * abs_sums
    worst = float(moved.max())  # (one host sync; NaN: 0 x an infinite k, never from finite inputs)
    if worst <= MAX_ABS_REWARD:
        return
    i = int(torch.argmax(torch.nan_to_num(moved, nan=math.inf)))
    why = (
        f"overflow: beta times sequence {i}'s KL is {float(moved[i]):.3g}, beyond {MAX_ABS_REWARD:g} (as a "
        "reward may not be); ref_logp is too far from old_logp for this beta"
    )
    raise InputError([FieldViolation("reward_kl.beta", why)])


def sequence_kl_mean(sums: Tensor, sent_counts: Tensor) -> Tensor:
    """verl's actor/reward_kl_penalty: the mean over sequences of each one's mean k over its
    tokens as sent (0 for one without any); 0 for no sequence."""
    if sums.numel() == 0:
        return torch.zeros((), dtype=F64, device=sums.device)
    means = sums / sent_counts.clamp(min=1).to(F64)
    mean = means.mean()
    # (a sum past float64's range: the mean of each over B, which cannot overflow)
    return torch.where(torch.isfinite(mean), mean, (means / means.numel()).sum())
