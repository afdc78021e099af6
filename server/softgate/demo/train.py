"""The RL loop: group sampling, then several optimiser steps per rollout batch, every loss and
gradient from a softgate loss backend (``logp.backward(grad)``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from softgate.demo.backends import LossBackend
from softgate.demo.policy import GruPolicy, sample, token_logp
from softgate.demo.runs import RunSpec
from softgate.demo.task import DigitSumTask

# Per-step curves every run records (means over the step's mini-batch updates, except the
# rollout reward / success, which are over the step's sampled batch before the update).
CURVES = (
    "reward",
    "success",
    "trust_region",  # SAPO: gate saturation (share of tokens with w < 0.5); clip objectives: clip fraction
    "grad_retained",
    "approx_kl",
    "ratio_max",
    "degenerate_groups",
    "loss",
)


# The largest seed: torch's generators take seeds below 2**64 (an audit: a larger --seed was a
# traceback), and a run also seeds seed + 1 and 10_000 + seed.
MAX_SEED = 2**32 - 1

# The largest --lr, far past a useful one already (the default is 1e-2): an unbounded one
# overflowed Adam's float32 update (1e38: a traceback; an audit).
MAX_LR = 10.0


# The largest counts of the flags that have one: more --threads than torch takes (2**31: a
# ValueError traceback) or than any CPU has; a --hidden whose weights the allocator refuses
# (1e8: a RuntimeError traceback), far past this task's need (64; an audit).
MAX_COUNTS = {"threads": 1024, "hidden": 4096}


# The largest rollout batch, prompts x samples (the default's 128 x 512): a larger one
# allocated until the OOM killer ended the run, silent (1e8 samples; an audit).
MAX_ROLLOUTS = 1 << 16


def check_counts(counts: dict[str, int]) -> None:
    """Refuse a count flag below 1, or above its MAX_COUNTS, naming it (ValueError)."""
    for flag, value in counts.items():
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
        if value > MAX_COUNTS.get(flag, value):
            raise ValueError(f"--{flag} must be at most {MAX_COUNTS[flag]}, got {value}")


def check_seeds(first: int, count: int) -> None:
    """Refuse seeds first .. first + count - 1 outside 0 .. MAX_SEED (ValueError naming --seed)."""
    if not 0 <= first <= first + count - 1 <= MAX_SEED:
        raise ValueError(
            f"--seed must be between 0 and {MAX_SEED}, and so must the last seed "
            f"(--seed + --seeds - 1), got --seed {first}"
        )


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 150
    prompts_per_step: int = 16
    group_size: int = 8
    minibatches: int = 4
    lr: float = 1e-2
    hidden: int = 64
    seed: int = 0
    eval_prompts_per_target: int = 8
    task: DigitSumTask = field(default_factory=DigitSumTask)

    def check(self) -> None:
        check_counts(
            {
                "steps": self.steps,
                "prompts-per-step": self.prompts_per_step,
                "minibatches": self.minibatches,
                "hidden": self.hidden,
            }
        )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive finite number, got {self.lr}")
        if self.lr > MAX_LR:
            raise ValueError(f"--lr must be at most {MAX_LR:g}, got {self.lr:g}")
        if self.prompts_per_step % self.minibatches:
            raise ValueError(
                f"--prompts-per-step ({self.prompts_per_step}) must be a multiple of --minibatches "
                f"({self.minibatches}): each mini-batch holds whole groups, so that the service "
                "normalises every group's rewards over all its members"
            )
        check_seeds(self.seed, 1)
        if self.group_size < 2:
            raise ValueError("--group-size must be at least 2 (a group of one has no baseline)")
        if self.prompts_per_step * self.group_size > MAX_ROLLOUTS:
            raise ValueError(
                f"--prompts-per-step x --group-size must be at most {MAX_ROLLOUTS} rollouts a step, "
                f"got {self.prompts_per_step} x {self.group_size}"
            )


@dataclass
class RunResult:
    spec: RunSpec
    seed: int
    curves: dict[str, list[float]]
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    seconds: float


def evaluate(policy: GruPolicy, cfg: TrainConfig) -> dict[str, float]:
    """Reward and exact-hit rate on fixed prompts (every target, k samples each, fixed seed)."""
    task = cfg.task
    targets = torch.arange(task.max_target + 1).repeat_interleave(cfg.eval_prompts_per_target)
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    ro = sample(policy, task.prompts(targets), task.max_len, gen)
    reward, success = task.rewards(targets, ro.tokens, ro.lengths)
    return {"reward": float(reward.mean()), "success": float(success.float().mean())}


def train(
    spec: RunSpec,
    cfg: TrainConfig,
    backend: LossBackend,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    cfg.check()
    torch.manual_seed(cfg.seed)
    policy = GruPolicy(cfg.hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    task = cfg.task
    P, G, M = cfg.prompts_per_step, cfg.group_size, cfg.minibatches
    curves: dict[str, list[float]] = {k: [] for k in CURVES}

    eval_before = evaluate(policy, cfg)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        # 1. rollouts: P prompts, G samples each, with the sampler's log-probs (old_logp)
        targets = task.sample_targets(P, gen)
        group_ids = torch.arange(P).repeat_interleave(G)
        targets = targets.repeat_interleave(G)
        ro = sample(policy, task.prompts(targets), task.max_len, gen)
        rewards, success = task.rewards(targets, ro.tokens, ro.lengths)

        # 2. M optimiser steps on M mini-batches of whole groups; the first is on-policy,
        #    the later ones are off-policy (the policy moved): the trust region acts there.
        step_metrics: list[dict[str, float]] = []
        for mb in range(M):
            rows = slice(mb * (P // M) * G, (mb + 1) * (P // M) * G)
            logp = token_logp(policy, ro.prompts[rows], ro.tokens[rows])  # [b, T], requires grad
            loss, metrics = backend.loss(
                spec,
                logp=logp,
                old_logp=ro.old_logp[rows],
                mask=ro.mask[rows],
                rewards=rewards[rows],
                group_ids=group_ids[rows],
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()  # logp.grad = softgate's exact per-token gradient, then through the GRU
            opt.step()
            step_metrics.append({"loss": loss.item(), **metrics})

        row = {
            "reward": float(rewards.mean()),
            "success": float(success.float().mean()),
        }
        for k in CURVES[2:]:
            vals = [m[k] for m in step_metrics if k in m and np.isfinite(m[k])]
            if not vals:
                row[k] = float("nan")
            else:
                row[k] = float(np.max(vals) if k == "ratio_max" else np.mean(vals))
        for k in CURVES:
            curves[k].append(row[k])
        if on_step is not None:
            on_step(step, row)

    seconds = time.perf_counter() - t0
    return RunResult(spec, cfg.seed, curves, eval_before, evaluate(policy, cfg), seconds)
