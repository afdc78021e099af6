"""Values exactly on the spec's bounds (every inequality of docs/spec.md is strict), and the
neutral values of metrics and defaults. Found missing by a mutation-testing audit: each test
pins down a behaviour that a one-token change to the engine altered with no other test failing."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from softgate.engine import (
    AdvantageConfig,
    AggregationConfig,
    Batch,
    Engine,
    Grpo,
    Gspo,
    InputError,
    KLConfig,
    LossConfig,
    MismatchConfig,
    Sapo,
)
from softgate.engine.aggregate import sequence_weights

E = Engine(device="cpu", compile=False)
F64 = torch.float64


def _on_policy(adv: list[float], logp: list[float] | None = None, **kw) -> Batch:
    n = len(adv)
    lp = torch.tensor(logp if logp is not None else [-0.5 - 0.1 * i for i in range(n)], dtype=F64)
    return Batch(
        logp=lp,
        offsets=torch.tensor([0, n]),
        old_logp=lp.clone(),
        advantages=torch.tensor(adv, dtype=F64),
        advantage_level="token",
        **kw,
    )


def test_clip_bounds_are_strict_at_eps_zero():
    """SPEC: the clip is active where r > 1+eps_high (A > 0) or r < 1-eps_low (A < 0), strictly.
    With eps 0 and an on-policy batch (r == 1 exactly) nothing is clipped: gradient -A / N."""
    b = _on_policy([1.0, -2.0, 0.5, -0.25])
    r = E.loss(b, LossConfig(objective=Grpo(eps_low=0.0, eps_high=0.0)))
    expect = -b.advantages / 4
    torch.testing.assert_close(r.grad, expect, rtol=0, atol=1e-15)
    assert not bool(r.clip_mask.any())
    assert r.metrics["clip_low"] == 0.0 and r.metrics["clip_high"] == 0.0
    assert r.metrics["clip_fraction"] == 0.0 and r.metrics["grad_retained"] == 1.0


def test_dual_clip_is_strict_at_r_equal_c():
    """SPEC: dual clip zeroes the gradient where A < 0 and r > c; at r == c exactly it does not."""
    lp = torch.tensor([-1.0, -1.0], dtype=F64)
    old = torch.tensor([-1.5, -1.5], dtype=F64)  # d = 0.5 exactly
    c = float(torch.exp(torch.tensor(0.5, dtype=F64)))  # r == c, bit for bit
    b = Batch(
        logp=lp,
        offsets=torch.tensor([0, 2]),
        old_logp=old,
        advantages=torch.tensor([-1.0, -3.0], dtype=F64),
        advantage_level="token",
    )
    r = E.loss(b, LossConfig(objective=Grpo(dual_clip=c)))
    # A < 0, r = c > 1 + eps_high: unclipped, gradient -A r / N
    torch.testing.assert_close(r.grad, -b.advantages * c / 2, rtol=1e-15, atol=0)
    assert r.metrics["dual_clip"] == 0.0 and not bool(r.clip_mask.any())


def test_gate_saturation_is_strictly_below_the_threshold():
    """SPEC: saturation = share of tokens whose gate weight is *below* the threshold. On policy
    SAPO's gate is exactly 1 (p = 1/2), so with threshold 1 no token is saturated."""
    b = _on_policy([1.0, -2.0, 0.5, -0.25])
    r = E.loss(b, LossConfig(objective=Sapo(), saturation_threshold=1.0))
    assert bool((r.gate_weight == 1.0).all())
    assert r.metrics["gate_saturation_pos"] == 0.0
    assert r.metrics["gate_saturation_neg"] == 0.0


def test_mismatch_truncation_counts_only_weights_above_the_cap():
    """A weight equal to the cap (v = 1 = cap: rollout == old) is not truncated."""
    b = _on_policy([1.0, -2.0, 0.5], rollout_logp=torch.tensor([-0.5, -0.6, -0.7], dtype=F64))
    r = E.loss(b, LossConfig(objective=Grpo(), mismatch=MismatchConfig(mode="truncate", cap=1.0)))
    assert r.metrics["mismatch_clipped_frac"] == 0.0
    assert r.metrics["mismatch_weight_mean"] == 1.0


