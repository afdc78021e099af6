"""Engine behaviour beyond the autograd match: shards, SAPO identities, edge cases, dtypes,
validation, metrics."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from conftest import needs_compile
from reference_loss import (
    AGG_MODES,
    OBJECTIVE_NAMES,
    PER_SEQUENCE_ADVANTAGES,
    REFUSED_SCALES,
    SEQUENCE_ESTIMATORS,
    SEQUENCE_RATIO,
    assert_same_result,
    make_config,
    random_batch,
    reference_advantages,
    reference_loss,
    reference_selection,
    splitmix64,
)
from softgate.engine import (
    METRIC_NAMES,
    AdvantageConfig,
    AggregationConfig,
    Batch,
    Cispo,
    CispoSeq,
    ClipCov,
    DppoKl,
    DppoTv,
    Dro,
    Engine,
    Gmpo,
    Gppo,
    Grpo,
    Gspo,
    GspoToken,
    InputError,
    KLConfig,
    KlCov,
    LossConfig,
    LossResult,
    MismatchConfig,
    Reinforce,
    RejectionCriterion,
    RewardKLConfig,
    Sapo,
    SapoSeq,
    transfer,
)
from softgate.engine.covariance import top_k, uniform_keys
from softgate.engine.engine import DEFAULT_HOST_MAX_TOKENS
from softgate.engine.kernel import token_terms
from softgate.engine.loss import compute_loss
from softgate.engine.metrics import to_floats
from softgate.engine.validation import REASON_CODES
from torch import Tensor

E = Engine(device="cpu", compile=False)
F64 = torch.float64
SLOW = pytest.mark.slow


def slow(*values: object) -> Any:
    """A parametrize row marked slow (`make test-slow`)."""
    return pytest.param(*values, marks=SLOW)


ALL_OBJECTIVES = [
    Sapo(),
    Grpo(),
    Grpo(dual_clip=3.0),
    Gspo(),
    GspoToken(),
    Cispo(),
    Gppo(),
    Gmpo(),
    DppoTv(),
    DppoKl(ratio_cap=2.0),
    ClipCov(fraction=0.5, cov_low=-10.0, cov_high=10.0),
    KlCov(fraction=0.5),
    Reinforce(),
    Dro(),
    Gspo(dual_clip=1.001),
]


def simple_batch(lengths, *, seed=0, dtype=F64, **kw) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    n = int(lengths.sum())
    logp = -torch.rand(n, generator=g, dtype=F64) * 3 - 0.05
    base = {
        "logp": logp.to(dtype),
        "offsets": Batch.offsets_from_lengths(lengths),
        "old_logp": (logp + 0.2 * torch.randn(n, generator=g, dtype=F64)).clamp(max=0).to(dtype),
    }
    base.update(kw)
    return Batch(**base)


# ---------------------------------------------------------------- shards


# (clip_cov and kl_cov select over the request, as verl over its micro-batch: no sum over shards)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("objective", [o for o in OBJECTIVE_NAMES if o not in ("clip_cov", "kl_cov")])
def test_shards_sum_to_whole_batch(mode, objective):
    whole = random_batch(11, max_len=7, advantages="sequence", num_seqs=9)
    cfg = make_config(objective, mode, "k3", ("sequence", "truncate"), variant=1)
    m = whole.mask
    off = whole.offsets
    lens = off[1:] - off[:-1]
    ylen = torch.stack([m[off[i] : off[i + 1]].sum() for i in range(len(lens))])
    agg = AggregationConfig(
        mode=mode,
        num_tokens=float(m.sum()),
        num_seqs=float((ylen > 0).sum()),
        constant=cfg.aggregation.constant,
    )
    cfg_g = LossConfig(objective=cfg.objective, aggregation=agg, kl=cfg.kl, mismatch=cfg.mismatch)
    res_whole = E.loss(whole, cfg_g)
    res_default = E.loss(
        whole,
        LossConfig(objective=cfg.objective, aggregation=cfg.aggregation, kl=cfg.kl, mismatch=cfg.mismatch),
    )
    assert math.isclose(res_whole.loss, res_default.loss, rel_tol=1e-12, abs_tol=1e-15)
    total, grads = 0.0, []
    cuts = [0, 2, 3, 7, len(lens)]
    for a, b in itertools.pairwise(cuts):
        t0, t1 = int(off[a]), int(off[b])
        part = Batch(
            logp=whole.logp[t0:t1],
            offsets=off[a : b + 1] - t0,
            old_logp=whole.old_logp[t0:t1],
            mask=m[t0:t1],
            ref_logp=whole.ref_logp[t0:t1],
            rollout_logp=whole.rollout_logp[t0:t1],
            advantages=whole.advantages[a:b],
            advantage_level="sequence",
        )
        r = E.loss(part, cfg_g)
        total += r.loss
        grads.append(r.grad)
    assert math.isclose(total, res_whole.loss, rel_tol=1e-12, abs_tol=1e-15)
    torch.testing.assert_close(torch.cat(grads), res_whole.grad, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- SAPO identities


@pytest.mark.parametrize("tau", [(1.0, 1.05), (0.3, 7.0), (5.0, 0.2)])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_sapo_on_policy_gradient_is_minus_advantage(tau, mode):
    b = simple_batch([3, 0, 4, 2], advantages=torch.tensor([1.5, 0.3, -2.0, 0.0], dtype=F64))
    b.old_logp = b.logp.clone()
    agg = AggregationConfig(mode=mode, constant=5.0 if mode == "token_sum_norm" else None)
    res = E.loss(b, LossConfig(objective=Sapo(*tau), aggregation=agg))
    alpha = {
        "token_mean": torch.full((9,), 1 / 9, dtype=F64),
        "seq_mean_token_mean": torch.tensor([1 / 3] * 3 + [1 / 4] * 4 + [1 / 2] * 2, dtype=F64) / 3,
        "seq_mean_token_sum": torch.full((9,), 1 / 3, dtype=F64),
        "token_sum_norm": torch.full((9,), 1 / 5, dtype=F64),
    }[mode]
    torch.testing.assert_close(res.grad, -res.advantages * alpha, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(res.gate_weight, torch.ones(9, dtype=F64))
    assert res.metrics["grad_retained"] == pytest.approx(1.0)


def test_sapo_gate_and_tau_sign():
    b = simple_batch([5, 4], seed=3, advantages=torch.tensor([0.7, -1.3], dtype=F64))
    tp, tn = 0.6, 2.5
    res = E.loss(
        b,
        LossConfig(
            objective=Sapo(tau_pos=tp, tau_neg=tn),
            aggregation=AggregationConfig("token_sum_norm", constant=1.0),
        ),
    )
    r = torch.exp(b.logp - b.old_logp)
    a = res.advantages
    tau = torch.where(a > 0, torch.tensor(tp, dtype=F64), torch.tensor(tn, dtype=F64))
    p = torch.sigmoid(tau * (r - 1))
    torch.testing.assert_close(res.gate_weight, 4 * p * (1 - p), rtol=1e-13, atol=0)
    torch.testing.assert_close(res.grad, -4 * p * (1 - p) * r * a, rtol=1e-13, atol=0)
    assert res.loss == pytest.approx(float((-(4 / tau) * p * a).sum()), rel=1e-13)
    # tau_neg is used for A <= 0: A = 0 tokens give loss 0 and gradient 0 whatever tau
    b0 = simple_batch([3], advantages=torch.tensor([0.0], dtype=F64))
    r0 = E.loss(b0, LossConfig(objective=Sapo(tau_pos=tp, tau_neg=tn)))
    assert r0.loss == 0.0 and torch.all(r0.grad == 0)


def test_sapo_saturation_metrics():
    n = 6
    logp = torch.full((n,), -5.0, dtype=F64)
    old = logp - torch.tensor([0.0, 0.0, 3.0, 0.0, 3.0, 0.0], dtype=F64)  # r = 1 or e^3
    b = Batch(
        logp=logp,
        offsets=torch.tensor([0, 3, 6]),
        old_logp=old,
        advantages=torch.tensor([1.0, -1.0], dtype=F64),
    )
    m = E.loss(b, LossConfig(objective=Sapo())).metrics
    assert m["gate_saturation_pos"] == pytest.approx(1 / 3)
    assert m["gate_saturation_neg"] == pytest.approx(1 / 3)
    assert m["tokens_pos"] == 3 and m["tokens_neg"] == 3
    assert 0 < m["gate_mean_pos"] < 1 and 0 < m["grad_retained"] < 1


# ---------------------------------------------------------------- clip metrics


def test_grpo_sign_aware_clip_fractions():
    d = torch.tensor([0.5, 0.0, -0.5, -0.5, 0.0, 2.0], dtype=F64)  # r = e^d
    logp = torch.full((6,), -2.0, dtype=F64)
    b = Batch(
        logp=logp,
        offsets=torch.tensor([0, 3, 6]),
        old_logp=logp - d,
        advantages=torch.tensor([1.0, -1.0], dtype=F64),
    )
    res = E.loss(b, LossConfig(objective=Grpo(dual_clip=3.0)))
    m = res.metrics
    assert m["clip_high"] == pytest.approx(1 / 3)  # A>0: r = e^0.5 > 1.2
    assert m["clip_low"] == pytest.approx(1 / 3)  # A<0: r = e^-0.5 < 0.8
    assert m["dual_clip"] == pytest.approx(1 / 3)  # A<0: r = e^2 > 3
    assert res.clip_mask.tolist() == [True, False, False, True, False, True]
    assert res.grad[[0, 3, 5]].abs().sum() == 0
    g = E.loss(b, LossConfig(objective=Gppo())).grad
    assert g[0] == pytest.approx(-1.2 / 2 / 3)  # bound's gradient, seq_mean_token_mean weight 1/(3*2)
    assert g[3] == pytest.approx(0.8 / 2 / 3)


@pytest.mark.parametrize("obj", [Cispo(eps_low=0.2, eps_high=0.28), Grpo(), Gppo()], ids=lambda o: o.name)
def test_a_token_without_advantage_is_never_clipped(obj):
    """Found by an audit: CISPO counted A = 0 tokens (degenerate groups, no gradient) in
    clip_mask and clip_fraction, which grpo / gppo / gspo never do."""
    r = torch.tensor([0.5, 2.0, 1.0, 0.5, 2.0, 0.5, 2.0], dtype=F64)
    a = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, -1.0, -1.0], dtype=F64)
    logp = torch.full((7,), -2.0, dtype=F64)
    b = Batch(
        logp=logp,
        offsets=torch.tensor([0, 7]),
        old_logp=logp - r.log(),
        advantages=a,
        advantage_level="token",
    )
    res = E.loss(b, LossConfig(objective=obj))
    assert res.clip_mask[:3].tolist() == [False, False, False]
    # of the 7 trained tokens only A != 0 ones outside the bounds: grpo / gppo 2 (r = 2 at A>0,
    # r = 0.5 at A<0), cispo all 4 (its IS weight is clipped on both sides whatever A's sign)
    want = [False, True, True, False] if obj.name != "cispo" else [True, True, True, True]
    assert res.clip_mask[3:].tolist() == want
    assert res.metrics["clip_fraction"] == pytest.approx(sum(want) / 7)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("obj", ALL_OBJECTIVES, ids=lambda o: o.name)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_fully_masked_and_empty(obj, mode):
    agg = AggregationConfig(mode=mode, constant=3.0 if mode == "token_sum_norm" else None)
    kw = {"kl": KLConfig(beta=0.1), "mismatch": MismatchConfig()}
    b = simple_batch([2, 0, 3], rewards=torch.tensor([1.0, 0.0, 2.0]), group_ids=torch.tensor([0, 0, 0]))
    b.mask = torch.zeros(5, dtype=torch.bool)
    b.ref_logp = b.logp + 0.1
    b.rollout_logp = b.logp
    res = E.loss(b, LossConfig(objective=obj, aggregation=agg, **kw))
    assert res.loss == 0.0 and torch.all(res.grad == 0)
    assert all(math.isfinite(v) for v in res.metrics.values())
    assert set(res.metrics) == set(METRIC_NAMES)
    # no trained token: ratio_min and ratio_max are 1 (not an infinite min over no token)
    assert (res.metrics["ratio_min"], res.metrics["ratio_mean"], res.metrics["ratio_max"]) == (1.0, 1.0, 1.0)
    # no token at all, no sequence at all
    for lengths in ([0, 0], []):
        e = Batch(
            logp=torch.zeros(0),
            offsets=Batch.offsets_from_lengths(torch.tensor(lengths, dtype=torch.int64)),
            advantages=torch.zeros(len(lengths)),
            ref_logp=torch.zeros(0),
            rollout_logp=torch.zeros(0),
        )
        r = E.loss(e, LossConfig(objective=obj, aggregation=agg, **kw))
        assert r.loss == 0.0 and r.grad.numel() == 0
        assert all(math.isfinite(v) for v in r.metrics.values())
        assert r.metrics["ratio_mean"] == 1.0 and r.metrics["grad_retained"] == 1.0
        assert r.metrics["ratio_min"] == 1.0 and r.metrics["ratio_max"] == 1.0


def test_singleton_and_equal_groups_are_degenerate():
    b = simple_batch(
        [2, 3, 1, 2, 2],
        rewards=torch.tensor([1.0, 1.0, 0.3, 0.0, 1.0]),
        group_ids=torch.tensor([5, 5, 9, 2, 2]),
    )
    res = E.loss(b, LossConfig())
    assert torch.all(res.advantages[:6] == 0)  # equal group (5) and singleton (9)
    assert torch.all(res.advantages[6:8] < 0) and torch.all(res.advantages[8:] > 0)
    assert res.metrics["degenerate_group_frac"] == pytest.approx(2 / 3)
    assert res.metrics["num_groups"] == 3
    assert torch.all(res.grad[:6] == 0)
    # min_group_std turns a near-equal continuous group degenerate
    b2 = simple_batch([2, 2], rewards=torch.tensor([0.5, 0.5 + 1e-7]), group_ids=torch.tensor([1, 1]))
    assert E.loss(b2, LossConfig()).metrics["degenerate_group_frac"] == 0.0
    res2 = E.loss(b2, LossConfig(advantages=AdvantageConfig(min_group_std=1e-3)))
    assert res2.metrics["degenerate_group_frac"] == 1.0 and torch.all(res2.advantages == 0)


@pytest.mark.parametrize(
    ("est", "scale"),
    # (reinforce_pp's group scale and gdpo's batch scale are refused: their own tests)
    [
        (e, s)
        for e in SEQUENCE_ESTIMATORS
        for s in (None, "group", "batch", "leave_one_out")
        if (e, s) not in REFUSED_SCALES
    ],
)
def test_eps_0_gives_finite_advantages(est, scale):
    """eps=0 is accepted: a zero denominator (an equal group, a batch of one weighted value)
    whitens or scales to 0, not 0/0 (reinforce_pp_baseline with one trained sequence was
    refused as an `overflow`; found by an audit)."""
    b = simple_batch([0, 4], rewards=torch.tensor([0.0, 1.0]), group_ids=torch.tensor([0, 0]))  # one weighted
    res = E.loss(b, LossConfig(advantages=AdvantageConfig(estimator=est, scale=scale, eps=0.0)))
    assert torch.isfinite(res.advantages).all() and math.isfinite(res.loss)
    adv = E.advantages(
        torch.tensor([0.0, 1.0, 5.0, 5.0]), torch.tensor([0, 0, 1, 2]), AdvantageConfig(est, scale, eps=0.0)
    ).advantages
    # (reinforce_pp has no group baseline: groups of one keep their R)
    assert torch.isfinite(adv).all() and (adv[2:].tolist() == [0.0, 0.0]) == (est != "reinforce_pp")
    # one reward value in the whole batch (R / a batch std of 0 for reinforce_pp): 0 for all
    same = E.advantages(torch.full((3,), 2.0), torch.tensor([0, 1, 1]), AdvantageConfig(est, scale, eps=0.0))
    assert same.advantages.tolist() == [0.0] * 3


@pytest.mark.parametrize("mask", [[1, 1, 1, 0, 0, 0], [0] * 6])
def test_reinforce_pp_baseline_without_spread_whitens_untrained_sequences_to_0(mask):
    """When the trained tokens carry one value (here: one trained sequence, or none), nothing
    is whitened: every advantage is 0, a fully masked sequence's too (it was (a - mu) / eps,
    -1e6, in the advantages output; found by an audit)."""
    b = simple_batch(
        [3, 3],
        mask=torch.tensor(mask, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0]),
        group_ids=torch.tensor([0, 0]),
    )
    res = E.loss(b, LossConfig(advantages=AdvantageConfig(estimator="reinforce_pp_baseline")))
    assert res.advantages.tolist() == [0.0] * 6 and res.loss == 0.0
    spread = simple_batch(
        [3, 3, 2],
        mask=torch.tensor([1, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0, 0.5]),
        group_ids=torch.tensor([0, 0, 0]),
    )
    a = E.loss(spread, LossConfig(advantages=AdvantageConfig(estimator="reinforce_pp_baseline"))).advantages
    assert 0 < float(a.abs().max()) < 10  # with spread, the untrained sequence is whitened too


@pytest.mark.parametrize("est", SEQUENCE_ESTIMATORS)
def test_estimators(est):
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0], dtype=F64)
    g = torch.tensor([0, 0, 0, 1, 1])
    res = E.advantages(r, g, AdvantageConfig(estimator=est))
    a = res.advantages
    # adv_std and reward_std are population stds, as METRIC_NAMES says
    assert res.metrics["adv_std"] == pytest.approx(float(a.std(correction=0)), rel=1e-12)
    assert res.metrics["reward_std"] == pytest.approx(float(r.std(correction=0)), rel=1e-12)
    if est == "grpo":
        s0 = r[:3].std()
        torch.testing.assert_close(a[:3], (r[:3] - 1 / 3) / (s0 + 1e-6))
    elif est == "dr_grpo":
        torch.testing.assert_close(a, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, 1.0], dtype=F64))
    elif est == "rloo":
        torch.testing.assert_close(a, torch.tensor([1.0, -0.5, -0.5, -2.0, 2.0], dtype=F64))
    elif est == "opo":  # every sequence weighs 1 without token counts: dr_grpo's
        torch.testing.assert_close(a, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, 1.0], dtype=F64))
    elif est == "gpg":  # dr_grpo's times B / #(R != 0) = 5 / 3
        torch.testing.assert_close(a, torch.tensor([10 / 9, -5 / 9, -5 / 9, -5 / 3, 5 / 3], dtype=F64))
    elif est == "grpo_passk":  # each group's best alone: (R_max - R_second) / (std_g + eps)
        s0, s1 = r[:3].std(), r[3:].std()
        torch.testing.assert_close(a, torch.tensor([1 / (s0 + 1e-6), 0, 0, 0, 2 / (s1 + 1e-6)], dtype=F64))
    elif est == "reinforce_pp":  # R with no baseline, whitened over the sequences (each weighs 1)
        torch.testing.assert_close(a, (r - 1.4) / (r.std() + 1e-6))
    else:
        assert abs(float(a.mean())) < 1e-12 and float(a.std()) == pytest.approx(1.0, rel=1e-5)
    batch_scaled = E.advantages(r, g, AdvantageConfig(estimator="dr_grpo", scale="batch")).advantages
    torch.testing.assert_close(
        batch_scaled, (r - torch.tensor([1 / 3] * 3 + [3.0] * 2, dtype=F64)) / (r.std() + 1e-6)
    )


def _verl_opo_and_gpg(
    scores: list[float], lengths: list[int], index: list[int]
) -> tuple[list[float], list[float]]:
    """verl's compute_opo_outcome_advantage and compute_gpg_outcome_advantage (f_norm 1), their
    loops written out over floats."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(index):
        groups.setdefault(g, []).append(i)
    opo, gpg = list(scores), list(scores)
    alpha = len(scores) / max(1, sum(1 for x in scores if x != 0))
    for idx in groups.values():
        if len(idx) == 1:
            bsl = mean = 0.0
        else:
            bsl = sum(lengths[i] * scores[i] for i in idx) / sum(lengths[i] for i in idx)
            mean = sum(scores[i] for i in idx) / len(idx)
        for i in idx:
            opo[i] = scores[i] - bsl
            gpg[i] = alpha * (scores[i] - mean)
    return opo, gpg


def _verl_grpo_passk(scores: list[float], index: list[int], eps: float = 1e-6) -> dict[int, float]:
    """verl's compute_grpo_passk_outcome_advantage (norm_adv_by_std_in_grpo) over the groups of
    two or more (verl refuses a group of one): {sequence: advantage}."""
    r = torch.tensor(scores, dtype=F64)
    out: dict[int, float] = {}
    for g in sorted(set(index)):
        idx = [i for i, x in enumerate(index) if x == g]
        if len(idx) < 2:
            continue
        rewards = r[idx]
        topk, topk_idx = torch.topk(rewards, 2)
        out.update(dict.fromkeys(idx, 0.0))
        out[idx[int(topk_idx[0])]] = float((topk[0] - topk[1]) / (torch.std(rewards) + eps))
    return out


def test_opo_gpg_and_grpo_passk_are_verls():
    """OPO (R minus the group's length-weighted mean), GPG (B / #(R != 0) times R minus the
    group mean) and Pass@k (the best alone gets R_max - R_second over std + eps) against verl's
    loops, through `loss` (the weights: each sequence's trained tokens) and `advantages`
    (token_counts). A group of one gets 0 here, as every estimator's does; verl gives it R
    (opo) or alpha R (gpg), and refuses it (grpo_passk)."""
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 9, (13,), generator=gen)
    rewards = torch.randint(0, 3, (13,), generator=gen).to(F64) / 2  # some 0, some groups all equal
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 4])  # 3 and 4 alone
    b = Batch(
        logp=-torch.rand(int(lengths.sum()), generator=gen, dtype=F64),
        offsets=Batch.offsets_from_lengths(lengths),
        rewards=rewards,
        group_ids=groups,
    )
    opo, gpg = _verl_opo_and_gpg(rewards.tolist(), lengths.tolist(), groups.tolist())
    for est, want in (("opo", opo), ("gpg", gpg)):
        cfg = AdvantageConfig(estimator=est)
        got = E.advantages(rewards, groups, cfg, token_counts=lengths).advantages
        assert got[:11].tolist() == pytest.approx(want[:11], rel=1e-12, abs=1e-12)
        assert got[11:].tolist() == [0.0, 0.0] and want[11:] != [0.0, 0.0]
        per_token = E.loss(b, LossConfig(advantages=cfg)).advantages
        assert torch.equal(per_token, got.repeat_interleave(lengths))
    assert any(x != y for x, y in zip(opo[:11], gpg[:11], strict=True))
    # grpo_passk: group 0's best is alone (1 over 0.5), group 2's top is shared (0 for all)
    rewards[0], rewards[8], rewards[9] = 1.0, 1.0, 1.0
    passk = _verl_grpo_passk(rewards.tolist(), groups.tolist())
    got = E.advantages(rewards, groups, AdvantageConfig(estimator="grpo_passk")).advantages
    assert got[:11].tolist() == pytest.approx([passk[i] for i in range(11)], rel=1e-12, abs=1e-12)
    assert got[:4].count_nonzero() == 1 and got[7:11].count_nonzero() == 0 and got[11:].tolist() == [0.0, 0.0]


def _verl_reinforce_plus_plus(
    token_level_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0
) -> Tensor:
    """verl's compute_reinforce_plus_plus_outcome_advantage with its masked_whiten (mean and
    unbiased variance over the mask's tokens, (x - mean) * rsqrt(var + 1e-8)), written out."""
    returns = torch.zeros_like(token_level_rewards)
    running = torch.zeros(token_level_rewards.shape[0], dtype=F64)
    for t in reversed(range(token_level_rewards.shape[1])):
        running = token_level_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * response_mask[:, t]  # "Reset after EOS"
    m = response_mask.to(F64)
    mean = (returns * m).sum() / m.sum()
    var = ((returns - mean) ** 2 * m).sum() / m.sum() * (m.sum() / (m.sum() - 1))
    return (returns - mean) * torch.rsqrt(var + 1e-8) * m


def _openrlhf_reinforce(token_level_rewards: Tensor, action_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """OpenRLHF's `reinforce` estimator: get_cumulative_returns, then the experience maker's
    normalisation over every action token (population variance, rsqrt(var.clamp(1e-8)))."""
    rewards = token_level_rewards * action_mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=F64)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    m = action_mask.to(F64)
    mean = (returns * m).sum() / m.sum()
    var = ((returns - mean) ** 2 * m).sum() / m.sum()
    return (returns - mean) * var.clamp(min=1e-8).rsqrt() * m


def test_reinforce_pp_is_verls_reinforce_plus_plus_and_openrlhfs_reinforce():
    """REINFORCE++ at gamma 1 (both peers' default): the outcome reward at each response's last
    token, its return R on every token, whitened over the batch's tokens with no baseline.
    Padded [B, T] with the reward at the last response token, as both peers place it; groups
    are not read (an all-equal group and a group of one keep their R)."""
    gen = torch.Generator().manual_seed(11)
    lengths = torch.tensor([3, 7, 1, 5, 4, 6, 2, 8])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.0, 2.0], dtype=F64)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])  # groups 1, 2 all equal; 3 and 4 alone
    t_max = int(lengths.max())
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    token_rewards = torch.zeros(len(lengths), t_max, dtype=F64)
    token_rewards[torch.arange(len(lengths)), lengths - 1] = rewards
    b = Batch(
        logp=-torch.rand(int(lengths.sum()), generator=gen, dtype=F64),
        offsets=Batch.offsets_from_lengths(lengths),
        rewards=rewards,
        group_ids=groups,
    )
    cfg = AdvantageConfig(estimator="reinforce_pp", eps=0.0)
    got = E.loss(b, LossConfig(advantages=cfg)).advantages
    verl = _verl_reinforce_plus_plus(token_rewards, mask)[mask]
    torch.testing.assert_close(got, verl, rtol=1e-7, atol=0)  # (verl's + 1e-8 under the rsqrt)
    # OpenRLHF's population variance: a factor sqrt(N / (N - 1)) from softgate's
    n = int(lengths.sum())
    torch.testing.assert_close(got * math.sqrt(n / (n - 1)), _openrlhf_reinforce(token_rewards, mask)[mask])
    seq = E.advantages(rewards, groups, cfg, token_counts=lengths)
    assert seq.advantages.count_nonzero() == len(lengths) and seq.metrics["degenerate_group_frac"] == 0.8
    # unlike reinforce_pp_baseline, which zeroes the degenerate groups' members
    base = E.advantages(rewards, groups, AdvantageConfig("reinforce_pp_baseline"), token_counts=lengths)
    assert base.advantages[2:].count_nonzero() == 0


def test_reinforce_pp_refuses_the_group_scale_and_min_group_std():  # (and gdpo the batch scale: below)
    """reinforce_pp reads no groups: R over a group of one's std (0) + eps would be R / eps,
    and min_group_std would zero nothing (a setting silently ignored)."""
    for cfg, field in (
        (AdvantageConfig(estimator="reinforce_pp", scale="group"), "advantages.scale"),
        (AdvantageConfig(estimator="reinforce_pp", min_group_std=0.1), "advantages.min_group_std"),
    ):
        with pytest.raises(InputError) as err:
            E.advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), cfg)
        ((v,),) = [err.value.violations]
        assert v.field == field and v.reason.startswith("unsupported: reinforce_pp reads no groups")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_rloo_leave_one_out_scale_is_the_reference(seed: int, eps: float) -> None:
    """rloo with scale leave_one_out against the plain-loop reference: each member's
    R - mean(others) over the others' unbiased std + eps where that std is above 0, on groups of
    1 to 6 members with rewards from a few values (ties, lone outliers, equal groups); in
    ComputeAdvantages and in a loss (float64 and float32 rewards)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 7, (12,), generator=g)
    groups = torch.repeat_interleave(torch.arange(12), sizes)[torch.randperm(int(sizes.sum()), generator=g)]
    values = torch.tensor([0.0, 1.0, 0.25, 0.7], dtype=torch.float64)
    r = values[torch.randint(0, 4, (groups.numel(),), generator=g)]
    cfg = AdvantageConfig(estimator="rloo", scale="leave_one_out", eps=eps)
    want, frac = reference_advantages(r.tolist(), groups.tolist(), cfg)
    got = E.advantages(r, groups, cfg)
    torch.testing.assert_close(got.advantages, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-14)
    assert got.metrics["degenerate_group_frac"] == pytest.approx(frac)
    got32 = E.advantages(r.float(), groups, cfg).advantages.double()
    torch.testing.assert_close(got32, torch.tensor(want, dtype=F64), rtol=1e-6, atol=1e-6)
    lengths = torch.randint(1, 4, (groups.numel(),), generator=g)
    batch = Batch(
        logp=-torch.rand(int(lengths.sum()), generator=g, dtype=F64) - 0.1,
        offsets=Batch.offsets_from_lengths(lengths),
        rewards=r,
        group_ids=groups,
    )
    res = E.loss(batch, LossConfig(advantages=cfg))
    torch.testing.assert_close(res.advantages, torch.tensor(want, dtype=F64).repeat_interleave(lengths))
    # ... which plain rloo is not, wherever a member's others have a spread other than 1
    plain = E.advantages(r, groups, AdvantageConfig(estimator="rloo", eps=eps)).advantages
    assert not torch.allclose(plain, got.advantages)


def test_rloo_leave_one_out_scale_by_hand() -> None:
    """The cases NeMo-RL's rule decides: a lone correct answer among equal wrong ones keeps
    R - mean(others) = 1 while its peers are divided by their others' std; a pair is never
    divided (one other: no std); rewards 3, 1, 2, 2: each member over its others' std."""
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 0.9, 3.0, 1.0, 2.0, 2.0], dtype=F64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    got = E.advantages(
        r, groups, AdvantageConfig(estimator="rloo", scale="leave_one_out", eps=0.0)
    ).advantages
    peer = -1 / 3 / math.sqrt(1 / 3)  # others {1, 0, 0}: mean 1/3, unbiased variance 1/3
    want = [1.0, peer, peer, peer, -0.7, 0.7]
    want += [(3 - 5 / 3) / math.sqrt(1 / 3), (1 - 7 / 3) / math.sqrt(1 / 3), (2 - 2) / 1.0, 0.0]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    # others at 0.7, 0.7, 0.7: equal, though E[R^2] - mean^2 rounds to 1e-16 (NeMo-RL's std
    # 1.6e-8 then divides, giving -6.4e5): undivided
    r = torch.tensor([0.05, 0.7, 0.7, 0.7], dtype=F64)
    got = E.advantages(
        r, torch.zeros(4, dtype=torch.long), AdvantageConfig("rloo", "leave_one_out")
    ).advantages
    assert float(got[0]) == pytest.approx(-0.65, rel=1e-14)


