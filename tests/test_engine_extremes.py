"""Numerics at the extremes of the parameters and inputs (the numerics audit): a loss past
float64's range is refused (never reported as 0), non-finite advantages are refused by every
estimator, GPPO's gate and grad_retained are continuous across the log-ratio clamp,
parameters the compute dtype cannot hold are refused naming their field, and the ratio's
mean lies between its minimum and maximum."""

from __future__ import annotations

import math

import pytest
import torch
from reference_loss import REFUSED_SCALES, SEQUENCE_ESTIMATORS
from softgate.engine import (
    AdvantageConfig,
    AggregationConfig,
    Batch,
    Engine,
    Gppo,
    Grpo,
    InputError,
    KLConfig,
    LossConfig,
    MismatchConfig,
    Reinforce,
    Sapo,
)
from softgate.engine.metrics import to_floats

E = Engine(device="cpu", compile=False)
F32, F64 = torch.float32, torch.float64


def _batch(logp, old, lengths, adv, dtype=F64, **kw) -> Batch:
    return Batch(
        logp=torch.tensor(logp, dtype=dtype),
        old_logp=torch.tensor(old, dtype=dtype),
        offsets=Batch.offsets_from_lengths(torch.tensor(lengths)),
        advantages=torch.tensor(adv, dtype=dtype),
        **{k: torch.tensor(v, dtype=dtype) for k, v in kw.items()},
    )


def _refusal(batch: Batch, config: LossConfig) -> list[tuple[str, str]]:
    with pytest.raises(InputError) as err:
        E.loss(batch, config)
    return [(v.field, v.reason) for v in err.value.violations]


# ---------------------------------------------------------------- a loss past float64's range


@pytest.mark.parametrize("beta", [1e300, 1.7e308])
def test_a_kl_loss_past_float64s_range_is_refused_naming_kl_beta(beta: float) -> None:
    """beta * KL overflows float64 while the gradient (beta * alpha * dk) does not: the loss
    and kl_loss came back as 0.0 next to a gradient of 5e299."""
    b = _batch([-1.0, -2.0], [-1.0, -2.0], [1, 1], [1.0, -1.0], ref_logp=[-1e10, -1e10])
    config = LossConfig(kl=KLConfig(estimator="k1", beta=beta))
    ((field, reason),) = _refusal(b, config)
    assert field == "kl.beta"
    assert reason.startswith("overflow: the loss is not finite in float64")
    ok = E.loss(b, LossConfig(kl=KLConfig(estimator="k1", beta=1e290)))  # finite: computed
    assert ok.kl_loss == pytest.approx(1e300, rel=1e-9) and ok.loss == ok.policy_loss + ok.kl_loss


def test_a_policy_plus_kl_sum_past_float64s_range_is_refused_naming_the_batch() -> None:
    """Each part finite (1e308 and 1e308), their sum not."""
    b = _batch([-1.0, -2.0], [-1.0, -2.0], [1, 1], [-1e308, -1e308], ref_logp=[-1e10, -1e10])
    config = LossConfig(
        objective=Reinforce(),
        aggregation=AggregationConfig(mode="seq_mean_token_sum"),
        kl=KLConfig(estimator="k1", beta=1e298),
    )
    ((field, reason),) = _refusal(b, config)
    assert field == "batch" and reason.startswith("overflow: the loss is not finite in float64")


