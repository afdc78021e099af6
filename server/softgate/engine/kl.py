"""KL penalty to the reference policy per token, x = ref - logp (SPEC: k1, k2, k3).

k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1; d k / d logp = 1, -x, 1 - exp(x). Only k3 clamps
x, and only from above, at log_ratio_clamp (so exp(x) stays finite in float32; its gradient is
0 where it clamped, the clamp's derivative). Below, exp(x) only underflows to 0: a token far
more likely under the policy than under the reference keeps k3's full pull (gradient ~1), as
k1 and k2 keep theirs for every finite x (as TRL's and verl's k1 / k2 do).
"""

from __future__ import annotations

import torch
from torch import Tensor


def kl_terms(estimator: str, x_raw: Tensor, clamp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(k, d k / d logp, clamped) per token from x_raw = ref - logp (0 on masked tokens)."""
    if estimator == "k1":
        return -x_raw, torch.ones_like(x_raw), torch.zeros_like(x_raw, dtype=torch.bool)
    if estimator == "k2":
        return 0.5 * x_raw * x_raw, -x_raw, torch.zeros_like(x_raw, dtype=torch.bool)
    if estimator != "k3":
        raise ValueError(f"unknown KL estimator {estimator!r}")
    x = torch.clamp(x_raw, max=clamp)
    clamped = x_raw > clamp
    ex = torch.exp(x)
    return ex - x - 1, torch.where(clamped, torch.zeros_like(ex), 1 - ex), clamped