@pytest.mark.parametrize(
    "values",
    [
        [0.0, 1e-7, 2e-7, 5e-8, 100.0],
        [0.0, 1e-3, 2e-3, 5e-4, 1e6],
        [1.0, 0.9, 0.9, 0.9001],
        [5.0, 1.0, 1.0, 1.0 + 1e-9],
    ],
)
def test_rloo_leave_one_out_scale_one_member_far_from_close_others(values: list[float]) -> None:
    """One member's deviation holds nearly all of the group's squares (S - d^2 n / (n - 1)
    keeps no digits: a review found 100 where 9.2e7 is right): its others' squares are summed
    again, and every member matches exact rational arithmetic to 1e-9."""
    from fractions import Fraction

    r = torch.tensor(values, dtype=F64)
    got = E.advantages(
        r, torch.zeros(len(values), dtype=torch.long), AdvantageConfig("rloo", "leave_one_out", eps=0.0)
    )
    for i, a in enumerate(got.advantages.tolist()):
        others = [Fraction(v) for j, v in enumerate(values) if j != i]
        mean = sum(others) / len(others)
        var = sum((x - mean) ** 2 for x in others) / (len(others) - 1)
        want = (
            float(Fraction(values[i]) - mean) / float(var) ** 0.5
            if var
            else float(Fraction(values[i]) - mean)
        )
        assert a == pytest.approx(want, rel=1e-9), i


def test_rloo_leave_one_out_scale_with_min_group_std() -> None:
    """min_group_std guards the others' std too: a member whose others' std is below it is not
    divided (as one whose others are equal), where 1 / (5.8e-5 + eps) would multiply it by 1.7e4."""
    r = torch.tensor([1.0, 0.9, 0.9, 0.9001], dtype=F64)
    groups = torch.zeros(4, dtype=torch.long)
    loose = E.advantages(r, groups, AdvantageConfig("rloo", "leave_one_out")).advantages
    guarded = E.advantages(r, groups, AdvantageConfig("rloo", "leave_one_out", min_group_std=0.01)).advantages
    assert float(loose[0]) > 1000 and float(guarded[0]) == pytest.approx(1.0 - 2.7001 / 3, rel=1e-12)
    torch.testing.assert_close(guarded[1:], loose[1:], rtol=0, atol=0)  # (their others' std: 0.05)


def test_rloo_leave_one_out_scale_with_skip_nan_components() -> None:
    """An unscored member (its one reward NaN, skip_nan_components) is nobody's other: the
    scored members get what they get without it, and it gets 0."""
    r = torch.tensor([1.0, float("nan"), 0.0, 0.5, 0.25, 0.0, float("nan")], dtype=F64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    cfg = AdvantageConfig(estimator="rloo", scale="leave_one_out", skip_nan_components=True)
    got = E.advantages(r, groups, cfg).advantages
    kept = ~torch.isnan(r)
    alone = E.advantages(
        r[kept], groups[kept], dataclasses.replace(cfg, skip_nan_components=False)
    ).advantages
    torch.testing.assert_close(got[kept], alone, rtol=1e-13, atol=0.0)
    assert got[~kept].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("skip_nan", [False, True])
def test_rloo_leave_one_out_scale_on_the_gpu_code_path(monkeypatch, skip_nan: bool) -> None:
    """The segmented group sums a GPU runs (rewards sorted by group) give the CPU's bits."""
    from softgate.engine import advantages

    g = torch.Generator().manual_seed(3)
    groups = torch.randint(0, 9, (60,), generator=g)
    r = torch.tensor([0.0, 1.0, 0.3, 0.7], dtype=F64)[torch.randint(0, 4, (60,), generator=g)]
    # and a group whose far member's others' squares are summed again over pairs
    groups = torch.cat([groups, torch.full((4,), 9)])
    r = torch.cat([r, torch.tensor([0.0, 1e-7, 2e-7, 100.0], dtype=F64)])
    if skip_nan:
        r[:60:7] = float("nan")
    cfg = AdvantageConfig(estimator="rloo", scale="leave_one_out", skip_nan_components=skip_nan)
    want = E.advantages(r, groups, cfg).advantages
    monkeypatch.setattr(advantages, "use_segment_reduce", lambda device: True)
    got = E.advantages(r, groups, cfg).advantages
    assert torch.equal(got, want) and bool(want.ne(0).any())


@pytest.mark.parametrize("est", [e for e in SEQUENCE_ESTIMATORS if e != "rloo"])
def test_leave_one_out_scale_is_refused_but_with_rloo(est: str) -> None:
    with pytest.raises(InputError) as err:
        E.advantages(
            torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 0]), AdvantageConfig(est, "leave_one_out")
        )
    ((v,),) = [err.value.violations]
    assert v.field == "advantages.scale" and v.reason.startswith("unsupported: leave_one_out divides rloo's")


def _trl_nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """TRL's nanstd: the unbiased std of the values that are not NaN (NaN for one of them)."""
    if dim is None:
        return _trl_nanstd(x.reshape(-1), 0)[0]
    var = torch.nanmean((x - torch.nanmean(x, dim=dim, keepdim=True)) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    return torch.sqrt(var * count / (count - 1))


def _trl_normalize_then_sum(rewards_per_func: Tensor, num_generations: int, weights: list[float]) -> Tensor:
    """TRL's multi_objective_aggregation="normalize_then_sum" (GDPO), written out: each
    component over its group's mean and unbiased std + 1e-4, their weighted sum, that over the
    batch's mean and std + 1e-4 (groups of num_generations consecutive rows). NaN components
    (a reward function's None) are left out of the group statistics and of the sum; a row of
    NaN (unscorable) out of the batch's statistics, with advantage 0."""
    k = rewards_per_func.shape[1]
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    grouped = rewards_per_func.view(-1, num_generations, k)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = _trl_nanstd(grouped, dim=1)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, k)
    rewards = (reward_k * torch.tensor(weights, dtype=F64)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    advantages = (rewards - torch.nanmean(rewards)) / (_trl_nanstd(rewards) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _trl_sum_then_normalize(rewards_per_func: Tensor, num_generations: int, weights: list[float]) -> Tensor:
    """TRL's default multi_objective_aggregation="sum_then_normalize" (scale_rewards "group"):
    the components' weighted nansum (a None is 0; a row of them unscorable: out of its group's
    mean and std, advantage 0), over its group's mean and std + 1e-4."""
    rewards = (rewards_per_func * torch.tensor(weights, dtype=F64)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    std = _trl_nanstd(grouped, dim=1)[:, 0].repeat_interleave(num_generations)
    return torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)


def _verl_gdpo(scores: Tensor, index: list[int], weights: list[float], lengths: Tensor) -> Tensor:
    """verl's compute_gdpo_outcome_advantage written out: each component through its GRPO
    (group mean and unbiased std + 1e-6, groups of two or more), the weighted sum on every
    token of the response, masked_whiten over those tokens ((x - mean) * rsqrt(var + 1e-8),
    unbiased var): per sequence."""
    total = torch.zeros(scores.shape[0], dtype=F64)
    for k, w in enumerate(weights):
        s = scores[:, k]
        a = torch.zeros_like(s)
        for g in set(index):
            idx = [i for i, x in enumerate(index) if x == g]
            a[idx] = (s[idx] - s[idx].mean()) / (s[idx].std() + 1e-6)
        total = total + w * a
    tok = total.repeat_interleave(lengths)
    var = tok.var()  # (unbiased, over every response token)
    return (total - tok.mean()) * torch.rsqrt(var + 1e-8)


def test_gdpo_is_trls_normalize_then_sum_and_verls_gdpo():
    """GDPO over [B, K] rewards: each component normalised within its group, the weighted sum
    whitened. Against TRL's normalize_then_sum (whitened over sequences: `advantages` without
    token counts, eps 1e-4) and verl's gdpo (over tokens: token_counts, and its eps 1e-6 in the
    groups but 1e-8 under the whitening's rsqrt, hence 1e-5). A component constant within a
    group adds 0 there; groups of one are left out (verl gives them mean 0, std 1; TRL needs 2+)."""
    gen = torch.Generator().manual_seed(21)
    rewards = torch.randint(0, 4, (12, 3), generator=gen).to(F64) / 3
    rewards[0:4, 1] = 0.5  # component 1 constant in group 0
    ids = torch.arange(12) // 4
    weights = [0.2, 0.5, 0.3]
    got = E.advantages(rewards, ids, AdvantageConfig("gdpo", eps=1e-4, reward_weights=weights))
    torch.testing.assert_close(
        got.advantages, _trl_normalize_then_sum(rewards, 4, weights), rtol=0, atol=1e-13
    )
    lengths = torch.randint(1, 9, (12,), generator=gen)
    got = E.advantages(rewards, ids, AdvantageConfig("gdpo", reward_weights=weights), token_counts=lengths)
    torch.testing.assert_close(
        got.advantages, _verl_gdpo(rewards, ids.tolist(), weights, lengths), rtol=1e-5, atol=0
    )
    # the metrics read the weighted sum of the components
    summed = rewards @ torch.tensor(weights, dtype=F64)
    assert got.metrics["reward_mean"] == pytest.approx(float(summed.mean()), rel=1e-14)
    assert got.metrics["degenerate_group_frac"] == 0.0
    # a group constant in every component: 0 here, where verl whitens its 0 sum to -mean / std;
    # the others as verl's (its whitening statistics hold the group's tokens at 0 too)
    rewards[4:8] = torch.tensor([1.0, 0.0, 2.0], dtype=F64)
    got = E.advantages(rewards, ids, AdvantageConfig("gdpo", reward_weights=weights), token_counts=lengths)
    verl = _verl_gdpo(rewards, ids.tolist(), weights, lengths)
    assert got.advantages[4:8].tolist() == [0.0] * 4 and bool((verl[4:8] != 0).all())
    keep = torch.tensor([True] * 4 + [False] * 4 + [True] * 4)
    torch.testing.assert_close(got.advantages[keep], verl[keep], rtol=1e-5, atol=0)
    assert got.metrics["degenerate_group_frac"] == pytest.approx(1 / 3)


def test_gdpo_degenerate_groups_and_the_other_estimators_weighted_sum():
    """A group constant in every component (or of one member) gives 0 to its members and counts
    as degenerate; the other estimators take the components' weighted sum (TRL's
    sum_then_normalize), equal to sending that sum as [B] rewards; [B] rewards with one weight
    scale by it; gdpo of [B] rewards is one component's."""
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5], [2.0, 3.0]], dtype=F64)
    ids = torch.tensor([0, 0, 1, 1, 2])
    res = E.advantages(rewards, ids, AdvantageConfig("gdpo", reward_weights=(1.0, 2.0)))
    assert res.advantages[2:].tolist() == [0.0, 0.0, 0.0] and res.advantages[:2].count_nonzero() == 2
    assert res.metrics["degenerate_group_frac"] == pytest.approx(2 / 3)
    w = torch.tensor([0.25, -1.5], dtype=F64)
    for est in ("grpo", "rloo", "reinforce_pp_baseline", "opo"):
        multi = E.advantages(rewards, ids, AdvantageConfig(est, reward_weights=tuple(w.tolist()))).advantages
        assert torch.equal(multi, E.advantages(rewards @ w, ids, AdvantageConfig(est)).advantages), est
    r = rewards[:, 0]
    scaled = E.advantages(r, ids, AdvantageConfig("dr_grpo", reward_weights=(3.0,))).advantages
    assert torch.equal(scaled, E.advantages(3.0 * r, ids, AdvantageConfig("dr_grpo")).advantages)
    # gdpo of one component: grpo's advantages (degenerate groups 0), whitened over sequences
    one = E.advantages(r, ids, AdvantageConfig("gdpo")).advantages
    a = E.advantages(r, ids, AdvantageConfig("grpo")).advantages
    white = (a - a.mean()) / (a.std() + 1e-6)
    torch.testing.assert_close(one, torch.where(a == 0, 0.0, white), rtol=1e-14, atol=0)
    assert one[2:].tolist() == [0.0] * 3 and bool((one[:2] != 0).all())


def test_skip_nan_components_is_trls_none():
    """skip_nan_components: a NaN component (a TRL reward function's None) does not apply. GDPO
    leaves it out of its group's statistics (TRL's nanmean and nanstd) and the others' weighted
    sum counts it 0 (TRL's nansum); a sequence with no component that applies has no reward:
    out of every statistic, advantage 0 (TRL's unscorable completions). TRL's
    normalize_then_sum and sum_then_normalize to 1e-13. A group where a component applies to
    one member or none is degenerate in it (TRL: NaN, dropped by its nansum); without NaN the
    setting changes no bit."""
    gen = torch.Generator().manual_seed(5)
    rewards = torch.randint(0, 4, (16, 3), generator=gen).to(F64) / 3
    rewards[torch.rand(16, 3, generator=gen) < 0.3] = math.nan
    rewards[4:8, 2] = torch.tensor([math.nan, 1.0, math.nan, math.nan])  # applies to one member
    rewards[8:12, 1] = math.nan  # to none of group 2
    rewards[[2, 9]] = math.nan  # no reward at all
    ids = torch.arange(16) // 4
    w = [0.2, 0.5, 0.3]
    nan = AdvantageConfig("gdpo", eps=1e-4, reward_weights=w, skip_nan_components=True)
    got = E.advantages(rewards, ids, nan)
    torch.testing.assert_close(got.advantages, _trl_normalize_then_sum(rewards, 4, w), rtol=0, atol=1e-13)
    assert got.metrics["degenerate_group_frac"] == 0.0
    # group 3 constant in each component where it applies, and one applies to none: degenerate
    # in all, 0 (TRL: -mean / std)
    nan3 = torch.tensor(
        [[1.0, math.nan, -2.0], [1.0, math.nan, math.nan], [math.nan, math.nan, -2.0], [1.0, math.nan, -2.0]]
    )
    three = torch.cat([rewards[:12], nan3.to(F64)])
    got3 = E.advantages(three, ids, nan)
    assert got3.advantages[12:].tolist() == [0.0] * 4 and got3.metrics["degenerate_group_frac"] == 0.25
    trl = _trl_normalize_then_sum(three, 4, w)
    assert bool((trl[12:] != 0).all())
    torch.testing.assert_close(got3.advantages[:12], trl[:12], rtol=0, atol=1e-13)
    assert got.advantages[[2, 9]].tolist() == [0.0, 0.0]
    summed = rewards.nan_to_num(0.0) @ torch.tensor(w, dtype=F64)
    scored = ~rewards.isnan().all(1)
    assert got.metrics["reward_mean"] == pytest.approx(float(summed[scored].mean()), rel=1e-14)
    assert got.metrics["unscored_seqs"] == float((~scored).sum()) == 3.0  # (rows 2, 9 and one drawn)
    # not 0 in GDPO's statistics: a 0 there moves every member's advantage
    moved = rewards.clone()
    moved[rewards.isnan()] = 0.0
    assert not torch.allclose(E.advantages(moved, ids, nan).advantages, got.advantages)
    got = E.advantages(rewards, ids, dataclasses.replace(nan, estimator="grpo"))
    torch.testing.assert_close(got.advantages, _trl_sum_then_normalize(rewards, 4, w), rtol=0, atol=1e-13)
    # an unscored sequence weighs nothing: as if it were not sent, for every estimator
    counts = torch.randint(1, 9, (16,), generator=gen)
    for est, scale in itertools.product(SEQUENCE_ESTIMATORS, (None, "batch")):
        if est == "gdpo" and scale == "batch":
            continue
        cfg = dataclasses.replace(nan, estimator=est, scale=scale)
        got = E.advantages(rewards, ids, cfg, counts)
        alone = E.advantages(rewards[scored], ids[scored], cfg, counts[scored])
        torch.testing.assert_close(got.advantages[scored], alone.advantages, rtol=1e-13, atol=1e-15)
        assert not bool(got.advantages[~scored].any()), est
    # grpo_passk: an unscored member's 0 is neither the group's best nor its second
    r = torch.tensor([0.0, math.nan, -1.0, -1.5, -1.0, -2.0, math.nan, -3.0], dtype=F64)
    two = torch.arange(8) // 4
    got = E.advantages(r, two, AdvantageConfig("grpo_passk", scale="none", skip_nan_components=True))
    assert got.advantages.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # without NaN: the bits of the setting unset, for every estimator and the token weights
    full = rewards.nan_to_num(0.25)
    for est in SEQUENCE_ESTIMATORS:
        on, off = (AdvantageConfig(est, reward_weights=w, skip_nan_components=x) for x in (True, False))
        got_on, got_off = E.advantages(full, ids, on, counts), E.advantages(full, ids, off, counts)
        assert torch.equal(got_on.advantages, got_off.advantages)
        assert got_on.metrics["unscored_seqs"] == got_off.metrics["unscored_seqs"] == 0.0
    # half precisions are read as float64, NaN included
    half = E.advantages(rewards.to(torch.bfloat16), ids, nan).advantages
    torch.testing.assert_close(
        half, E.advantages(rewards.to(torch.bfloat16).to(F64), ids, nan).advantages.float()
    )


@pytest.mark.parametrize(
    "adv",
    [
        AdvantageConfig("grpo", skip_nan_components=True),
        AdvantageConfig("reinforce_pp_baseline", skip_nan_components=True),
        AdvantageConfig("reinforce_pp", gamma=0.9, skip_nan_components=True),
    ],
)
def test_skip_nan_components_in_loss(adv: AdvantageConfig):
    """loss()'s [B] rewards are one component: a NaN one is a sequence without a reward,
    advantage 0 at every token (the KL in the reward too) and out of the group statistics and
    the token whitening: the other tokens' advantages are those of the batch with that
    sequence masked out (reinforce_pp), or as ComputeAdvantages gives them (per sequence)."""
    b = random_batch(7, num_seqs=6, max_len=8)
    assert b.rewards is not None and b.mask is not None
    b.rewards[2] = math.nan
    cfg = LossConfig(advantages=adv)
    if adv.estimator == "reinforce_pp":
        cfg = dataclasses.replace(cfg, reward_kl=RewardKLConfig(beta=0.1, estimator="k1"))
        assert b.ref_logp is not None
    got = E.loss(b, cfg)
    seq = torch.repeat_interleave(torch.arange(6), b.offsets.diff())
    assert bool(b.mask[seq == 2].any()) and bool(got.advantages[b.mask].any())
    assert not bool(got.advantages[seq == 2].any())
    assert math.isfinite(got.loss) and bool(torch.isfinite(got.grad).all())
    if adv.estimator == "reinforce_pp":
        masked = dataclasses.replace(b, mask=b.mask & (seq != 2), rewards=b.rewards.nan_to_num(5.0))
        want = E.loss(
            masked, dataclasses.replace(cfg, advantages=dataclasses.replace(adv, skip_nan_components=False))
        )
        keep = b.mask & (seq != 2)
        torch.testing.assert_close(got.advantages[keep], want.advantages[keep], rtol=1e-12, atol=1e-12)
    else:
        counts = torch.zeros(6, dtype=torch.int64).index_add_(0, seq, b.mask.long())  # (trained tokens)
        per_seq = E.advantages(b.rewards, b.group_ids, adv, counts)
        want = per_seq.advantages.to(got.advantages.dtype)[seq]
        torch.testing.assert_close(got.advantages[b.mask], want[b.mask], rtol=1e-12, atol=1e-12)
    scored = b.rewards[~b.rewards.isnan()]
    assert got.metrics["reward_mean"] == pytest.approx(float(scored.mean()), rel=1e-12)
    assert got.metrics["unscored_seqs"] == 1.0
    # beside advantages sent, the rewards are only reported: over the sequences with one
    skip = LossConfig(advantages=AdvantageConfig(skip_nan_components=True))
    sent = E.loss(dataclasses.replace(b, advantages=torch.ones(6, dtype=F64)), skip)
    assert sent.metrics["reward_mean"] == pytest.approx(float(scored.mean()), rel=1e-12)
    assert sent.metrics["unscored_seqs"] == 1.0
    # every reward there: none unscored
    b.rewards[2] = 0.5
    assert E.loss(b, cfg).metrics["unscored_seqs"] == 0.0


@pytest.mark.parametrize(
    "est", ["grpo", "dr_grpo", "rloo", "opo", "gpg", "grpo_passk", "reinforce_pp_baseline"]
)
def test_skip_nan_components_with_a_sequence_kl_in_the_reward(est: str) -> None:
    """A sequence without a reward has none for reward_kl at level sequence to move: its KL
    stays out of its group's mean and std and out of gpg's count (it moved every scored
    member's advantage, and at a KL of 10 made all three positive, an audit)."""
    old = torch.full((16,), -0.5, dtype=F64)
    rewards = torch.tensor([1.0, 0.0, 0.5, math.nan], dtype=F64)
    cfg = LossConfig(
        advantages=AdvantageConfig(est, skip_nan_components=True),
        reward_kl=RewardKLConfig(beta=0.1, estimator="k1", level="sequence"),
    )
    got = []
    for kl in (0.0, 1.0, 10.0):  # of the unscored sequence alone
        ref = old.clone()
        ref[12:] -= kl
        b = Batch(
            logp=old.clone(),
            old_logp=old,
            ref_logp=ref,
            offsets=torch.tensor([0, 4, 8, 12, 16]),
            rewards=rewards,
            group_ids=torch.tensor([0, 0, 0, 0]),
        )
        got.append(E.loss(b, cfg).advantages)
    assert bool(got[0][:12].any()) and not bool(got[0][12:].any())
    assert torch.equal(got[1], got[0]) and torch.equal(got[2], got[0])


@pytest.mark.parametrize(
    ("rewards", "cfg", "field", "reason"),
    [
        (
            torch.tensor([[1.0, math.nan], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]),
            AdvantageConfig("gdpo"),
            "rewards[0]",
            "non_finite: value is NaN; set skip_nan_components if NaN marks a reward that does not apply",
        ),
        (
            torch.tensor([[1.0, math.nan], [0.0, 1.0], [1.0, -math.inf], [0.0, 0.0]]),
            AdvantageConfig("gdpo", skip_nan_components=True),
            "rewards[2]",
            "non_finite: value is infinite",
        ),
        (
            torch.tensor([1.0, math.nan, 0.0, 1.0]),
            AdvantageConfig("grpo"),
            "rewards[1]",
            "non_finite: value is NaN; set skip_nan_components if NaN marks a reward that does not apply",
        ),
        (
            torch.ones(4, 2),
            AdvantageConfig("gdpo", skip_nan_components=1),  # type: ignore[arg-type]
            "advantages.skip_nan_components",
            "bad_type: 1; true or false",
        ),
        (
            torch.tensor([[1e99, math.nan], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=F64),
            AdvantageConfig("grpo", reward_weights=(20.0, 1.0), skip_nan_components=True),
            "rewards[0]",
            "out_of_range: the weighted reward 2e+100 exceeds 1e+100",
        ),
        (
            torch.ones(4, 3),
            AdvantageConfig("gdpo", reward_weights=(1.0, 2.0)),
            "advantages.reward_weights",
            "length_mismatch: 2 weights; rewards have 3 components",
        ),
        (
            torch.ones(4),
            AdvantageConfig("grpo", reward_weights=(1.0, 2.0)),
            "advantages.reward_weights",
            "length_mismatch: 2 weights; [B] rewards are one component",
        ),
        (
            torch.ones(4, 2),
            AdvantageConfig("gdpo", reward_weights=(math.inf, 1.0)),
            "advantages.reward_weights",
            "out_of_range: inf is not a finite number",
        ),
        (  # (an OverflowError from math.isfinite once: a review)
            torch.ones(4, 2),
            AdvantageConfig("gdpo", reward_weights=(10**400, 1.0)),
            "advantages.reward_weights",
            "out_of_range: 1000000000",
        ),
        (
            torch.ones(4, 2),
            AdvantageConfig("gdpo", reward_weights=()),
            "advantages.reward_weights",
            "bad_dtype: expected a non-empty sequence of numbers",
        ),
        (
            torch.ones(4, 2),
            AdvantageConfig("gdpo", scale="batch"),
            "advantages.scale",
            "unsupported: gdpo divides",
        ),
        (
            torch.ones(4, 2, 1),
            AdvantageConfig("gdpo"),
            "rewards",
            "bad_shape: shape (4, 2, 1); [B] or [B, K]",
        ),
        (
            torch.ones(4, 0),
            AdvantageConfig("gdpo"),
            "rewards",
            "bad_shape: (4, 0); 1 to 64 reward components",
        ),
        (
            torch.ones(4, 65),
            AdvantageConfig("gdpo"),
            "rewards",
            "bad_shape: (4, 65); 1 to 64 reward components",
        ),
        (
            torch.ones(4, 2),
            AdvantageConfig("gdpo", reward_weights=(1.0,) * 65),
            "advantages.reward_weights",
            "out_of_range: 65 weights; at most 64",
        ),
        (
            torch.ones(4, 2),
            AdvantageConfig("gdpo", reward_weights=(True, 1.0)),
            "advantages.reward_weights",
            "bad_dtype: expected a non-empty sequence of numbers",
        ),
        (
            torch.full((4, 2), 1e99, dtype=F64),
            AdvantageConfig("grpo", reward_weights=(20.0, 1.0)),
            "rewards",
            "out_of_range: the weighted reward 2.1e+100 exceeds 1e+100",
        ),
    ],
)
def test_reward_components_refused_by_name(rewards, cfg, field, reason):
    with pytest.raises(InputError) as err:
        E.advantages(rewards, torch.tensor([0, 0, 1, 1]), cfg)
    assert any(
        field in (v.field, f"{v.field}[{v.index}]") and v.reason.startswith(reason)
        for v in err.value.violations
    ), err.value


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reward_components_on_cuda_equal_the_cpu():
    """[B, K] rewards and their weights on the GPU (the weighted-sum check builds its weights
    on the rewards' device), GDPO and a weighted sum, as on the CPU."""
    gen = torch.Generator().manual_seed(8)
    rewards = torch.randint(0, 3, (64, 3), generator=gen).to(F64)
    ids, counts = torch.arange(64) // 8, torch.randint(1, 30, (64,), generator=gen)
    ec = Engine(device="cuda", host_max_tokens=0)
    skipped = rewards.clone()
    skipped[::5, 1] = math.nan  # (skip_nan_components: NaN components that do not apply)
    skipped[[3, 17, 18]] = math.nan  # (sequences without a reward)
    for est, r, skip in itertools.product(("gdpo", "grpo"), (rewards, skipped), (False, True)):
        if r is skipped and not skip:
            continue
        cfg = AdvantageConfig(est, reward_weights=(0.5, 1.0, 2.0), skip_nan_components=skip)
        want = E.advantages(r, ids, cfg, counts).advantages
        got = ec.advantages(r.cuda(), ids.cuda(), cfg, counts.cuda()).advantages
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-15)


