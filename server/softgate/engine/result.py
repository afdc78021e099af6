"""What the engine returns for one batch."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class AdvantageResult:
    """Per-sequence advantages from rewards, and their metrics."""

    advantages: Tensor  # [B], the input dtype
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LossResult:
    """Loss, exact per-token gradient and everything a trainer or dashboard may ask for.

    `grad[k]` = d loss / d logp[k] for every token (0 for masked tokens). Per-token
    tensors are always filled (they are computed anyway); adapters send back only the ones
    a request asks for. `metrics` uses the names of `softgate.engine.metrics.METRIC_NAMES`.
    """

    loss: float  # policy + kl, as float64
    policy_loss: float
    kl_loss: float
    grad: Tensor  # [N]
    advantages: Tensor  # [N] per-token advantage A_{i,t}
    ratio: Tensor  # [N] r (token ratio; the sequence ratio s_i for gspo objectives)
    gate_weight: Tensor  # [N] SAPO's w = 4p(1-p); 1 for unclipped, 0 for clipped tokens of hard-clip objectives
    clip_mask: Tensor  # [N] bool, True where the trust region removed the token's gradient
    mask: Tensor  # [N] bool, the effective loss mask
    metrics: dict[str, float] = field(default_factory=dict)
