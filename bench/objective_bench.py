"""Each objective's cost in process, on the CPU: the compiled engine as `softgate serve` calls it
for a request that wants the gradient alone (ratio and gate for a 32K-token sample), on one
batch of per-sequence advantages, every objective at its defaults, GRPO with a k3, k3_is or k3_is_seq KL
term (and k3 bounded, alone and weighted by the ratio to the sampler), GRPO with a token-level TIS or seq_mask (seq-mask-tis) mismatch correction (the same
batch with rollout log-probs; TIS also with batch_normalize), GRPO with off-policy sequence masking (OPSM) and with rollout
rejection (the same rollout log-probs), GSPO with a dual clip, and advantages from rewards in the
call: GRPO's, and with a KL in the reward (REINFORCE++'s per-token return, verl's per-sequence
sum), REINFORCE++ discounted with and without it, GRPO's with skip_nan_components (no NaN:
the setting's cost alone) and verl's optimal token baseline (with sum_pi_squared) (the same
batch with rewards and group ids in place of advantages), and SAPO's batch with sum_pi_squared
(the variance-proxy metrics' cost). It runs under the process's allocator (bench/engine_bench.py
preloads tcmalloc, as the service ships; `LD_PRELOAD=libtcmalloc_minimal.so.4` for the same
here).

    python bench/objective_bench.py            # 1024 sequences of 1024 tokens (about 2 minutes)
    python bench/objective_bench.py --quick    # 256 x 256, 5 rounds

Prints the median (and minimum) ms of each configuration over the timed rounds, after untimed
calls that compile it, and its ratio to SAPO's median in the same run. The configurations run
round-robin within each round, so that load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from softgate.engine import (
    OBJECTIVES,
    AdvantageConfig,
    Batch,
    Engine,
    Grpo,
    Gspo,
    KLConfig,
    LossConfig,
    MismatchConfig,
    RejectionCriterion,
    RewardKLConfig,
)


def configs() -> dict[str, LossConfig]:
    """Every objective at its defaults, then GRPO with each importance-weighted or plain k3 (and k3
    bounded, verl's), and
    with each mismatch mode that weighs tokens by their own ratio; OPSM, and a GSPO dual clip."""
    out = {name: LossConfig(objective=cls()) for name, cls in OBJECTIVES.items()}
    for est in ("k3", "k3_is", "k3_is_seq"):
        out[f"grpo + {est}"] = LossConfig(objective=Grpo(), kl=KLConfig(est, 0.01))
    # verl's low_var_kl: k3's value bounded at 10 (a clamp and a mask more in the kernel)
    out["grpo + k3, value_clamp 10"] = LossConfig(objective=Grpo(), kl=KLConfig("k3", 0.01, value_clamp=10.0))
    # NeMo-RL's on-policy KL approximation: k3 weighted by the ratio to the sampler, w k bounded
    out["grpo + k3 w=sampler, clamp 10"] = LossConfig(
        objective=Grpo(), kl=KLConfig("k3", 0.01, value_clamp=10.0, weight="sampler_ratio")
    )
    for mode in ("truncate", "seq_mask"):
        out[f"grpo + {mode}"] = LossConfig(
            objective=Grpo(), mismatch=MismatchConfig(mode=mode, lo=0.998, hi=1.002)
        )
    # verl's rollout_is_batch_normalize: the TIS weights' batch mean, an eager pass first
    out["grpo + truncate + batch_normalize"] = LossConfig(
        objective=Grpo(), mismatch=MismatchConfig(mode="truncate", batch_normalize=True)
    )
    # a per-sequence weight: the product (sequence) and the geometric mean (AReaL's, verl's geometric)
    for level in ("sequence", "geometric"):
        out[f"grpo + {level} truncate"] = LossConfig(
            objective=Grpo(), mismatch=MismatchConfig(level=level, mode="truncate", cap=1.001)
        )
    out["grpo + opsm"] = LossConfig(objective=Grpo(), off_policy_mask_threshold=0.0)
    # rollout rejection: a k1 window per token, sequences by their mean k3 (verl's decoupled_geo_rs-like)
    out["grpo + rejection"] = LossConfig(
        objective=Grpo(),
        rejection=(RejectionCriterion(1.1, "k1", "token", 0.9), RejectionCriterion(0.002, "k3", "seq_mean")),
    )
    out["gspo + dual_clip"] = LossConfig(objective=Gspo(dual_clip=1.0005))
    # advantages from rewards in the call; a KL in the reward, per token and per sequence
    out["grpo + rewards"] = LossConfig(objective=Grpo())
    # TRL's None rewards read as no reward (none here: the setting's cost alone)
    out["grpo + rewards, skip_nan_components"] = LossConfig(
        objective=Grpo(), advantages=AdvantageConfig(skip_nan_components=True)
    )
    out["grpo + reward_kl token (reinforce_pp)"] = LossConfig(
        objective=Grpo(), advantages=AdvantageConfig("reinforce_pp"), reward_kl=RewardKLConfig(0.01)
    )
    out["grpo + reward_kl sequence"] = LossConfig(
        objective=Grpo(), reward_kl=RewardKLConfig(0.01, level="sequence")
    )
    # NeMo-RL's default advantages, and its REINFORCE++ KL: each token's own
    out["grpo + rloo leave_one_out"] = LossConfig(
        objective=Grpo(), advantages=AdvantageConfig("rloo", "leave_one_out")
    )
    out["grpo + reward_kl immediate"] = LossConfig(
        objective=Grpo(),
        advantages=AdvantageConfig("reinforce_pp_baseline"),
        reward_kl=RewardKLConfig(0.01, level="immediate"),
    )
    # REINFORCE++ discounted (gamma < 1: the doubling scan on the host too), with and without the KL
    discounted = AdvantageConfig("reinforce_pp", gamma=0.99)
    out["grpo + reinforce_pp gamma 0.99"] = LossConfig(objective=Grpo(), advantages=discounted)
    out["grpo + reward_kl token gamma 0.99"] = LossConfig(
        objective=Grpo(), advantages=discounted, reward_kl=RewardKLConfig(0.01)
    )
    # verl's optimal token baseline: per-position baselines in each group, from sum_pi_squared
    out["grpo + optimal_token_baseline"] = LossConfig(
        objective=Grpo(), advantages=AdvantageConfig("optimal_token_baseline")
    )
    # SAPO's batch with sum_pi_squared: the variance-proxy metrics' cost alone
    out["sapo + sum_pi_squared (variance proxy)"] = LossConfig()
    return out


def batch(n_seq: int, length: int) -> Batch:
    """float32 log-probs near the old and reference ones, one advantage per sequence."""
    g = torch.Generator().manual_seed(0)
    n = n_seq * length
    logp = -torch.rand(n, generator=g) - 0.1
    return Batch(
        logp=logp,
        offsets=Batch.offsets_from_lengths(torch.full((n_seq,), length)),
        old_logp=(logp + 0.05 * torch.randn(n, generator=g)).clamp(max=-1e-3),
        ref_logp=(logp + 0.05 * torch.randn(n, generator=g)).clamp(max=-1e-3),
        advantages=torch.randn(n_seq, generator=g),
        advantage_level="sequence",
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 x 256 tokens, 5 rounds")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds, >= 1 (default 15, --quick 5)")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be at least 1")
    side = 256 if args.quick else 1024
    rounds = args.rounds or (5 if args.quick else 15)
    plain = batch(side, side)
    g = torch.Generator().manual_seed(1)
    rollout = (plain.old_logp + 0.05 * torch.randn(side * side, generator=g)).clamp(max=-1e-3)
    with_rollout = dataclasses.replace(plain, rollout_logp=rollout)
    rewards = torch.randint(0, 2, (side,), generator=g).to(torch.float32)
    with_rewards = dataclasses.replace(
        plain, advantages=None, advantage_level=None, rewards=rewards, group_ids=torch.arange(side) // 16
    )
    assert plain.old_logp is not None
    p = plain.old_logp.exp()
    spp = p * p + (1 - p) ** 2 * torch.rand(side * side, generator=g)
    with_spp = dataclasses.replace(with_rewards, sum_pi_squared=spp)
    plain_spp = dataclasses.replace(plain, sum_pi_squared=spp)
    engine = Engine(device="cpu", compile="sync")
    cfgs = configs()
    batches = {
        name: with_spp
        if cfg.advantages.estimator == "optimal_token_baseline"
        else plain_spp
        if "sum_pi_squared" in name
        else with_rollout
        if cfg.mismatch or cfg.rejection or (cfg.kl and cfg.kl.weight == "sampler_ratio")
        else with_rewards
        if "rewards" in name or cfg.reward_kl or cfg.advantages != AdvantageConfig()
        else plain
        for name, cfg in cfgs.items()
    }
    # an estimator reads rewards: given advantages it is never run (the rloo row timed grpo's
    # work, its batch carrying advantages; an audit)
    assert all(batches[k].rewards is not None for k, c in cfgs.items() if c.advantages != AdvantageConfig())
    for name, cfg in cfgs.items():
        for _ in range(3):
            engine.loss(batches[name], cfg, sample_tokens=32768)
    if engine.kernel is None or not engine.kernel.enabled:  # (an old torch: eager code, not this bench's)
        raise SystemExit("the engine did not compile (see its log): nothing to time")
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for _ in range(rounds):
        for name, cfg in cfgs.items():
            t = time.perf_counter()
            engine.loss(batches[name], cfg, sample_tokens=32768)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["sapo"])
    print(
        f"{side * side:,} tokens, {rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'configuration':38s} {'median ms':>10s} {'min ms':>8s} {'/ sapo':>7s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:38s} {med * 1e3:10.2f} {min(ts) * 1e3:8.2f} {med / base:7.2f}")


if __name__ == "__main__":
    main()
