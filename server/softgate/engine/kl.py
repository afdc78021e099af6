"""KL penalty to the reference policy per token, x = ref - logp (clamped like the log-ratio).

k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1; d k / d logp = 1, -x, 1 - exp(x) where x was not
clamped, 0 where it was (the derivative of the clamp). The clamp keeps k3 finite in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kl_terms(estimator: str, x_raw: Tensor, clamp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(k, d k / d logp, clamped) per token from x_raw = ref - logp (0 on masked tokens)."""
    x = torch.clamp(x_raw, -clamp, clamp)
    clamped = x_raw.abs() > clamp
    if estimator == "k1":
        k, dk = -x, torch.ones_like(x)
    elif estimator == "k2":
        k, dk = 0.5 * x * x, -x
    elif estimator == "k3":
        ex = torch.exp(x)
        k, dk = ex - x - 1, 1 - ex
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}")
    return k, torch.where(clamped, torch.zeros_like(dk), dk), clamped