def test_reward_components_in_loss_are_refused_with_the_way_to_send_them():
    """`loss` (ComputeLoss) takes [B] rewards: [B, K] ones are refused as unsupported, naming
    advantages() (ComputeAdvantages), which takes them."""
    b = simple_batch([2, 3], rewards=torch.ones(2, 2), group_ids=torch.tensor([0, 0]))
    with pytest.raises(InputError) as err:
        E.loss(b, LossConfig(advantages=AdvantageConfig("gdpo")))
    ((v,),) = [err.value.violations]
    assert (
        v.field == "rewards"
        and v.reason.startswith("unsupported: [B, K] rewards")
        and "ComputeAdvantages" in v.reason
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_advantages_with_token_counts_equal_the_loss_whitening(dtype):
    """reinforce_pp_baseline whitens over trained tokens inside `loss`; `advantages` without
    token counts whitens over sequences, so a trainer that computed advantages once and sent
    micro-batches with them trained on other values (micro-batching was not exact). With each
    sequence's trained tokens as `token_counts` the two agree bit for bit: a degenerate group,
    an empty sequence and a fully masked one included."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 0, 7, 3, 6, 2, 4, 8, 1, 5, 3, 6])
    n = int(lengths.sum())
    mask = torch.rand(n, generator=gen) > 0.3
    mask[5:12] = False  # the third sequence (7 tokens) fully masked
    rewards = torch.randn(12, generator=gen, dtype=dtype)
    rewards[4:8] = 1.0  # a degenerate group
    groups = torch.arange(12) // 4
    b = Batch(
        logp=-torch.rand(n, generator=gen, dtype=dtype),
        offsets=Batch.offsets_from_lengths(lengths),
        mask=mask,
        rewards=rewards,
        group_ids=groups,
    )
    counts = torch.stack([m.sum() for m in mask.split(lengths.tolist())])
    for est in ("reinforce_pp_baseline", "reinforce_pp"):
        cfg = AdvantageConfig(estimator=est)
        per_token = E.loss(b, LossConfig(advantages=cfg)).advantages
        counted = E.advantages(rewards, groups, cfg, token_counts=counts).advantages
        assert torch.equal(counted.repeat_interleave(lengths), per_token)
        unweighted = E.advantages(rewards, groups, cfg).advantages
        assert not torch.equal(unweighted.repeat_interleave(lengths), per_token)  # (what the test guards)
    # ... and opo's baseline weighs them: the same agreement
    opo = AdvantageConfig(estimator="opo")
    weighted = E.advantages(rewards, groups, opo, token_counts=counts).advantages
    assert torch.equal(weighted.repeat_interleave(lengths), E.loss(b, LossConfig(advantages=opo)).advantages)
    assert not torch.equal(weighted, E.advantages(rewards, groups, opo).advantages)
    # the other estimators do not read them
    for est in ("grpo", "dr_grpo", "rloo", "gpg"):
        c = AdvantageConfig(estimator=est)
        assert torch.equal(
            E.advantages(rewards, groups, c, counts).advantages, E.advantages(rewards, groups, c).advantages
        )


@pytest.mark.parametrize(
    ("counts", "reason"),
    [
        (torch.tensor([1.0, 2.0, 3.0]), "token_counts: bad_dtype"),
        (torch.tensor([[1, 2, 3]]), "token_counts: bad_shape: expected a 1-D tensor"),  # (as loss() says)
        (torch.tensor([1, 2]), "token_counts: length_mismatch: length 2, expected 3"),
        (torch.tensor([1, -2, 3]), "token_counts[1]: out_of_range: -2 < 0"),
    ],
)
def test_bad_token_counts_are_refused_by_name(counts, reason):
    with pytest.raises(InputError, match=re.escape(reason)):
        E.advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 0]), AdvantageConfig(), counts)


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (F64, 1e-12)])
def test_k3_near_zero_is_accurate_and_never_negative(dtype: torch.dtype, rel: float) -> None:
    """k3 = exp(x) - x - 1 of a policy close to its reference (|x| ~ 1e-4 at the start of a
    run): evaluated as written it cancelled, float32 read -2.3e-10 for 4.95e-9 and kl_loss came
    out negative (an audit). Its value (against its series summed in float64) and gradient."""
    from softgate.engine.kl import kl_terms

    xs = [
        1e-6,
        -1e-6,
        1e-4,
        -1e-4,
        1e-3,
        -0.03,
        0.0999,
        -0.0999,
        0.1001,
        -0.5,
        2.0,
        -7.0,
        -3e7,
    ]  # (-3e7: x + k = 0)
    k, dk, _ = kl_terms("k3", torch.tensor(xs, dtype=dtype), torch.tensor(20.0, dtype=dtype))
    for x, got, g in zip(torch.tensor(xs, dtype=dtype).tolist(), k.tolist(), dk.tolist(), strict=True):
        exact = math.fsum(x**n / math.factorial(n) for n in range(2, 40)) if abs(x) < 1 else math.expm1(x) - x
        assert got == pytest.approx(exact, rel=rel, abs=0) and got > 0, x
        assert g == pytest.approx(-math.expm1(x), rel=max(rel, 1e-7), abs=0), x
    b = simple_batch([50, 30], dtype=dtype, advantages=torch.tensor([1.0, -1.0], dtype=dtype))
    near = dataclasses.replace(b, ref_logp=b.logp + 1e-4 * torch.randn(80, dtype=F64).to(dtype))
    res = E.loss(near, LossConfig(kl=KLConfig(beta=1.0)))  # k3 is the default estimator
    assert res.metrics["kl_mean"] > 0 and res.kl_loss > 0


@pytest.mark.parametrize("x", [-30.0, 20.0, 30.0])
@pytest.mark.parametrize(
    "estimator", ["k1", "k2", "k3", "k1_st", "k3_st", "k3_is", "abs", "abs_st", "k3_is_seq"]
)
def test_only_k3_clamps_the_kl_log_ratio_and_only_from_above(estimator: str, x: float) -> None:
    """SPEC's k1 = -x and k2 = x^2/2 are finite for any finite x = ref - logp: beyond the clamp
    they keep their gradient (1, -x), which pulls hardest where the policy drifted furthest.
    k3 = exp(x) - x - 1 clamps x above (float32's exp), so its gradient is 0 there; below, exp
    only underflows, and a token far likelier than under the reference keeps its pull 1 - exp(x)
    (an audit found it clamped both ways: a policy 30 nats above the reference got gradient 0).
    x exactly at the clamp is not clamped: k3 keeps its gradient 1 - exp(x) there."""
    b = Batch(
        logp=torch.tensor([-31.0], dtype=F64),
        offsets=torch.tensor([0, 1]),
        advantages=torch.tensor([0.0], dtype=F64),
        ref_logp=torch.tensor([-31.0 + x], dtype=F64),  # |x| = 30 beyond the clamp of 20, or 20 on it
    )
    res = E.loss(b, LossConfig(objective=Reinforce(), kl=KLConfig(estimator=estimator, beta=1.0)))
    clamped = estimator.startswith("k3") and x > 20  # (k3_st, k3_is: k3's value, clamped alike)
    # _st: k2's gradient; k3_is: k2's times r = 1 (on-policy); k3_is_seq, one token: k3's own
    # (at the clamped x) plus s_i's share k3, -min(x, 20)
    grad = {"k1": 1.0, "k2": -x, "k3": 0.0 if clamped else 1 - math.exp(x), "abs": -math.copysign(1, x)}
    grad["k3_is_seq"] = -min(x, 20.0)
    grad = grad.get(estimator, -x)
    assert res.grad.tolist() == [pytest.approx(grad, rel=1e-12)]
    xc = min(x, 20.0)
    want = {"k1": -x, "k2": x * x / 2, "k3": math.exp(xc) - xc - 1, "ab": abs(x)}[estimator[:2]]
    assert res.kl_loss == pytest.approx(want, rel=1e-12)
    assert res.metrics["kl_clamped_tokens"] == clamped


def _verl_kl_penalty(logp: Tensor, ref: Tensor, kind: str) -> Tensor:
    """verl's core_algos.kl_penalty written out: "kl" (k1), "mse" (k2), "low_var_kl" (k3, x
    clamped to [-20, 20] and the value to [-10, 10]), "low_var_kl+" (its value, k2's gradient)."""
    if kind == "kl":
        return logp - ref
    if kind == "mse":
        return 0.5 * (logp - ref).square()
    kl = torch.clamp(ref - logp, min=-20, max=20)
    kld = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if kind == "low_var_kl":
        return kld
    k2 = 0.5 * (logp - ref).square()
    return k2 - k2.detach() + kld.detach()


@pytest.mark.parametrize(
    "kind,estimator", [("low_var_kl", "k3"), ("low_var_kl+", "k3_st"), ("kl", "k1"), ("mse", "k2")]
)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_kl_value_clamp_10_is_verls_kl_loss(kind: str, estimator: str, dtype: torch.dtype) -> None:
    """verl's use_kl_loss (kl_penalty, then agg_loss token-mean) against kl.value_clamp=10: the
    same loss and gradient, with tokens past the bound on both sides of k3 (x = ref - logp
    above 2.6 and below -11: verl's gradient 0 there, k3_st's k2's). verl's k1 and k2 are not
    clamped: with value_clamp 10 they differ only where |k| > 10, here the k3 tokens, so the
    bound is checked there against a clamped k1 / k2. kl_clamped_tokens counts the clamped."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([6, 4, 7])
    n = int(lengths.sum())
    logp = -torch.rand(n, generator=g, dtype=F64) * 2 - 5.0
    ref = logp + 0.5 * torch.randn(n, generator=g, dtype=F64)
    ref[1], ref[7], ref[12] = logp[1] + 2.7, logp[7] + 4.0, logp[12] - 12.0  # k3 > 10 at all three
    mask = torch.ones(n, dtype=torch.bool)
    mask[3] = False
    x = logp.clone().requires_grad_(True)
    k = _verl_kl_penalty(x, ref, kind)
    if kind in ("kl", "mse"):
        k = torch.clamp(k, -10, 10)
    beta = 0.3
    want = beta * k[mask].sum() / mask.sum()
    (grad,) = torch.autograd.grad(want, x)
    batch = Batch(
        logp=logp.to(dtype),
        offsets=Batch.offsets_from_lengths(lengths),
        ref_logp=ref.to(dtype),
        mask=mask,
        advantages=torch.zeros(3, dtype=dtype),
    )
    cfg = LossConfig(
        objective=Reinforce(),
        aggregation=AggregationConfig(mode="token_mean"),
        kl=KLConfig(estimator=estimator, beta=beta, value_clamp=10.0),  # type: ignore[arg-type]
    )
    res = E.loss(batch, cfg)
    rel = 1e-12 if dtype == F64 else 2e-6
    assert res.kl_loss == pytest.approx(float(want.detach()), rel=rel)
    torch.testing.assert_close(res.grad.to(F64), grad * mask, rtol=rel, atol=1e-7 if dtype != F64 else 1e-15)
    d = ref - logp
    raw = {"k1": -d, "k2": d * d / 2}.get(estimator, torch.expm1(d) - d)
    over = (raw.abs() > 10) & mask
    assert res.metrics["kl_clamped_tokens"] == int(over.sum()) and int(over.sum()) >= 1
    if estimator == "k3":  # the three tokens past 10: gradient 0, as verl's
        assert res.grad[[1, 7, 12]].tolist() == [0.0, 0.0, 0.0]
    unbounded = E.loss(batch, dataclasses.replace(cfg, kl=KLConfig(estimator=estimator, beta=beta)))  # type: ignore[arg-type]
    assert unbounded.kl_loss > res.kl_loss


@pytest.mark.parametrize("estimator", ["k1", "k1_st"])
def test_kl_value_clamp_on_both_sides_and_at_its_bound(estimator: str) -> None:
    """k1 = -x with c = 10 at x = 15 (k = -15, below -c), -10 (k = c exactly), -12 and 0.5:
    the value clamped to [-c, c] on both sides, the gradient 0 strictly past the bound (k1's 1
    kept at |k| = c, torch.clamp's), k1_st's gradient -x everywhere; the two past it counted."""
    logp = torch.tensor([-20.0, -1.0, -1.0, -1.0], dtype=F64)
    ref = logp + torch.tensor([15.0, -10.0, -12.0, 0.5], dtype=F64)
    b = Batch(logp=logp, offsets=torch.tensor([0, 4]), ref_logp=ref, advantages=torch.zeros(1, dtype=F64))
    kl = KLConfig(estimator=estimator, beta=1.0, value_clamp=10.0)  # type: ignore[arg-type]
    res = E.loss(b, LossConfig(objective=Reinforce(), aggregation=AggregationConfig("token_mean"), kl=kl))
    assert res.kl_loss == pytest.approx((-10 + 10 + 10 - 0.5) / 4, rel=1e-15)
    want = [0.0, 0.25, 0.0, 0.25] if estimator == "k1" else [-15 / 4, 10 / 4, 12 / 4, -0.5 / 4]
    assert res.grad.tolist() == pytest.approx(want, rel=1e-15)
    assert res.metrics["kl_clamped_tokens"] == 2


def test_a_kl_value_clamp_past_float32s_range_is_no_bound_there() -> None:
    """A k2 that overflows float32 (x = 1e20: 5e39) is refused as an overflow with or without a
    bound past float32's range (1e300): the bound cannot be reached there, and read as float32's
    largest value it took the overflow for a clamped token (gradient 0, loss 1.1e37). float64
    holds that k, below the bound: computed, not clamped."""
    kw = {"objective": Reinforce(), "aggregation": AggregationConfig("token_mean")}
    for dtype in (torch.float32, F64):
        logp = torch.tensor([-1.0, -2.0, -1.5], dtype=dtype)
        ref = torch.tensor([-1e20, -2.1, -1.4], dtype=dtype)
        b = Batch(
            logp=logp, offsets=torch.tensor([0, 3]), ref_logp=ref, advantages=torch.zeros(1, dtype=dtype)
        )
        for cap in (None, 1e300):
            cfg = LossConfig(kl=KLConfig(estimator="k2", beta=0.1, value_clamp=cap), **kw)
            if dtype == torch.float32:
                with pytest.raises(InputError, match="overflow"):
                    E.loss(b, cfg)
            else:
                r = E.loss(b, cfg)
                assert r.metrics["kl_clamped_tokens"] == 0 and r.grad[0] == pytest.approx(0.1 * 1e20 / 3)
                assert r.kl_loss == pytest.approx(0.1 * 5e39 / 3, rel=1e-12)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_the_mismatch_weight_is_the_spec_s_exact_v(dtype: torch.dtype) -> None:
    """Found by an audit: log v = old - rollout was clamped at +-log_ratio_clamp before exp, so
    IcePop kept a token whose v = e^29 lay above hi = 1e10 (weight e^20, gradient -2.4e8
    instead of 0), and sequence-level TIS with log_ratio_clamp 3 weighted log v = -4 by e^-3.
    v is now exact: an overflow is truncated to cap or zeroed outside [lo, hi]."""
    old = torch.tensor([-1.0, -2.0, -3.0, -3.0], dtype=dtype)
    b = Batch(
        logp=old.clone(),
        offsets=torch.tensor([0, 1, 2, 4]),
        old_logp=old,
        advantages=torch.tensor([1.0, 1.0, 1.0], dtype=dtype),
        rollout_logp=torch.tensor([-30.0, -102.0, -1.0, -1.0], dtype=dtype),
    )  # log v per token: 29, 100 (exp overflows float32), -2, -2; sequence 2's: -4
    agg = AggregationConfig(mode="token_sum_norm", constant=1.0)  # gradient -A v on policy tokens
    mask = LossConfig(objective=Reinforce(), aggregation=agg, mismatch=MismatchConfig(mode="mask", hi=1e10))
    assert E.loss(b, mask).grad.tolist() == [0.0, 0.0, 0.0, 0.0]  # 29 and 100 above, -2 below lo
    # hi past float32's largest value (a review found e^100 = inf kept, then refused as overflow)
    wide = dataclasses.replace(mask, mismatch=MismatchConfig(mode="mask", hi=1e39))
    g = E.loss(b, wide).grad.double()
    torch.testing.assert_close(
        g, torch.tensor([-math.exp(29.0), 0.0, 0.0, 0.0], dtype=F64), rtol=1e-6, atol=0.0
    )
    tis = dataclasses.replace(mask, mismatch=MismatchConfig(cap=1e30))
    g = E.loss(b, tis).grad.double()
    want = torch.tensor([-math.exp(29.0), -1e30, -math.exp(-2.0), -math.exp(-2.0)], dtype=F64)
    torch.testing.assert_close(g, want, rtol=1e-6, atol=0.0)
    # a cap past float32's largest value is that value: e^100 (inf in float32) is truncated to
    # it and counted, not kept as inf and refused as an overflow
    res = E.loss(b, dataclasses.replace(mask, mismatch=MismatchConfig(cap=1e39)))
    assert res.metrics["mismatch_clipped_frac"] == 0.25
    cap = 1e39 if dtype == F64 else float(torch.finfo(torch.float32).max)
    want = torch.tensor([-math.exp(29.0), -cap, -math.exp(-2.0), -math.exp(-2.0)], dtype=F64)
    torch.testing.assert_close(res.grad.double(), want, rtol=1e-6, atol=0.0)
    seq = dataclasses.replace(tis, mismatch=MismatchConfig(level="sequence", cap=2.0), log_ratio_clamp=3.0)
    g = E.loss(b, seq).grad.double()
    want = torch.tensor([-2.0, -2.0, -math.exp(-4.0), -math.exp(-4.0)], dtype=F64)
    torch.testing.assert_close(g, want, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype,a", [(F64, 1e160), (torch.float32, 1e20)])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_metrics_whose_sums_overflow_are_taken_scaled_not_zeroed(dtype, a, level):
    """Found by an audit: advantages of +-1e160 (float64) or +-1e20 (float32) overflowed the
    sum of squares, and adv_std came back 0.0, silently."""
    logp = -torch.rand(12, dtype=dtype, generator=torch.Generator().manual_seed(0)) - 0.1
    adv = torch.tensor([a, -a] * (6 if level == "token" else 1), dtype=dtype)
    b = Batch(logp=logp, offsets=torch.tensor([0, 6, 12]), old_logp=logp + 0.01, advantages=adv)
    b.advantage_level = level
    res = E.loss(b, LossConfig())
    assert res.metrics["adv_std"] == pytest.approx(float(adv[0]), rel=1e-12)
    assert res.metrics["adv_mean"] == 0.0
    # approx_kl, unclamped, of log-probs near -float64's max
    lp = torch.tensor([-1e308, -1e308, -0.5], dtype=F64)
    b = Batch(logp=lp, offsets=torch.tensor([0, 3]), old_logp=torch.full((3,), -0.5, dtype=F64))
    b.advantages = torch.tensor([1.0], dtype=F64)
    assert E.loss(b, LossConfig()).metrics["approx_kl"] == pytest.approx(1e308 / 3 * 2, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("spread", [0.0, 1e-3])
def test_adv_std_of_per_token_advantages_far_from_zero_keeps_its_digits(dtype, spread):
    """adv_std of per-token advantages was taken in one pass (mean of squares minus the square of
    the mean), each square rounded in the compute dtype: a constant float32 100.1 read 0.008."""
    n = 1000
    logp = torch.full((n,), -1.0, dtype=dtype)
    adv = (100.1 + spread * torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=F64)).to(dtype)
    mask = torch.arange(n) % 7 != 3
    adv[~mask] = -50.0  # (untrained: left out)
    b = Batch(logp=logp, offsets=torch.tensor([0, 400, n]), old_logp=logp.clone(), advantages=adv, mask=mask)
    res = E.loss(b, LossConfig(objective=Sapo()))
    want = adv[mask].double()
    assert res.metrics["adv_std"] == pytest.approx(float(want.std(correction=0)), rel=1e-9, abs=1e-12)
    assert res.metrics["adv_mean"] == pytest.approx(float(want.mean()), rel=1e-12)


def test_extreme_log_ratios_are_clamped_and_counted():
    logp = torch.tensor([-1.0, -1.0, -80.0, -1.0], dtype=F64)
    old = torch.tensor([-60.0, -1.0, -1.0, -1.1], dtype=F64)
    b = Batch(
        logp=logp, offsets=torch.tensor([0, 4]), old_logp=old, advantages=torch.tensor([-1.0], dtype=F64)
    )
    b.ref_logp = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=F64)
    for obj in ALL_OBJECTIVES:
        res = E.loss(b, LossConfig(objective=obj, kl=KLConfig(beta=0.1)))
        assert all(math.isfinite(v) for v in res.metrics.values())
        assert torch.isfinite(res.grad).all()
        if obj.name in SEQUENCE_RATIO:
            assert res.metrics["clamped_tokens"] == 0  # mean log-ratio (59 - 79 + 0.1)/4 is inside
        else:
            assert res.metrics["clamped_tokens"] == 2
            assert res.ratio[0] == pytest.approx(math.exp(20)) and res.ratio[2] == pytest.approx(
                math.exp(-20)
            )
        assert res.metrics["kl_clamped_tokens"] == 1  # ref - logp = 79
        # the spec's masked mean of old - logp, unclamped (it read the clamped log-ratio's)
        assert res.metrics["approx_kl"] == pytest.approx(float((old - logp).mean()), rel=1e-12)
    res32 = E.loss(
        Batch(
            logp=logp.float(),
            offsets=b.offsets,
            old_logp=old.float(),
            advantages=torch.tensor([1.0]),
            ref_logp=b.ref_logp.float(),
        ),
        LossConfig(objective=Reinforce(), kl=KLConfig(estimator="k3", beta=1.0)),
    )
    assert math.isfinite(res32.loss) and torch.isfinite(res32.grad).all()


def test_masked_garbage_has_no_effect():
    b = random_batch(5, max_seqs=6, max_len=8)
    cfg = make_config("sapo", "token_mean", "k2", ("token", "mask"))
    r1 = E.loss(b, cfg)
    m = b.mask
    for name in ("logp", "old_logp", "ref_logp", "rollout_logp"):
        x = getattr(b, name).clone()
        x[~m] = torch.where(torch.arange(int((~m).sum())) % 2 == 0, 3.0e38, -3.0e38).to(x.dtype)
        setattr(b, name, x)
    r2 = E.loss(b, cfg)
    assert r1.loss == r2.loss and torch.equal(r1.grad, r2.grad) and r1.metrics == r2.metrics


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(
    "name,mismatch",
    [("reinforce", ("sequence", "mask")), ("reinforce", ("sequence", "truncate")), ("gspo_token", None)],
)
def test_masked_garbage_advantages_have_no_effect(name, mismatch, dtype):
    """A masked token's own (per-token) advantage may be any finite value: a huge one times a
    sequence-level mismatch weight or GSPO's sequence ratio once overflowed (a refusal) or
    changed grad_retained."""
    b = random_batch(6, max_seqs=6, max_len=8, dtype=dtype)
    b.rewards = b.group_ids = None
    b.advantages = torch.randn(b.logp.numel(), generator=torch.Generator().manual_seed(1), dtype=F64).to(
        dtype
    )
    b.advantage_level = "token"
    b.old_logp = torch.where(b.mask, b.logp - 3.0, b.old_logp)  # ratios e^3: clipped, sizeable
    cfg = make_config(name, "token_mean", None, mismatch)
    r1 = E.loss(b, cfg)
    adv = b.advantages.clone()
    adv[~b.mask] = torch.finfo(dtype).max / 2
    b.advantages = adv
    r2 = E.loss(b, cfg)
    assert r1.loss == r2.loss and torch.equal(r1.grad, r2.grad) and r1.metrics == r2.metrics
    assert torch.equal(r2.advantages, adv)  # the output still carries what was given


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_sequence_mismatch_weight_sums_trained_tokens_only(mode: str) -> None:
    """SPEC: the sequence-level log-weight is the masked sum of old - rollout; masked tokens'
    values (any finite garbage, here old != rollout) never enter it."""
    logp = torch.tensor([-1.0, -1.0, -1.0], dtype=F64)
    b = Batch(
        logp=logp,
        offsets=torch.tensor([0, 3]),
        old_logp=logp.clone(),
        mask=torch.tensor([True, True, False]),
        advantages=torch.tensor([1.0], dtype=F64),
        rollout_logp=torch.tensor([-1.5, -1.0, -5.0], dtype=F64),  # trained: log v = 0.5; masked: 4
    )
    agg = AggregationConfig(mode="token_sum_norm", constant=1.0)  # gradient -A v on policy tokens
    mm = MismatchConfig(level="sequence", mode=mode, cap=2.0, lo=0.5, hi=2.0)  # type: ignore[arg-type]
    res = E.loss(b, LossConfig(objective=Reinforce(), aggregation=agg, mismatch=mm))
    v = math.exp(0.5)
    assert res.grad.tolist() == [pytest.approx(-v, rel=1e-12), pytest.approx(-v, rel=1e-12), 0.0]
    assert res.metrics["mismatch_clipped_frac"] == 0.0
    assert res.metrics["mismatch_weight_mean"] == pytest.approx(v, rel=1e-12)


def test_cispo_ignores_huge_garbage_log_probs_on_masked_tokens() -> None:
    """cispo's loss reads logp itself: a masked token's finite garbage (-3e38, times A in
    float32 past the range) must not reach the loss (0 * inf = NaN, refused as an overflow)."""
    b = Batch(
        logp=torch.tensor([-1.0, -3.0e38, -1.2]),
        offsets=torch.tensor([0, 3]),
        old_logp=torch.tensor([-1.1, -1.0, -1.2]),
        mask=torch.tensor([True, False, True]),
        advantages=torch.tensor([10.0]),
    )
    agg = AggregationConfig(mode="token_sum_norm", constant=1.0)
    res = E.loss(b, LossConfig(objective=Cispo(), aggregation=agg))
    assert math.isfinite(res.loss) and torch.isfinite(res.grad).all()
    assert res.grad[1].item() == 0.0
    assert res.loss == pytest.approx(-10.0 * (math.exp(0.1) * -1.0 + 1.0 * -1.2), rel=1e-6)


@pytest.mark.parametrize(
    "compile,dtype,sampler",
    [
        *((False, d, s) for d in (torch.float32, F64) for s in ("rollout", "old")),
        # compiled: float32 with rollout log-probs (the overflow) by default, the rest slow
        pytest.param(True, torch.float32, "rollout", marks=needs_compile),
        *(
            pytest.param(True, d, s, marks=(needs_compile, SLOW))
            for d, s in ((torch.float32, "old"), (F64, "rollout"), (F64, "old"))
        ),
    ],
)
def test_dro_and_opsm_ignore_huge_garbage_on_masked_tokens(
    dtype: torch.dtype, compile: bool, sampler: str
) -> None:
    """dro's penalty reads logp - old, and OPSM's mean q - logp (q: rollout_logp when sent,
    else old_logp) over the sequence's trained tokens: a masked token's finite garbage (logp
    -3e38, old and rollout +3e38, whose differences overflow float32) must reach neither, and
    the mean divides by the trained tokens, not all of the sequence's."""
    b = Batch(
        logp=torch.tensor([-1.0, -3.0e38, -1.2, -3.0e38], dtype=dtype),
        offsets=torch.tensor([0, 3, 4]),
        old_logp=torch.tensor([-1.1, 3.0e38, -1.0, 3.0e38], dtype=dtype),
        rollout_logp=torch.tensor([-1.3, 3.0e38, -1.1, -1.0], dtype=dtype) if sampler == "rollout" else None,
        mask=torch.tensor([True, False, True, False]),
        advantages=torch.tensor([-2.0, 1.0], dtype=dtype),
    )
    eng = Engine(device="cpu", compile="sync") if compile else E
    agg = AggregationConfig(mode="token_sum_norm", constant=1.0)
    cfg = LossConfig(objective=Dro(coef=0.5), aggregation=agg, off_policy_mask_threshold=0.15)
    # sequence 0 (A < 0): mean(q - logp) over its 2 trained tokens: rollout (-0.3 + 0.1) / 2 =
    # -0.1, old (-0.1 + 0.2) / 2 = 0.05; over all 3 of its tokens it would be -0.067 / 0.033
    mean = -0.1 if sampler == "rollout" else 0.05
    res = eng.loss(b, cfg)
    assert res.grad[1].item() == res.grad[3].item() == 0.0
    x = torch.tensor([-1.0 + 1.1, -1.2 + 1.0], dtype=F64)
    want = float((2.0 * torch.tensor([-1.0, -1.2], dtype=F64) + 0.25 * x * x).sum())
    assert res.loss == pytest.approx(want, rel=1e-6) and res.metrics["off_policy_masked_frac"] == 0.0
    torch.testing.assert_close(res.grad[[0, 2]].to(F64), 2.0 + 0.5 * x, rtol=1e-6, atol=0)
    # between the two means (5/6 of the trained one): the wrong divisor decides the other way
    for delta, dropped in ((mean - 0.02, True), (mean + 0.02, False), (mean * 5 / 6, mean > 0)):
        res = eng.loss(b, dataclasses.replace(cfg, off_policy_mask_threshold=delta))
        assert res.metrics["off_policy_masked_frac"] == (1.0 if dropped else 0.0), delta
        assert (res.grad.tolist() == [0.0] * 4) == dropped, delta


@pytest.mark.parametrize(
    "d,a,expected", [(19.9, 1.0, -1.2), (25.0, 1.0, -1.2), (-19.9, -1.0, 0.8), (-25.0, -1.0, 0.8)]
)
def test_gppo_clipped_tokens_keep_their_bounds_gradient_when_clamped(d, a, expected):
    """SPEC: a clipped gppo token's gradient is -(1 + eps_high) A or -(1 - eps_low) A, also
    beyond the log-ratio clamp (it was 0 there, the clamp's derivative)."""
    b = Batch(
        logp=torch.tensor([-30.0], dtype=F64),
        old_logp=torch.tensor([-30.0 - d], dtype=F64),
        offsets=torch.tensor([0, 1]),
        advantages=torch.tensor([a], dtype=F64),
    )
    r = E.loss(b, LossConfig(objective=Gppo(), aggregation=AggregationConfig(mode="token_mean")))
    assert r.grad.tolist() == [pytest.approx(expected, rel=1e-15)]
    assert r.loss == pytest.approx(expected, rel=1e-15)  # grpo's clipped value, -bound A
    assert r.clip_mask.tolist() == [True]


# ---------------------------------------------------------------- dtypes


def test_dtype_rule_promotes_mixed_to_float64():
    """In process; over gRPC the contract refuses mixed float dtypes (codec.decode_batch)."""
    b = simple_batch([3, 2], dtype=torch.float32, advantages=torch.tensor([1.0, -1.0]))
    assert E.loss(b, LossConfig()).grad.dtype == torch.float32
    b.old_logp = b.old_logp.double()
    res = E.loss(b, LossConfig())
    assert res.grad.dtype == torch.float64 and res.advantages.dtype == torch.float64
    b.old_logp = b.old_logp.float()
    b.advantages = b.advantages.double()
    assert E.loss(b, LossConfig()).grad.dtype == torch.float64
    # float64 reference or rollout log-probs choose float64 too
    b.advantages = b.advantages.float()
    for name, cfg in (
        ("ref_logp", LossConfig(kl=KLConfig(beta=0.1))),
        ("rollout_logp", LossConfig(mismatch=MismatchConfig())),
    ):
        res = E.loss(dataclasses.replace(b, **{name: (b.logp - 0.2).double()}), cfg)
        assert res.grad.dtype == torch.float64 and res.ratio.dtype == torch.float64, name
    # rewards' dtype does not choose the compute dtype (they are reduced in float64 anyway)
    b2 = simple_batch(
        [3, 2], dtype=torch.float32, rewards=torch.tensor([1, 0]), group_ids=torch.tensor([0, 0])
    )
    assert E.loss(b2, LossConfig()).grad.dtype == torch.float32


def test_device_default_and_warmup():
    e = Engine()
    assert e.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    e.warmup()


def test_float32_and_float64_agree():
    b64 = random_batch(21, max_seqs=8, max_len=10)
    b32 = random_batch(21, max_seqs=8, max_len=10, dtype=torch.float32)
    for name in OBJECTIVE_NAMES:
        cfg = make_config(name, "seq_mean_token_mean", "k3", ("token", "truncate"), variant=1)
        r64 = E.loss(b64, cfg)
        r32 = E.loss(b32, cfg)
        assert r32.loss == pytest.approx(r64.loss, rel=1e-3, abs=1e-5)


# ---------------------------------------------------------------- validation


def reasons(batch, cfg=None):
    with pytest.raises(InputError) as ei:
        E.loss(batch, cfg or LossConfig())
    for v in ei.value.violations:
        assert re.match(r"^[a-z_]+: ", v.reason), v.reason
        assert v.reason.split(":")[0] in REASON_CODES
    return {(v.field, v.reason.split(":")[0], v.index) for v in ei.value.violations}


@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_validation_batch(monkeypatch, path):
    if path == "gpu":  # the same errors from the code a GPU runs (see _gpu_code_path)
        _gpu_code_path(monkeypatch)
    adv = torch.tensor([1.0, -1.0])
    ok = simple_batch([3, 2], advantages=adv)
    E.loss(ok, LossConfig())
    nan = ok.logp.clone()
    nan[3] = float("nan")
    assert reasons(Batch(logp=nan, offsets=ok.offsets, advantages=adv)) == {("logp", "non_finite", 3)}
    inf = ok.old_logp.clone()
    inf[1] = float("-inf")
    assert ("old_logp", "non_finite", 1) in reasons(
        Batch(logp=ok.logp, offsets=ok.offsets, old_logp=inf, advantages=adv)
    )
    pos = ok.logp.clone()
    pos[2] = 0.01
    assert reasons(Batch(logp=pos, offsets=ok.offsets, advantages=adv)) == {("logp", "positive_logp", 2)}
    pos[2] = 5e-5  # inside the tolerance
    E.loss(Batch(logp=pos, offsets=ok.offsets, advantages=adv), LossConfig())
    # positive garbage on a masked token is fine
    pos[2] = 3.0
    E.loss(
        Batch(logp=pos, offsets=ok.offsets, advantages=adv, mask=torch.tensor([1, 1, 0, 1, 1])), LossConfig()
    )
    r = reasons(Batch(logp=ok.logp.bfloat16(), offsets=ok.offsets, advantages=adv))
    assert r == {("logp", "half_precision", None)}
    with pytest.raises(InputError, match=r"float16 log-probs carry up to 0\.4% ratio noise"):
        E.loss(Batch(logp=ok.logp.half(), offsets=ok.offsets, advantages=adv), LossConfig())
    assert reasons(Batch(logp=ok.logp, offsets=torch.tensor([0, 3, 4]), advantages=adv)) == {
        ("offsets", "bad_offsets", 2)
    }
    assert reasons(Batch(logp=ok.logp, offsets=torch.tensor([0, 4, 3, 5]), advantages=torch.zeros(3))) == {
        ("offsets", "bad_offsets", 2)
    }
    assert ("offsets", "bad_offsets", 0) in reasons(
        Batch(logp=ok.logp, offsets=torch.tensor([1, 3, 5]), advantages=adv)
    )
    assert ("offsets", "bad_dtype", None) in reasons(
        Batch(logp=ok.logp, offsets=torch.tensor([0.0, 3, 5]), advantages=adv)
    )
    assert ("old_logp", "length_mismatch", None) in reasons(
        Batch(logp=ok.logp, offsets=ok.offsets, old_logp=ok.logp[:4], advantages=adv)
    )
    assert ("mask", "length_mismatch", None) in reasons(
        Batch(logp=ok.logp, offsets=ok.offsets, mask=torch.ones(4, dtype=torch.bool), advantages=adv)
    )
    assert ("mask", "bad_mask", 1) in reasons(
        Batch(logp=ok.logp, offsets=ok.offsets, mask=torch.tensor([1, 2, 1, 1, 0]), advantages=adv)
    )
    assert ("advantages", "length_mismatch", None) in reasons(
        Batch(logp=ok.logp, offsets=ok.offsets, advantages=torch.zeros(4))
    )
    assert ("rewards", "missing", None) in reasons(Batch(logp=ok.logp, offsets=ok.offsets))
    assert ("group_ids", "missing", None) in reasons(Batch(logp=ok.logp, offsets=ok.offsets, rewards=adv))
    assert ("group_ids", "length_mismatch", None) in reasons(
        Batch(logp=ok.logp, offsets=ok.offsets, rewards=adv, group_ids=torch.tensor([0, 0, 1]))
    )
    assert ("rewards", "length_mismatch", None) in reasons(
        Batch(logp=ok.logp, offsets=ok.offsets, rewards=torch.zeros(3), group_ids=torch.tensor([0, 0]))
    )
    assert ("group_ids", "bad_dtype", None) in reasons(
        Batch(logp=ok.logp, offsets=ok.offsets, rewards=adv, group_ids=torch.tensor([0.0, 1.0]))
    )
    assert ("ref_logp", "missing", None) in reasons(ok, LossConfig(kl=KLConfig(beta=0.1)))
    assert ("rollout_logp", "missing", None) in reasons(ok, LossConfig(mismatch=MismatchConfig()))
    sampler_kl = KLConfig(beta=0.1, weight="sampler_ratio")
    assert ("rollout_logp", "missing", None) in reasons(
        dataclasses.replace(ok, ref_logp=ok.logp), LossConfig(kl=sampler_kl)
    )
    # ref_logp and rollout_logp values are checked too (the kernel's checks read only logp,
    # old_logp and per-token advantages), each with its own field and index
    both = LossConfig(kl=KLConfig(beta=0.1), mismatch=MismatchConfig())
    for name, value, code in (
        ("ref_logp", 0.5, "positive_logp"),
        ("ref_logp", float("nan"), "non_finite"),
        ("rollout_logp", float("inf"), "non_finite"),
    ):
        bad = ok.logp - 0.1
        bad[1] = value
        fields = {"ref_logp": ok.logp - 0.1, "rollout_logp": ok.logp - 0.1, name: bad}
        assert reasons(dataclasses.replace(ok, **fields), both) == {(name, code, 1)}
    assert ("logp", "bad_shape", None) in reasons(
        Batch(logp=ok.logp.reshape(5, 1), offsets=ok.offsets, advantages=adv)
    )
    assert ("logp", "bad_dtype", None) in reasons(
        Batch(logp=torch.zeros(5, dtype=torch.int64), offsets=ok.offsets, advantages=adv)
    )
    # B == N with sequences of unequal length: the advantages' level is ambiguous unless given
    amb = Batch(logp=ok.logp[:2], offsets=torch.tensor([0, 0, 2]), advantages=adv)
    assert ("advantage_level", "ambiguous", None) in reasons(amb)
    amb.advantage_level = "sequence"
    E.loss(amb, LossConfig())
    # ... and unless every sequence is one token long (lengths 0, 2, 1 have one such sequence)
    amb = Batch(
        logp=ok.logp[:3], offsets=torch.tensor([0, 0, 2, 3]), advantages=torch.tensor([1.0, -1.0, 0.5])
    )
    assert ("advantage_level", "ambiguous", None) in reasons(amb)
    amb.advantage_level = "token"
    E.loss(amb, LossConfig())
    tok = Batch(logp=ok.logp, offsets=ok.offsets, advantages=torch.ones(5))
    assert ("advantages", "unsupported", None) in reasons(tok, LossConfig(objective=Gspo()))
    E.loss(tok, LossConfig(objective=GspoToken()))
    # ... also when B == N (it was computed as gspo_token there, clipping per token)
    tok_bn = Batch(logp=ok.logp[:2], offsets=torch.tensor([0, 0, 2]), advantages=adv, advantage_level="token")
    assert ("advantages", "unsupported", None) in reasons(tok_bn, LossConfig(objective=Gspo()))
    E.loss(tok_bn, LossConfig(objective=GspoToken()))
    # several violations at once, all reported
    many = reasons(
        Batch(logp=nan, offsets=ok.offsets, advantages=adv), LossConfig(objective=Sapo(tau_pos=0.0))
    )
    assert {("logp", "non_finite", 3), ("objective.sapo.tau_pos", "out_of_range", None)} <= many


@pytest.mark.parametrize(
    "cfg,field",
    [
        (LossConfig(objective=Sapo(tau_pos=-1.0)), "objective.sapo.tau_pos"),
        (LossConfig(objective=Sapo(tau_neg=0.0)), "objective.sapo.tau_neg"),
        (LossConfig(objective=Grpo(eps_low=-0.1)), "objective.grpo.eps_low"),
        (LossConfig(objective=Gspo(eps_high=float("nan"))), "objective.gspo.eps_high"),
        (LossConfig(objective=Grpo(dual_clip=1.0)), "objective.grpo.dual_clip"),
        (LossConfig(kl=KLConfig(beta=-0.1)), "kl.beta"),
        (LossConfig(kl=KLConfig(estimator="k4")), "kl.estimator"),  # type: ignore[arg-type]
        (LossConfig(kl=KLConfig(value_clamp=0.0)), "kl.value_clamp"),  # (unset, not 0, is no bound)
        (LossConfig(kl=KLConfig(value_clamp=-10.0)), "kl.value_clamp"),
        (LossConfig(kl=KLConfig(value_clamp=math.inf)), "kl.value_clamp"),
        (LossConfig(kl=KLConfig(value_clamp=10**400)), "kl.value_clamp"),  # (an OverflowError once)
        (LossConfig(kl=KLConfig(beta=10**400)), "kl.beta"),
        (LossConfig(kl=KLConfig(estimator="k3_is_seq", value_clamp=10.0)), "kl.value_clamp"),
        (LossConfig(kl=KLConfig(weight="sequence")), "kl.weight"),  # type: ignore[arg-type]
        (LossConfig(kl=KLConfig(weight=["ratio"])), "kl.weight"),  # type: ignore[arg-type]
        (LossConfig(kl=KLConfig(weight=np.array(["ratio"]))), "kl.weight"),  # type: ignore[arg-type]
        # (every name so: a one-name array compared equal to it, then crashed the engine: a review)
        (LossConfig(kl=KLConfig(estimator=np.array(["k3"]))), "kl.estimator"),  # type: ignore[arg-type]
        (LossConfig(kl=KLConfig(aggregation=np.array(["token_mean"]))), "kl.aggregation"),  # type: ignore[arg-type]
        (LossConfig(aggregation=AggregationConfig(mode=np.array(["token_mean"]))), "aggregation.mode"),  # type: ignore[arg-type]
        (LossConfig(mismatch=MismatchConfig(level=np.array(["token"]))), "mismatch.level"),  # type: ignore[arg-type]
        (LossConfig(reward_kl=RewardKLConfig(level=np.array(["token"]))), "reward_kl.level"),  # type: ignore[arg-type]
        *((LossConfig(kl=KLConfig(estimator=e, weight="ratio")), "kl.weight") for e in ("k3_st", "k3_is")),  # type: ignore[arg-type]
        (LossConfig(kl=KLConfig(estimator="k3_is_seq", weight="score")), "kl.weight"),
        (LossConfig(mismatch=MismatchConfig(cap=0.0)), "mismatch.cap"),
        (LossConfig(mismatch=MismatchConfig(mode="mask", lo=2.0, hi=2.0)), "mismatch.lo"),
        (LossConfig(mismatch=MismatchConfig(mode="mask", hi=0.3)), "mismatch.hi"),  # lo left at 0.5
        (LossConfig(mismatch=MismatchConfig(level="batch")), "mismatch.level"),  # type: ignore[arg-type]
        # the other mode's bounds too (they were not checked): a NaN is a bad request wherever it is
        (LossConfig(mismatch=MismatchConfig(mode="mask", cap=float("nan"))), "mismatch.cap"),
        (LossConfig(mismatch=MismatchConfig(mode="truncate", lo=-1.0)), "mismatch.lo"),
        (LossConfig(mismatch=MismatchConfig(mode="truncate", hi=float("inf"))), "mismatch.hi"),
        (LossConfig(mismatch=MismatchConfig(floor=-0.1)), "mismatch.floor"),
        (LossConfig(mismatch=MismatchConfig(floor=2.0)), "mismatch.floor"),  # not below cap 2
        (LossConfig(mismatch=MismatchConfig(mode="mask", floor=0.5)), "mismatch.floor"),  # mask's: lo
        (LossConfig(mismatch=MismatchConfig(batch_normalize=1)), "mismatch.batch_normalize"),  # type: ignore[arg-type]
        (LossConfig(reward_kl=RewardKLConfig(beta=-0.1)), "reward_kl.beta"),
        (LossConfig(reward_kl=RewardKLConfig(beta=float("nan"))), "reward_kl.beta"),
        (LossConfig(reward_kl=RewardKLConfig(value_clamp=float("nan"))), "reward_kl.value_clamp"),
        (LossConfig(reward_kl=RewardKLConfig(value_clamp=-1.0)), "reward_kl.value_clamp"),
        (LossConfig(reward_kl=RewardKLConfig(estimator="k3_is")), "reward_kl.estimator"),  # type: ignore[arg-type]
        (LossConfig(reward_kl=RewardKLConfig(level="seq")), "reward_kl.level"),  # type: ignore[arg-type]
        (LossConfig(objective=Gspo(), reward_kl=RewardKLConfig()), "reward_kl.level"),  # one A per sequence
        (LossConfig(objective=Gspo(), reward_kl=RewardKLConfig(level="immediate")), "reward_kl.level"),
        (LossConfig(objective=Gmpo(), reward_kl=RewardKLConfig(level="immediate")), "reward_kl.level"),
        (LossConfig(objective=SapoSeq(), reward_kl=RewardKLConfig(level="immediate")), "reward_kl.level"),
        (
            LossConfig(
                advantages=AdvantageConfig(estimator="gdpo"), reward_kl=RewardKLConfig(level="sequence")
            ),
            "reward_kl.level",
        ),
        (LossConfig(reward_kl=KLConfig()), "reward_kl"),  # type: ignore[arg-type]
        (LossConfig(aggregation=AggregationConfig(num_tokens=0.0)), "aggregation.num_tokens"),
        (LossConfig(aggregation=AggregationConfig(num_seqs=-3.0)), "aggregation.num_seqs"),
        (LossConfig(aggregation=AggregationConfig(mode="token_sum_norm")), "aggregation.constant"),
        (LossConfig(aggregation=AggregationConfig(mode="sum")), "aggregation.mode"),  # type: ignore[arg-type]
        (LossConfig(advantages=AdvantageConfig(estimator="ppo")), "advantages.estimator"),  # type: ignore[arg-type]
        (LossConfig(advantages=AdvantageConfig(scale="seq")), "advantages.scale"),  # type: ignore[arg-type]
        (LossConfig(advantages=AdvantageConfig(min_group_std=-1.0)), "advantages.min_group_std"),
        (LossConfig(advantages=AdvantageConfig(estimator="reinforce_pp", gamma=1.5)), "advantages.gamma"),
        (
            LossConfig(advantages=AdvantageConfig(estimator="reinforce_pp", gamma=math.nan)),
            "advantages.gamma",
        ),
        (LossConfig(advantages=AdvantageConfig(gamma=0.9)), "advantages.gamma"),  # grpo: per sequence
        (
            LossConfig(objective=Gspo(), advantages=AdvantageConfig(estimator="reinforce_pp", gamma=0.9)),
            "advantages.gamma",
        ),
        (LossConfig(log_ratio_clamp=0.0), "log_ratio_clamp"),
        (LossConfig(saturation_threshold=1.5), "saturation_threshold"),
        (LossConfig(objective="sapo"), "objective"),  # type: ignore[arg-type]
    ],
)
def test_validation_config(cfg, field):
    b = simple_batch(
        [3, 2],
        advantages=torch.tensor([1.0, -1.0]),
        ref_logp=torch.full((5,), -1.0),
        rollout_logp=torch.full((5,), -1.0),
    )
    with pytest.raises(InputError) as ei:
        E.loss(b, cfg)
    assert field in {v.field for v in ei.value.violations}
    assert all(c in REASON_CODES for c in ei.value.reasons)


def test_reward_kl_batch_refusals() -> None:
    """A KL in the reward needs ref_logp and rewards (it changes advantages computed here), and
    it reads old_logp before the kernel, so a bad old_logp is named there, not as advantages."""
    rk = LossConfig(advantages=AdvantageConfig(estimator="reinforce_pp"), reward_kl=RewardKLConfig(beta=0.1))
    kw = {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])}
    assert ("ref_logp", "missing", None) in reasons(simple_batch([3, 2], **kw), rk)
    ref = torch.full((5,), -1.0, dtype=F64)
    sent = simple_batch([3, 2], ref_logp=ref, advantages=torch.tensor([1.0, -1.0]))
    assert ("reward_kl", "unsupported", None) in reasons(sent, rk)
    bad = simple_batch([3, 2], ref_logp=ref, **kw)
    old = bad.old_logp.clone()
    old[2] = float("nan")
    assert reasons(dataclasses.replace(bad, old_logp=old), rk) == {("old_logp", "non_finite", 2)}
    E.loss(bad, rk)


@pytest.mark.parametrize(
    ("adv", "objective", "why"),
    [
        (AdvantageConfig("reinforce_pp", gamma=1.5), Sapo(), "out_of_range: 1.5 must be in [0, 1]"),
        (AdvantageConfig("reinforce_pp", gamma=-0.0001), Sapo(), "out_of_range: -0.0001 must be in [0, 1]"),
        (AdvantageConfig("reinforce_pp", gamma=math.nan), Sapo(), "out_of_range: nan must be in [0, 1]"),
        (AdvantageConfig("reinforce_pp", gamma=math.inf), Sapo(), "out_of_range: inf must be in [0, 1]"),
        (AdvantageConfig("reinforce_pp", gamma=np.array([0.5, 0.5])), Sapo(), "out_of_range"),  # (an audit)
        (AdvantageConfig("rloo", gamma=0.9), Sapo(), "unsupported: rloo gives one advantage per sequence"),
        (AdvantageConfig("reinforce_pp", gamma=0.9), Gspo(), "unsupported: gspo uses one advantage"),
        (AdvantageConfig("reinforce_pp", gamma=0.9), Gmpo(), "unsupported: gmpo uses one advantage"),
        (AdvantageConfig("reinforce_pp", gamma=0.9), SapoSeq(), "unsupported: sapo_seq uses one advantage"),
    ],
)
def test_gamma_config_refusals(adv, objective, why) -> None:
    """Each refusal of a discount, alone and with its reason, on a batch of rewards."""
    b = simple_batch([3, 2], rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]))
    with pytest.raises(InputError) as ei:
        E.loss(b, LossConfig(objective=objective, advantages=adv))
    assert [v.field for v in ei.value.violations] == ["advantages.gamma"]
    assert ei.value.violations[0].reason.startswith(why)
    E.loss(b, LossConfig(objective=objective, advantages=dataclasses.replace(adv, gamma=1.0)))


