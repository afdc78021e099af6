"""Policy objectives: per-token loss l, closed-form d l / d logp, gate weight, clip masks.

Inputs per token: `ratio` rho (r = exp(clamp(logp - old)), or the sequence ratio s_i for gspo
objectives), `dratio` = d rho / d logp (r where the log-ratio was not clamped, 0 where it was;
s_i for gspo objectives, whose s_{i,t} = sg[s_i] exp(logp - sg[logp])), advantage `a`, `logp`.

`grad_free` is the gradient of the same algorithm with the trust region removed (nothing
clipped, gate weight 1): -A d rho / d logp, and -A r for cispo. `gate` = grad / grad_free, the
factor by which the trust region scales each token's gradient (SAPO: 4p(1-p); hard clips: 1 or
0; gppo: bound / r on clipped tokens; cispo: clip(r) / r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from softgate.engine.config import Cispo, Gppo, Grpo, Gspo, GspoToken, Objective, Reinforce, Sapo


@dataclass
class PolicyTerms:
    loss: Tensor
    grad: Tensor
    grad_free: Tensor
    gate: Tensor
    clip: Tensor  # bool: the trust-region clip is active for this token
    clip_low: Tensor | None  # bool: A < 0 and rho < 1 - eps_low
    clip_high: Tensor | None  # bool: A > 0 and rho > 1 + eps_high
    dual: Tensor | None  # bool: A < 0 and rho > c


def policy_terms(obj: Objective, ratio: Tensor, dratio: Tensor, a: Tensor, logp: Tensor) -> PolicyTerms:
    one = torch.ones_like(ratio)
    if isinstance(obj, Sapo):
        tau = torch.where(a > 0, ratio.new_tensor(obj.tau_pos), ratio.new_tensor(obj.tau_neg))
        p = torch.sigmoid(tau * (ratio - 1))
        w = 4 * p * (1 - p)
        free = -a * dratio
        no = torch.zeros_like(ratio, dtype=torch.bool)
        return PolicyTerms(-(4 / tau) * p * a, w * free, free, w, no, None, None, None)
    if isinstance(obj, Reinforce):
        free = -a * dratio
        no = torch.zeros_like(ratio, dtype=torch.bool)
        return PolicyTerms(-ratio * a, free, free, one, no, None, None, None)
    if isinstance(obj, Cispo):
        lo, hi = 1 - obj.eps_low, 1 + obj.eps_high
        wgt = ratio.clamp(lo, hi)
        high = (a > 0) & (ratio > hi)
        low = (a < 0) & (ratio < lo)
        clip = (ratio < lo) | (ratio > hi)
        return PolicyTerms(-wgt * a * logp, -wgt * a, -ratio * a, wgt / ratio, clip, low, high, None)
    assert isinstance(obj, (Grpo, Gppo, Gspo, GspoToken)), obj
    lo, hi = 1 - obj.eps_low, 1 + obj.eps_high
    high = (a > 0) & (ratio > hi)
    low = (a < 0) & (ratio < lo)
    clip = high | low
    bound = torch.where(high, ratio.new_tensor(hi), ratio.new_tensor(lo))
    loss = -a * torch.where(clip, bound, ratio)
    free = -a * dratio
    dual = None
    if isinstance(obj, Grpo) and obj.dual_clip is not None:
        dual = (a < 0) & (ratio > obj.dual_clip)
        loss = torch.where(dual, -obj.dual_clip * a, loss)
        clip = clip | dual
    if isinstance(obj, Gppo):
        # clipped tokens keep the gradient of their bound: d/dlogp of r * sg[bound / r]
        grad = torch.where(clip, -a * bound * (dratio / ratio), free)
        gate = torch.where(clip, bound / ratio, one)
    else:
        grad = torch.where(clip, torch.zeros_like(free), free)
        gate = torch.where(clip, torch.zeros_like(one), one)
    return PolicyTerms(loss, grad, free, gate, clip, low, high, dual)