def test_mismatch_mask_keeps_weights_on_the_closed_interval():
    """SPEC: v is zeroed *outside* [lo, hi]; v == lo (rollout == old, lo = 1) keeps the token."""
    b = _on_policy([1.0, -2.0, 0.5], rollout_logp=torch.tensor([-0.5, -0.6, -0.7], dtype=F64))
    plain = E.loss(b, LossConfig(objective=Grpo()))
    for lo, hi in ((1.0, 2.0), (0.5, 1.0)):
        r = E.loss(b, LossConfig(objective=Grpo(), mismatch=MismatchConfig(mode="mask", lo=lo, hi=hi)))
        torch.testing.assert_close(r.grad, plain.grad, rtol=0, atol=0)
        assert r.loss == plain.loss
        assert r.metrics["mismatch_clipped_frac"] == 0.0


def test_min_group_std_is_a_strict_lower_bound():
    """SPEC: a group is degenerate when its std is *below* min_group_std: rewards 1, 2, 3 have
    unbiased std exactly 1, so min_group_std = 1 keeps them."""
    b = Batch(
        logp=torch.full((3,), -0.5, dtype=F64),
        offsets=torch.tensor([0, 1, 2, 3]),
        rewards=torch.tensor([1.0, 2.0, 3.0], dtype=F64),
        group_ids=torch.tensor([0, 0, 0]),
    )
    r = E.loss(b, LossConfig(advantages=AdvantageConfig(estimator="dr_grpo", min_group_std=1.0)))
    assert r.metrics["degenerate_group_frac"] == 0.0
    torch.testing.assert_close(r.advantages, torch.tensor([-1.0, 0.0, 1.0], dtype=F64))


def test_fully_masked_batch_with_mismatch_has_neutral_mismatch_metrics():
    """metrics: mismatch_weight_mean is 1 and mismatch_clipped_frac, a share, 0 where there is
    no trained token (nothing reweighted, nothing truncated)."""
    b = _on_policy(
        [1.0, -1.0], rollout_logp=torch.tensor([-0.9, -0.9], dtype=F64), mask=torch.tensor([False, False])
    )
    r = E.loss(b, LossConfig(objective=Grpo(), mismatch=MismatchConfig()))
    assert r.metrics["num_tokens"] == 0.0
    assert r.metrics["mismatch_weight_mean"] == 1.0
    assert r.metrics["mismatch_clipped_frac"] == 0.0