def test_gamma_refusals() -> None:
    """gamma discounts returns computed here from rewards, per token: refused with advantages
    sent, and by advantages(), which returns one per sequence; gamma 1 is accepted anywhere."""
    cfg = AdvantageConfig(estimator="reinforce_pp", gamma=0.9)
    sent = simple_batch([3, 2], advantages=torch.tensor([1.0, -1.0]))
    assert reasons(sent, LossConfig(advantages=cfg)) == {("advantages.gamma", "unsupported", None)}
    E.loss(sent, LossConfig(advantages=dataclasses.replace(cfg, gamma=1.0)))
    rewards, groups = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(InputError) as ei:
        E.advantages(rewards, groups, cfg)
    assert [(v.field, v.reason.split(":")[0]) for v in ei.value.violations] == [
        ("advantages.gamma", "unsupported")
    ]
    with pytest.raises(InputError) as ei:
        E.advantages(rewards, groups, dataclasses.replace(cfg, gamma=-0.5))
    assert [(v.field, v.reason.split(":")[0]) for v in ei.value.violations] == [
        ("advantages.gamma", "out_of_range")
    ]
    E.advantages(rewards, groups, dataclasses.replace(cfg, gamma=1.0))


@pytest.mark.parametrize(
    "mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"]
)
def test_cpu_sequence_weights_are_the_torch_formula_bit_for_bit(mode: str) -> None:
    # the CPU computes them with numpy (aggregate.sequence_weights), every other device with torch
    from softgate.engine.aggregate import _weights, sequence_weights

    yl = torch.tensor([0, 3, 7, 1, 0, 12, 5])
    # (tiny normalisers: weights past float32's range, inf there, refused later; no warning)
    for given in ({}, {"num_tokens": 33.0, "num_seqs": 5.0}, {"num_tokens": 1e-300, "num_seqs": 1e-300}):
        kw = {"constant": given.get("num_tokens", 7.0)} if mode == "token_sum_norm" else given
        c = AggregationConfig(mode=mode, **kw)  # type: ignore[arg-type]
        for dt in (torch.float32, torch.float64):
            want = torch.as_tensor(_weights(c, yl.to(torch.float64), torch)).to(dt)
            for counts in (yl, yl.numpy()):  # (compute_loss passes a host batch's counts in numpy)
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    got = sequence_weights(c, counts, dt)
                assert got.dtype == dt and torch.equal(got, want), (given, dt, type(counts))
                assert got.dim() == (1 if mode == "seq_mean_token_mean" else 0)  # uniform: one weight


def test_a_valid_config_object_is_checked_once_and_an_equal_one_still_is() -> None:
    from softgate.engine.validation import validate_config

    ok = LossConfig(objective=Sapo(tau_pos=1.0))
    assert validate_config(ok) == [] and validate_config(ok) == []  # the second by identity
    bad = LossConfig(objective=Sapo(tau_pos=True))  # type: ignore[arg-type]
    assert bad == ok  # True == 1.0: equal, yet not valid
    assert [v.field for v in validate_config(bad)] == ["objective.sapo.tau_pos"]


def test_engine_advantages_refuses_group_ids_of_another_length() -> None:
    """Engine.advantages: group_ids must have one id per reward (length_mismatch, an InputError)."""
    with pytest.raises(InputError) as err:
        E.advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0]), AdvantageConfig())
    assert [(v.field, v.reason.split(":")[0]) for v in err.value.violations] == [
        ("group_ids", "length_mismatch")
    ]


def test_engine_advantages_validates_its_configuration() -> None:
    """Engine.advantages refuses an unknown estimator or a negative eps with an InputError
    naming the field (not a KeyError from inside the computation)."""
    with pytest.raises(InputError) as err:
        E.advantages(
            torch.tensor([1.0, 0.0]),
            torch.tensor([0, 0]),
            AdvantageConfig(estimator="nope", eps=-1.0),  # type: ignore[arg-type]
        )
    fields = [(v.field, v.reason.split(":")[0]) for v in err.value.violations]
    assert fields == [("advantages.estimator", "unknown_name"), ("advantages.eps", "out_of_range")]


# ---------------------------------------------------------------- metrics


def test_metric_names_are_stable_snake_case():
    for k, desc in METRIC_NAMES.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", k) and desc
    for k in (
        "clip_low",
        "clip_high",
        "dual_clip",
        "grad_retained",
        "tokens_pos",
        "tokens_neg",
        "num_tokens",
        "num_seqs",
        "gate_mean_pos",
        "gate_mean_neg",
        "gate_saturation_pos",
        "gate_saturation_neg",
        "degenerate_group_frac",
        "clamped_tokens",
        "ratio_mean",
        "ratio_min",
        "ratio_max",
        "approx_kl",
        "adv_mean",
        "adv_std",
        "reward_mean",
        "reward_std",
    ):
        assert k in METRIC_NAMES
    res = E.loss(random_batch(3), make_config("grpo", "token_mean", "k1", ("token", "truncate")))
    assert list(res.metrics) == list(METRIC_NAMES)


def test_grad_retained_definition():
    b = random_batch(8, max_seqs=8, max_len=8, big_deltas=True)
    for name in OBJECTIVE_NAMES:
        res = E.loss(b, make_config(name, "token_mean", None, None))
        free = E.loss(b, make_config("reinforce", "token_mean", None, None))
        if name in ("sapo", "grpo", "gppo", "reinforce"):
            # their gradient with nothing clipped and w = 1 is the reinforce gradient on the same ratio
            den = free.grad.abs().sum()
            want = float(res.grad.abs().sum() / den) if den > 0 else 1.0
            assert res.metrics["grad_retained"] == pytest.approx(want, rel=1e-12)
        assert math.isfinite(res.metrics["grad_retained"])
    assert E.loss(b, make_config("reinforce", "token_mean", None, None)).metrics[
        "grad_retained"
    ] == pytest.approx(1.0)


def test_reward_metrics_are_reported_when_advantages_are_given_too() -> None:
    """reward_mean / reward_std describe the rewards given, whether or not the caller also gave
    the advantages (then no group statistics are computed)."""
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    b = Batch(
        logp=logp,
        offsets=torch.tensor([0, 1, 3]),
        old_logp=logp.clone(),
        advantages=torch.tensor([0.5, -0.5], dtype=F64),
        rewards=torch.tensor([1.0, 0.0], dtype=F64),
    )
    m = E.loss(b, LossConfig()).metrics
    assert m["reward_mean"] == 0.5 and m["reward_std"] == 0.5  # population std
    assert m["num_groups"] == 0.0


def test_to_floats_turns_non_finite_values_into_0() -> None:
    """metrics.to_floats: a non-finite metric value (never expected) becomes 0.0, others stay."""
    got = to_floats({"a": math.inf, "b": math.nan, "c": -math.inf, "d": 2.5})
    assert got == {"a": 0.0, "b": 0.0, "c": 0.0, "d": 2.5}


# ---------------------------------------------------------------- compiled kernel


EC = None


CODES = 1 << 15  # sample_tokens above the batch's size: ratio and gate whole, with their bucket codes


def _openrlhf_seq_mask_tis(
    logp: Tensor, old: Tensor, rollout: Tensor, adv: Tensor, mask: Tensor, lo: float, hi: float
) -> Tensor:
    """OpenRLHF's PolicyLoss (ppo, clip 0.2, token_level_loss) with vllm_is_correction_type
    "seq-mask-tis", written out on padded [B, T] tensors: the loss."""
    m = mask.to(F64)
    ratio = (logp - old).exp()
    surr1, surr2 = ratio * adv, ratio.clamp(0.8, 1.2) * adv
    loss = -torch.min(surr1, surr2)
    log_ratio = old - rollout
    seq_is = torch.exp((log_ratio * m).sum(-1) / m.sum(-1))  # masked_mean(..., dim=-1)
    seq_mask = (seq_is >= lo) & (seq_is <= hi)
    loss = seq_mask.unsqueeze(-1) * torch.exp(log_ratio).detach() * loss
    return (loss * m).sum() / m.sum()


def test_seq_mask_is_openrlhfs_seq_mask_tis():
    """mismatch mode seq_mask: each token weighs its own exp(old - rollout), not truncated, and
    a sequence whose geometric-mean weight is outside [lo, hi] drops out (its tokens stay in
    the normalisers), as OpenRLHF's seq-mask-tis; NeMo-RL's is the same formula. Loss and
    gradient against autograd of the peer's code, with holes in the mask."""
    gen = torch.Generator().manual_seed(23)
    lengths = torch.tensor([4, 1, 6, 3, 5, 2])
    bsz, t_max = len(lengths), int(lengths.max())
    pad = torch.arange(t_max)[None, :] < lengths[:, None]
    mask = pad & (torch.rand(bsz, t_max, generator=gen) > 0.2)
    mask[:, 0] = True
    old = -torch.rand(bsz, t_max, generator=gen, dtype=F64) - 1.5
    logp = old + 0.15 * torch.randn(bsz, t_max, generator=gen, dtype=F64)
    rollout = old + 0.4 * torch.randn(bsz, t_max, generator=gen, dtype=F64)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, 2.0], dtype=F64)
    lo, hi = 0.85, 1.15
    geo = torch.exp(((old - rollout) * mask).sum(-1) / mask.sum(-1))
    kept = (geo >= lo) & (geo <= hi)
    assert 0 < int(kept.sum()) < bsz  # (both kinds in the batch)
    leaf = logp.clone().requires_grad_(True)
    want = _openrlhf_seq_mask_tis(leaf, old, rollout, adv[:, None], mask, lo, hi)
    (want_grad,) = torch.autograd.grad(want, leaf)
    b = Batch(
        logp=logp[pad],
        old_logp=old[pad],
        rollout_logp=rollout[pad],
        mask=mask[pad],
        offsets=Batch.offsets_from_lengths(lengths),
        advantages=adv,
    )
    cfg = LossConfig(
        objective=Grpo(eps_low=0.2, eps_high=0.2),
        aggregation=AggregationConfig(mode="token_mean"),
        mismatch=MismatchConfig(mode="seq_mask", lo=lo, hi=hi),
    )
    res = E.loss(b, cfg)
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(res.grad, want_grad[pad], rtol=1e-12, atol=1e-15)
    # the dropped sequences' trained tokens count as changed; a kept one's weights are its own
    dropped = (~kept[:, None] & mask)[pad]
    assert res.metrics["mismatch_clipped_frac"] == pytest.approx(int(dropped.sum()) / int(mask.sum()))
    assert float(torch.exp(old - rollout)[mask & kept[:, None]].max()) > hi  # (untruncated)


