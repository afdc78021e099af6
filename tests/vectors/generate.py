"""Conformance vectors: small float64 cases, inputs and the engine's outputs, one JSON file per
objective (schema in tests/vectors/README.md).

    python -m tests.vectors.generate           # rewrite tests/vectors/*.json
    python -m tests.vectors.generate --check   # exit 1 if the engine drifted from the files

Every case is also checked against the autograd oracle (tests/reference_loss.py) before it is
written, so a vector never records an engine bug.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make `tests` and `softgate` importable
    sys.path.insert(0, str(HERE.parents[1]))
    sys.path.insert(0, str(HERE.parents[1] / "server"))

from softgate.engine import (  # noqa: E402
    OBJECTIVES,
    AdvantageConfig,
    AggregationConfig,
    Batch,
    Engine,
    KLConfig,
    LossConfig,
    LossResult,
    MismatchConfig,
    RejectionCriterion,
    RewardKLConfig,
)

from tests.reference_loss import (  # noqa: E402
    AGG_MODES,
    OBJECTIVE_NAMES,
    PER_SEQUENCE_ADVANTAGES,
    make_config,
    near_boundary,
    random_batch,
    reference_loss,
)

SCHEMA = "softgate-conformance/1"
RTOL, ATOL = 1e-9, 1e-12
TOKEN_FIELDS = ("logp", "old_logp", "ref_logp", "rollout_logp")


# ---------------------------------------------------------------- JSON <-> engine types


def config_to_json(cfg: LossConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    # fields added since the vectors were written, at their defaults: left out, as before
    if d.get("mismatch") and not d["mismatch"]["floor"]:
        del d["mismatch"]["floor"]
    if d.get("mismatch") and not d["mismatch"]["batch_normalize"]:
        del d["mismatch"]["batch_normalize"]
    if d.get("kl") and d["kl"]["aggregation"] is None:
        del d["kl"]["aggregation"]
    if d.get("kl") and d["kl"]["weight"] == "none":
        del d["kl"]["weight"]
    for s in ("kl", "reward_kl"):
        if d.get(s) and d[s]["value_clamp"] is None:
            del d[s]["value_clamp"]
    if d["advantages"]["reward_weights"] is None:  # (a loss case's rewards are one component)
        del d["advantages"]["reward_weights"]
    if d["advantages"]["gamma"] == 1.0:
        del d["advantages"]["gamma"]
    if not d["advantages"]["skip_nan_components"]:  # (a loss case's rewards are one component)
        del d["advantages"]["skip_nan_components"]
    if d["advantages"]["position"] == "token":
        del d["advantages"]["position"]
    if not d["advantages"]["zero_tail"]:
        del d["advantages"]["zero_tail"]
    if d["off_policy_mask_threshold"] is None:
        del d["off_policy_mask_threshold"]
    if d["off_policy_mask_reference"] == "rollout":
        del d["off_policy_mask_reference"]
    if d["reward_kl"] is None:
        del d["reward_kl"]
    if not d["rejection"]:
        del d["rejection"]
    else:  # each criterion without its unset lower bound
        d["rejection"] = [{k: v for k, v in c.items() if v is not None} for c in d["rejection"]]
    obj = d.pop("objective")
    if obj["name"] == "gspo" and obj["dual_clip"] is None:  # (grpo's vectors always had theirs)
        del obj["dual_clip"]
    d["objective"] = {"name": obj.pop("name"), **obj}
    return d


def config_from_json(d: dict[str, Any]) -> LossConfig:
    obj = dict(d["objective"])
    cls = OBJECTIVES[obj.pop("name")]
    return LossConfig(
        objective=cls(**obj),
        advantages=AdvantageConfig(**d["advantages"]),
        aggregation=AggregationConfig(**d["aggregation"]),
        kl=KLConfig(**d["kl"]) if d.get("kl") else None,
        mismatch=MismatchConfig(**d["mismatch"]) if d.get("mismatch") else None,
        log_ratio_clamp=d["log_ratio_clamp"],
        saturation_threshold=d["saturation_threshold"],
        off_policy_mask_threshold=d.get("off_policy_mask_threshold"),
        off_policy_mask_reference=d.get("off_policy_mask_reference", "rollout"),
        rejection=tuple(RejectionCriterion(**c) for c in d.get("rejection", ())),
        reward_kl=RewardKLConfig(**d["reward_kl"]) if d.get("reward_kl") else None,
    )


def batch_to_json(b: Batch) -> dict[str, Any]:
    def lst(t: torch.Tensor | None) -> list | None:
        return None if t is None else t.tolist()

    out = {
        "offsets": lst(b.offsets),
        **{f: lst(getattr(b, f)) for f in TOKEN_FIELDS},
        "mask": None if b.mask is None else [int(x) for x in b.mask.tolist()],
        "rewards": lst(b.rewards),
        "group_ids": lst(b.group_ids),
        "advantages": lst(b.advantages),
        "advantage_level": b.advantage_level,
    }
    if b.sum_pi_squared is not None:  # (added since the first vectors: only where sent)
        out["sum_pi_squared"] = lst(b.sum_pi_squared)
    return out


def batch_from_json(d: dict[str, Any]) -> Batch:
    def f64(x: list | None) -> torch.Tensor | None:
        return None if x is None else torch.tensor(x, dtype=torch.float64)

    return Batch(
        logp=torch.tensor(d["logp"], dtype=torch.float64),
        offsets=torch.tensor(d["offsets"], dtype=torch.int64),
        old_logp=f64(d["old_logp"]),
        mask=None if d["mask"] is None else torch.tensor(d["mask"], dtype=torch.bool),
        ref_logp=f64(d["ref_logp"]),
        rollout_logp=f64(d["rollout_logp"]),
        rewards=f64(d["rewards"]),
        group_ids=None if d["group_ids"] is None else torch.tensor(d["group_ids"], dtype=torch.int64),
        advantages=f64(d["advantages"]),
        advantage_level=d["advantage_level"],
        sum_pi_squared=f64(d.get("sum_pi_squared")),
    )


def result_to_json(r: LossResult) -> dict[str, Any]:
    return {
        "loss": r.loss,
        "policy_loss": r.policy_loss,
        "kl_loss": r.kl_loss,
        "grad": r.grad.tolist(),
        "advantages": r.advantages.tolist(),
        "ratio": r.ratio.tolist(),
        "gate_weight": r.gate_weight.tolist(),
        "clip_mask": [int(x) for x in r.clip_mask.tolist()],
        "metrics": dict(r.metrics),
    }


# ---------------------------------------------------------------- the cases

VARIANTS = [
    # (advantages, estimator, scale, kl, mismatch, clamp, big_deltas)
    ("rewards", "grpo", None, None, None, 20.0, False),
    ("rewards", "rloo", "batch", "k3", ("token", "truncate"), 20.0, False),
    ("rewards", "dr_grpo", None, "k1", ("sequence", "mask"), 3.0, True),
    ("rewards", "reinforce_pp_baseline", None, "k2", ("token", "mask"), 20.0, False),
    ("sequence", "grpo", None, None, ("sequence", "truncate"), 20.0, False),
    ("token", "grpo", None, "k3", None, 3.0, True),
]


def _case(name: str, batch: Batch, cfg: LossConfig, engine: Engine) -> dict[str, Any]:
    res = engine.loss(batch, cfg)
    ref = reference_loss(batch, cfg)
    g = ref.grad()
    torch.testing.assert_close(
        res.grad, g, rtol=RTOL, atol=ATOL * max(1.0, float(g.abs().max()) if g.numel() else 1.0)
    )
    assert math.isclose(res.loss, float(ref.loss.detach()), rel_tol=RTOL, abs_tol=ATOL), name
    return {
        "name": name,
        "config": config_to_json(cfg),
        "inputs": batch_to_json(batch),
        "outputs": result_to_json(res),
    }


def _informative(batch: Batch, cfg: LossConfig, engine: Engine) -> bool:
    """A case whose policy loss and gradient are not all 0: singleton and equal-reward groups
    made 8 of 64 vectors that a server computing nothing passed (an audit)."""
    r = engine.loss(batch, cfg)
    return r.policy_loss != 0 and bool(r.grad.ne(0).any())


def build_cases(objective: str, engine: Engine | None = None) -> list[dict[str, Any]]:
    engine = engine or Engine(device="cpu", compile=False)
    cases = []
    k = 0
    for mode in AGG_MODES:
        for vi in (
            (0, 1, 2) if mode == "seq_mean_token_mean" else (k % len(VARIANTS), (k + 3) % len(VARIANTS))
        ):
            adv, est, scale, kl, mm, clamp, big = VARIANTS[vi]
            if objective in PER_SEQUENCE_ADVANTAGES and adv == "token":
                adv = "sequence"
            k += 1
            cfg = make_config(
                objective,
                mode,
                kl,
                mm,
                variant=k,
                estimator=est,
                scale=scale,
                clamp=clamp,
                global_norm=(k % 3 == 0),
            )
            for seed in range(1000):
                batch = random_batch(
                    1000 * k + seed + 97 * OBJECTIVE_NAMES.index(objective),
                    max_seqs=5,
                    max_len=5,
                    advantages=adv,
                    big_deltas=big,
                )
                if (
                    batch.logp.numel() >= 4
                    and not near_boundary(batch, cfg, tol=1e-6)
                    and _informative(batch, cfg, engine)
                ):
                    break
            parts = [objective, mode, adv if adv != "rewards" else est, f"kl_{kl}" if kl else "no_kl"]
            parts.append(f"mm_{mm[0]}_{mm[1]}" if mm else "no_mismatch")
            cases.append(_case("/".join(parts), batch, cfg, engine))
    if objective == "sapo":
        # on-policy (r = 1): the gradient is -A * alpha whatever tau, the loss -2A/tau per token
        b = random_batch(4242, max_seqs=4, max_len=5, advantages="sequence", with_mask=False)
        b.old_logp = b.logp.clone()
        cfg = make_config("sapo", "seq_mean_token_mean", None, None, variant=1)
        cases.append(_case("sapo/on_policy_r_equals_1", b, cfg, engine))
        cases += _default_cases(engine)
    return cases


def _default_cases(engine: Engine) -> list[dict[str, Any]]:
    """What the generated variants never hold (an audit): every parameter at its default, with
    old_logp, the mask and the advantage level unset; RLOO at its default (group) scale; k3 KL
    clamped from above on one trained token; eps, min_group_std, beta, the mismatch bounds
    and the saturation threshold at values of their own; the seq_mask mismatch mode and the
    geometric level; OPSM; the k3_is and k3_is_seq KL estimators; the opo, gpg, grpo_passk, reinforce_pp and gdpo estimators."""
    out = []
    b = random_batch(5151, max_seqs=5, max_len=5, advantages="rewards", with_mask=False, num_seqs=5)
    b.rewards = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0], dtype=torch.float64)
    b.group_ids = torch.tensor([3, 3, 8, 8, 3])
    b.old_logp, b.mask, b.ref_logp, b.rollout_logp = None, None, None, None
    out.append(_case("sapo/all_defaults_no_old_logp_no_mask", b, LossConfig(), engine))
    b = random_batch(5252, max_seqs=5, max_len=5, advantages="sequence", num_seqs=4)
    b.advantage_level = None  # (B != N: inferred from the length)
    assert b.advantages is not None and b.advantages.numel() != b.logp.numel()
    out.append(_case("sapo/advantage_level_inferred", b, LossConfig(), engine))
    b = random_batch(5353, max_seqs=5, max_len=5, advantages="rewards", num_seqs=5)
    b.rewards = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.25], dtype=torch.float64)
    b.group_ids = torch.tensor([1, 1, 1, 2, 2])
    assert b.ref_logp is not None and b.mask is not None
    t = int(torch.nonzero(b.mask)[0])
    b.logp[t] = b.ref_logp[t] - 4.0  # x = ref - logp = 4 > the clamp 3: k3 clamps it
    cfg = LossConfig(
        advantages=AdvantageConfig(estimator="rloo"),
        kl=KLConfig(estimator="k3", beta=0.2),
        log_ratio_clamp=3.0,
    )
    out.append(_case("sapo/rloo_default_scale_kl_k3_clamped", b, cfg, engine))
    assert out[-1]["outputs"]["metrics"]["kl_clamped_tokens"] > 0
    # NeMo-RL's default: rloo divided by the others' std; a lone correct answer (others all
    # equal) and a pair stay undivided
    b = random_batch(5355, max_seqs=9, max_len=5, advantages="rewards", num_seqs=9)
    b.rewards = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.2, 0.9, 0.1, 0.4, 0.75], dtype=torch.float64)
    b.group_ids = torch.tensor([5, 5, 5, 5, 6, 6, 7, 7, 7])
    cfg = LossConfig(advantages=AdvantageConfig(estimator="rloo", scale="leave_one_out"))
    out.append(_case("sapo/rloo_leave_one_out_scale", b, cfg, engine))
    # the parameters every other case leaves at one value, at others
    b = random_batch(5454, max_seqs=6, max_len=5, advantages="rewards", num_seqs=6, big_deltas=True)
    b.rewards = torch.tensor([0.0, 1.0, 0.2, 0.3, 1.0, 0.5], dtype=torch.float64)
    b.group_ids = torch.tensor([4, 4, 9, 9, 0, 0])
    cfg = LossConfig(
        advantages=AdvantageConfig(estimator="grpo", eps=1e-3, min_group_std=0.15),
        kl=KLConfig(estimator="k2", beta=0.5),
        mismatch=MismatchConfig(level="token", mode="mask", lo=0.9, hi=1.1),
        saturation_threshold=0.8,
    )
    out.append(_case("sapo/other_eps_min_group_std_beta_bounds_saturation", b, cfg, engine))
    m = out[-1]["outputs"]["metrics"]
    assert 0 < m["degenerate_group_frac"] < 1 and m["mismatch_clipped_frac"] > 0, m
    assert m["gate_saturation_pos"] + m["gate_saturation_neg"] > 0, m
    # seq_mask (seq-mask-tis): each token's own weight, a sequence dropped by its geometric mean
    cfg = LossConfig(mismatch=MismatchConfig(mode="seq_mask", lo=0.9, hi=1.1))
    out.append(_case("sapo/mismatch_seq_mask", b, cfg, engine))
    assert 0 < out[-1]["outputs"]["metrics"]["mismatch_clipped_frac"] < 1
    # geometric: every token weighed by its sequence's geometric-mean weight, zeroed outside [lo, hi]
    cfg = LossConfig(mismatch=MismatchConfig(level="geometric", mode="mask", lo=0.9, hi=1.1))
    out.append(_case("sapo/mismatch_geometric_mask", b, cfg, engine))
    assert 0 < out[-1]["outputs"]["metrics"]["mismatch_clipped_frac"] < 1
    # OPSM: A < 0 tokens of sequences whose mean (rollout - logp) passes the threshold drop out
    cfg = LossConfig(
        mismatch=MismatchConfig(level="token", mode="truncate", cap=2.0), off_policy_mask_threshold=-0.5
    )
    out.append(_case("sapo/off_policy_mask_threshold", b, cfg, engine))
    assert 0 < out[-1]["outputs"]["metrics"]["off_policy_masked_frac"] < 1
    # the same, measured from old_logp though rollout_logp is sent (slime's, beside TIS)
    cfg = dataclasses.replace(cfg, off_policy_mask_threshold=0.0, off_policy_mask_reference="old")
    out.append(_case("sapo/off_policy_mask_reference_old", b, cfg, engine))
    assert 0 < out[-1]["outputs"]["metrics"]["off_policy_masked_frac"] < 1
    # rollout rejection (verl's rollout_rs): tokens past a k1 window, sequences past a mean k3 or
    # a max k2 leave the mask, and the normalisers with it
    for name, crit in (
        ("token_k1", (RejectionCriterion(1.2, "k1", "token", 0.9),)),
        (
            "seq_mean_k3_seq_max_k2",
            (RejectionCriterion(0.02, "k3", "seq_mean"), RejectionCriterion(0.3, "k2", "seq_max")),
        ),
        ("binary_kl", (RejectionCriterion(0.005, "binary_kl"),)),
        # verl's veto (a sequence with one ratio below 0.8 out) and the largest d bounded (AReaL)
        (
            "seq_max_k1_seq_min_k1",
            (
                RejectionCriterion(1 / 0.8, "k1", "seq_max", 0.0),
                RejectionCriterion(1e300, "k1", "seq_min", 0.7),
            ),
        ),
    ):
        cfg = LossConfig(aggregation=AggregationConfig(mode="token_mean"), rejection=crit)
        out.append(_case(f"sapo/rejection_{name}", b, cfg, engine))
        m = out[-1]["outputs"]["metrics"]
        assert m["rejected_tokens"] > 0 and m["num_tokens"] > 0, (name, m)
    # AReaL's kl_k3, exp(-d) - 1 + d: a token at d = -1.5 (1.98; its mirror k3 0.72) bounded at 1
    assert b.old_logp is not None and b.rollout_logp is not None and b.mask is not None
    old, ro, mk = b.old_logp.clone(), b.rollout_logp.clone(), b.mask.clone()
    old[0], ro[0], mk[0] = -2.0, -0.5, True
    rb = dataclasses.replace(b, old_logp=old, rollout_logp=ro, mask=mk)
    cfg = LossConfig(
        aggregation=AggregationConfig(mode="token_mean"), rejection=(RejectionCriterion(1.0, "k3_reverse"),)
    )
    out.append(_case("sapo/rejection_token_k3_reverse", rb, cfg, engine))
    mirror = dataclasses.replace(cfg, rejection=(RejectionCriterion(1.0, "k3"),))
    assert (
        engine.loss(rb, cfg).metrics["rejected_tokens"] > engine.loss(rb, mirror).metrics["rejected_tokens"]
    )
    # verl's rollout_is_batch_normalize: sequence-level TIS weights divided by their batch mean,
    # beside a KL term it leaves as it was
    cfg = LossConfig(
        mismatch=MismatchConfig(level="sequence", mode="truncate", cap=1.5, batch_normalize=True),
        kl=KLConfig(estimator="k3", beta=0.1),
    )
    out.append(_case("sapo/mismatch_batch_normalize", b, cfg, engine))
    assert out[-1]["outputs"]["metrics"]["mismatch_norm_factor"] not in (0.0, 1.0)
    # k3_is: k3 weighted by the token's ratio, gradient -x r (TRL's use_bias_correction_kl)
    b = random_batch(5555, max_seqs=5, max_len=5, advantages="sequence", num_seqs=5, big_deltas=True)
    cfg = LossConfig(kl=KLConfig(estimator="k3_is", beta=0.3, aggregation="token_mean"))
    out.append(_case("sapo/kl_k3_is_token_mean", b, cfg, engine))
    # k3_is_seq: k3 weighted by the sequence ratio, whose gradient spreads over the sequence
    cfg = LossConfig(kl=KLConfig(estimator="k3_is_seq", beta=0.3, aggregation="token_mean"))
    out.append(_case("sapo/kl_k3_is_seq_token_mean", b, cfg, engine))
    # verl's low_var_kl bound on k (10 there; 0.05 here, so some tokens pass it and some do not)
    cfg = LossConfig(kl=KLConfig(estimator="k3", beta=0.3, value_clamp=0.05))
    out.append(_case("sapo/kl_k3_value_clamp", b, cfg, engine))
    m = out[-1]["outputs"]["metrics"]
    assert 0 < m["kl_clamped_tokens"] < m["num_tokens"], m
    # weighted estimates, w's gradient included: k1 by the ratio to old, its w k bounded (slime's
    # --use-unbiased-kl), k2 by the ratio to the sampler (NeMo-RL's on-policy KL approximation)
    cfg = LossConfig(kl=KLConfig(estimator="k1", beta=0.3, value_clamp=0.05, weight="ratio"))
    out.append(_case("sapo/kl_k1_ratio_weight_value_clamp", b, cfg, engine))
    m = out[-1]["outputs"]["metrics"]
    assert 0 < m["kl_clamped_tokens"] < m["num_tokens"], m
    cfg = LossConfig(kl=KLConfig(estimator="k2", beta=0.3, weight="sampler_ratio", aggregation="token_mean"))
    out.append(_case("sapo/kl_k2_sampler_ratio_weight", b, cfg, engine))
    # opo: the baseline weighs each sequence by its trained tokens; gpg: alpha = B / #(R != 0);
    # grpo_passk: each group's best alone; reinforce_pp: R whitened, no baseline; gdpo (one component)
    b = random_batch(5656, max_seqs=6, max_len=5, advantages="rewards", num_seqs=6)
    b.rewards = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 0.25], dtype=torch.float64)
    b.group_ids = torch.tensor([2, 2, 2, 5, 5, 5])
    for est in ("opo", "gpg", "grpo_passk", "reinforce_pp", "gdpo"):
        cfg = LossConfig(advantages=AdvantageConfig(estimator=est))
        out.append(_case(f"sapo/{est}_estimator", b, cfg, engine))
    # reinforce_pp reads no groups: an all-equal group's members keep their R
    b.rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    cfg = LossConfig(advantages=AdvantageConfig(estimator="reinforce_pp"))
    out.append(_case("sapo/reinforce_pp_equal_group", b, cfg, engine))
    # a KL in the reward: REINFORCE++'s per-token return (OpenRLHF's default), whitened over
    # the tokens, and verl's grpo with the KL summed into each reward
    b = random_batch(5757, max_seqs=6, max_len=6, advantages="rewards", num_seqs=6)
    cfg = LossConfig(
        advantages=AdvantageConfig(estimator="reinforce_pp"),
        reward_kl=RewardKLConfig(beta=0.1, estimator="k1", level="token"),
    )
    out.append(_case("sapo/reward_kl_token_reinforce_pp", b, cfg, engine))
    # ... discounted (OpenRLHF's --gamma): the outcome at each sequence's last sent token
    gamma = AdvantageConfig(estimator="reinforce_pp", gamma=0.8)
    out.append(
        _case(
            "sapo/reward_kl_token_reinforce_pp_gamma", b, dataclasses.replace(cfg, advantages=gamma), engine
        )
    )
    assert b.mask is not None and not bool(b.mask[b.offsets[1:] - 1].all())  # (a masked last token)
    # ... each token's own KL alone (NeMo-RL's REINFORCE++, slime's reinforce_plus_plus_baseline)
    own = LossConfig(
        advantages=AdvantageConfig(estimator="reinforce_pp_baseline"),
        reward_kl=RewardKLConfig(beta=0.1, estimator="k3", level="immediate", value_clamp=10.0),
    )
    out.append(_case("sapo/reward_kl_immediate_reinforce_pp_baseline", b, own, engine))
    cfg = LossConfig(reward_kl=RewardKLConfig(beta=0.2, estimator="k3", level="sequence"))
    out.append(_case("sapo/reward_kl_sequence_grpo", b, cfg, engine))
    assert out[-1]["outputs"]["metrics"]["reward_kl_mean"] > 0
    clamped = dataclasses.replace(cfg, reward_kl=dataclasses.replace(cfg.reward_kl, value_clamp=0.02))
    out.append(_case("sapo/reward_kl_sequence_grpo_value_clamp", b, clamped, engine))
    assert (
        0 < out[-1]["outputs"]["metrics"]["reward_kl_mean"] < out[-2]["outputs"]["metrics"]["reward_kl_mean"]
    )
    # verl's optimal token baseline: per-token baselines from the old policy's probabilities and
    # sum_pi_squared, at trained positions (multi-turn holes in the mask), the longest member's tail 0
    b = random_batch(5858, max_seqs=6, max_len=7, advantages="rewards", num_seqs=6)
    b.group_ids = torch.tensor([1, 1, 1, 4, 4, 4])
    assert b.old_logp is not None and b.mask is not None and not bool(b.mask.all())
    p = b.old_logp.exp()
    spread = torch.rand(p.shape, generator=torch.Generator().manual_seed(5858), dtype=torch.float64)
    b.sum_pi_squared = p * p + (1 - p) ** 2 * spread
    otb = AdvantageConfig(estimator="optimal_token_baseline", eps=1e-8, position="trained", zero_tail=True)
    cfg = LossConfig(advantages=otb, aggregation=AggregationConfig(mode="token_mean"))
    out.append(_case("sapo/optimal_token_baseline_trained_zero_tail", b, cfg, engine))
    no_tail = dataclasses.replace(cfg, advantages=dataclasses.replace(otb, zero_tail=False))
    assert engine.loss(b, no_tail).loss != out[-1]["outputs"]["loss"]  # (a longest member alone)
    # verl's gradient-variance proxy from the same sum_pi_squared beside GRPO's advantages, its W
    # and total power through sequence-level TIS weights (the metrics variance_proxy_*)
    b.rollout_logp = (b.old_logp - 0.3 * spread.to(b.old_logp.dtype)).clamp(max=-1e-4)
    tis = MismatchConfig(level="sequence", mode="truncate", cap=1.6)
    out.append(_case("sapo/variance_proxy_grpo_sequence_tis", b, LossConfig(mismatch=tis), engine))
    m = out[-1]["outputs"]["metrics"]
    assert (
        m["variance_proxy_tokens"] > 0
        and m["variance_proxy_total_power"] > 0
        and m["mismatch_clipped_frac"] > 0
    )
    return out


def dump(cases: list[dict[str, Any]], objective: str) -> str:
    doc = {
        "schema": SCHEMA,
        "objective": objective,
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "cases": cases,
    }
    return json.dumps(doc, indent=1) + "\n"


def close(a: Any, b: Any, path: str = "") -> list[str]:
    """Differences between two JSON values, floats compared with RTOL / ATOL."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in close(x, y, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL):
            return []
        return [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def keep_stored(new: Any, old: Any) -> Any:
    """`new` with every number that is `close` to the stored one at its place replaced by it:
    regenerating on another CPU (its exp, its vector width) leaves the files' last digits."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: keep_stored(v, old[k]) if k in old else v for k, v in new.items()}
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [keep_stored(x, y) for x, y in zip(new, old, strict=True)]
    return old if not close(new, old) else new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the stored files, write nothing")
    args = ap.parse_args(argv)
    engine = Engine(device="cpu", compile=False)
    bad = 0
    for obj in OBJECTIVE_NAMES:
        path = HERE / f"{obj}.json"
        cases = build_cases(obj, engine)
        if args.check:
            stored = json.loads(path.read_text()) if path.exists() else None
            diffs = close(stored["cases"], cases) if stored else [f"{path} missing"]
            if diffs:
                bad += 1
                print(f"{path.name}: {len(diffs)} differences, first: {diffs[:3]}")
        else:
            if path.exists():
                stored = {c["name"]: c for c in json.loads(path.read_text())["cases"]}
                cases = [keep_stored(c, stored[c["name"]]) if c["name"] in stored else c for c in cases]
            path.write_text(dump(cases, obj))
            print(f"wrote {path.relative_to(HERE.parents[1])}: {len(cases)} cases")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
