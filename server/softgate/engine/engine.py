"""Engine: the device-bound entry point every adapter calls."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import torch
from torch import Tensor

from softgate.engine.advantages import group_advantages
from softgate.engine.batch import Batch
from softgate.engine.config import (
    OBJECTIVES,
    AdvantageConfig,
    AggregationConfig,
    KLConfig,
    LossConfig,
    MismatchConfig,
)
from softgate.engine.errors import FieldViolation, InputError
from softgate.engine.kernel import token_terms
from softgate.engine.loss import TokenTerms, compute_loss
from softgate.engine.result import AdvantageResult, LossResult
from softgate.engine.validation import _INTS, _float_tensor, check

log = logging.getLogger(__name__)


class Engine:
    """Computes advantages and losses on one device (CUDA when present, else CPU).

    Inputs may live on any device; they are moved to the engine's device and results stay
    there (adapters call `.cpu()` on what they send back).

    `compile=True` runs the per-token kernel (`loss.token_terms`) through
    torch.compile(dynamic=True): one fused loop instead of ~60 separate passes over the tokens,
    the same code as the eager path, equal numbers up to float rounding (5-8x faster than
    eager on CPU at 16M tokens, see bench/RESULTS.md). Each distinct configuration shape
    (objective kind, KL / mismatch on or off, advantage level) compiles once per process:
    0.3-45 s on 2 CPU cores depending on the inductor disk cache; `warmup()` does the default
    paths ahead. `compile=None` (default): on for CUDA, off for CPU (the warm-up per
    configuration is too slow for a CPU service's first requests and for test suites); the
    environment variable SOFTGATE_ENGINE_COMPILE=1 / 0 overrides it. If compilation fails
    the engine logs it, falls back to eager and keeps serving. Eager calls may run from
    several threads at once; compiled calls are serialised by a lock.
    """

    def __init__(self, device: str | torch.device | None = None, compile: bool | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if compile is None:
            env = os.environ.get("SOFTGATE_ENGINE_COMPILE", "").strip().lower()
            compile = env in ("1", "true", "yes") if env else self.device.type == "cuda"
        self.compile = bool(compile)
        self._kernel: TokenTerms | None = None
        self._lock = threading.Lock()
        if self.compile:
            self._kernel = torch.compile(token_terms, dynamic=True)

    def _to_device(self, batch: Batch) -> Batch:
        moved = {
            f.name: v.to(self.device)
            for f in dataclasses.fields(batch)
            if isinstance(v := getattr(batch, f.name), Tensor)
        }
        return dataclasses.replace(batch, **moved)  # type: ignore[arg-type]

    def loss(self, batch: Batch, config: LossConfig) -> LossResult:
        """Validate, move to the device, compute loss + exact per-token gradient + metrics."""
        check(batch, config)
        batch = self._to_device(batch)
        if self._kernel is not None:
            try:
                # dynamo's compile step is not safe to enter from several threads at once;
                # compiled calls are serialised (each already uses every core / the GPU)
                with self._lock:
                    return compute_loss(batch, config, validate=False, kernel=self._kernel)
            except InputError:
                raise
            except Exception as exc:  # a compiler failure must not take the service down
                log.warning("compiled engine kernel failed (%s); falling back to eager", exc)
                self._kernel = None
        return compute_loss(batch, config, validate=False)

    def advantages(self, rewards: Tensor, group_ids: Tensor, config: AdvantageConfig) -> AdvantageResult:
        """Per-sequence advantages from rewards and group ids (reinforce_pp_baseline whitens
        over sequences here, each weighing 1; in `loss` it whitens over trained tokens)."""
        v: list[FieldViolation] = []
        ok = _float_tensor(v, "rewards", rewards, None, allow_int=True)
        if not isinstance(group_ids, Tensor) or group_ids.dtype not in _INTS or group_ids.dim() != 1:
            v.append(FieldViolation("group_ids", "bad_dtype: group_ids must be a 1-D integer tensor"))
        elif ok and group_ids.numel() != rewards.numel():
            v.append(
                FieldViolation(
                    "group_ids", f"length_mismatch: length {group_ids.numel()}, expected {rewards.numel()}"
                )
            )
        from softgate.engine.validation import validate_config

        v += validate_config(LossConfig(advantages=config))
        if v:
            raise InputError(v)
        ga = group_advantages(rewards.to(self.device), group_ids.to(self.device), config)
        dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
        adv = ga.advantages.to(dt)
        if not bool(torch.isfinite(adv).all()):
            i = int(torch.nonzero(~torch.isfinite(adv))[0, 0])
            raise InputError(
                [
                    FieldViolation(
                        "rewards", f"overflow: advantage not finite in {str(dt).replace('torch.', '')}", i
                    )
                ]
            )
        r = rewards.to(self.device, torch.float64)
        metrics = {
            "num_groups": float(ga.num_groups),
            "degenerate_group_frac": float(ga.degenerate_group_frac),
            "adv_mean": float(ga.advantages.mean()) if r.numel() else 0.0,
            "adv_std": float(ga.advantages.std(correction=0)) if r.numel() else 0.0,
            "reward_mean": float(r.mean()) if r.numel() else 0.0,
            "reward_std": float(r.std(correction=0)) if r.numel() else 0.0,
        }
        return AdvantageResult(adv, metrics)

    def warmup(self) -> None:
        """Run one small batch through every objective (and the KL, mismatch and aggregation
        paths) so the first request is fast."""
        g = torch.Generator().manual_seed(0)
        lengths = torch.tensor([3, 0, 5, 2])
        n = int(lengths.sum())
        logp = -torch.rand(n, generator=g) - 0.1
        batch = Batch(
            logp=logp,
            offsets=Batch.offsets_from_lengths(lengths),
            old_logp=logp + 0.05 * torch.randn(n, generator=g),
            ref_logp=logp - 0.1,
            rollout_logp=logp + 0.01,
            rewards=torch.tensor([1.0, 0.0, 0.5, 1.0]),
            group_ids=torch.tensor([0, 0, 1, 1]),
        )
        modes = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")
        for i, cls in enumerate(OBJECTIVES.values()):
            cfg = LossConfig(
                objective=cls(),
                aggregation=AggregationConfig(mode=modes[i % 4], constant=8.0),  # type: ignore[arg-type]
                kl=KLConfig(beta=0.01),
                mismatch=MismatchConfig(),
            )
            self.loss(batch, cfg)