def test_seq_mask_refuses_the_sequence_level_and_a_floor():
    """seq_mask weighs each token by its own weight: the sequence level is refused, and so is
    a floor (a truncate bound it never reads), each naming its field."""
    b = random_batch(3, max_seqs=3, max_len=4)
    for mm, field in (
        (MismatchConfig(level="sequence", mode="seq_mask"), "mismatch.level"),
        (MismatchConfig(level="geometric", mode="seq_mask"), "mismatch.level"),
        (MismatchConfig(mode="seq_mask", floor=0.5), "mismatch.floor"),
        (MismatchConfig(mode="seq_mask", lo=1.5, hi=1.2), "mismatch.lo"),
    ):
        with pytest.raises(InputError) as err:
            E.loss(b, LossConfig(mismatch=mm))
        ((v,),) = [err.value.violations]
        assert v.field == field, v
        assert v.reason.split(":")[0] in ("unsupported", "out_of_range"), v


# Each row compiles a kernel of its own (~30 s on CI's 2 cores): the default run keeps one
# of each kind (AOTInductor and dynamo, float64 and float32, the kernel inputs each feature
# adds); the rows marked slow (`make test-slow`) take every objective through the compiler.
@needs_compile
@pytest.mark.parametrize(
    "dtype,name,kl,mm,clamp,agg,adv,sample",
    [
        (F64, "sapo", None, None, 3.0, "seq_mean_token_mean", "rewards", None),
        (F64, "grpo", "k3", ("token", "truncate"), 3.0, "seq_mean_token_mean", "rewards", None),
        # the same kernel, another clamp: numbers are kernel inputs, never baked in (a float
        # argument once was, and inductor's cache served the clamp-3 kernel to clamp 20)
        (F64, "grpo", "k3", ("token", "truncate"), 20.0, "seq_mean_token_mean", "rewards", None),
        slow(torch.float32, "gspo", None, None, 3.0, "seq_mean_token_mean", "rewards", None),
        # one weight for all and per-token advantages: a kernel without per-token sequence ids
        (torch.float32, "sapo", None, None, 20.0, "token_mean", "token", None),
        slow(F64, "cispo", "k1", None, 20.0, "seq_mean_token_sum", "sequence", None),
        # with bucket codes, as a server calls it: every objective's AOTInductor kernel (its
        # small buffers on the stack) once more
        (torch.float32, "sapo", "k3", ("token", "truncate"), 20.0, "seq_mean_token_mean", "token", CODES),
        slow(F64, "grpo", "k2", ("sequence", "mask"), 20.0, "token_mean", "rewards", CODES),
        (torch.float32, "gspo", None, None, 20.0, "seq_mean_token_sum", "sequence", CODES),
        slow(torch.float32, "gspo_token", "k1", None, 20.0, "token_sum_norm", "token", CODES),
        slow(F64, "gppo", None, ("token", "mask"), 20.0, "seq_mean_token_mean", "sequence", CODES),
        # the same kernel with clamped, clipped gppo tokens: their free gradient is -A r (not
        # the clamp's 0) compiled as eagerly, whatever inductor's cache holds
        slow(F64, "gppo", None, ("token", "mask"), 3.0, "seq_mean_token_mean", "sequence", CODES),
        slow(torch.float32, "cispo", None, None, 20.0, "token_mean", "token", CODES),
        slow(torch.float32, "dppo_kl", None, None, 20.0, "token_mean", "token", CODES),
        slow(F64, "dppo_tv", "k3", ("token", "truncate"), 20.0, "seq_mean_token_mean", "rewards", CODES),
        slow(torch.float32, "reinforce", "k3", None, 20.0, "seq_mean_token_mean", "rewards", CODES),
        # the covariance selection as a kernel input (sel), read in the loop
        (torch.float32, "clip_cov", None, ("token", "truncate"), 20.0, "token_mean", "token", CODES),
        slow(F64, "kl_cov", "k3", None, 20.0, "seq_mean_token_mean", "rewards", None),
        # sapo's gate on the sequence ratio
        slow(F64, "sapo_seq", "k3", ("token", "truncate"), 20.0, "seq_mean_token_mean", "rewards", CODES),
        slow(torch.float32, "cispo_seq", None, None, 20.0, "token_mean", "token", CODES),
        # each token's own mismatch weight, filtered by its sequence's geometric mean
        (torch.float32, "grpo", None, ("token", "seq_mask"), 20.0, "token_mean", "sequence", CODES),
        # the sequence ratio's KL weight and its gradient's share, two per-sequence inputs
        (torch.float32, "grpo", "k3_is_seq", None, 20.0, "seq_mean_token_mean", "rewards", CODES),
        # dro's penalty reads logp and old, both zeroed on masked tokens (gspo's rows above:
        # variant 1, with a dual clip)
        (torch.float32, "dro", "k3", ("token", "truncate"), 20.0, "token_sum_norm", "token", CODES),
        slow(F64, "dro", None, None, 3.0, "seq_mean_token_mean", "rewards", None),
    ],
)
def test_compiled_kernel_matches_eager(dtype, name, kl, mm, clamp, agg, adv, sample, caplog):
    global EC
    EC = EC or Engine(device="cpu", compile=True)
    b = random_batch(17, max_seqs=12, max_len=30, dtype=dtype, big_deltas=True, advantages=adv)
    cfg = make_config(name, agg, kl, mm, variant=1, clamp=clamp)
    if mm == ("token", "seq_mask"):  # a window that drops some sequences (a quarter) and keeps others
        cfg = dataclasses.replace(cfg, mismatch=dataclasses.replace(cfg.mismatch, lo=0.9, hi=1.1))
    r_e = E.loss(b, cfg, sample_tokens=sample)
    assert mm != ("token", "seq_mask") or 0 < r_e.metrics["mismatch_clipped_frac"] < 1
    with caplog.at_level(logging.WARNING, logger="softgate.engine.compiled"):
        r_c = EC.loss(b, cfg, sample_tokens=sample)
    assert EC.kernel.enabled, "compilation fell back to eager"
    assert "AOTInductor compile failed" not in caplog.text  # (not sampled: AOTInductor's kernel)
    tol = 1e-12 if dtype == F64 else 1e-5
    assert_same_result(r_c, r_e, tol)
    n = b.logp.numel()
    codes = n if sample else 0
    assert r_c.sample_stride == 1 and r_c.ratio_bucket.numel() == r_c.gate_bucket.numel() == codes
    if sample:  # the same codes but where a value within an ulp of an edge rounds across it
        for got, want in ((r_c.ratio_bucket, r_e.ratio_bucket), (r_c.gate_bucket, r_e.gate_bucket)):
            assert int((got != want).sum()) <= n // 100
        assert r_c.bucket_sums == pytest.approx(r_e.bucket_sums, rel=1e-6, abs=1e-9)


# rollout rejection criteria that take out part of random_batch's tokens: a k1 window per
# token, sequences by their mean k3 and their largest k2
REJECTION = (
    RejectionCriterion(1.3, "k1", "token", 0.7),
    RejectionCriterion(0.05, "k3", "seq_mean"),
    RejectionCriterion(0.5, "k2", "seq_max"),
)


@needs_compile
@pytest.mark.parametrize("name", ["grpo", slow("gspo"), slow("cispo")])
def test_compiled_kernel_with_rollout_rejection_matches_eager(name):
    """The mask rejection leaves is the compiled kernel's, with a KL term and a mismatch weight."""
    global EC
    EC = EC or Engine(device="cpu", compile=True)
    b = random_batch(31, max_seqs=12, max_len=30, dtype=torch.float32, advantages="rewards")
    cfg = make_config(name, "token_mean", "k3", ("token", "truncate"), variant=1, rejection=REJECTION)
    r_e = E.loss(b, cfg, sample_tokens=CODES)
    assert 0 < r_e.metrics["rejected_tokens"] < int(b.mask.sum())
    r_c = EC.loss(b, cfg, sample_tokens=CODES)
    assert EC.kernel.enabled, "compilation fell back to eager"
    assert_same_result(r_c, r_e, 1e-5)


