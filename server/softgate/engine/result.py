"""What the engine returns for one batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class AdvantageResult:
    """Per-sequence advantages from rewards, and their metrics."""

    advantages: Tensor  # [B]: float64 for float64 rewards, else float32 (integer and half rewards too)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LossResult:
    """Loss, exact per-token gradient and everything a trainer or dashboard may ask for.

    `grad[k]` = d loss / d logp[k] for every token (0 for masked tokens). Per-token
    tensors are filled for every token unless `sample_stride` > 1 (`compute_loss`'s
    `sample_tokens`): then `ratio` and `gate_weight` hold tokens 0, k, 2k, ... only and
    `clip_mask` is empty; `grad`, `advantages` and `mask` are always whole. `metrics` uses
    the names of `softgate.engine.metrics.METRIC_NAMES`.
    """

    loss: float  # policy + kl, as float64
    policy_loss: float
    kl_loss: float
    grad: Tensor  # [N]
    # [N] per-token advantage A_{i,t}; advantages given per token, on the device and in the
    # compute dtype, come back as the caller's tensor itself, as `mask` does (not a copy)
    advantages: Tensor
    # [N] r (token ratio; the sequence ratio s_i for gspo, gspo_token, sapo_seq and cispo_seq;
    # gmpo's the token's own); 1 on masked tokens
    ratio: Tensor
    # [N] the factor by which the trust region scales the token's gradient, grad / grad with
    # nothing clipped: SAPO's w = 4p(1-p); 1 unclipped / 0 clipped for grpo, gspo, gmpo, clip_cov
    # (0 on its drawn tokens too); bound / r on clipped gppo tokens; clip(r) / r for cispo;
    # min(r, ratio_cap) / r for dppo (0 dropped); 1 for reinforce, kl_cov and dro (their
    # penalty is added, not a scaling); 0 on masked tokens
    gate_weight: Tensor
    # [N] bool, True where the trust region's clip is active (gradient removed, dppo's dropped
    # and clip_cov's drawn tokens with A != 0 too, or for gppo / cispo replaced by the bound's;
    # kl_cov's penalised tokens, any A); False on masked tokens
    clip_mask: Tensor
    # [N] bool, the loss mask as given (no mask given: a read-only broadcast True), less the
    # tokens rollout rejection took out (LossConfig.rejection)
    mask: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    # 1: every per-token tensor is whole; k > 1: ratio, gate_weight sampled, clip_mask empty
    sample_stride: int = 1
    # uint8 histogram codes of ratio and gate_weight, for the same tokens as those: sign *
    # slots + bucket (softgate.engine.buckets), what telemetry counts; empty when not computed
    # (compute_loss computes them only for a ratio of at most `sample_tokens` tokens)
    ratio_bucket: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    gate_bucket: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    # with the codes: the sums of ratio and gate_weight over those tokens per sign (buckets.BUCKET_SUMS)
    bucket_sums: tuple[float, ...] = ()