@pytest.mark.parametrize("host", [True, False])
def test_token_mean_weight_of_a_fully_masked_batch_is_finite(host, monkeypatch):
    """token_mean's default N_tok is at least 1: no trained token gives a finite weight, not
    1/0 (inf, with numpy's divide-by-zero warning in every such call)."""
    from softgate.engine import aggregate

    monkeypatch.setattr(aggregate, "host_shortcuts", lambda device: host)  # False: a GPU's torch path
    counts = torch.zeros(3, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = sequence_weights(AggregationConfig(mode="token_mean"), counts, F64)
    assert math.isfinite(float(w))


def test_an_empty_batch_with_sample_tokens_1_computes():
    """sample_tokens 1 samples nothing more than the batch has: an empty batch computes (no
    stride of 0). (0 is refused: tests/test_engine_library.py.)"""
    b = Batch(logp=torch.zeros(0, dtype=F64), offsets=torch.tensor([0]), advantages=torch.zeros(0, dtype=F64))
    r = E.loss(b, LossConfig(), sample_tokens=1)
    assert r.loss == 0.0 and r.sample_stride == 1


def test_gspo_sequence_clamp_counts_only_beyond_the_bound():
    """clamped_tokens: a sequence whose mean log-ratio equals the clamp bound exactly is not clamped;
    one beyond it, below as above, is clamped and counts each of its trained tokens."""
    lp = torch.tensor([-1.0, -1.0], dtype=F64)
    b = Batch(
        logp=lp,
        offsets=torch.tensor([0, 2]),
        old_logp=lp - 0.5,
        advantages=torch.tensor([1.0], dtype=F64),
        advantage_level="sequence",
    )
    r = E.loss(b, LossConfig(objective=Gspo(), log_ratio_clamp=0.5))
    assert r.metrics["clamped_tokens"] == 0.0
    # log s_i is clamped like d on both sides: a mean log-ratio of -25 is clamped to -20
    b = Batch(
        logp=torch.full((3,), -30.0, dtype=F64),
        offsets=torch.tensor([0, 3]),
        old_logp=torch.full((3,), -5.0, dtype=F64),
        advantages=torch.tensor([-1.0], dtype=F64),
    )
    r = E.loss(b, LossConfig(objective=Gspo()))
    assert r.metrics["clamped_tokens"] == 3
    assert r.metrics["ratio_min"] == pytest.approx(math.exp(-20.0), rel=1e-12)


def test_kl_beta_zero_is_valid_and_still_reports_the_kl():
    """KLConfig's default beta is 0 (>= 0 is valid): the KL is measured, not added to the loss."""
    b = _on_policy([1.0, -1.0], ref_logp=torch.tensor([-0.7, -0.4], dtype=F64))
    r = E.loss(b, LossConfig(objective=Grpo(), kl=KLConfig()))
    plain = E.loss(b, LossConfig(objective=Grpo()))
    assert r.metrics["kl_loss"] == 0.0 and r.loss == plain.loss
    assert r.metrics["kl_mean"] > 0.0
    torch.testing.assert_close(r.grad, plain.grad, rtol=0, atol=0)


def test_non_finite_per_sequence_advantages_are_named():
    """Per-sequence advantages are not read by the kernel's value check: validation must name a
    NaN there (field advantages, its index, non_finite), not report an overflow of the loss."""
    lp = torch.tensor([-0.5, -0.6, -0.7], dtype=F64)
    b = Batch(
        logp=lp,
        offsets=torch.tensor([0, 1, 3]),
        old_logp=lp.clone(),
        advantages=torch.tensor([1.0, float("nan")], dtype=F64),
        advantage_level="sequence",
    )
    with pytest.raises(InputError) as ei:
        E.loss(b, LossConfig(objective=Grpo()))
    assert [(v.field, v.index, v.code) for v in ei.value.violations] == [("advantages", 1, "non_finite")]


def test_group_ids_beside_advantages_are_checked_whenever_given():
    """Found by an audit: with advantages, group_ids go unused and were not checked at all
    (float ones, or of the wrong length, passed), where the server counted them; bad input gets
    a clear error whatever else the batch holds. Valid ones are still unused (num_groups 0)."""
    lp = torch.tensor([-0.5, -0.6, -0.7], dtype=F64)

    def batch(group_ids: torch.Tensor, **kw) -> Batch:
        adv = torch.tensor([1.0, -1.0], dtype=F64)
        return Batch(logp=lp, offsets=torch.tensor([0, 1, 3]), advantages=adv, group_ids=group_ids, **kw)

    assert E.loss(batch(torch.tensor([0, 1])), LossConfig()).metrics["num_groups"] == 0.0
    rewards = torch.tensor([1.0, 0.0])
    for group_ids, code in (
        (torch.tensor([0.0, 1.0]), "bad_dtype"),
        (torch.tensor([True, False]), "bad_dtype"),
        (torch.tensor([[0, 1]]), "bad_shape"),
        (torch.tensor([0, 1, 2]), "length_mismatch"),
    ):
        for kw in ({}, {"rewards": rewards}):
            with pytest.raises(InputError) as ei:
                E.loss(batch(group_ids, **kw), LossConfig())
            assert [(v.field, v.code) for v in ei.value.violations] == [("group_ids", code)], kw
    # rewards alone still need group ids; advantages do not
    with pytest.raises(InputError) as ei:
        E.loss(Batch(logp=lp, offsets=torch.tensor([0, 1, 3]), rewards=rewards), LossConfig())
    assert [(v.field, v.code) for v in ei.value.violations] == [("group_ids", "missing")]


def test_a_refused_reward_dtype_names_what_rewards_accept():
    """Found by an audit: boolean rewards were refused with "float32 or float64 expected",
    though integer (and half-precision) rewards are accepted."""
    lp = torch.tensor([-0.5, -0.6], dtype=F64)
    b = Batch(
        logp=lp,
        offsets=torch.tensor([0, 1, 2]),
        rewards=torch.tensor([True, False]),
        group_ids=torch.tensor([0, 0]),
    )
    with pytest.raises(InputError) as ei:
        E.loss(b, LossConfig())
    ((v,),) = [ei.value.violations]
    assert (v.field, v.reason) == (
        "rewards",
        "bad_dtype: torch.bool given, a float or integer dtype expected",
    )