@needs_compile
@pytest.mark.parametrize("name", ["grpo", slow("sapo_seq"), slow("dro")])
def test_compiled_kernel_with_off_policy_masking_matches_eager(name):
    """OPSM's per-sequence mean KL and its threshold as kernel inputs, with a token-level
    mismatch correction (its rollout log-probs are OPSM's sampler) and sampled bucket codes."""
    global EC
    EC = EC or Engine(device="cpu", compile=True)
    adv = "sequence" if name in PER_SEQUENCE_ADVANTAGES else "token"
    b = random_batch(29, max_seqs=12, max_len=30, dtype=torch.float32, big_deltas=True, advantages=adv)
    cfg = make_config(name, "seq_mean_token_mean", "k3", ("token", "truncate"), variant=1, opsm=0.0)
    r_e = E.loss(b, cfg, sample_tokens=CODES)
    assert 0 < r_e.metrics["off_policy_masked_frac"] < 1
    r_c = EC.loss(b, cfg, sample_tokens=CODES)
    assert EC.kernel.enabled, "compilation fell back to eager"
    assert_same_result(r_c, r_e, 1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_matches_cpu(compile):
    ec = Engine(device="cuda", compile=compile, host_max_tokens=0)  # small batches too on the GPU
    for i, name in enumerate(OBJECTIVE_NAMES):
        b = random_batch(31, max_seqs=10, max_len=20)
        # every other objective with OPSM (its per-sequence mean gathered on the device; -0.15
        # drops about a fifth of this batch's tokens)
        opsm = -0.15 if i % 2 else None
        rejection = REJECTION if i % 3 == 0 else ()  # (its per-sequence sums and maxima on the device)
        cfg = make_config(
            name, "seq_mean_token_mean", "k3", ("sequence", "mask"), variant=1, opsm=opsm, rejection=rejection
        )
        r_cpu = E.loss(b, cfg)
        assert opsm is None or r_cpu.metrics["off_policy_masked_frac"] > 0
        assert not rejection or r_cpu.metrics["rejected_tokens"] > 0
        r_gpu = ec.loss(b, cfg)
        assert r_gpu.grad.device.type == "cuda"
        assert r_gpu.loss == pytest.approx(r_cpu.loss, rel=1e-10, abs=1e-12)
        torch.testing.assert_close(r_gpu.grad.cpu(), r_cpu.grad, rtol=1e-10, atol=1e-12)
        for k in METRIC_NAMES:
            assert r_gpu.metrics[k] == pytest.approx(r_cpu.metrics[k], rel=1e-8, abs=1e-10), k
    # compiled, not quietly eager after a failed compile (logged, never raised)
    assert ec.kernel.compiled_calls == (len(OBJECTIVE_NAMES) if compile else 0)


def test_a_cuda_engine_computes_a_small_host_batch_on_the_host(monkeypatch):
    """A GPU's launches, copies and synchronisations cost more than a small batch's compute on
    the host: a CUDA engine computes a host batch of at most host_max_tokens tokens there, as a
    CPU engine does; a larger one, or one with a tensor elsewhere, goes to its device. (Making a
    CUDA engine touches no GPU, and neither does a host batch: this runs anywhere.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (Engine refuses a CUDA it lacks)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small = random_batch(8, max_seqs=6, max_len=10, advantages="rewards")
    n = small.logp.numel()
    eng = Engine(device="cuda", compile=False, host_max_tokens=n)
    assert eng.device_for(small) == cpu
    for name in OBJECTIVE_NAMES:
        cfg = make_config(name, "seq_mean_token_mean", "k3", ("sequence", "mask"), variant=1)
        got, want = eng.loss(small, cfg), E.loss(small, cfg)
        assert got.grad.device == cpu
        _assert_equal_results(got, want, rtol=0)
    adv = eng.advantages(small.rewards, small.group_ids, AdvantageConfig())
    assert torch.equal(
        adv.advantages, E.advantages(small.rewards, small.group_ids, AdvantageConfig()).advantages
    )

    big = random_batch(9, max_seqs=6, max_len=10, num_seqs=6)
    assert big.logp.numel() > n
    assert eng.device_for(big) == cuda
    assert Engine(device="cuda", host_max_tokens=0).device_for(small) == cuda
    elsewhere = dataclasses.replace(small, ref_logp=small.ref_logp.to("meta"))
    assert eng.device_for(elsewhere) == cuda
    assert eng.device_for(small, grad_out=torch.empty(n, device="meta")) == cuda  # written there
    assert eng.device_for(small, grad_out=torch.empty(n, dtype=small.logp.dtype)) == cpu
    assert Engine(device="cpu").host_max_tokens == 0


def test_a_cuda_engine_warms_up_both_devices(monkeypatch):
    """Its first small call runs on the host, its first large one on the GPU: the warm-up
    runs every objective on each (and on the GPU only when nothing goes to the host)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (Engine refuses a CUDA it lacks)
    for host_max, want in ((DEFAULT_HOST_MAX_TOKENS, ["cuda", "cpu"]), (0, ["cuda"])):
        eng = Engine(device="cuda", compile=False, host_max_tokens=host_max)
        seen: list[str] = []
        monkeypatch.setattr(
            eng, "_loss", lambda batch, cfg, kernel, device, seen=seen: seen.append(device.type)
        )
        eng.warmup()
        assert seen == want * len(OBJECTIVE_NAMES)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_engine_keeps_small_batches_on_the_host_and_large_ones_on_the_gpu():
    """With the default host_max_tokens: a small host batch comes back on the host with the CPU
    engine's bits; the same batch already on the GPU, or a large one, is computed there."""
    eng = Engine(device="cuda")
    small = random_batch(21, max_seqs=20, max_len=30)
    cfg = make_config("sapo", "seq_mean_token_mean", "k3", ("sequence", "mask"))
    got = eng.loss(small, cfg)
    assert got.grad.device.type == "cpu"
    _assert_equal_results(got, Engine(device="cpu").loss(small, cfg), rtol=0)
    fields = {f.name: getattr(small, f.name) for f in dataclasses.fields(small)}
    on_gpu = dataclasses.replace(
        small, **{k: v.cuda() for k, v in fields.items() if isinstance(v, torch.Tensor)}
    )
    assert eng.loss(on_gpu, cfg).grad.device.type == "cuda"
    big = random_batch(22, max_seqs=300, max_len=600, num_seqs=300)
    assert big.logp.numel() > eng.host_max_tokens
    assert eng.loss(big, cfg).grad.device.type == "cuda"


def test_transfers_on_the_cpu_are_plain():
    x = torch.randn(7, requires_grad=True)
    assert transfer.to_device(x, torch.device("cpu")) is x
    (h,) = transfer.to_host([x * 2])
    assert not h.requires_grad and torch.equal(h, (x * 2).detach())


def test_tensors_of_at_least_1_mib_travel_pinned() -> None:
    """transfer: a tensor of exactly PIN_MIN_BYTES (1 MiB) goes through pinned memory, one byte
    less does not."""
    assert transfer._pinned(torch.empty(transfer.PIN_MIN_BYTES, dtype=torch.uint8))
    assert not transfer._pinned(torch.empty(transfer.PIN_MIN_BYTES - 1, dtype=torch.uint8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transfers_through_pinned_memory_equal_plain_copies():
    big = torch.randn(transfer.PIN_MIN_BYTES // 4 + 3)  # pinned on the way
    small = torch.arange(5, dtype=torch.float64)  # copied directly
    dev = torch.device("cuda")
    on = [transfer.to_device(x, dev) for x in (big, small)]
    assert [t.device.type for t in on] == ["cuda", "cuda"]
    back = transfer.to_host([*on, on[0][3:], on[0] > 0])
    for got, want in zip(back, [big, small, big[3:], big > 0], strict=True):
        assert got.device.type == "cpu" and got.dtype == want.dtype and torch.equal(got, want)
    assert back[0].is_pinned() and not back[1].is_pinned()


def test_segment_sum_equals_index_add():
    from softgate.engine.segments import segment_sum

    lengths = torch.tensor([3, 0, 5, 1, 0, 7])
    off = Batch.offsets_from_lengths(lengths)
    ids = torch.repeat_interleave(lengths)
    x = torch.randint(-50, 50, (int(lengths.sum()),)).to(F64)  # integers: exact in any order
    assert torch.equal(segment_sum(x, off), torch.zeros(6, dtype=F64).index_add_(0, ids, x))
    assert torch.equal(segment_sum(x[:0], torch.zeros(3, dtype=torch.int64)), torch.zeros(2, dtype=F64))
    assert segment_sum(x, torch.zeros(1, dtype=torch.int64)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cpu_segment_sums_are_reduceat_sums(dtype):
    """CPU sequence sums (numpy's add.reduceat): 0 for empty sequences wherever they are,
    the dtype kept, close to a float64 sum, and the same bits on every call."""
    from softgate.engine.segments import Segments

    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([0, 3, 0, 0, 5, 1, 2000, 0, 7, 0])
    off = Batch.offsets_from_lengths(lengths)
    n = int(lengths.sum())
    x = torch.randn(n, generator=g, dtype=dtype)
    seg = Segments(off, n)
    got = seg.sum(x)
    want = torch.zeros(10, dtype=F64).index_add_(0, torch.repeat_interleave(lengths), x.to(F64))
    assert got.dtype == dtype and got.shape == (10,)
    assert bool((got[lengths == 0] == 0).all())
    assert torch.allclose(got.to(F64), want, rtol=0, atol=1e-12 if dtype == F64 else 1e-5)
    assert torch.equal(seg.sum(x), got)
    assert torch.equal(Segments(off[:1], 0).sum(x[:0]), torch.zeros(0, dtype=dtype))


@pytest.mark.parametrize("name", ["gspo", "sapo"])
def test_segment_reduce_sums_equal_cpu_sums(monkeypatch, name):
    """The sums CUDA takes (segment_reduce over sequences, over rewards sorted by group) give
    the CPU path's numbers (reduceat, index_add_ over groups), checked here on the CPU."""
    from softgate.engine import advantages, segments

    b = random_batch(5, max_seqs=40, max_len=30)
    cfg = make_config(name, "seq_mean_token_mean", "k3", ("sequence", "mask"), estimator="rloo")
    want = E.loss(b, cfg)
    monkeypatch.setattr(segments, "use_segment_reduce", lambda device: True)
    monkeypatch.setattr(advantages, "use_segment_reduce", lambda device: True)
    assert_same_result(E.loss(b, cfg), want, 1e-12)


@pytest.mark.parametrize(
    ("level", "gamma"), [("token", 1.0), ("sequence", 1.0), ("token", 0.9), ("immediate", 0.9), (None, 0.5)]
)
def test_reward_kl_on_the_gpu_code_path(monkeypatch, level, gamma) -> None:
    """A KL in the reward and a discount through the code a GPU runs (segment sums, gathers,
    the doubling scan of the returns) give the CPU's loss, gradient, advantages and metrics."""
    b = random_batch(11, max_seqs=40, max_len=30)
    cfg = make_config("sapo", "token_mean", "k3", None, estimator="reinforce_pp")
    rk = RewardKLConfig(beta=0.1, estimator="k3", level=level) if level else None
    adv = dataclasses.replace(cfg.advantages, gamma=gamma)
    cfg = dataclasses.replace(cfg, reward_kl=rk, advantages=adv)
    want = E.loss(b, cfg)
    _gpu_code_path(monkeypatch)
    got = E.loss(b, cfg)
    _assert_equal_results(got, want)
    if level:
        assert got.metrics["reward_kl_mean"] == pytest.approx(want.metrics["reward_kl_mean"], rel=1e-12)


def _gpu_code_path(monkeypatch) -> None:
    """Make the engine run the device-generic code a GPU runs, here on the CPU: no host
    shortcuts (numpy; per-sequence values expanded before the kernel: a gather in it instead;
    the eager kernel in slices), segment_reduce sums, dynamo for compiles."""
    from softgate.engine import advantages, aggregate, chunked, compiled, loss, returns, segments, validation

    for m in (segments, loss, aggregate, validation, compiled, chunked, returns):
        monkeypatch.setattr(m, "host_shortcuts", lambda device: False)
    for m in (segments, advantages):
        monkeypatch.setattr(m, "use_segment_reduce", lambda device: True)


def _assert_equal_results(got, want, rtol: float = 1e-12) -> None:
    """Two float64 LossResults of one batch agree to summation order: every output and metric."""
    assert got.loss == pytest.approx(want.loss, rel=rtol, abs=1e-15)
    for name in ("grad", "advantages", "ratio", "gate_weight"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=rtol, atol=1e-15)
    assert torch.equal(got.clip_mask, want.clip_mask) and torch.equal(got.mask, want.mask)
    for k in METRIC_NAMES:
        assert got.metrics[k] == pytest.approx(want.metrics[k], rel=rtol, abs=1e-15), k


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
@pytest.mark.parametrize(
    "agg,kl,mm,adv,opsm",
    [
        ("seq_mean_token_mean", "k3", ("sequence", "truncate"), "rewards", None),
        ("token_mean", None, ("token", "mask"), "sequence", None),
        # (geometric: the sequence level's kernel, its log-weight a mean)
        ("seq_mean_token_sum", "k1", ("geometric", "mask"), "token", None),
        # the rollout per token beside its sequence's mean log-weight; the KL's two [B] inputs
        ("token_mean", "k3_is_seq", ("token", "seq_mask"), "rewards", None),
        # OPSM's per-sequence mean KL from the sampler
        ("token_sum_norm", "k3", ("token", "truncate"), "token", 0.0),
        # rollout rejection: its per-sequence sum, mean and max statistics (opsm: None)
        ("seq_mean_token_mean", None, ("token", "truncate"), "rewards", "rejection"),
    ],
)
def test_the_gpu_code_path_on_the_cpu_gives_the_cpu_results(monkeypatch, name, agg, kl, mm, adv, opsm):
    """The code CUDA runs (sequence ids gathered in the kernel, torch for the layout, weights
    and sums) differs from the CPU's shortcuts; run here on the CPU, it gives their results,
    so the path a GPU takes is tested on every CI run, not only when a GPU is at hand."""
    if name in PER_SEQUENCE_ADVANTAGES and adv == "token":
        adv = "sequence"  # (gspo takes one advantage per sequence)
    b = random_batch(11, max_seqs=12, max_len=15, advantages=adv)
    rejection = REJECTION if opsm == "rejection" else ()
    opsm = None if opsm == "rejection" else opsm
    cfg = make_config(name, agg, kl, mm, variant=1, opsm=opsm, rejection=rejection)
    want = E.loss(b, cfg)
    assert opsm is None or 0 < want.metrics["off_policy_masked_frac"] < 1
    assert not rejection or 0 < want.metrics["rejected_tokens"] < int(b.mask.sum())
    _gpu_code_path(monkeypatch)
    seen: list[dict] = []
    got = compute_loss(b, cfg, kernel=lambda t, *a: seen.append(dict(t)) or token_terms(t, *a))
    # every case has something per sequence (advantages, weight, ratio or mismatch weight)
    assert "ids" in seen[0] and not any(k.endswith("_tok") for k in seen[0])
    _assert_equal_results(got, want)


@needs_compile
def test_the_gpu_code_path_compiled_on_the_cpu_gives_the_cpu_results(monkeypatch):
    """The same, compiled as CUDA compiles (dynamo, the gathers in the graph)."""
    from softgate.engine import compiled

    b = random_batch(12, max_seqs=12, max_len=15, advantages="rewards")
    cfg = make_config("gspo_token", "seq_mean_token_mean", "k3", ("sequence", "truncate"))
    want = E.loss(b, cfg)
    _gpu_code_path(monkeypatch)
    monkeypatch.setattr(compiled, "aoti_compile", lambda example: pytest.fail("AOTInductor is CPU-only"))
    ec = Engine(device="cpu", compile=True)
    got = ec.loss(b, cfg)
    (key,) = ec.kernel._fns  # the configuration compiled: the kernel reads sequence ids
    assert ec.kernel.compiled_calls == 1 and any(k == "ids" for k, *_ in key[5])
    _assert_equal_results(got, want, rtol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_results_are_the_same_bits_on_every_call():
    """No atomic float adds on the path: GSPO's sequence ratio, the sequence mismatch weight and
    group advantages of float rewards, twice on one batch, give identical results."""
    ec = Engine(device="cuda", compile=False, host_max_tokens=0)
    b = random_batch(3, max_seqs=400, max_len=500, num_seqs=400)
    b.rewards = torch.randn(400, dtype=F64)
    cfg = make_config("gspo", "seq_mean_token_mean", "k3", ("sequence", "truncate"))
    r1, r2 = ec.loss(b, cfg), ec.loss(b, cfg)
    assert r1.loss == r2.loss and r1.policy_loss == r2.policy_loss
    assert torch.equal(r1.grad, r2.grad)
    assert r1.metrics == pytest.approx(r2.metrics, rel=0, abs=0, nan_ok=True)


def test_inputs_with_autograd_graph():
    """A trainer passes its live logp: no graph is recorded, logp.backward(grad) applies it;
    the same with the caller's grad mode off, which the engine leaves as it found it."""
    b = random_batch(9, max_seqs=5, max_len=6, advantages="sequence")
    params = b.logp.clone().requires_grad_(True)
    live = params * 1.0
    b.logp = live
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            res = E.loss(b, make_config("sapo", "token_mean", "k3", None))
            assert torch.is_grad_enabled() is grad
        assert res.grad.grad_fn is None and not res.grad.requires_grad
        params.grad = None
        live.backward(res.grad, retain_graph=True)
        torch.testing.assert_close(params.grad, res.grad)


def test_overflowing_results_are_refused():
    """Finite inputs whose float32 result overflows: InputError 'overflow', never inf/NaN out."""
    logp = torch.tensor([-1.0, -0.5, -2.0, -0.1])
    old = torch.tensor([-6.0, -5.5, -7.0, -5.1])
    off = torch.tensor([0, 2, 4])
    huge = Batch(logp=logp, offsets=off, old_logp=old, advantages=torch.tensor([3e38, -3e38]))
    assert ("logp", "overflow", 0) in reasons(huge, LossConfig(objective=Reinforce()))
    ok = Batch(logp=logp, offsets=off, old_logp=old, advantages=torch.tensor([1.0, -1.0]))
    # (weights of 5e36, ratios of ~150)
    tiny = LossConfig(objective=Reinforce(), aggregation=AggregationConfig(num_seqs=1e-37))
    assert {c for _, c, _ in reasons(ok, tiny)} == {"overflow"}
    # one whose weight float32 cannot hold is the normaliser's fault, named
    tinier = LossConfig(aggregation=AggregationConfig(num_seqs=1e-300))
    assert reasons(ok, tinier) == {("aggregation.num_seqs", "out_of_range", None)}
    rw = Batch(
        logp=logp,
        offsets=off,
        old_logp=old,
        rewards=torch.tensor([1e308, -1e308], dtype=F64),
        group_ids=torch.tensor([0, 0]),
    )
    dr_grpo = LossConfig(advantages=AdvantageConfig(estimator="dr_grpo"))
    assert reasons(rw, dr_grpo) == {("rewards", "out_of_range", 0)}
    # squares that overflow float64 would make the group's std inf and its advantages 0
    rw.rewards = torch.tensor([1.0, 1e200], dtype=F64)
    assert reasons(rw, LossConfig()) == {("rewards", "out_of_range", 1)}
    with pytest.raises(InputError, match=r"rewards\[1\]: out_of_range"):
        E.advantages(rw.rewards, torch.tensor([0, 0]), AdvantageConfig())
    rw.rewards = torch.tensor([1.0, 1e100], dtype=F64)  # the bound itself is accepted
    E.advantages(rw.rewards, torch.tensor([0, 0]), AdvantageConfig())
    # an advantage past float32 (the log-probs'): refused on the reward, not on a token of logp
    # as an overflowing gradient (an audit)
    rw.rewards = torch.tensor([1e39, 0.0], dtype=F64)
    assert reasons(rw, dr_grpo) == {("rewards", "overflow", 0)}
    assert ("log_ratio_clamp", "out_of_range", None) in reasons(ok, LossConfig(log_ratio_clamp=100.0))
    assert ("log_ratio_clamp", "out_of_range", None) in reasons(ok, LossConfig(log_ratio_clamp=1e300))
    E.loss(ok, LossConfig(log_ratio_clamp=80.0))
    with pytest.raises(InputError, match="overflow"):
        E.advantages(torch.tensor([3e38, -3e38]), torch.tensor([0, 0]), AdvantageConfig(estimator="rloo"))
    # the KL term's gradient and value are checked too, not only the policy part: k2's gradient
    # -x = -10 times beta 1e38 (the loss, summed in float64, stays finite), and k2 = x^2 / 2 of
    # x = 1e20 (the policy part and the gradient stay finite; never a loss that reads 0)
    agg = AggregationConfig(mode="token_sum_norm", constant=1.0)
    kl_grad = Batch(
        logp=torch.tensor([-11.0]),
        offsets=torch.tensor([0, 1]),
        advantages=torch.tensor([0.0]),  # policy gradient 0
        ref_logp=torch.tensor([-1.0]),
    )
    cfg = LossConfig(objective=Reinforce(), aggregation=agg, kl=KLConfig(estimator="k2", beta=1e38))
    assert {c for _, c, _ in reasons(kl_grad, cfg)} == {"overflow"}
    kl_value = Batch(
        logp=torch.tensor([-1e20, -1.0]),
        offsets=torch.tensor([0, 2]),
        advantages=torch.tensor([1.0]),
        ref_logp=torch.tensor([-1.0, -1.0]),
    )
    cfg = LossConfig(objective=Reinforce(), aggregation=agg, kl=KLConfig(estimator="k2", beta=1e-3))
    assert {c for _, c, _ in reasons(kl_value, cfg)} == {"overflow"}


@pytest.mark.parametrize("words", [False, True])
def test_segment_counts_are_exact(monkeypatch, words):
    """Per-sequence mask counts, by cumsum and by 8-byte words (the large-batch CPU path):
    empty sequences, offsets inside words and in a partial last word, an unaligned mask."""
    from softgate.engine import segments

    monkeypatch.setattr(segments, "_WORDS_MIN_TOKENS", 8 if words else 1 << 62)
    g = torch.Generator().manual_seed(5)
    cases = ((1, 1), (8, 1), (13, 2), (64, 1), (130, 3), (1000, 40), (4099, 64), (4096, 9), (777, 777))
    for (n, b), shift in itertools.product(cases, (0, 1)):
        lengths = torch.multinomial(torch.ones(b), n, replacement=True, generator=g).bincount(minlength=b)
        lengths[: b // 5] = 0
        lengths[-1] += n - int(lengths.sum())
        off = Batch.offsets_from_lengths(lengths)
        m = (torch.rand(n + shift, generator=g) < 0.6)[shift:]  # shift 1: not 8-byte aligned
        want = torch.zeros(b, dtype=torch.int64).index_add_(
            0, torch.repeat_interleave(torch.arange(b), lengths), m.long()
        )
        assert torch.equal(segments.Segments(off, n).count(m), want), (n, b, shift)


def test_the_kl_terms_own_mode_reads_its_normaliser_too() -> None:
    """KLConfig(aggregation=...) adds the KL term's mode to the policy term's: the normalisers
    either reads are used (num_seqs and num_tokens beside SAPO + token_mean KL), one of them
    given without the other is refused as before, and constant is read when either mode is
    token_sum_norm."""
    b = simple_batch([3, 2, 4], advantages=torch.tensor([1.0, -1.0, 0.5], dtype=F64))
    b = dataclasses.replace(b, ref_logp=b.logp - 0.05 * torch.arange(9, dtype=F64))  # (k varies)

    def cfg(mode: str = "seq_mean_token_mean", kl: str | None = "token_mean", **agg: float) -> LossConfig:
        return LossConfig(
            aggregation=AggregationConfig(mode=mode, **agg),  # type: ignore[arg-type]
            kl=KLConfig("k3", 0.1, aggregation=kl),  # type: ignore[arg-type]
        )

    E.loss(b, cfg(num_seqs=3.0, num_tokens=9.0))  # both read: accepted
    assert reasons(b, cfg(num_seqs=3.0)) == {("aggregation.num_tokens", "missing", None)}
    assert reasons(b, cfg(num_tokens=9.0)) == {("aggregation.num_seqs", "missing", None)}
    assert reasons(b, cfg(kl="token_sum_norm")) == {("aggregation.constant", "missing", None)}
    E.loss(b, cfg(kl="token_sum_norm", constant=64.0))
    E.loss(b, cfg(mode="token_sum_norm", kl="token_mean", constant=64.0, num_tokens=9.0))
    assert reasons(b, cfg(kl="tokens")) == {("kl.aggregation", "unknown_name", None)}
    with pytest.raises(InputError, match="the KL term's token_mean"):
        E.loss(b, cfg(num_seqs=3.0))
    # the default (None) and the policy's own mode are the policy term's aggregation, bit for bit
    plain = E.loss(b, cfg(kl=None))
    assert plain.loss == E.loss(b, cfg(kl="seq_mean_token_mean")).loss
    assert plain.loss != E.loss(b, cfg(kl="token_mean")).loss


def test_gmpo_is_verls_geo_mean_loss() -> None:
    """GMPO against verl's `geo_mean` written out (its core_algos, autograd through the whole
    sequence ratio, no token trick): with the default aggregation and num_seqs = B, loss and
    gradient agree; the clip counts are the active side's only (verl's pg_clipfrac counts an
    A>0 token below -eps_low too)."""
    g = torch.Generator().manual_seed(5)
    lengths = [5, 1, 7, 3, 6, 2]
    n, b = sum(lengths), len(lengths)
    logp = -torch.rand(n, generator=g, dtype=F64) - 0.2
    old = (logp - 0.5 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-3)  # |d| > 0.4: ~40%
    mask = torch.rand(n, generator=g) < 0.8
    mask[torch.tensor(lengths).cumsum(0) - 1] = True  # every sequence trained
    adv = torch.tensor([1.0, -0.5, -1.5, 0.7, 0.0, -0.2], dtype=F64)
    lo, hi = 0.3, 0.45
    cfg = LossConfig(objective=Gmpo(eps_low=lo, eps_high=hi))
    batch = Batch(
        logp=logp,
        offsets=Batch.offsets_from_lengths(torch.tensor(lengths)),
        old_logp=old,
        mask=mask,
        advantages=adv,
        advantage_level="sequence",
    )
    res = E.loss(batch, cfg)

    x = logp.clone().requires_grad_(True)
    losses, free, n_high, n_low = [], 0.0, 0, 0
    for i, (s, e) in enumerate(itertools.pairwise([0, *torch.tensor(lengths).cumsum(0).tolist()])):
        m = mask[s:e].to(F64)
        d = x[s:e] - old[s:e]
        sgn = torch.sign(adv[i])
        dmin = sgn * torch.min(sgn * d, sgn * torch.clamp(d, -lo, hi))
        ratio = torch.exp((dmin * m).sum() / m.sum())
        losses.append(-adv[i] * ratio)
        # every trained token's unclipped |gradient| is |A| s / (|y| B): |A| s / B a sequence
        free += float(abs(adv[i]) * ratio.detach()) / b
        n_high += int(((d > hi) & mask[s:e]).sum()) if adv[i] > 0 else 0
        n_low += int(((d < -lo) & mask[s:e]).sum()) if adv[i] < 0 else 0
    want = torch.stack(losses).mean()
    (grad,) = torch.autograd.grad(want, x)
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-13)
    torch.testing.assert_close(res.grad, grad, rtol=1e-12, atol=1e-15)
    assert n_high > 0 and n_low > 0  # (the batch clips on both sides)
    assert res.metrics["clip_high"] * res.metrics["tokens_pos"] == pytest.approx(n_high)
    assert res.metrics["clip_low"] * res.metrics["tokens_neg"] == pytest.approx(n_low)
    assert res.metrics["clip_fraction"] * res.metrics["num_tokens"] == pytest.approx(n_high + n_low)
    # the clipped tokens are exactly those without gradient (gate 0); A = 0's sequence has none
    clipped = res.clip_mask & mask
    assert torch.equal(clipped, (res.gate_weight == 0) & mask & (res.advantages != 0))
    assert bool((res.grad[clipped] == 0).all()) and bool(
        (res.grad[~clipped & mask & (res.advantages != 0)] != 0).all()
    )
    assert res.metrics["grad_retained"] == pytest.approx(float(res.grad.abs().sum()) / free, rel=1e-12)
    assert 0 < res.metrics["grad_retained"] < 1


def test_gmpo_refuses_per_token_advantages_and_negative_bounds() -> None:
    b = simple_batch([3, 2], advantages=torch.tensor([1.0, -1.0, 0.5, 0.5, 2.0], dtype=F64))
    assert reasons(b, LossConfig(objective=Gmpo())) == {("advantages", "unsupported", None)}
    with pytest.raises(InputError, match="gmpo uses one advantage per sequence"):
        E.loss(b, LossConfig(objective=Gmpo()))
    s = simple_batch([3, 2], advantages=torch.tensor([1.0, -1.0], dtype=F64))
    assert reasons(s, LossConfig(objective=Gmpo(eps_low=-0.1))) == {
        ("objective.gmpo.eps_low", "out_of_range", None)
    }


@pytest.mark.parametrize("eps", [0.0, 1e-50, 0.3, 80.0, 100.0, 1e300])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gmpo_takes_every_bound_in_either_dtype(eps: float, dtype: torch.dtype) -> None:
    """A review: a GMPO bound of 1e-50 was refused in float32 (-1e-50 is a float32 0), and
    then, once the kernel compared ratios, one past ~103 was (exp(-103) is). A bound past the
    log-ratio clamp clips nothing; any bound gives the float64 reference's loss and gradient."""

    b = random_batch(8, advantages="sequence", big_deltas=True, dtype=dtype)
    cfg = LossConfig(objective=Gmpo(eps_low=eps, eps_high=eps))
    res = E.loss(b, cfg)
    ref = reference_loss(b, cfg)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert res.loss == pytest.approx(float(ref.loss.detach()), rel=tol, abs=tol)
    torch.testing.assert_close(res.grad.to(F64), ref.grad(), rtol=tol, atol=tol)
    if eps >= 80:
        assert res.metrics["clip_fraction"] == 0.0


def test_gmpo_clips_on_the_log_ratio_as_its_value_does() -> None:
    """A review: compared on the ratio, a float32 bound of 0 let tokens with log-ratios up to
    6e-8 (a ratio of 1.0 in float32) keep their whole gradient while their value was clipped.
    Host and kernel now clip at the same log-ratio bound, and a bound past the clamp counts no
    clamped token as clipped."""
    old = torch.tensor([-1e-3, -1e-3, -1e-3], dtype=torch.float32)
    logp = old + torch.tensor([4.7e-9, 2.8e-8, -0.1], dtype=torch.float32)
    b = Batch(logp=logp, offsets=torch.tensor([0, 3]), old_logp=old, advantages=torch.tensor([1.0]))
    res = E.loss(b, LossConfig(objective=Gmpo(eps_low=0.0, eps_high=0.0)))
    assert res.grad[:2].tolist() == [0.0, 0.0] and res.grad[2] < 0
    assert res.metrics["clip_high"] == pytest.approx(2 / 3)
    far = Batch(
        logp=torch.tensor([-1.0, -1.0]),
        offsets=torch.tensor([0, 2]),
        old_logp=torch.tensor([-86.0, -1.1]),
        advantages=torch.tensor([1.0]),
    )
    cfg = LossConfig(objective=Gmpo(eps_low=100.0, eps_high=100.0), log_ratio_clamp=80.0)
    res = E.loss(far, cfg)
    assert res.metrics["clamped_tokens"] == 1 and res.metrics["clip_fraction"] == 0.0
    assert res.grad[0] == 0 and res.grad[1] != 0


def _verl_dppo(kind, logp, old, adv, mask, lo, hi, cap):
    """verl's dppo_tv / dppo_kl (core_algos) written out on padded [B, T] tensors, token-mean:
    (loss, valid mask, truncated tokens)."""
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    weight = torch.clamp(ratio, max=cap).detach()
    p, q = torch.exp(logp), torch.exp(old)
    if kind == "dppo_tv":
        pos_ok, neg_ok = (p - q) <= hi, (p - q) >= -lo
    else:
        kl = q * (old - logp) + (1 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
        pos_ok, neg_ok = (kl <= hi) | (p <= q), (kl <= lo) | (p >= q)
    valid = torch.where(adv > 0, pos_ok, neg_ok).detach().to(F64)
    losses = -adv * weight * logp * valid
    return (losses * mask).sum() / mask.sum(), valid.bool(), (ratio > cap) & valid.bool()


@pytest.mark.parametrize("kind", ["dppo_tv", "dppo_kl"])
@pytest.mark.parametrize("cap", [None, 1.1])
def test_dppo_is_verls_loss(kind: str, cap: float | None) -> None:
    """DPPO against verl's `dppo_tv` / `dppo_kl` written out (padded, autograd): loss and
    gradient agree to rounding; the dropped tokens are verl's invalid ones with A != 0, per
    sign in clip_low / clip_high, with gate 0 and no gradient (an A = 0 token verl finds invalid
    is not dropped); a truncated token's gate is cap / r, a kept one's else 1; grad_retained is
    sum |grad| / sum |A r|."""
    g = torch.Generator().manual_seed(11)
    lengths = torch.tensor([9, 5, 1, 0, 7, 3, 8])
    b, t = len(lengths), int(lengths.max())
    pad = torch.arange(t)[None, :] < lengths[:, None]
    holes = torch.rand(b, t, generator=g) < 0.85
    mask = pad & holes
    logp = -torch.rand(b, t, generator=g, dtype=F64) * 2 - 1e-3
    old = (logp + 0.4 * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=-1e-4)
    adv = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.5, 0.0, 0.8], dtype=F64)
    logp[5, 0], old[5, 0], mask[5, 0] = -1.5, -1e-3, True  # A = 0, its probability fell 0.78
    lo, hi = (0.1, 0.12) if kind == "dppo_tv" else (0.02, 0.03)
    x = logp.clone().requires_grad_(True)
    want, valid, truncated = _verl_dppo(
        kind, x, old, adv[:, None].expand(b, t), mask.to(F64), lo, hi, cap or 1e300
    )
    (grad,) = torch.autograd.grad(want, x)
    cls = DppoTv if kind == "dppo_tv" else DppoKl
    cfg = LossConfig(
        objective=cls(eps_low=lo, eps_high=hi, ratio_cap=cap),
        aggregation=AggregationConfig(mode="token_mean"),
    )
    batch = Batch(
        logp=logp[pad],
        offsets=Batch.offsets_from_lengths(lengths),
        old_logp=old[pad],
        mask=mask[pad],
        advantages=adv,
    )
    res = E.loss(batch, cfg)
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-13)
    torch.testing.assert_close(res.grad, grad[pad], rtol=1e-12, atol=1e-15)
    a = adv[:, None].expand(b, t)
    dropped = (~valid & mask & (a != 0))[pad]
    assert torch.equal(res.clip_mask & batch.mask, dropped)
    assert not valid[5, 0] and not res.clip_mask[int(lengths[:5].sum())]  # (verl: invalid)
    pos, neg = ((a > 0) & mask)[pad], ((a < 0) & mask)[pad]
    assert int(dropped[pos].sum()) > 0 and int(dropped[neg].sum()) > 0  # (both sides drop)
    assert res.metrics["clip_high"] * res.metrics["tokens_pos"] == pytest.approx(int(dropped[pos].sum()))
    assert res.metrics["clip_low"] * res.metrics["tokens_neg"] == pytest.approx(int(dropped[neg].sum()))
    assert res.metrics["clip_fraction"] * res.metrics["num_tokens"] == pytest.approx(int(dropped.sum()))
    assert bool((res.gate_weight[dropped] == 0).all()) and bool((res.grad[dropped] == 0).all())
    r = torch.exp(logp - old)[pad]
    cut = (truncated & mask & (a != 0))[pad]
    assert bool(cut.any()) == (cap is not None)
    if cap is not None:
        torch.testing.assert_close(res.gate_weight[cut], cap / r[cut])
    kept = batch.mask & ~dropped & ~cut & (a != 0)[pad]
    assert bool((res.gate_weight[kept] == 1).all())
    free = (a.abs()[pad] * r)[batch.mask].sum() / mask.sum()
    assert res.metrics["grad_retained"] == pytest.approx(float(res.grad.abs().sum() / free), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", [DppoTv, DppoKl])
def test_dppo_edge_values(kind: type, dtype: torch.dtype) -> None:
    """Bounds of 0, past every divergence (1e300: nothing dropped) and a cap past the dtype's
    range give the float64 reference's loss and gradient; a log-prob within the tolerance above
    0 (p > 1) and probabilities of exactly 0 and 1 stay finite; a bad cap is refused by name."""

    b = random_batch(8, advantages="sequence", big_deltas=True, dtype=dtype)
    b = dataclasses.replace(b, advantages=b.advantages.to(dtype))  # (float64 ones would compute in it)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    bounds = (0.0, 1e-50, 1e300)  # 1e-50: 0 in float32, taken as 0 (not refused), as gmpo's
    for eps in bounds:
        cfg = LossConfig(objective=kind(eps_low=eps, eps_high=eps, ratio_cap=1e300 if eps > 1 else None))
        res = E.loss(b, cfg)
        assert res.grad.dtype == dtype
        ref = reference_loss(b, cfg)
        assert res.loss == pytest.approx(float(ref.loss.detach()), rel=tol, abs=tol)
        torch.testing.assert_close(res.grad.to(F64), ref.grad(), rtol=tol, atol=tol)
    assert res.metrics["clip_fraction"] == 0.0
    edge = Batch(
        logp=torch.tensor([5e-5, -200.0, -200.0, 0.0], dtype=dtype),
        offsets=torch.tensor([0, 2, 4]),
        old_logp=torch.tensor([-200.0, 5e-5, 0.0, -1e-9], dtype=dtype),
        advantages=torch.tensor([1.0, -1.0], dtype=dtype),
    )
    res = E.loss(edge, LossConfig(objective=kind()))
    assert math.isfinite(res.loss) and bool(torch.isfinite(res.grad).all())
    # dropped: p 0 -> 1 where A > 0, 1 -> 0 where A < 0; kept: the moves A asks for
    assert res.clip_mask.tolist() == [True, False, True, False]
    for cap in (0.0, -1.0, float("inf"), float("nan")):
        assert reasons(b, LossConfig(objective=kind(ratio_cap=cap))) == {
            (f"objective.{kind.name}.ratio_cap", "out_of_range", None)
        }


@pytest.mark.parametrize("kind", [DppoTv, DppoKl])
def test_dppo_on_policy_drops_nothing_even_at_bound_zero(kind: type) -> None:
    """On policy (p = p_old) no probability moved: with both bounds 0 nothing is past them
    (strictly), every trained token's gate is 1 and its gradient -A times its weight. (For
    dppo_kl the direction test p > p_old already fails here: this pins TV's comparisons.)"""
    b = simple_batch([4, 1, 3], advantages=torch.tensor([1.0, -2.0, 0.5], dtype=F64))
    b = dataclasses.replace(b, old_logp=b.logp.clone())
    res = E.loss(
        b, LossConfig(objective=kind(eps_low=0.0, eps_high=0.0), aggregation=AggregationConfig("token_mean"))
    )
    assert res.metrics["clip_fraction"] == 0.0 and bool((res.gate_weight == 1).all())
    torch.testing.assert_close(res.grad, -res.advantages / 8)


@pytest.mark.parametrize("kind", [DppoTv, DppoKl])
def test_dppo_ignores_a_masked_token_s_values(kind: type) -> None:
    """A masked token's logp and old_logp may hold any finite value: 1e30 or -1e30 there (whose
    probabilities overflow to inf or 0) change nothing."""
    b = simple_batch([4, 3], advantages=torch.tensor([1.0, -2.0], dtype=F64))
    b = dataclasses.replace(
        b, old_logp=b.logp - 0.3, mask=torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    )
    cfg = LossConfig(objective=kind(eps_low=0.05, eps_high=0.05))
    want = E.loss(b, cfg)
    for lp, old in ((1e30, -1e30), (-1e30, 1e30), (5.0, 5.0)):
        logp, old_logp = b.logp.clone(), b.old_logp.clone()
        logp[[1, 4]], old_logp[[1, 4]] = lp, old
        res = E.loss(dataclasses.replace(b, logp=logp, old_logp=old_logp), cfg)
        assert res.loss == want.loss and torch.equal(res.grad, want.grad)


def test_dppo_kl_reads_the_binary_kl_with_1e_8() -> None:
    """DPPO's binary KL adds 1e-8 beside 1 - p_old and 1 - p (verl, the paper's code): with
    p_old within 1e-7 of 1 that constant moves the KL by 2e-7. A bound between the KL with 1e-8
    and with 1e-6 drops the token by the first."""
    old, logp = -1e-7, -1.0
    q, p = math.exp(old), math.exp(logp)

    def kl(c: float) -> float:
        return q * (old - logp) + (1 - q) * math.log((1 - q + c) / (1 - p + c))

    bound = (kl(1e-8) + kl(1e-6)) / 2
    assert kl(1e-8) < bound < kl(1e-6)
    b = Batch(
        logp=torch.tensor([logp], dtype=F64),
        offsets=torch.tensor([0, 1]),
        old_logp=torch.tensor([old], dtype=F64),
        advantages=torch.tensor([-1.0], dtype=F64),
    )
    assert E.loss(b, LossConfig(objective=DppoKl(eps_low=bound))).clip_mask.tolist() == [False]
    assert E.loss(b, LossConfig(objective=DppoKl(eps_low=kl(1e-8) * (1 - 1e-9)))).clip_mask.tolist() == [True]


def _trl_padded(lengths: list[int], seed: int):
    """A padded [B, T] batch (logp, old, mask with trailing and inner zeros), where its rows' tokens
    are (`keep`), and its ragged twin without advantages."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    logp = -torch.rand(b, t, generator=g, dtype=F64) * 2 - 0.1
    old = (logp + 0.4 * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=-1e-3)
    mask = (torch.arange(t) < torch.tensor(lengths)[:, None]) & (torch.rand(b, t, generator=g) < 0.85)
    mask[:, 0] = True  # every row trains a token (TRL's seq-mean divides by every row)
    keep = torch.arange(t) < torch.tensor(lengths)[:, None]
    ragged = Batch(
        logp=logp[keep],
        offsets=Batch.offsets_from_lengths(torch.tensor(lengths)),
        old_logp=old[keep],
        mask=mask[keep],
    )
    return logp, old, mask, keep, ragged


def _trl_sequence_ratio(x: torch.Tensor, old: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """TRL's coef_1 at importance_sampling_level="sequence": exp of the row's masked mean log-ratio, [B, 1]."""
    return torch.exp(((x - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0))


def _trl_clip(r: torch.Tensor, a: torch.Tensor, eps: float) -> torch.Tensor:
    """TRL's per-token clipped loss -min(r A, clamp(r, 1 - eps, 1 + eps) A) (r a token's or its row's ratio)."""
    return -torch.min(r * a, torch.clamp(r, 1 - eps, 1 + eps) * a)


def _trl_sapo(r: torch.Tensor, a: torch.Tensor, tau_pos: float, tau_neg: float) -> torch.Tensor:
    """TRL's loss_type="sapo" per-token loss -sigmoid(tau (r - 1)) 4 / tau A, tau by A's sign."""
    tau = torch.where(a > 0, torch.tensor(tau_pos, dtype=r.dtype), torch.tensor(tau_neg, dtype=r.dtype))
    return -torch.sigmoid(tau * (r - 1)) * 4 / tau * a


def _trl_aggregate(per_token_loss: torch.Tensor, m: torch.Tensor, agg: str) -> torch.Tensor:
    """TRL's loss of a [B, T] per-token loss: grpo / sapo (rows' token means, averaged over every
    row), bnpo (token mean) and dr_grpo (sum / (B T)), by softgate's mode names."""
    if agg == "seq_mean_token_mean":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if agg == "token_mean":
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    return (per_token_loss * m).sum() / m.numel()


@pytest.mark.parametrize(
    "agg",
    ["seq_mean_token_mean", "token_mean", "token_sum_norm"],  # TRL's sapo / grpo, bnpo, dr_grpo
)
def test_sapo_seq_is_trls_sequence_level_sapo(agg: str) -> None:
    """sapo_seq against TRL's loss_type="sapo" with importance_sampling_level="sequence" written
    out on padded tensors: coef_1 = exp(the masked mean log-ratio), with its gradient through
    the mean; per_token_loss = -sigmoid(tau (coef_1 - 1)) 4 / tau A on every token of the row;
    TRL's aggregation of it. Loss and gradient agree (softgate's per-token form, s_i with
    gradient s_i at each token, has the same gradient with one advantage per sequence)."""
    lengths = [5, 3, 7, 1, 6]
    logp, old, mask, keep, ragged = _trl_padded(lengths, 11)
    adv = torch.tensor([1.3, -0.6, 0.4, -1.1, 0.0], dtype=F64)
    tau_pos, tau_neg = 1.0, 1.05
    x = logp.clone().requires_grad_(True)
    m = mask.to(F64)
    coef_1 = _trl_sequence_ratio(x, old, m)
    a = adv[:, None]
    tau = torch.where(a > 0, torch.tensor(tau_pos, dtype=F64), torch.tensor(tau_neg, dtype=F64))
    per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * a
    want = _trl_aggregate(per_token_loss, m, agg)
    (grad,) = torch.autograd.grad(want, x)
    batch = dataclasses.replace(ragged, advantages=adv)
    cfg = AggregationConfig(mode=agg, constant=float(m.numel()) if agg == "token_sum_norm" else None)
    res = E.loss(batch, LossConfig(objective=SapoSeq(tau_pos=tau_pos, tau_neg=tau_neg), aggregation=cfg))
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-13)
    torch.testing.assert_close(res.grad, grad[keep], rtol=1e-12, atol=1e-15)
    # every token of a sequence carries its s_i and its gate 4 p (1 - p)
    s = coef_1.detach()[:, 0]
    torch.testing.assert_close(res.ratio[batch.mask], s.repeat_interleave(torch.tensor(lengths))[batch.mask])
    p = torch.sigmoid(tau[:, 0] * (s - 1))
    gate = (4 * p * (1 - p)).repeat_interleave(torch.tensor(lengths))
    torch.testing.assert_close(res.gate_weight[batch.mask], gate[batch.mask])
    # ... which is not token-level SAPO's
    tok = E.loss(batch, LossConfig(objective=Sapo(tau_pos=tau_pos, tau_neg=tau_neg), aggregation=cfg))
    assert not torch.allclose(tok.grad, res.grad)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_cispo_seq_is_trls_sequence_level_cispo(agg: str) -> None:
    """cispo_seq against TRL's loss_type="cispo" with importance_sampling_level="sequence"
    written out: per_token_loss = -clamp(coef_1, max=epsilon_high).detach() A logp with coef_1
    the sequence's exp(mean log-ratio); TRL's absolute cap E is eps_low = 1, eps_high = E - 1.
    Per-token advantages too: the weight is a constant of the gradient."""
    lengths = [5, 3, 7, 1, 6]
    logp, old, mask, keep, ragged = _trl_padded(lengths, 12)
    b, t = logp.shape
    adv = torch.randn(b, t, generator=torch.Generator().manual_seed(4), dtype=F64)
    cap = 1.1
    x = logp.clone().requires_grad_(True)
    m = mask.to(F64)
    coef_1 = _trl_sequence_ratio(x, old, m)
    assert bool((coef_1 > cap).any() and (coef_1 < cap).any())  # some sequences capped, some not
    per_token_loss = -torch.clamp(coef_1, max=cap).detach() * adv * x
    want = _trl_aggregate(per_token_loss, m, agg)
    (grad,) = torch.autograd.grad(want, x)
    batch = dataclasses.replace(ragged, advantages=adv[keep], advantage_level="token")
    obj = CispoSeq(eps_low=1.0, eps_high=cap - 1)
    res = E.loss(batch, LossConfig(objective=obj, aggregation=AggregationConfig(mode=agg)))
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(res.grad, grad[keep], rtol=1e-12, atol=1e-15)
    # the weight of each sequence's tokens: clip(s_i) / s_i, the same on all of them
    s = coef_1.detach()[:, 0].repeat_interleave(torch.tensor(lengths))
    torch.testing.assert_close(res.gate_weight[batch.mask], (s.clamp(max=cap) / s)[batch.mask])


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "token_sum_norm"])
def test_gspo_dual_clip_is_trls_sequence_level_delta(agg: str) -> None:
    """gspo with dual_clip against TRL's two-sided clip at importance_sampling_level="sequence"
    written out: coef_2 = clamp(coef_1, 1 - epsilon, 1 + epsilon_high), then coef_1 clamped
    at max=delta, per_token_loss = -min(coef_1 A, coef_2 A). A sequence with A < 0 and s_i past
    delta keeps -delta A and loses its gradient; one between 1 + epsilon_high and delta keeps
    its gradient; A > 0 past delta is the ordinary upper clip."""
    lengths = [5, 3, 7, 1, 6, 4]
    logp, old, mask, keep, ragged = _trl_padded(lengths, 14)
    adv = torch.tensor([-0.5, 0.6, -0.4, -1.1, 0.9, -0.8], dtype=F64)
    eps, delta = 0.05, 1.2
    x = logp.clone().requires_grad_(True)
    m = mask.to(F64)
    coef_1 = _trl_sequence_ratio(x, old, m)
    s = coef_1.detach()[:, 0]
    neg = adv < 0
    assert bool((neg & (s > delta)).any() and (neg & (s > 1 + eps) & (s < delta)).any())
    assert bool((~neg & (s > delta)).any() and (neg & (s < 1 - eps)).any())
    a = adv[:, None]
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token_loss = -torch.min(torch.clamp(coef_1, max=delta) * a, coef_2 * a)
    want = _trl_aggregate(per_token_loss, m, agg)
    (grad,) = torch.autograd.grad(want, x)
    batch = dataclasses.replace(ragged, advantages=adv)
    cfg = AggregationConfig(mode=agg, constant=float(m.numel()) if agg == "token_sum_norm" else None)
    res = E.loss(
        batch, LossConfig(objective=Gspo(eps_low=eps, eps_high=eps, dual_clip=delta), aggregation=cfg)
    )
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-13)
    torch.testing.assert_close(res.grad, grad[keep], rtol=1e-12, atol=1e-15)
    # the dual-clipped sequence's tokens: clipped, no gradient; dual_clip is their share of A < 0 tokens
    dual = (neg & (s > delta)).repeat_interleave(torch.tensor(lengths)) & batch.mask
    assert bool(res.clip_mask[dual].all()) and bool((res.grad[dual] == 0).all())
    tok_neg = neg.repeat_interleave(torch.tensor(lengths)) & batch.mask
    assert res.metrics["dual_clip"] == pytest.approx(int(dual.sum()) / int(tok_neg.sum()))
    # ... which plain gspo does not do
    plain = E.loss(batch, LossConfig(objective=Gspo(eps_low=eps, eps_high=eps), aggregation=cfg))
    assert plain.metrics["dual_clip"] == 0 and not torch.allclose(plain.grad, res.grad)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])  # TRL's grpo, bnpo
