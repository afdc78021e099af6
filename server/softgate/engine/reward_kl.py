"""A KL penalty in the reward (LossConfig.reward_kl): verl's use_kl_in_reward, OpenRLHF's
init_kl_coef (REINFORCE++'s default).

Each token of the mask as sent carries the penalty beta * k, k an estimator of x = ref - old
(kl.kl_terms' value: k1 = -x, k2 = x^2 / 2, k3 = exp(x) - 1 - x with x clamped from above
at log_ratio_clamp, abs = |x|), computed in float64 from the policy that sampled (old_logp, or
logp on-policy): a constant of the loss, so the gradient is the policy term's alone.

- level sequence: each reward less beta times its sequence's KL sum, before the estimator
  (verl, whose outcome estimators sum the token-level rewards: R - beta sum_t k_t);
- level token: each token's advantage less beta times the KL from that token to its
  sequence's end, A_t = A_i - beta sum_{u >= t} k_u, before the estimator's whitening
  (REINFORCE++'s return with gamma 1; OpenRLHF's for every estimator). Returns run through
  masked tokens (their k is 0), as OpenRLHF's do; verl's REINFORCE++ restarts them there.

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
from softgate.engine.segments import Segments, host_shortcuts
from softgate.engine.validation import MAX_ABS_REWARD

F64 = torch.float64


def token_kl(rk: RewardKLConfig, old: Tensor, ref: Tensor, sent: Tensor, clamp: float) -> Tensor:
    """k per token [N] float64, 0 off the mask as sent (`sent`, [N] bool)."""
    x = torch.where(sent, ref.to(F64) - old.to(F64), torch.zeros((), dtype=F64, device=old.device))
    k, _, _ = kl_terms(rk.estimator, x, torch.tensor(clamp, dtype=F64, device=old.device))
    return torch.where(sent, k, torch.zeros_like(k))


def check_bounded(rk: RewardKLConfig, k: Tensor, seg: Segments) -> None:
    """InputError (`overflow`, on reward_kl.beta) when beta times some sequence's summed |k|, the
    most its reward or a token's return can move, is not finite or beyond MAX_ABS_REWARD."""
    if seg.num_seqs == 0:
        return
    moved = rk.beta * seg.sum(k.abs())
    worst = float(moved.max())  # (one host sync; NaN: 0 x an infinite k, never from finite inputs)
    if worst <= MAX_ABS_REWARD:
        return
    i = int(torch.argmax(torch.nan_to_num(moved, nan=math.inf)))
    why = (
        f"overflow: beta times sequence {i}'s KL is {float(moved[i]):.3g}, beyond {MAX_ABS_REWARD:g} (as a "
        "reward may not be); ref_logp is too far from old_logp for this beta"
    )
    raise InputError([FieldViolation("reward_kl.beta", why)])


def returns_to_go(k: Tensor, seg: Segments) -> Tensor:
    """sum_{u >= t} k_u within each token's sequence ([N] -> [N]). On the host one prefix sum
    (sequential, so the same bits on every call); elsewhere a doubling scan of elementwise adds
    within each sequence, as a GPU's float cumsum is not bitwise reproducible."""
    if host_shortcuts(k.device):
        before = torch.nn.functional.pad(torch.cumsum(k, 0), (1, 0))  # before[t]: sum of k_u, u < t
        end = before[seg.offsets[1:]]  # each sequence's prefix sum at its end
        return seg.expand(end) - before[:-1]
    ids = seg.ids
    longest = int(seg.lengths.max()) if seg.num_seqs else 0  # (one host sync)
    out, d = k, 1
    while d < longest:  # after it, out[t] sums k over [t, t + 2d) within t's sequence
        same = ids[d:] == ids[:-d]
        out = out + torch.nn.functional.pad(torch.where(same, out[d:], torch.zeros_like(out[d:])), (0, d))
        d *= 2
    return out


def sequence_kl_mean(k: Tensor, seg: Segments, sent_counts: Tensor) -> Tensor:
    """verl's actor/reward_kl_penalty: the mean over sequences of each one's mean k over its
    tokens as sent (0 for one without any); 0 for no sequence."""
    if seg.num_seqs == 0:
        return torch.zeros((), dtype=F64, device=k.device)
    return (seg.sum(k) / sent_counts.clamp(min=1).to(F64)).mean()