@pytest.mark.parametrize("key", ["loss", "policy_loss", "kl_loss"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_to_floats_never_turns_a_non_finite_loss_into_0(key: str, value: float) -> None:
    """A non-finite loss reaching to_floats is a bug (compute_loss refuses it first): loud,
    an INTERNAL error over gRPC, never a finite-looking 0."""
    with pytest.raises(AssertionError, match=key):
        to_floats({"loss": 1.0, "policy_loss": 1.0, "kl_loss": 0.0, key: value})


# ---------------------------------------------------------------- non-finite advantages


@pytest.mark.parametrize(
    ("estimator", "scale"),
    # (reinforce_pp's group scale and gdpo's batch scale are refused as unsupported)
    [(e, s) for e in SEQUENCE_ESTIMATORS for s in ("group", "batch") if (e, s) not in REFUSED_SCALES],
)
def test_non_finite_advantages_are_refused_by_every_estimator(estimator: str, scale: str) -> None:
    """With eps = 0 a reward spread whose squares underflow divides by a std of 0: inf.
    reinforce_pp_baseline's whitening turned those into 0 for every sequence (loss 0, no
    gradient, nothing degenerate) where the other estimators refuse them."""
    rewards = [5e-324, 0.0, 1e-310]
    b = Batch(
        logp=torch.tensor([-1.0, -2.0, -0.5], dtype=F64),
        old_logp=torch.tensor([-1.1, -1.5, -0.5], dtype=F64),
        offsets=torch.tensor([0, 1, 2, 3]),
        rewards=torch.tensor(rewards, dtype=F64),
        group_ids=torch.tensor([0, 0, 0]),
    )
    adv = AdvantageConfig(estimator=estimator, scale=scale, eps=0.0)  # type: ignore[arg-type]
    reasons = _refusal(b, LossConfig(objective=Grpo(), advantages=adv))
    assert [r.split(":")[0] for _, r in reasons] == ["overflow"]
    with pytest.raises(InputError) as err:
        E.advantages(b.rewards, b.group_ids, adv)
    assert err.value.reasons == ["overflow"] and err.value.violations[0].field == "rewards"


@pytest.mark.parametrize("eps", [5e-324, 1e-200, 9.9e-101])
@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp_baseline"])
def test_an_eps_below_its_floor_is_refused_naming_advantages_eps(
    estimator: str, scale: str, eps: float
) -> None:
    """A review: rewards 1e-163 apart have a std whose squares underflow float64 to 0, and the
    division by eps alone gave advantages of 1e160 (eps 5e-324) or 1e37 (1e-200) where the
    spread is worth about 1. eps is 0 or at least MIN_ADVANTAGE_EPS (1e-100)."""
    rewards = torch.tensor([0.0, 1e-163, 0.0, 2e-163], dtype=F64)
    groups = torch.tensor([0, 0, 1, 1])
    adv = AdvantageConfig(estimator=estimator, scale=scale, eps=eps)  # type: ignore[arg-type]
    with pytest.raises(InputError) as err:
        E.advantages(rewards, groups, adv)
    ((v,),) = [err.value.violations]
    assert v.field == "advantages.eps" and v.reason.startswith("out_of_range: ")
    assert "must be 0 or >= 1e-100" in v.reason
    b = Batch(
        logp=torch.full((4,), -1.0, dtype=F64),
        offsets=torch.arange(5),
        rewards=rewards,
        group_ids=groups,
    )
    assert _refusal(b, LossConfig(advantages=adv)) == [(v.field, v.reason)]


@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_at_the_eps_floor_a_spread_that_underflows_gives_the_exact_advantages(
    estimator: str, scale: str
) -> None:
    """At eps = 1e-100 the std that underflowed to 0 (~1e-163) is negligible next to eps: the
    advantages are those of the rewards and eps scaled by 2^500, where nothing underflows."""
    rewards, groups = torch.tensor([0.0, 1e-163, 0.0, 2e-163], dtype=F64), torch.tensor([0, 0, 1, 1])
    s = 2.0**500  # (exact: a power of two)

    def advantages(scaled: float) -> torch.Tensor:
        adv = AdvantageConfig(estimator=estimator, scale=scale, eps=1e-100 * scaled)  # type: ignore[arg-type]
        return E.advantages(rewards * scaled, groups, adv).advantages

    a = advantages(1.0)
    assert bool(a.abs().max() > 0)
    torch.testing.assert_close(a, advantages(s), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- GPPO across the clamp


@pytest.mark.parametrize("d", [1.0, 19.0, 19.99, 20.01, 25.0, -19.99, -20.01, -25.0])
def test_gppo_gate_is_the_gradient_over_the_free_gradient_across_the_clamp(d: float) -> None:
    """A clipped gppo token keeps its bound's gradient; its gradient without the trust region
    is -A r, clamped or not (as cispo's), so gate = bound / r = grad_retained on one token:
    at a log-ratio of 25 grad_retained read 1 (a free gradient of 0) and at 19.99 6.7e-9."""
    a = 1.0 if d > 0 else -1.0
    b = _batch([-30.0], [-30.0 - d], [1], [a])
    r = E.loss(b, LossConfig(objective=Gppo(), aggregation=AggregationConfig(mode="token_mean")))
    bound = 1.2 if d > 0 else 0.8
    ratio = math.exp(max(-20.0, min(20.0, d)))
    assert r.clip_mask.tolist() == [True]
    assert r.grad.tolist() == [pytest.approx(-bound * a, rel=1e-15)]
    assert r.gate_weight.tolist() == [pytest.approx(bound / ratio, rel=1e-12)]
    assert r.metrics["grad_retained"] == pytest.approx(bound / ratio, rel=1e-12)


def test_gppo_grad_retained_stays_within_1_with_clamped_a_positive_tokens() -> None:
    """docs/spec.md: only clipped A<0 tokens (bound / r > 1) take grad_retained past 1; an
    unclipped and a clamped, clipped A>0 token read 2.2."""
    b = _batch([-0.1, -0.1], [-0.1, -25.1], [2], [1.0])
    r = E.loss(b, LossConfig(objective=Gppo(), aggregation=AggregationConfig(mode="token_mean")))
    free = 0.5 + 0.5 * math.exp(20.0)  # |alpha A r| of each token, r clamped at e^20
    assert r.metrics["grad_retained"] == pytest.approx((0.5 + 0.6) / free, rel=1e-12)


# ---------------------------------------------------------------- parameters the dtype cannot hold


NOT_IN_F32 = "out_of_range: not representable in float32; send float64 or a value in range"


@pytest.mark.parametrize(
    "config,fields",
    [
        (
            LossConfig(objective=Sapo(tau_pos=1e-40, tau_neg=1e-40)),
            ["objective.sapo.tau_pos", "objective.sapo.tau_neg"],
        ),  # 4/tau
        (LossConfig(objective=Sapo(tau_pos=1e-46)), ["objective.sapo.tau_pos"]),  # 0
        (LossConfig(objective=Sapo(tau_neg=1e39)), ["objective.sapo.tau_neg"]),  # inf
        (LossConfig(kl=KLConfig(beta=1e39)), ["kl.beta"]),
        (LossConfig(kl=KLConfig(beta=1e-50)), ["kl.beta"]),  # a beta > 0 that would be 0
        (LossConfig(kl=KLConfig(beta=0.1, value_clamp=1e-50)), ["kl.value_clamp"]),  # a bound of 0
        (LossConfig(saturation_threshold=1e-50), ["saturation_threshold"]),
        (LossConfig(mismatch=MismatchConfig(mode="mask", lo=1e-50)), ["mismatch.lo"]),
        # a normaliser is read as its reciprocal: 1e300 gave a loss and gradient of 0, status OK
        (
            LossConfig(aggregation=AggregationConfig(mode="token_mean", num_tokens=1e300)),
            ["aggregation.num_tokens"],
        ),
        (
            LossConfig(aggregation=AggregationConfig(mode="token_mean", num_tokens=1e-300)),
            ["aggregation.num_tokens"],
        ),
        (
            LossConfig(aggregation=AggregationConfig(mode="token_sum_norm", constant=1e46)),
            ["aggregation.constant"],
        ),
        (  # a subnormal weight (1e-45): a few bits, a loss of 0 and a wrong gradient (a review)
            LossConfig(aggregation=AggregationConfig(mode="token_mean", num_tokens=1e45)),
            ["aggregation.num_tokens"],
        ),
        (
            LossConfig(aggregation=AggregationConfig(mode="seq_mean_token_mean", num_seqs=1e300)),
            ["aggregation.num_seqs"],
        ),
        (  # the KL term's own mode reads num_seqs
            LossConfig(
                aggregation=AggregationConfig(mode="token_mean", num_tokens=10.0, num_seqs=1e300),
                kl=KLConfig(aggregation="seq_mean_token_sum"),
            ),
            ["aggregation.num_seqs"],
        ),
    ],
)
def test_parameters_float32_cannot_hold_are_refused_naming_them(
    config: LossConfig, fields: list[str]
) -> None:
    """A temperature of 1e-40 or 1e39 in a float32 batch was refused as `batch: overflow` or
    `logp[2]: overflow` (or, for a beta of 1e-50, computed with beta 0); float64 computes it."""
    lp, old = [-1.0, -2.0, -0.5], [-1.1, -1.5, -0.5]
    kw = {"ref_logp": [-1.2, -1.9, -0.4], "rollout_logp": [-1.0, -1.6, -0.6]}
    got = _refusal(_batch(lp, old, [1, 2], [1.0, -1.0], dtype=F32, **kw), config)
    assert got == [(f, NOT_IN_F32) for f in fields]
    r = E.loss(_batch(lp, old, [1, 2], [1.0, -1.0], dtype=F64, **kw), config)
    assert math.isfinite(r.loss) and bool(torch.isfinite(r.grad).all())


@pytest.mark.parametrize(
    "objective", [Grpo(eps_high=1e300), Grpo(eps_low=1e300, eps_high=1e39, dual_clip=1e300)]
)
def test_clip_bounds_float32_cannot_hold_mean_no_clip(objective: Grpo) -> None:
    """An infinite clip bound means no clip, as a mismatch bound does: a float32 batch computes
    what float64 does (no token clipped) rather than being refused (a review)."""
    lp, old, kw = [-1.0, -2.0, -0.5], [-1.1, -1.5, -0.5], {"ref_logp": [-1.2, -1.9, -0.4]}
    cfg = LossConfig(objective=objective, kl=KLConfig(beta=0.1))
    r32 = E.loss(_batch(lp, old, [1, 2], [1.0, -1.0], dtype=F32, **kw), cfg)
    r64 = E.loss(_batch(lp, old, [1, 2], [1.0, -1.0], dtype=F64, **kw), cfg)
    assert r32.metrics["clip_fraction"] == r64.metrics["clip_fraction"]
    assert r32.metrics["clip_high"] == r32.metrics["dual_clip"] == 0.0
    assert r32.loss == pytest.approx(r64.loss, rel=1e-6)
    assert torch.allclose(r32.grad.double(), r64.grad, rtol=1e-6, atol=0)


def test_a_temperature_whose_4_over_tau_float64_cannot_hold_is_refused_naming_it() -> None:
    b = _batch([-1.0, -2.0, -0.5], [-1.1, -1.5, -0.5], [1, 2], [1.0, -1.0])
    got = _refusal(b, LossConfig(objective=Sapo(tau_pos=1e-310)))
    assert got == [
        ("objective.sapo.tau_pos", "out_of_range: not representable in float64; send a value in range")
    ]


# ---------------------------------------------------------------- the ratio's mean


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("d", [-29.0, -20.5, 0.3, 25.0])
def test_ratio_mean_lies_between_ratio_min_and_ratio_max(dtype: torch.dtype, d: float) -> None:
    """Every ratio e^-20 (clamped): the mean, 1 + mean(expm1(d)), read 0 in float32 (expm1
    rounds to -1) and just below the minimum in float64."""
    b = _batch([-30.0, -30.0], [-30.0 - d, -30.0 - d], [1, 1], [1.0, -1.0], dtype=dtype)
    m = E.loss(b, LossConfig()).metrics
    assert m["ratio_min"] <= m["ratio_mean"] <= m["ratio_max"]
    assert m["ratio_mean"] == pytest.approx(math.exp(max(-20.0, min(20.0, d))), rel=1e-6)