def test_trls_top_entropy_quantile_is_per_token_advantages_times_its_mask(agg: str) -> None:
    """TRL's top_entropy_quantile (GRPOTrainer.get_high_entropy_mask: the trained tokens whose
    entropy is at least the quantile 1 - q of the batch's) written out, with a k3 KL term:
    the entropy mask multiplies the clipped policy term only, the KL term and the normalisers
    keep every trained token. softgate computes the same loss and gradient from per-token
    advantages A_i times that mask (docs/peers.md), the mask unchanged."""
    lengths = [6, 4, 7, 3, 5, 6]
    logp, old, mask, keep, ragged = _trl_padded(lengths, 21)
    g = torch.Generator().manual_seed(8)
    entropy = torch.rand(logp.shape, generator=g, dtype=F64) * 3
    ref = (logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.3, 0.9, -0.2], dtype=F64)
    q, eps, beta = 0.2, 0.2, 0.04
    threshold = torch.quantile(entropy[mask], 1 - q)
    entropy_mask = (entropy >= threshold) & mask
    assert 0 < int(entropy_mask.sum()) < int(mask.sum())
    x = logp.clone().requires_grad_(True)
    coef_1 = torch.exp(x - old)
    a = adv[:, None]
    per_token_loss = _trl_clip(coef_1, a, eps) * entropy_mask
    d = ref - x
    per_token_loss = per_token_loss + beta * (torch.exp(d) - d - 1)
    want = _trl_aggregate(per_token_loss, mask.to(F64), agg)
    (grad,) = torch.autograd.grad(want, x)
    tok_adv = (a * entropy_mask)[keep]  # what the trainer sends
    batch = dataclasses.replace(ragged, ref_logp=ref[keep], advantages=tok_adv, advantage_level="token")
    cfg = LossConfig(
        objective=Grpo(eps_low=eps, eps_high=eps),
        aggregation=AggregationConfig(mode=agg),
        kl=KLConfig("k3", beta=beta),
    )
    res = E.loss(batch, cfg)
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(res.grad, grad[keep], rtol=1e-12, atol=1e-15)
    # the mask is not the way: dropping those tokens from it drops their KL and normalisers too
    cut = dataclasses.replace(batch, mask=entropy_mask[keep], advantages=adv, advantage_level=None)
    assert E.loss(cut, cfg).loss != pytest.approx(float(want.detach()), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "sapo"])
@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_trls_entropy_mask_at_sequence_level_is_a_scaled_sequence_advantage(loss_type: str, agg: str) -> None:
    """TRL's entropy mask with importance_sampling_level="sequence": every token of a row has
    the row's loss f(s_i, A_i), which is positively homogeneous in A_i, so the mask's kept
    share of a row scales its advantage: gspo (TRL's grpo) and sapo_seq (TRL's sapo) with A_i
    times (kept / trained tokens of row i) give TRL's loss and gradient, with a k3 KL term over
    every trained token (docs/peers.md)."""
    lengths = [6, 4, 7, 3, 5, 6]
    logp, old, mask, keep, ragged = _trl_padded(lengths, 23)
    g = torch.Generator().manual_seed(9)
    entropy = torch.rand(logp.shape, generator=g, dtype=F64)
    ref = (logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.3, 0.9, -0.2], dtype=F64)
    eps, beta, tau_pos, tau_neg = 0.05, 0.04, 1.0, 1.05
    entropy_mask = (entropy >= torch.quantile(entropy[mask], 0.8)) & mask
    x = logp.clone().requires_grad_(True)
    m = mask.to(F64)
    s = _trl_sequence_ratio(x, old, m)
    a = adv[:, None]
    if loss_type == "grpo":
        per_token_loss, obj = _trl_clip(s, a, eps), Gspo(eps_low=eps, eps_high=eps)
    else:
        per_token_loss, obj = _trl_sapo(s, a, tau_pos, tau_neg), SapoSeq(tau_pos=tau_pos, tau_neg=tau_neg)
    d = ref - x
    per_token_loss = per_token_loss.expand_as(x) * entropy_mask + beta * (torch.exp(d) - d - 1)
    want = _trl_aggregate(per_token_loss, m, agg)
    (grad,) = torch.autograd.grad(want, x)
    share = entropy_mask.sum(-1).to(F64) / mask.sum(-1).to(F64)
    assert bool(((share > 0) & (share < 1)).any())
    batch = dataclasses.replace(ragged, ref_logp=ref[keep], advantages=adv * share)
    cfg = LossConfig(objective=obj, aggregation=AggregationConfig(mode=agg), kl=KLConfig("k3", beta=beta))
    res = E.loss(batch, cfg)
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(res.grad, grad[keep], rtol=1e-12, atol=1e-15)


def test_gspo_refuses_a_dual_clip_not_above_1() -> None:
    b = simple_batch([2, 3], advantages=torch.tensor([1.0, -1.0], dtype=F64))
    for bad, why in (
        (1.0, "must be > 1"),
        (math.nan, "not a finite number"),
        (math.inf, "not a finite number"),
    ):
        with pytest.raises(InputError) as e:
            E.loss(b, LossConfig(objective=Gspo(dual_clip=bad)))
        assert "objective.gspo.dual_clip" in str(e.value) and why in str(e.value)


@pytest.mark.parametrize("vllm", [False, True])
def test_off_policy_sequence_masking_is_trls(vllm: bool) -> None:
    """off_policy_mask_threshold against TRL's get_off_policy_mask and its use written out:
    kl = sampler - logp.detach() (the sampler: vLLM's log-probs, else old), its masked row
    mean; keep = (A >= 0) | (mean <= delta); the per-token policy loss times keep, then
    times the vLLM IS weight (token, truncated at its cap), plus beta k3; TRL's grpo
    aggregation. Without vLLM the mask reads the old log-probs."""
    lengths = [5, 3, 7, 1, 6, 4]
    logp, old, mask, keep, ragged = _trl_padded(lengths, 17)
    g = torch.Generator().manual_seed(3)
    sampling = (old + 0.3 * torch.randn(old.shape, generator=g, dtype=F64)).clamp(max=-1e-3)
    ref = (logp + 0.2 * torch.randn(old.shape, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = torch.tensor([-0.5, 0.6, -0.4, -1.1, 0.9, -0.8], dtype=F64)
    delta, eps, beta, cap = 0.1, 0.2, 0.04, 2.0
    x = logp.clone().requires_grad_(True)
    m = mask.to(F64)
    src = sampling if vllm else old
    seq_kl = ((src - x.detach()) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    a = adv[:, None]
    off_policy_mask = ((a >= 0) | (seq_kl <= delta)).to(F64)
    dropped = (a < 0) & (seq_kl > delta)
    assert bool(dropped.any()) and bool(((a < 0) & ~dropped).any())  # some A < 0 rows kept
    coef_1 = torch.exp(x - old)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a) * off_policy_mask
    if vllm:
        per_token_loss = per_token_loss * torch.clamp(torch.exp(old - sampling), max=cap)
    per_token_kl = torch.exp(ref - x) - (ref - x) - 1
    per_token_loss = per_token_loss + beta * per_token_kl
    want = _trl_aggregate(per_token_loss, m, "seq_mean_token_mean")
    (grad,) = torch.autograd.grad(want, x)
    batch = dataclasses.replace(
        ragged, advantages=adv, ref_logp=ref[keep], rollout_logp=sampling[keep] if vllm else None
    )
    config = LossConfig(
        objective=Grpo(eps_low=eps, eps_high=eps),
        kl=KLConfig("k3", beta),
        mismatch=MismatchConfig(level="token", mode="truncate", cap=cap) if vllm else None,
        off_policy_mask_threshold=delta,
    )
    res = E.loss(batch, config)
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-13)
    torch.testing.assert_close(res.grad, grad[keep], rtol=1e-12, atol=1e-15)
    tokens = dropped[:, 0].repeat_interleave(torch.tensor(lengths))[batch.mask]
    assert res.metrics["off_policy_masked_frac"] == pytest.approx(float(tokens.float().mean()))


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (LossConfig(off_policy_mask_threshold=0.1, off_policy_mask_reference="sampler"), "unknown_name"),  # type: ignore[arg-type]
        (LossConfig(off_policy_mask_reference="old"), "unsupported"),
    ],
)
def test_off_policy_mask_reference_is_refused_by_name(config: LossConfig, reason: str) -> None:
    """An unknown reference, or one given without OPSM's threshold, is refused by its name."""
    b = simple_batch([2, 3], advantages=torch.tensor([1.0, -1.0], dtype=F64))
    with pytest.raises(InputError) as e:
        E.loss(b, config)
    assert [(v.field, v.reason.split(":")[0]) for v in e.value.violations] == [
        ("off_policy_mask_reference", reason)
    ]


def test_off_policy_mask_threshold_must_be_finite() -> None:
    b = simple_batch([2, 3], advantages=torch.tensor([1.0, -1.0], dtype=F64))
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(InputError) as e:
            E.loss(b, LossConfig(off_policy_mask_threshold=bad))
        assert "off_policy_mask_threshold: out_of_range" in str(e.value) and "not a finite number" in str(
            e.value
        )
    # any finite threshold, also past float32's range or below its smallest normal (one sequence
    # with A < 0 and mean(old - logp) > 0 over its tokens)
    b = Batch(
        logp=torch.tensor([-1.0, -1.2]),
        offsets=torch.tensor([0, 2]),
        old_logp=torch.tensor([-1.1, -1.0]),
        advantages=torch.tensor([-1.0]),
    )
    for delta, dropped in ((1e39, 0.0), (-1e39, 1.0), (1e-50, 1.0), (-1e300, 1.0)):
        assert (
            E.loss(b, LossConfig(off_policy_mask_threshold=delta)).metrics["off_policy_masked_frac"]
            == dropped
        )


def _tinker_loss(
    loss_fn: str, target: Tensor, sampling: Tensor, adv: Tensor, cfg: dict[str, float]
) -> Tensor:
    """Tinker's built-in RL losses as its docs write them (tinker-cookbook docs/losses.mdx): a
    plain sum over the positions of every datum, the sampler's log-probs as the reference."""
    prob_ratio = torch.exp(target - sampling)
    if loss_fn == "importance_sampling":
        return -(prob_ratio * adv).sum()
    if loss_fn == "dro":
        quadratic_term = (target - sampling) ** 2
        return -(target * adv - 0.5 * cfg["beta"] * quadratic_term).sum()
    clipped_ratio = torch.clamp(prob_ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    if loss_fn == "cispo":
        return -(clipped_ratio.detach() * target * adv).sum()
    return -torch.min(prob_ratio * adv, clipped_ratio * adv).sum()


@pytest.mark.parametrize(
    ("loss_fn", "cfg", "objective"),
    [
        ("importance_sampling", {}, Reinforce()),
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, Grpo(eps_low=0.1, eps_high=0.1)),
        ("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, Cispo(eps_low=0.2, eps_high=0.2)),
        ("dro", {"beta": 0.05}, Dro(coef=0.05)),
    ],
)
def test_tinkers_rl_losses_with_the_cookbooks_advantages(loss_fn: str, cfg: dict, objective) -> None:
    """Each of Tinker's RL loss functions against softgate's objective with
    aggregation token_sum_norm, constant 1 (a sum), the sampler's log-probs as old_logp, and
    the cookbook's advantages (tinker_cookbook/rl/data_processing.py: (R - mean_g) G / (G - 1)
    on every action token, 0 on the prompt's) computed by softgate's rloo from rewards and
    groups (the third group's rewards all equal: advantage 0, where dro's penalty still acts).
    Tinker's datum holds the prompt too (advantage 0, sampled log-prob 0); softgate's mask
    leaves it out, where the first three losses have nothing and dro would penalise logp - 0.
    Then the whole datum, as peers.md says to send it for Tinker's dro: every position
    trained, old_logp 0 and advantage 0 on the prompt's."""
    g = torch.Generator().manual_seed(21)
    prompt, actions = [3, 2, 4, 3, 2, 5, 2, 3, 1], [4, 6, 1, 5, 3, 2, 3, 2, 4]
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 0.5, 0.5], dtype=F64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    lengths = torch.tensor(prompt) + torch.tensor(actions)
    n = int(lengths.sum())
    target = -torch.rand(n, generator=g, dtype=F64) * 2 - 0.05
    action = torch.cat([torch.arange(p + a) >= p for p, a in zip(prompt, actions, strict=True)])
    sampling = torch.where(
        action, (target + 0.3 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-3), 0.0
    )
    # the cookbook's advantages: each group's centred rewards times G / (G - 1), on the action tokens
    traj_adv = torch.cat([(r - r.mean()) * 3 / 2 for r in rewards.split(3)])
    adv = torch.where(action, traj_adv.repeat_interleave(lengths), 0.0)
    x = target.clone().requires_grad_(True)
    config = LossConfig(
        objective=objective,
        advantages=AdvantageConfig(estimator="rloo"),
        aggregation=AggregationConfig(mode="token_sum_norm", constant=1.0),
    )

    def agrees(summed: Tensor | slice, batch: Batch) -> LossResult:
        """softgate's result for `batch`, once its loss and gradient are Tinker's summed over `summed`."""
        want = _tinker_loss(loss_fn, x[summed], sampling[summed], adv[summed], cfg)
        (grad,) = torch.autograd.grad(want, x)
        res = E.loss(batch, config)
        assert res.loss == pytest.approx(float(want.detach()), rel=1e-13)
        torch.testing.assert_close(res.grad, grad, rtol=1e-12, atol=1e-15)
        return res

    offsets = Batch.offsets_from_lengths(lengths)
    res = agrees(
        action,
        Batch(
            logp=target, offsets=offsets, old_logp=sampling, mask=action, rewards=rewards, group_ids=groups
        ),
    )
    torch.testing.assert_close(res.advantages[action], adv[action])
    if loss_fn == "ppo":  # (the clip acts somewhere: not the importance-sampling loss)
        assert res.metrics["clip_fraction"] > 0
    if loss_fn == "dro":  # no clip; grad_retained: |-A + coef (logp - old)| against |-A|
        assert res.metrics["clip_fraction"] == 0 and bool((res.gate_weight[action] == 1).all())
        free = adv[action].abs().sum()
        assert res.metrics["grad_retained"] == pytest.approx(float(res.grad.abs().sum() / free), rel=1e-12)
        assert bool((res.grad[action & (adv == 0)] != 0).any())  # the equal group: pulled toward old
    # the whole datum: Tinker's documented sum over every position, the prompt's included
    agrees(
        slice(None),
        Batch(logp=target, offsets=offsets, old_logp=sampling, advantages=adv, advantage_level="token"),
    )


def test_dro_refuses_a_negative_or_non_finite_coef() -> None:
    b = simple_batch([2, 3], advantages=torch.tensor([1.0, -1.0], dtype=F64))
    for bad, why in (
        (-0.1, "must be >= 0"),
        (math.nan, "not a finite number"),
        (math.inf, "not a finite number"),
    ):
        with pytest.raises(InputError) as e:
            E.loss(b, LossConfig(objective=Dro(coef=bad)))
        assert "objective.dro.coef" in str(e.value) and why in str(e.value)


def test_sapo_seq_refuses_per_token_advantages_and_bad_temperatures() -> None:
    b = simple_batch([2, 3], advantages=torch.linspace(-1, 1, 5, dtype=F64), advantage_level="token")
    with pytest.raises(InputError) as e:
        E.loss(b, LossConfig(objective=SapoSeq()))
    assert "unsupported: sapo_seq uses one advantage per sequence; use sapo or cispo_seq" in str(e.value)
    b = simple_batch([2, 3], advantages=torch.tensor([1.0, -1.0], dtype=F64))
    for bad in ({"tau_pos": 0.0}, {"tau_neg": -1.0}, {"tau_pos": math.inf}):
        with pytest.raises(InputError) as e:
            E.loss(b, LossConfig(objective=SapoSeq(**bad)))
        assert f"objective.sapo_seq.{next(iter(bad))}" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("objective", [Grpo(), Gspo(eps_low=0.2, eps_high=0.2), Gmpo()])
def test_k3_is_is_trls_bias_corrected_kl(objective, dtype: torch.dtype) -> None:
    """k3_is against TRL's `use_bias_correction_kl` written out (per_token_kl * coef_1, coef_1
    = exp(logp - old) with its gradient, at token level) with the KL term aggregated per token:
    loss and gradient of the KL part agree, whatever the objective (the ratio is the token's
    own also under gspo, whose TRL counterpart weighs by the sequence ratio instead)."""
    g = torch.Generator().manual_seed(3)
    lengths = [4, 1, 6, 3]
    n = sum(lengths)
    logp = -torch.rand(n, generator=g, dtype=F64) * 2 - 0.1
    old = (logp + 0.3 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-3)
    ref = (logp + 0.5 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-3)
    mask = torch.rand(n, generator=g) < 0.8
    beta = 0.3
    batch = Batch(
        logp=logp,
        offsets=Batch.offsets_from_lengths(torch.tensor(lengths)),
        old_logp=old,
        ref_logp=ref,
        mask=mask,
        advantages=torch.tensor([1.0, -0.5, 0.7, -1.2], dtype=F64),
    )
    batch = dataclasses.replace(
        batch, **{f: getattr(batch, f).to(dtype) for f in ("logp", "old_logp", "ref_logp", "advantages")}
    )
    logp, old, ref = batch.logp.double(), batch.old_logp.double(), batch.ref_logp.double()
    tol = 1e-13 if dtype == F64 else 1e-5
    agg = AggregationConfig(mode="seq_mean_token_mean")
    with_kl = E.loss(
        batch, LossConfig(objective=objective, aggregation=agg, kl=KLConfig("k3_is", beta, "token_mean"))
    )
    without = E.loss(batch, LossConfig(objective=objective, aggregation=agg))
    x = logp.clone().requires_grad_(True)
    coef_1 = torch.exp(x - old)
    per_token_kl = (torch.exp(ref - x) - (ref - x) - 1) * coef_1
    want = beta * per_token_kl[mask].sum() / mask.sum()
    (grad,) = torch.autograd.grad(want, x)
    assert with_kl.kl_loss == pytest.approx(float(want.detach()), rel=tol)
    torch.testing.assert_close((with_kl.grad - without.grad).double(), grad, rtol=tol * 10, atol=tol / 100)
    assert with_kl.metrics["kl_mean"] == pytest.approx(float(per_token_kl[mask].mean().detach()), rel=tol)


@pytest.mark.parametrize("kl_agg", [None, "token_mean"])
@pytest.mark.parametrize("objective", ["gspo", "sapo_seq"])
def test_k3_is_seq_is_trls_sequence_level_bias_corrected_kl(objective: str, kl_agg: str | None) -> None:
    """k3_is_seq against TRL's `use_bias_correction_kl` with importance_sampling_level="sequence"
    written out on padded tensors: per_token_kl = k3 * coef_1, coef_1 the row's exp(masked mean
    log-ratio) with its gradient spread over the row, added to GSPO's (loss_type "grpo") or
    sequence-level SAPO's per-token loss before TRL's row-mean aggregation; and with the KL
    term on its own token mean. Loss, gradient and the kl metric agree."""
    lengths = [5, 3, 7, 1, 6]
    logp, old, mask, keep, ragged = _trl_padded(lengths, 13)
    ref = (logp + 0.5 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2), dtype=F64)).clamp(
        max=-1e-3
    )
    adv = torch.tensor([1.3, -0.6, 0.4, -1.1, 0.8], dtype=F64)
    beta, eps = 0.2, 0.05
    x = logp.clone().requires_grad_(True)
    m = mask.to(F64)
    coef_1 = _trl_sequence_ratio(x, old, m)
    a = adv[:, None]
    if objective == "gspo":
        per_token_loss, obj = _trl_clip(coef_1, a, eps), Gspo(eps_low=eps, eps_high=eps)
    else:
        per_token_loss, obj = _trl_sapo(coef_1, a, 1.0, 1.0), SapoSeq(tau_pos=1.0, tau_neg=1.0)
    per_token_kl = (torch.exp(ref - x) - (ref - x) - 1) * coef_1
    if kl_agg is None:
        want = _trl_aggregate(per_token_loss + beta * per_token_kl, m, "seq_mean_token_mean")
    else:
        want = _trl_aggregate(per_token_loss, m, "seq_mean_token_mean") + beta * _trl_aggregate(
            per_token_kl, m, kl_agg
        )
    (grad,) = torch.autograd.grad(want, x)
    batch = dataclasses.replace(ragged, advantages=adv, ref_logp=ref[keep])
    res = E.loss(batch, LossConfig(objective=obj, kl=KLConfig("k3_is_seq", beta, kl_agg)))
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-13)
    torch.testing.assert_close(res.grad, grad[keep], rtol=1e-12, atol=1e-15)
    assert res.metrics["kl_mean"] == pytest.approx(float(per_token_kl.detach()[mask].mean()), rel=1e-13)
    # ... which k3_is, the token's own ratio, is not (the review's 0.144 against TRL's 0.156)
    tok = E.loss(batch, LossConfig(objective=obj, kl=KLConfig("k3_is", beta, kl_agg)))
    assert abs(tok.metrics["kl_mean"] - res.metrics["kl_mean"]) > 1e-3


def test_k3_is_seq_past_the_clamps_and_with_masked_garbage() -> None:
    """k3_is_seq's s_i is exp of the clamped mean log-ratio (the derivative s_i past it, as
    GSPO's), k3's x is clamped from above: a sequence 25 nats above its
    old log-probs on average weighs e^20, and a token 21 nats below its reference counts as 20
    in the value and k3's gradient at 20 (not the clamp's 0, which would leave s_i's share alone
    to push it further from the reference). Masked tokens hold
    garbage that changes nothing; an empty sequence and a fully masked one contribute 0."""
    lengths = [2, 0, 3, 2]
    logp = torch.tensor([-30.0, -30.0, -1.0, -2.0, -1.5, -5.0, -6.0], dtype=F64)
    old = torch.tensor([-55.0, -55.0, -1.2, -1.9, -1.4, -1.0, -1.0], dtype=F64)
    ref = torch.tensor([-9.0, -30.5, -1.1, -2.5, -1.5, -5.0, -6.0], dtype=F64)
    mask = torch.tensor([True, True, True, True, False, False, False])
    garbage = dict(logp=logp.clone(), old=old.clone(), ref=ref.clone())
    garbage["logp"][4], garbage["old"][4], garbage["ref"][4] = -1e4, -7.0, -3e3
    cfg = LossConfig(
        objective=Grpo(), kl=KLConfig("k3_is_seq", 1.0), aggregation=AggregationConfig("token_mean")
    )
    res = []
    for v in (dict(logp=logp, old=old, ref=ref), garbage):
        b = Batch(
            logp=v["logp"],
            old_logp=v["old"],
            ref_logp=v["ref"],
            mask=mask,
            offsets=Batch.offsets_from_lengths(torch.tensor(lengths)),
            advantages=torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=F64),
        )
        res.append(E.loss(b, cfg))
    assert res[0].loss == res[1].loss and torch.equal(res[0].grad, res[1].grad)
    r = res[0]
    s0, s2 = math.exp(20.0), math.exp((0.2 - 0.1) / 2)
    k3 = lambda x: math.exp(x) - x - 1  # noqa: E731
    want = (s0 * (k3(20.0) + k3(-0.5)) + s2 * (k3(-0.1) + k3(-0.5))) / 4
    assert r.kl_loss == pytest.approx(want, rel=1e-12)
    # token 0: x = 21 clamped, its own gradient k3's at 20, 1 - e^20 (times s_0 / 4), and
    # s_0's share s_0 / 2 (k3(20) + k3(-0.5)) / 4 at both tokens
    share = s0 / 2 * (k3(20.0) + k3(-0.5)) / 4
    assert float(r.grad[0]) == pytest.approx(share + s0 * (1 - math.exp(20.0)) / 4, rel=1e-12)
    assert float(r.grad[0]) < 0  # (the pull towards the reference wins, as without the clamp)
    assert float(r.grad[1]) == pytest.approx(share + s0 * (1 - math.exp(-0.5)) / 4, rel=1e-12)
    assert r.grad[4:].tolist() == [0.0, 0.0, 0.0] and r.metrics["kl_clamped_tokens"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_k3_is_past_both_clamps_and_with_masked_garbage(dtype: torch.dtype) -> None:
    """k3_is's r is exp of the clamped log-ratio, its gradient -x r: a token 25 nats above its
    old log-prob weighs e^20, one 25 below e^-20. Its value is r k3 with k3's x clamped (the
    first token's x = 21 counts as 20), its gradient -x r with x as it is. A masked token's
    log-probs may hold any finite values (here 0 and -1e30, a log-ratio of 1e30)."""
    logp = torch.tensor([-30.0, -30.0, -2.0, 0.0], dtype=dtype)
    old = torch.tensor([-55.0, -5.0, -2.5, -1e30], dtype=dtype)
    ref = torch.tensor([-9.0, -29.0, -1.5, -1.0], dtype=dtype)
    b = Batch(
        logp=logp,
        offsets=torch.tensor([0, 4]),
        old_logp=old,
        ref_logp=ref,
        mask=torch.tensor([True, True, True, False]),
        advantages=torch.tensor([0.0], dtype=dtype),
    )
    cfg = LossConfig(
        objective=Grpo(),
        kl=KLConfig("k3_is", 1.0),
        aggregation=AggregationConfig("token_sum_norm", constant=1.0),
    )
    res = E.loss(b, cfg)
    x = [21.0, 1.0, 0.5]
    r = [math.exp(20.0), math.exp(-20.0), math.exp(0.5)]
    want_grad = [-xi * ri for xi, ri in zip(x, r, strict=True)] + [0.0]
    torch.testing.assert_close(res.grad.to(F64), torch.tensor(want_grad, dtype=F64), rtol=1e-6, atol=0)
    want = sum(ri * (math.exp(min(xi, 20.0)) - min(xi, 20.0) - 1) for xi, ri in zip(x, r, strict=True))
    assert res.kl_loss == pytest.approx(want, rel=1e-6)
    assert res.metrics["kl_clamped_tokens"] == 1


# ---------------------------------------------------------------- clip_cov and kl_cov (verl's)


def _masked_mean(x, m):
    """verl's masked_mean (verl.utils.torch_functional): sum(x m) / (sum(m) + 1e-8)."""
    return (x * m).sum() / (m.sum() + 1e-8)


def _verl_clip_cov(old, logp, adv, mask, lo, hi, fraction, cov_lb, cov_ub, pick=None):
    """verl's compute_policy_loss_clip_cov (core_algos) written out on padded [B, T] tensors,
    token-mean: (loss, pg_clipfrac, eligible [B, T], clip_num, clip_by_origin). Its random
    draw (a randperm of the eligible tokens) is replaced by `pick` ([B, T] bool) when given;
    verl's own draw otherwise."""
    ratio = torch.exp(logp - old)
    pg_losses1 = -adv * ratio
    corr = torch.ones_like(adv)
    pg_losses2 = -adv * torch.clamp(ratio, 1 - lo, 1 + hi)
    clip_by_origin = (pg_losses2 > pg_losses1) & (mask > 0)
    cov_all = (adv - _masked_mean(adv, mask)) * (logp - _masked_mean(logp.detach(), mask))
    cov_all[mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(fraction * mask.sum().item()), 1)
    eligible = (cov_all < cov_ub) & (cov_all > cov_lb) & (mask > 0)
    top_k_idx = torch.nonzero(eligible)
    if pick is not None:
        top_k_idx = torch.nonzero(pick)
    elif len(top_k_idx) > 0:
        perm = torch.randperm(len(top_k_idx))
        top_k_idx = top_k_idx[perm[: min(clip_num, len(top_k_idx))]]
    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0
    pg_clipfrac = _masked_mean((corr == 0).float(), mask)
    pg_losses = torch.maximum(pg_losses1, pg_losses2) * corr
    return (
        (pg_losses * mask).sum() / mask.sum(),
        float(pg_clipfrac),
        eligible.detach(),
        clip_num,
        clip_by_origin,
    )


def _verl_kl_cov(old, logp, adv, mask, fraction, coef):
    """verl's compute_policy_loss_kl_cov (core_algos) written out on padded [B, T] tensors,
    token-mean: (loss, the penalised tokens [B, T])."""
    negative_approx_kl = logp - old
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -adv * ratio
    pg_losses_kl = -adv * ratio + coef * abs_kl
    pg_losses = pg_losses1
    all_valid = mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = adv[all_valid].detach().reshape(-1).cpu()
    all_valid_logp = logp[all_valid].detach().reshape(-1).cpu()
    cov_lst_all = (all_valid_adv - all_valid_adv.mean()) * (all_valid_logp - all_valid_logp.mean())
    k_percent_nums = max(1, int(len(cov_lst_all) * fraction))
    large_cov_idxs = torch.topk(cov_lst_all, k_percent_nums, largest=True).indices
    large_cov_idxs = all_valid_idx[large_cov_idxs]
    rows, cols = large_cov_idxs // adv.shape[1], large_cov_idxs % adv.shape[1]
    pg_losses[rows, cols] = pg_losses_kl[rows, cols]
    penalised = torch.zeros(adv.shape, dtype=torch.bool)
    penalised[rows, cols] = True
    return (pg_losses * mask).sum() / mask.sum(), penalised


def _padded_cov_batch(seed: int, spread: float = 0.4):
    """Padded [B, T] float64 log-probs, old log-probs, per-token advantages (continuous: no
    ties in the covariance) and a mask with holes; and the packed Batch of the same values."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 5, 1, 0, 7, 3, 8, 12, 6, 4])
    b, t = len(lengths), int(lengths.max())
    pad = torch.arange(t)[None, :] < lengths[:, None]
    mask = pad & (torch.rand(b, t, generator=g) < 0.85)
    logp = -torch.rand(b, t, generator=g, dtype=F64) * 3 - 1e-3
    old = (logp + spread * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=-1e-4)
    adv = 1.5 * torch.randn(b, t, generator=g, dtype=F64)
    batch = Batch(
        logp=logp[pad],
        offsets=Batch.offsets_from_lengths(lengths),
        old_logp=old[pad],
        mask=mask[pad],
        advantages=adv[pad],
        advantage_level="token",
    )
    return logp, old, adv, mask, pad, batch


TOKEN_MEAN = AggregationConfig(mode="token_mean")


@pytest.mark.parametrize("fraction,coef", [(0.13, 1.0), (2e-4, 0.3), (0.5, 2.0), (1.0, 1.0)])
def test_kl_cov_is_verls_loss(fraction: float, coef: float) -> None:
    """KL-Cov against verl's `kl_cov` written out (padded, autograd): the penalised tokens are
    verl's k = max(1, floor(fraction n)) of largest covariance (fraction n not an integer at
    0.13: floor, not round or ceil), loss and gradient agree to rounding; the penalised tokens
    are the clip mask, counted per A's sign; the gate weight is 1 on every trained token."""
    logp, old, adv, mask, pad, batch = _padded_cov_batch(2)
    x = logp.clone().requires_grad_(True)
    want, penalised = _verl_kl_cov(old, x, adv, mask.to(F64), fraction, coef)
    (grad,) = torch.autograd.grad(want, x)
    res = E.loss(batch, LossConfig(objective=KlCov(fraction=fraction, coef=coef), aggregation=TOKEN_MEAN))
    n = int(mask.sum())
    k = max(1, math.floor(fraction * n))
    assert int(penalised.sum()) == k and (fraction != 0.13 or fraction * n != k)
    assert torch.equal(res.clip_mask, penalised[pad])
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-13)
    torch.testing.assert_close(res.grad, grad[pad], rtol=1e-12, atol=1e-15)
    assert res.metrics["clip_fraction"] == pytest.approx(k / n, rel=1e-12)
    a = adv[pad]
    assert res.metrics["clip_low"] * res.metrics["tokens_neg"] == pytest.approx(
        int((penalised[pad] & (a < 0)).sum())
    )
    assert res.metrics["clip_high"] * res.metrics["tokens_pos"] == pytest.approx(
        int((penalised[pad] & (a > 0)).sum())
    )
    assert bool((res.gate_weight[batch.mask] == 1).all()) and bool((res.gate_weight[~batch.mask] == 0).all())


@pytest.mark.parametrize(
    "fraction,cov_low,cov_high,seed,regime",
    [
        (0.1, -0.5, 2.0, 3, "draw"),  # k < eligible: the draw picks
        (0.9, -10.0, 10.0, 2**64 - 1, "all"),  # k >= eligible: every eligible token, none clipped
        (2e-4, 1.0, 5.0, 0, "draw"),  # verl's defaults: k = 1
    ],
)
def test_clip_cov_is_verls_loss(
    fraction: float, cov_low: float, cov_high: float, seed: int, regime: str
) -> None:
    """Clip-Cov against verl's `clip_cov` written out (padded, autograd). verl's draw is
    random: softgate's selection (the clip mask less GRPO's own clip) is min(clip_num,
    eligible) tokens, every one eligible by verl's test (trained, not clipped by the origin,
    covariance strictly inside the window); verl's loss with `corr` built from that
    selection is softgate's loss, and its autograd gradient softgate's. softgate's
    clip_fraction counts the origin clip too (verl's pg_clipfrac only the dropped tokens)."""
    lo, hi = 0.2, 0.25
    logp, old, adv, mask, pad, batch = _padded_cov_batch(4)
    obj = ClipCov(eps_low=lo, eps_high=hi, fraction=fraction, cov_low=cov_low, cov_high=cov_high, seed=seed)
    res = E.loss(batch, LossConfig(objective=obj, aggregation=TOKEN_MEAN))
    m = mask.to(F64)
    _, _, eligible, clip_num, origin = _verl_clip_cov(old, logp, adv, m, lo, hi, fraction, cov_low, cov_high)
    clip = torch.zeros_like(mask)
    clip[pad] = res.clip_mask
    picked = clip & ~origin
    n_eligible = int(eligible.sum())
    assert (clip_num < n_eligible) == (regime == "draw") and int(origin.sum()) > 0
    assert int(picked.sum()) == min(clip_num, n_eligible) and bool((picked <= eligible).all())
    if regime == "all":  # (a clipped token in the window: dropping `~clipped` would pick it)
        covw = (adv - _masked_mean(adv, m)) * (logp - _masked_mean(logp, m))
        assert bool((origin & (covw > cov_low) & (covw < cov_high)).any())
    assert torch.equal(clip & mask, (origin | picked) & mask)
    x = logp.clone().requires_grad_(True)
    want, clipfrac, *_ = _verl_clip_cov(old, x, adv, m, lo, hi, fraction, cov_low, cov_high, pick=picked)
    (grad,) = torch.autograd.grad(want, x)
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-13)
    torch.testing.assert_close(res.grad, grad[pad], rtol=1e-12, atol=1e-15)
    n = int(mask.sum())
    assert clipfrac == pytest.approx(int(picked.sum()) / n, rel=1e-9)
    assert res.metrics["clip_fraction"] == pytest.approx(int((origin | picked).sum()) / n, rel=1e-12)
    pos, neg = (origin | picked) & mask & (adv > 0), (origin | picked) & mask & (adv < 0)
    if regime == "all":  # (dropped tokens on both sides: swapped sides would show)
        assert int((picked & (adv > 0)).sum()) > 0 and int((picked & (adv < 0)).sum()) > 0
    assert res.metrics["clip_high"] * res.metrics["tokens_pos"] == pytest.approx(int(pos.sum()))
    assert res.metrics["clip_low"] * res.metrics["tokens_neg"] == pytest.approx(int(neg.sum()))
    sel = picked[pad]
    assert bool((res.grad[sel] == 0).all()) and bool((res.gate_weight[sel] == 0).all())
    # verl's own (random) draw drops as many tokens
    _, verl_frac, *_ = _verl_clip_cov(old, logp, adv, m, lo, hi, fraction, cov_low, cov_high)
    assert verl_frac == pytest.approx(clipfrac, rel=1e-12)


def test_cov_objectives_past_the_log_ratio_clamp() -> None:
    """softgate clamps the log-ratio at +-20 (log_ratio_clamp) where verl does not: a token 25
    nats above its old log-prob weighs e^20 in -A r and has no ratio gradient (clamped), where
    verl's weighs e^25 (so loss and gradient differ from verl's there, by design). KL-Cov's
    penalty reads the unclamped |logp - old| (25, not 20), its gradient coef sign(logp - old)
    on a clamped token too: where A = 0 softgate and verl agree."""
    logp = torch.tensor([-1.0, -1.5, -1.2, -0.8, -30.0], dtype=F64)
    old = torch.tensor([-26.0, -26.5, -1.5, -0.6, -5.0], dtype=F64)
    adv = torch.tensor([0.5, -1.0, 2.0, -0.5, 0.0], dtype=F64)
    b = Batch(logp=logp, offsets=torch.tensor([0, 5]), old_logp=old, advantages=adv, advantage_level="token")
    ones = torch.ones(1, 5, dtype=F64)
    coef = 0.7
    res = E.loss(b, LossConfig(objective=KlCov(fraction=1.0, coef=coef), aggregation=TOKEN_MEAN))
    x = logp - old
    r = torch.exp(x.clamp(-20.0, 20.0))
    clamped = x.abs() > 20
    assert res.metrics["clamped_tokens"] == 3 and bool(res.clip_mask.all())
    assert res.loss == pytest.approx(float((-adv * r + coef * x.abs()).mean()), rel=1e-13)
    want_grad = torch.where(clamped, torch.zeros_like(x), -adv * r) + coef * torch.sign(x)
    torch.testing.assert_close(res.grad, want_grad / 5, rtol=1e-13, atol=0)
    xv = logp.clone().requires_grad_(True)
    verl, penalised = _verl_kl_cov(old[None], xv[None], adv[None], ones, 1.0, coef)
    (verl_grad,) = torch.autograd.grad(verl, xv)
    assert bool(penalised.all()) and float(verl.detach()) > res.loss + 1e9  # e^25 / 2 against e^20 / 2
    assert res.grad[0] == pytest.approx(coef / 5) and verl_grad[0] < -1e9
    assert res.grad[4] == pytest.approx(-coef / 5) and verl_grad[4] == pytest.approx(-coef / 5)  # A = 0
    # clip_cov (a window nothing falls in: GRPO's clip): the A > 0 token 25 above is clipped by
    # both; the A < 0 one is not, its value -A e^20 here (no gradient), -A e^25 in verl
    cc = ClipCov(fraction=2e-4, cov_low=-1e9, cov_high=-1e8)
    res = E.loss(b, LossConfig(objective=cc, aggregation=TOKEN_MEAN))
    assert res.clip_mask.tolist() == [True, False, True, False, False]
    vals = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    assert res.loss == pytest.approx(float(vals.mean()), rel=1e-13)
    assert res.grad[0] == 0 and res.grad[1] == 0 and res.grad[4] == 0  # clipped; clamped; A = 0
    xv = logp.clone().requires_grad_(True)
    verl, *_ = _verl_clip_cov(old[None], xv[None], adv[None], ones, 0.2, 0.2, 2e-4, -1e9, -1e8)
    (verl_grad,) = torch.autograd.grad(verl, xv)
    assert float(verl.detach()) > res.loss + 1e9 and verl_grad[1] > 1e9
    # elsewhere (no clamp) the two agree
    torch.testing.assert_close(res.grad[[2, 3]], verl_grad[[2, 3]], rtol=1e-13, atol=0)


def _token_batch(logp, old, adv, mask=None) -> Batch:
    return Batch(
        logp=logp,
        offsets=torch.tensor([0, logp.numel()]),
        old_logp=old,
        mask=mask,
        advantages=adv,
        advantage_level="token",
    )


def test_kl_cov_with_fraction_1_penalises_every_trained_token() -> None:
    """fraction 1: every trained token is penalised (an A = 0 one too: counted in clip_fraction,
    in neither clip_low nor clip_high), no masked one; loss mean(-A r + coef |logp - old|)."""
    logp = torch.tensor([-1.0, -0.5, -2.0, -0.3, -1.7, -0.9], dtype=F64)
    old = torch.tensor([-1.1, -0.2, -2.5, -0.3, -1.0, -0.8], dtype=F64)
    adv = torch.tensor([1.0, -2.0, 0.0, 0.5, -0.4, 3.0], dtype=F64)
    mask = torch.tensor([True, True, True, False, True, True])
    res = E.loss(
        _token_batch(logp, old, adv, mask),
        LossConfig(objective=KlCov(fraction=1.0, coef=0.4), aggregation=TOKEN_MEAN),
    )
    assert torch.equal(res.clip_mask, mask)
    x = (logp - old)[mask]
    assert res.loss == pytest.approx(float((-adv[mask] * x.exp() + 0.4 * x.abs()).mean()), rel=1e-14)
    assert res.metrics["clip_fraction"] == 1.0
    assert res.metrics["clip_low"] == 1.0 and res.metrics["clip_high"] == 1.0  # 2 of 2 and 2 of 2
    assert res.metrics["tokens_pos"] + res.metrics["tokens_neg"] == 4  # (the A = 0 token in neither)


def test_equal_advantages_have_covariance_exactly_0() -> None:
    """Equal advantages centre to exactly 0 (the mean shifted by the first value): every
    covariance is 0, KL-Cov's top k are the first k trained tokens (ties to the lower index),
    and Clip-Cov's open window (0, 1) or (-1, 0) holds none of them: GRPO's result."""
    g = torch.Generator().manual_seed(8)
    logp = -torch.rand(12, generator=g, dtype=F64) * 3 - 0.01
    old = (logp + 0.05 * torch.randn(12, generator=g, dtype=F64)).clamp(max=-1e-4)
    # seven 0.1s: their plain mean sum / 7 is not 0.1 (x - mean would be +-1.4e-17, not 0)
    adv = torch.full((12,), 0.1, dtype=F64)
    mask = torch.ones(12, dtype=torch.bool)
    mask[[0, 2, 5, 8, 11]] = False
    assert float(adv[mask].sum() / 7) != 0.1
    b = _token_batch(logp, old, adv, mask)
    res = E.loss(b, LossConfig(objective=KlCov(fraction=0.3)))  # k = 2 of 7
    assert res.clip_mask.nonzero().flatten().tolist() == [1, 3]
    grpo = E.loss(b, LossConfig(objective=Grpo()))
    for lo, hi in ((0.0, 1.0), (-1.0, 0.0)):
        cc = E.loss(b, LossConfig(objective=ClipCov(fraction=1.0, cov_low=lo, cov_high=hi)))
        assert cc.loss == grpo.loss and torch.equal(cc.grad, grpo.grad)
        assert torch.equal(cc.clip_mask, grpo.clip_mask)
    cc = E.loss(b, LossConfig(objective=ClipCov(fraction=1.0, cov_low=-1.0, cov_high=1.0)))
    assert torch.equal(cc.clip_mask, mask)  # (every unclipped token in (-1, 1), all dropped)


def test_clip_cov_window_is_open_at_both_ends() -> None:
    """Covariances exactly at the window's ends are out: A = (1, -1), logp = (-1, -3) have
    covariance exactly 1, 1 (verl's default window (1, 5) takes neither); a window (0.5, 1)
    neither; (0.5, 5) both, of which k = 1 is dropped."""
    logp = torch.tensor([-1.0, -3.0], dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    b = _token_batch(logp, logp.clone(), adv)  # on policy: nothing clipped by the origin
    grpo = E.loss(b, LossConfig(objective=Grpo()))
    for lo, hi in ((1.0, 5.0), (0.5, 1.0)):
        res = E.loss(b, LossConfig(objective=ClipCov(cov_low=lo, cov_high=hi)))
        assert res.clip_mask.tolist() == [False, False]
        assert res.loss == grpo.loss and torch.equal(res.grad, grpo.grad)
    res = E.loss(b, LossConfig(objective=ClipCov(cov_low=0.5, cov_high=5.0)))
    assert int(res.clip_mask.sum()) == 1 and res.metrics["clip_fraction"] == 0.5


@pytest.mark.parametrize(
    "obj",
    [ClipCov(fraction=0.3, cov_low=-3.0, cov_high=3.0, seed=5), KlCov(fraction=0.3)],
    ids=lambda o: o.name,
)
def test_cov_selection_ignores_masked_garbage(obj) -> None:
    """A masked token's log-probs and its own advantage may hold any finite values (7.5,
    -3e4, 1e30): the means, the covariance and so the selection read trained tokens only."""
    *_, b = _padded_cov_batch(6)
    m = b.mask
    hole = (~m).nonzero().flatten()
    assert len(hole) >= 4
    cfg = LossConfig(objective=obj)
    results = []
    for lp, o, a in ((7.5, -3.0e4, 1e30), (-3.0e4, 7.5, -1e30), (-1.0, -1.0, 0.0)):
        alt = b.logp.clone(), b.old_logp.clone(), b.advantages.clone()
        alt[0][hole], alt[1][hole], alt[2][hole] = lp, o, a
        results.append(E.loss(dataclasses.replace(b, logp=alt[0], old_logp=alt[1], advantages=alt[2]), cfg))
    first = results[0]
    assert int(first.clip_mask.sum()) > 0
    for r in results[1:]:
        assert r.loss == first.loss and torch.equal(r.grad, first.grad)
        assert torch.equal(r.clip_mask, first.clip_mask) and r.metrics == first.metrics


@pytest.mark.parametrize(
    "obj",
    [ClipCov(fraction=0.2, cov_low=-0.5, cov_high=2.0, seed=9), KlCov(fraction=0.2)],
    ids=lambda o: o.name,
)
def test_cov_objectives_float32_agree_with_float64(obj) -> None:
    *_, b64 = _padded_cov_batch(7)
    b32 = dataclasses.replace(b64, **{f: getattr(b64, f).float() for f in ("logp", "old_logp", "advantages")})
    cfg = LossConfig(objective=obj, aggregation=TOKEN_MEAN)
    r64, r32 = E.loss(b64, cfg), E.loss(b32, cfg)
    assert r32.grad.dtype == torch.float32
    assert torch.equal(r32.clip_mask, r64.clip_mask) and int(r64.clip_mask.sum()) > 0
    assert r32.loss == pytest.approx(r64.loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(r32.grad.double(), r64.grad, rtol=1e-5, atol=1e-6)


def test_clip_cov_seed_fixes_the_draw() -> None:
    """The same seed drops the same tokens on every call; other seeds (0, 1, 2^63 - 1, 2^63,
    2^64 - 1) other tokens; each the eligible tokens of largest splitmix64(seed, index) (the
    plain-loop reference's selection)."""

    g = torch.Generator().manual_seed(10)
    n = 400
    logp = -torch.rand(n, generator=g, dtype=F64) * 3 - 0.01
    old = (logp + 0.1 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-4)
    adv = torch.randn(n, generator=g, dtype=F64)
    mask = torch.rand(n, generator=g) < 0.9
    b = _token_batch(logp, old, adv, mask)
    masks = []
    for seed in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        obj = ClipCov(fraction=0.05, cov_low=-5.0, cov_high=5.0, seed=seed)
        cfg = LossConfig(objective=obj)
        grpo = E.loss(b, LossConfig(objective=Grpo()))
        r1, r2 = E.loss(b, cfg), E.loss(b, cfg)
        assert (
            r1.loss == r2.loss and torch.equal(r1.clip_mask, r2.clip_mask) and torch.equal(r1.grad, r2.grad)
        )
        sel = r1.clip_mask & ~grpo.clip_mask
        assert int(sel.sum()) == int(0.05 * int(mask.sum()))
        assert torch.equal(sel, reference_selection(obj, logp, old, adv, mask, 20.0))
        masks.append(sel)
    for a, c in itertools.combinations(masks, 2):
        assert not torch.equal(a, c)
    # a narrow window: fewer than N / 8 eligible, more than k (the draw keys those alone)
    for seed in (0, 2**64 - 1):
        obj = ClipCov(fraction=0.01, cov_low=0.3, cov_high=0.6, seed=seed)
        want = reference_selection(obj, logp, old, adv, mask, 20.0)
        cov = (adv - adv[mask].mean()) * (logp - logp[mask].mean())
        eligible = int((mask & (cov > 0.3) & (cov < 0.6)).sum())
        assert int(want.sum()) == int(0.01 * int(mask.sum())) < eligible < n // 8
        sel = E.loss(b, LossConfig(objective=obj)).clip_mask & ~grpo.clip_mask
        assert torch.equal(sel, want)


def test_uniform_keys_are_splitmix64() -> None:
    """The draw's keys: splitmix64 of the stream `seed` (its published first outputs for seed
    0), as signed 64-bit integers, for seeds at every edge of the uint64 range."""

    cpu = torch.device("cpu")
    first = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert uniform_keys(0, torch.arange(3), cpu).tolist() == [x - 2**64 if x >= 2**63 else x for x in first]
    for seed in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        keys = uniform_keys(seed, torch.arange(64), cpu)
        assert keys.dtype == torch.int64
        assert keys.tolist() == [splitmix64(seed, i) for i in range(64)]
        # a token's key is its index's, whichever others are drawn beside it (the few-eligible path)
        some = torch.tensor([63, 5, 17])
        assert uniform_keys(seed, some, cpu).tolist() == [splitmix64(seed, i) for i in (63, 5, 17)]
    assert uniform_keys(5, torch.arange(0), cpu).numel() == 0


def test_top_k_ties_go_to_the_lower_index() -> None:
    every = torch.ones(6, dtype=torch.bool)
    f = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.5], dtype=F64)
    assert top_k(f, every, 2).nonzero().flatten().tolist() == [1, 3]
    assert top_k(f, every, 4).nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert top_k(f, every, 9).tolist() == every.tolist()  # fewer than k: all
    some = torch.tensor([False, False, True, False, True, True])
    assert top_k(f, some, 1).nonzero().flatten().tolist() == [4]
    assert not top_k(f, torch.zeros(6, dtype=torch.bool), 3).any()
    i = torch.tensor([7, -(2**63), 7, 2**63 - 1, -(2**63), 7], dtype=torch.int64)
    assert top_k(i, every, 3).nonzero().flatten().tolist() == [0, 2, 3]
    assert top_k(i, every, 5).nonzero().flatten().tolist() == [0, 1, 2, 3, 5]
    # an eligible key at the lowest value (-inf, int64's minimum) beside ineligible ones there
    inf = torch.tensor([-math.inf, -math.inf, 5.0, -math.inf, -math.inf], dtype=F64)
    el = torch.tensor([False, True, True, False, True])
    assert top_k(inf, el, 2).nonzero().flatten().tolist() == [1, 2]
    assert top_k(inf, el, 3).nonzero().flatten().tolist() == [1, 2, 4]
    low = torch.tensor([-(2**63), -(2**63), 3, -(2**63)], dtype=torch.int64)
    el = torch.tensor([False, False, True, True])
    assert top_k(low, el, 2).nonzero().flatten().tolist() == [2, 3]


def test_kl_cov_without_penalty_is_reinforce_and_clip_cov_without_window_is_grpo() -> None:
    """KL-Cov with coef 0 is REINFORCE, Clip-Cov with a window nothing falls in GRPO with the
    same bounds, bit for bit (loss, gradient, ratio, gate weight)."""
    b = random_batch(12, max_seqs=8, max_len=9, advantages="token", big_deltas=True)
    for cov, plain in (
        (KlCov(fraction=0.5, coef=0.0), Reinforce()),
        (
            ClipCov(eps_low=0.1, eps_high=0.3, fraction=1.0, cov_low=1e6, cov_high=1e7),
            Grpo(eps_low=0.1, eps_high=0.3),
        ),
    ):
        for agg in ("token_mean", "seq_mean_token_mean"):
            got = E.loss(b, LossConfig(objective=cov, aggregation=AggregationConfig(mode=agg)))
            want = E.loss(b, LossConfig(objective=plain, aggregation=AggregationConfig(mode=agg)))
            assert got.loss == want.loss and torch.equal(got.grad, want.grad)
            assert torch.equal(got.ratio, want.ratio) and torch.equal(got.gate_weight, want.gate_weight)
            if cov.name == "clip_cov":
                assert torch.equal(got.clip_mask, want.clip_mask)
                assert got.metrics["clip_fraction"] == want.metrics["clip_fraction"]


@pytest.mark.parametrize(
    "obj,field",
    [
        (KlCov(fraction=0.0), "objective.kl_cov.fraction"),
        (KlCov(fraction=1.5), "objective.kl_cov.fraction"),
        (KlCov(fraction=math.nan), "objective.kl_cov.fraction"),
        (KlCov(coef=-0.1), "objective.kl_cov.coef"),
        (ClipCov(fraction=0.0), "objective.clip_cov.fraction"),
        (ClipCov(fraction=1.5), "objective.clip_cov.fraction"),
        (ClipCov(fraction=math.nan), "objective.clip_cov.fraction"),
        (ClipCov(cov_low=5.0, cov_high=5.0), "objective.clip_cov.cov_high"),
        (ClipCov(cov_low=6.0, cov_high=5.0), "objective.clip_cov.cov_high"),
        (ClipCov(cov_low=math.inf), "objective.clip_cov.cov_low"),
        (ClipCov(cov_high=math.nan), "objective.clip_cov.cov_high"),
        (ClipCov(eps_low=-0.1), "objective.clip_cov.eps_low"),
        (ClipCov(seed=-1), "objective.clip_cov.seed"),
        (ClipCov(seed=2**64), "objective.clip_cov.seed"),
        # not an integer: bad_type, as the Python client says
        (ClipCov(seed=True), "objective.clip_cov.seed bad_type"),
        (ClipCov(seed=1.5), "objective.clip_cov.seed bad_type"),  # type: ignore[arg-type]
    ],
    ids=lambda x: x if isinstance(x, str) else repr(x).split("(")[1].split(",")[0],
)
def test_cov_objectives_validation(obj, field: str) -> None:
    b = simple_batch([3, 2], advantages=torch.tensor([1.0, -1.0]))
    field, _, code = field.partition(" ")
    assert reasons(b, LossConfig(objective=obj)) == {(field, code or "out_of_range", None)}


def test_clip_cov_leaves_out_the_tokens_grpo_s_clip_of_the_clamped_ratio_clips() -> None:
    """Clip-Cov's draw leaves out the tokens GRPO's clip clips as the kernel computes it, on the
    clamped ratio: with log_ratio_clamp 0.1 a log-ratio of +-0.3 reads exp(+-0.1), inside
    (0.8, 1.2), so no token is clipped and, with fraction 1 and a window holding all, every
    trained token is dropped (on the unclamped ratio two would be left with neither)."""
    logp = torch.tensor([-1.0, -1.2, -0.7, -2.0, -0.4], dtype=F64)
    d = torch.tensor([0.3, -0.3, 0.05, 0.15, 0.0], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0, -0.5], dtype=F64)
    mask = torch.tensor([True, True, True, True, False])
    b = _token_batch(logp, logp - d, adv, mask)
    grpo = E.loss(b, LossConfig(objective=Grpo(), log_ratio_clamp=0.1))
    assert not grpo.clip_mask.any()
    obj = ClipCov(fraction=1.0, cov_low=-1e9, cov_high=1e9)
    res = E.loss(b, LossConfig(objective=obj, log_ratio_clamp=0.1))
    assert torch.equal(res.clip_mask, mask) and res.loss == 0.0 and not res.grad.any()
    assert res.metrics["clip_fraction"] == 1.0


def test_clip_cov_s_sampled_gate_reads_its_draw() -> None:
    """A sampled call (ratio and gate for every stride-th token, as a server asks) reads the
    draw at those tokens: a drawn token shows gate 0 there too (a review: the sample's own
    policy pass could ignore the selection and no test noticed)."""
    batch = random_batch(3, max_seqs=30, max_len=40, advantages="token")
    obj = ClipCov(fraction=0.2, cov_low=-5.0, cov_high=5.0, seed=3)
    whole = E.loss(batch, LossConfig(objective=obj))
    n = whole.grad.numel()
    s = E.loss(batch, LossConfig(objective=obj), sample_tokens=n // 4)
    k = s.sample_stride
    assert k > 1 and torch.equal(s.grad, whole.grad)
    assert torch.equal(s.gate_weight, whole.gate_weight[::k]) and torch.equal(s.ratio, whole.ratio[::k])
    drawn = whole.clip_mask & ~E.loss(batch, LossConfig(objective=Grpo())).clip_mask
    assert bool(drawn[::k].any())  # (the sample holds drawn tokens)


@pytest.mark.parametrize(
    "obj", [ClipCov(fraction=0.2, cov_low=-5.0, cov_high=5.0, seed=9), KlCov(fraction=0.2, coef=0.5)]
)
def test_cov_objectives_gate_and_clip_metrics_read_their_outputs(obj) -> None:
    """The gate means, saturations and clip shares are those of the per-token outputs (clip_cov's
    drawn tokens at gate 0, kl_cov's gate 1 everywhere), by A's sign; clip_fraction counts
    every clipped token, an A = 0 one too (a review: clip_cov counted as clip-less passed)."""
    batch = random_batch(21, max_seqs=20, max_len=30, advantages="token")
    batch.advantages[::7] = 0.0  # (some A = 0 tokens, which either may select)
    res = E.loss(batch, LossConfig(objective=obj))
    m, a, gate, clip = res.mask, res.advantages, res.gate_weight.double(), res.clip_mask
    pos, neg = m & (a > 0), m & (a < 0)
    mx = res.metrics
    assert int(clip.sum()) > 0 and mx["clip_fraction"] == pytest.approx(int(clip.sum()) / int(m.sum()))
    for side, sel, name in ((pos, "pos", "clip_high"), (neg, "neg", "clip_low")):
        assert mx[f"gate_mean_{sel}"] == pytest.approx(float(gate[side].mean()), rel=1e-12)
        assert mx[f"gate_saturation_{sel}"] == pytest.approx(float((gate[side] < 0.5).double().mean()))
        assert mx[name] == pytest.approx(int((clip & side).sum()) / int(side.sum()))
    if isinstance(obj, KlCov):
        assert bool((gate[m] == 1).all()) and mx["gate_saturation_pos"] == mx["gate_saturation_neg"] == 0
    else:
        assert bool((gate[clip] == 0).all())
        # a drawn A = 0 token has no gradient to drop: not clipped, as cispo's (counting it, the
        # kernel reduced the clip count in a pass of its own: 5.2 -> 1.9 ms at 1M tokens)
        assert not bool((clip & m & (a == 0)).any())


def test_clip_cov_s_origin_clip_is_strict() -> None:
    """verl's clip_by_origin is pg_losses2 > pg_losses1, strict: on policy (r = 1 exactly) with
    eps 0, no token is clipped, and every one may be drawn (a `>=` survived the tests)."""
    logp = torch.tensor([-1.0, -3.0, -0.5, -2.5], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=F64)
    obj = ClipCov(eps_low=0.0, eps_high=0.0, fraction=0.5, cov_low=-10.0, cov_high=10.0, seed=1)
    b = _token_batch(logp, logp.clone(), adv)
    assert int(E.loss(b, LossConfig(objective=Grpo(eps_low=0.0, eps_high=0.0))).clip_mask.sum()) == 0
    res = E.loss(b, LossConfig(objective=obj))
    assert res.clip_mask.tolist() == [False, False, True, True]  # the 2 largest splitmix64(1, t)


def test_cov_selection_centres_values_whose_differences_overflow() -> None:
    """float64 advantages of +-1e308: x - c overflows, so the covariances are centred on
    x / max |x| and scaled back; token 3's is the largest (1.375e308). Centred as 0 (a review's
    mutant), every covariance ties and token 0 would be picked."""
    logp = torch.tensor([-1.0, -0.5, -2.0, -3.0], dtype=F64)
    adv = torch.tensor([1e308, -1e308, 1e308, -1e308], dtype=F64)
    res = E.loss(_token_batch(logp, logp - 0.01, adv), LossConfig(objective=KlCov(fraction=0.25, coef=0.0)))
    assert res.clip_mask.tolist() == [False, False, False, True]
