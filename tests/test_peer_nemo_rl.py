"""softgate against NeMo-RL (NVIDIA-NeMo/RL): its ClippedPGLossFn, calculate_kl, masked_mean and
advantage estimators written out on padded [B, T] float64 tensors (short transcriptions of the
formulas, not copies of its code), autograd for its gradient, compared with softgate's loss,
per-token gradient and metrics (docs/peers.md, "From NeMo-RL").

Peer files read (commit in brackets):
- nemo_rl/algorithms/loss/loss_functions.py [006907a9]: ClippedPGLossFn (clip, dual clip, GSPO,
  CISPO, disable_ppo_ratio, force_on_policy_ratio, IS correction, KL with the score-function
  gradient)
- nemo_rl/algorithms/loss_functions.py [005a098a]: the older ClippedPGLossFn (KL without it, the
  on-policy KL weight detached)
- nemo_rl/algorithms/utils.py [00439539]: calculate_kl (with importance_sampling_weights),
  masked_mean (+1e-8 in the denominator), calculate_baseline_and_std_per_prompt
- nemo_rl/algorithms/advantage_estimator.py [00925dd1]: GRPO / Reinforce++ advantages
- the policy workers' train step: global_valid_seqs = sum(sample_mask), global_valid_toks =
  sum(token_mask * sample_mask), over the whole global batch
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from softgate.engine import (
    AdvantageConfig,
    AggregationConfig,
    Batch,
    Cispo,
    Engine,
    Grpo,
    Gspo,
    KLConfig,
    LossConfig,
    MismatchConfig,
    RewardKLConfig,
)
from softgate_client import kl_from_nemo_rl

E = Engine(device="cpu", compile=False)
F64 = torch.float64
NEMO_EPS = 1e-8  # masked_mean's denominator: sum(mask) (or the global factor) + 1e-8
# ragged lengths: an empty row (2), a length-1 row (3), a fully masked row (5, below)
LENGTHS = [5, 3, 0, 1, 6, 4, 2]


def _mm(v: torch.Tensor, m: torch.Tensor, dim: int | None = None, norm=None, eps: float = NEMO_EPS):
    """NeMo-RL's masked_mean: sum(v m) / (sum(m) or the global factor + 1e-8); eps 0: the 1e-8
    left out (an empty row's 0 / 0 taken as 0, as NeMo-RL's 0 / 1e-8)."""
    n = torch.as_tensor((m.sum() if dim is None else m.sum(dim)) if norm is None else norm)
    return ((v * m).sum() if dim is None else (v * m).sum(dim)) / (n + eps if eps else n.clamp(min=1))


def _calc_kl(lp, ref, kl_type, in_c=20.0, out_c=10.0, w=None):
    """NeMo-RL's calculate_kl: logr = ref - logp clamped to [-in_c, in_c] (the weight detached where
    it clamps), k1 -logr, k2 logr^2 / 2, k3 exp(logr) - 1 - logr, times w, clamped to [-out_c, out_c]."""
    logr = ref - lp
    if in_c is not None:
        lc = logr.clamp(-in_c, in_c)
        w = None if w is None else torch.where(logr == lc, w, w.detach())
        logr = lc
    kl = {"k1": -logr, "k2": logr.square() / 2, "k3": torch.exp(logr) - 1 - logr}[kl_type]
    kl = kl if w is None else w * kl
    return kl if out_c is None else kl.clamp(-out_c, out_c)


def _data(seed: int, per_token: bool = False) -> dict:
    """Padded NeMo-RL tensors (already shifted to the response positions): logp, prev_logprobs,
    generation_logprobs, reference_policy_logprobs, advantages, token_mask with holes, sample_mask
    (row 1 off); ratios far outside the bands (rows 0 and 6), one at a band's edge (row 1), one
    above it with A > 0 and a KL past the output clamp (row 4), an A = 0 row; and softgate's
    ragged twin."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(LENGTHS), max(LENGTHS)
    logp = -torch.rand(b, t, generator=g, dtype=F64) * 2 - 0.05
    old = (logp + 0.35 * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=-1e-3)
    old[0, :2] = logp[0, :2] - 2.5  # r = e^2.5
    logp[6, :2], old[6, :2] = -4.0, -1.0  # r = e^-3
    old[1, 0] = logp[1, 0] - math.log1p(0.2)  # r at 1 + 0.2
    old[4] = logp[4] - 1.5  # r = e^1.5, A > 0 (clip high)
    gen = (old + 0.25 * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=-1e-3)
    logp[0, 2], old[0, 2], gen[0, 2] = -2.5, -2.5, -1.5  # a mismatch weight e^-1, below every lower bound
    ref = (logp + 0.7 * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=-1e-3)
    logp[4, 0], ref[4, 0] = -3.5, -0.5  # x = 3: k3 = e^3 - 4 > 10
    keep = torch.arange(t) < torch.tensor(LENGTHS)[:, None]
    tm = (keep & (torch.rand(b, t, generator=g) < 0.8)).to(F64)
    tm[4, :2] = tm[0, 2] = 1.0
    tm[5] = 0.0  # fully masked row
    sm = torch.ones(b, dtype=F64)
    sm[1] = 0.0  # sample_mask off: out of the loss and of global_valid_seqs
    if per_token:
        adv = torch.randn(b, t, generator=g, dtype=F64)
    else:
        a = torch.randn(b, generator=g, dtype=F64)
        a[3] = 0.0
        a[0], a[4], a[6] = -1.1, 0.8, -0.9  # A < 0 at r = e^2.5 (dual clip), e^-3 (clip low)
        adv = a[:, None].expand(b, t).clone()
    mask = tm * sm[:, None]
    batch = Batch(
        logp=logp[keep],
        offsets=Batch.offsets_from_lengths(torch.tensor(LENGTHS)),
        old_logp=old[keep],
        mask=mask[keep].bool(),
        ref_logp=ref[keep],
        rollout_logp=gen[keep],
        advantages=adv[keep] if per_token else adv[:, 0],
        advantage_level="token" if per_token else "sequence",
    )
    return dict(
        logp=logp, prev=old, gen=gen, ref=ref, adv=adv, tm=tm, sm=sm, mask=mask, keep=keep, batch=batch
    )


def _token_mean(d: dict, kl: KLConfig | None = None, mismatch: MismatchConfig | None = None, **obj) -> dict:
    """softgate's token_mean with num_tokens = global_valid_toks + NeMo-RL's 1e-8."""
    agg = AggregationConfig(mode="token_mean", num_tokens=float(d["mask"].sum()) + NEMO_EPS)
    return dict(aggregation=agg, kl=kl, mismatch=mismatch, **obj)


def _seq_mean(d: dict, eps: float, kl: KLConfig | None = None, mismatch: MismatchConfig | None = None, **obj):
    """softgate's seq_mean_token_mean with num_seqs = global_valid_seqs (+ eps): sum(sample_mask),
    empty rows included."""
    agg = AggregationConfig(mode="seq_mean_token_mean", num_seqs=float(d["sm"].sum()) + eps)
    return dict(aggregation=agg, kl=kl, mismatch=mismatch, **obj)


def _check(d: dict, want: torch.Tensor, x: torch.Tensor, cfg: LossConfig, rtol: float = 1e-12):
    (grad,) = torch.autograd.grad(want, x)
    res = E.loss(d["batch"], cfg)
    assert res.loss == pytest.approx(float(want.detach()), rel=rtol, abs=1e-15)
    torch.testing.assert_close(res.grad, grad[d["keep"]], rtol=rtol, atol=1e-15)
    return res, grad


def _clip_loss(r, rc, a, c):
    """ClippedPGLossFn's per-token loss: max(-A r, -A clamp(r)); dual clip: min(that, -A c) for A < 0."""
    loss = torch.max(-a * r, -a * rc)
    return loss if c is None else torch.where(a < 0, torch.min(loss, -a * c), loss)


@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize(("lo", "hi"), [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("token_level", [True, False])
def test_clipped_pg_is_grpo(lo: float, hi: float, dual: float | None, token_level: bool) -> None:
    """ClippedPGLossFn [loss/loss_functions.py @ 006907a9] with ratio_clip_min / ratio_clip_max /
    ratio_clip_c: r = exp(logp - prev), per-token max(-A r, -A clamp(r, 1 - min, 1 + max)), dual
    clip min(., -A c) for A < 0. token_level_loss true: masked_mean over token_mask * sample_mask
    by global_valid_toks (+1e-8): objective grpo, token_mean, num_tokens = that. false: the
    rows' token means (each / (n_i + 1e-8)) averaged by global_valid_seqs = sum(sample_mask)
    (+1e-8), empty rows counted: seq_mean_token_mean, num_seqs = it; exact with the 1e-8 left out
    of the rows' means, within 1e-7 with it. probs_ratio, its min and max = ratio_mean / _min / _max."""
    d = _data(7)
    x = d["logp"].clone().requires_grad_(True)
    r = torch.exp(x - d["prev"])
    loss = _clip_loss(r, r.clamp(1 - lo, 1 + hi), d["adv"], dual)
    obj = Grpo(eps_low=lo, eps_high=hi, dual_clip=dual)
    if token_level:
        want = _mm(loss, d["mask"], norm=d["mask"].sum())
        res, _ = _check(d, want, x, LossConfig(objective=obj, **_token_mean(d)))
    else:
        row = _mm(loss, d["tm"], dim=-1, eps=0.0)
        want = _mm(row, d["sm"], norm=d["sm"].sum(), eps=0.0)
        res, _ = _check(d, want, x, LossConfig(objective=obj, **_seq_mean(d, 0.0)))
        nemo = _mm(_mm(loss.detach(), d["tm"], dim=-1), d["sm"], norm=d["sm"].sum())  # with NeMo-RL's 1e-8
        assert float(nemo) == pytest.approx(res.loss, rel=1e-7)
        assert float(nemo) != pytest.approx(res.loss, rel=1e-12)
    rs = r.detach()[d["mask"].bool()]
    assert res.metrics["ratio_mean"] == pytest.approx(float(rs.mean()), rel=1e-12)
    assert res.metrics["ratio_min"] == pytest.approx(float(rs.min()), rel=1e-12)
    assert res.metrics["ratio_max"] == pytest.approx(float(rs.max()), rel=1e-12)
    # the clips and the dual clip are all exercised (NeMo-RL logs no clip fraction)
    assert res.metrics["clip_low"] > 0 and res.metrics["clip_high"] > 0
    assert (res.metrics["dual_clip"] > 0) == (dual is not None)


@pytest.mark.parametrize("dual", [None, 2.0])
def test_sequence_level_importance_ratios_is_gspo(dual: float | None) -> None:
    """sequence_level_importance_ratios with token_level_loss false [006907a9]: the row's ratio
    exp(masked_mean(logp - prev, token_mask)), its gradient through the mean, clipped per token
    with ratio_clip_min / max (and ratio_clip_c), sequence-level aggregation: objective gspo with
    the same bounds, seq_mean_token_mean. NeMo-RL's 1e-8 in the mean's denominator moves log s_i by
    1e-8 / n_i relative (left out here). probs_ratio (the token mean of s_i) = ratio_mean."""
    d = _data(8)
    d["adv"][[0, 4]] *= -1  # A > 0 at s = 1.6 (clip high), A < 0 at s = 2.5 (dual clip)
    d["batch"] = dataclasses.replace(d["batch"], advantages=d["adv"][:, 0])
    x = d["logp"].clone().requires_grad_(True)
    s = torch.exp(_mm(x - d["prev"], d["tm"], dim=-1, eps=0.0))[:, None].expand_as(x)
    loss = _clip_loss(s, s.clamp(1 - 0.1, 1 + 0.15), d["adv"], dual)
    want = _mm(_mm(loss, d["tm"], dim=-1, eps=0.0), d["sm"], norm=d["sm"].sum(), eps=0.0)
    obj = Gspo(eps_low=0.1, eps_high=0.15, dual_clip=dual)
    res, _ = _check(d, want, x, LossConfig(objective=obj, **_seq_mean(d, 0.0)))
    sel = d["mask"].bool()
    assert res.metrics["ratio_mean"] == pytest.approx(float(s.detach()[sel].mean()), rel=1e-12)
    assert res.metrics["clip_low"] > 0 and res.metrics["clip_high"] > 0
    assert (res.metrics["dual_clip"] > 0) == (dual is not None)


def test_disable_ppo_ratio_is_cispo_with_a_zero_band() -> None:
    """disable_ppo_ratio (REINFORCE / RLOO) [006907a9]: ratios = logp, so the loss is -A logp
    (dual clip: min(-A logp, -A c) = -A logp for A < 0, a no-op): objective cispo with
    eps_low = eps_high = 0 (-sg[clip(r, 1, 1)] A logp). Its probs_ratio is then the mean logp."""
    d = _data(9)
    x = d["logp"].clone().requires_grad_(True)
    want = _mm(_clip_loss(x, x, d["adv"], 3.0), d["mask"], norm=d["mask"].sum())
    _check(d, want, x, LossConfig(objective=Cispo(eps_low=0.0, eps_high=0.0), **_token_mean(d)))


def test_force_on_policy_ratio_is_grpo_on_policy() -> None:
    """force_on_policy_ratio [006907a9]: prev = logp.detach(), r = exp(logp - sg[logp]) = 1 with
    gradient r: grpo without old_logp (softgate's on-policy old = logp), dual clip inert."""
    d = _data(10)
    x = d["logp"].clone().requires_grad_(True)
    r = torch.exp(x - x.detach())
    want = _mm(_clip_loss(r, r, d["adv"], 3.0), d["mask"], norm=d["mask"].sum())
    (grad,) = torch.autograd.grad(want, x)
    res = E.loss(
        dataclasses.replace(d["batch"], old_logp=None),
        LossConfig(objective=Grpo(dual_clip=3.0), **_token_mean(d)),
    )
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(res.grad, grad[d["keep"]], rtol=1e-12, atol=1e-15)


def test_use_cispo_is_cispo() -> None:
    """use_cispo [006907a9]: -A sg[clamp(r, 1 - ratio_clip_min, 1 + ratio_clip_max)] logp, token
    level: objective cispo with eps_low = ratio_clip_min, eps_high = ratio_clip_max (NeMo-RL's
    defaults 0.2 / 0.2; softgate's 1.0 / 0.28 are MiniMax-M1's). Per-token advantages."""
    d = _data(11, per_token=True)
    x = d["logp"].clone().requires_grad_(True)
    r = torch.exp(x - d["prev"])
    want = _mm(-d["adv"] * r.clamp(0.8, 1.28).detach() * x, d["mask"], norm=d["mask"].sum())
    _check(d, want, x, LossConfig(objective=Cispo(eps_low=0.2, eps_high=0.28), **_token_mean(d)))


@pytest.mark.parametrize("out_c", [10.0, None])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("token_level", [True, False])
def test_reference_policy_kl_penalty(kl_type: str, out_c: float | None, token_level: bool) -> None:
    """reference_policy_kl_penalty beta, reference_policy_kl_type, kl_output_clamp_value (the older
    ClippedPGLossFn, loss_functions.py @ 005a098a, with utils.py's calculate_kl): beta k of
    x = ref - logp, x clamped to +-kl_input_clamp_value (20), k to +-kl_output_clamp_value (10;
    gradient 0 past it), aggregated as the policy term: kl_estimator k1 / k2 / k3, kl_beta,
    kl_value_clamp = the output clamp. NeMo-RL's kl_penalty metric (the aggregated KL / beta) is
    kl_loss / beta at both levels (kl_mean only at token level). Row 4 has a k3 past 10."""
    d = _data(12)
    x = d["logp"].clone().requires_grad_(True)
    r = torch.exp(x - d["prev"])
    pol = _clip_loss(r, r.clamp(0.8, 1.2), d["adv"], None)
    k = _calc_kl(x, d["ref"], kl_type, 20.0, out_c)
    kl_cfg = KLConfig(estimator=kl_type, beta=0.05, value_clamp=out_c)
    if token_level:
        n = d["mask"].sum()
        want = _mm(pol, d["mask"], norm=n) + _mm(0.05 * k, d["mask"], norm=n)
        res, _ = _check(d, want, x, LossConfig(objective=Grpo(), **_token_mean(d, kl=kl_cfg)))
        assert res.metrics["kl_mean"] == pytest.approx(float(_mm(k.detach(), d["mask"], eps=0.0)), rel=1e-12)
        kl_agg = _mm(k, d["mask"], norm=n)
    else:
        n = d["sm"].sum()
        agg = lambda v: _mm(_mm(v, d["tm"], dim=-1, eps=0.0), d["sm"], norm=n, eps=0.0)  # noqa: E731
        want = agg(pol) + agg(0.05 * k)
        res, _ = _check(d, want, x, LossConfig(objective=Grpo(), **_seq_mean(d, 0.0, kl=kl_cfg)))
        kl_agg = agg(k)
    assert res.metrics["kl_loss"] / 0.05 == pytest.approx(float(kl_agg.detach()), rel=1e-7)


def _nemo_kl(kl_type: str, beta: float, out_c: float | None, on_policy: bool = False) -> KLConfig:
    """The client's kl_from_nemo_rl of these settings, as the engine's KLConfig: the mapping is
    what the tests below compare with NeMo-RL's KL."""
    c = kl_from_nemo_rl(kl_type, beta, out_c, use_on_policy_kl_approximation=on_policy)
    assert c is not None and c.estimator is not None and c.weight is not None
    return KLConfig(estimator=c.estimator, beta=c.beta, value_clamp=c.value_clamp, weight=c.weight)  # type: ignore[arg-type]


@pytest.mark.parametrize("out_c", [None, 10.0])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_with_score_function_gradient_is_the_score_weight(kl_type: str, out_c: float | None) -> None:
    """The newer ClippedPGLossFn [loss/loss_functions.py @ 006907a9] weights the KL by
    w = exp(logp - sg[logp]) (value 1) before its output clamp, so its gradient is k + dk/dlogp
    (k3: -x; k1: 1 - x; k2: x^2 / 2 - x), 0 past the clamp: kl_weight "score" with the clamp as
    kl_value_clamp, as the client's kl_from_nemo_rl gives. Row 4's k3 is past 10. (k3_st has
    k3's gradient -x too, but keeps it past the clamp.)"""
    d = _data(13)
    x = d["logp"].clone().requires_grad_(True)
    w = torch.exp(x - x.detach())
    want = _mm(0.05 * _calc_kl(x, d["ref"], kl_type, 20.0, out_c, w), d["mask"], norm=d["mask"].sum())
    d["batch"] = dataclasses.replace(d["batch"], advantages=torch.zeros(len(LENGTHS), dtype=F64))
    kl_cfg = _nemo_kl(kl_type, 0.05, out_c)
    assert kl_cfg.weight == "score"
    res, grad = _check(d, want, x, LossConfig(objective=Grpo(), **_token_mean(d, kl=kl_cfg)))
    if kl_type == "k3":  # row 4's token, k3 = e^3 - 4: no gradient past the clamp, -x = -3 without it
        want4 = 0.0 if out_c else 0.05 * -3.0 / float(d["mask"].sum() + NEMO_EPS)
        assert float(grad[4, 0]) == pytest.approx(want4, rel=1e-12, abs=0.0)
        if out_c is None:
            st = E.loss(
                d["batch"], LossConfig(objective=Grpo(), **_token_mean(d, kl=KLConfig("k3_st", 0.05)))
            )
            torch.testing.assert_close(st.grad, res.grad, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("out_c", [None, 10.0])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_on_policy_kl_approximation_is_the_sampler_ratio_weight(kl_type: str, out_c: float | None) -> None:
    """use_on_policy_kl_approximation [006907a9]: the KL weighted by w = exp(logp -
    generation_logprobs) with w's gradient, then the output clamp (Nemotron 3 Nano's recipe sets
    it with the IS correction): kl_weight "sampler_ratio" with the generation log-probs as
    rollout_logp (the client's kl_from_nemo_rl with the flag). With generation = prev it is the
    ratio weight, and for k3 k3_is (TRL's).
    The older ClippedPGLossFn [005a098a] detached w (gradient w dk): no softgate estimator."""
    d = _data(14)
    x = d["logp"].clone().requires_grad_(True)
    w = torch.exp(x - d["gen"])
    want = _mm(0.1 * _calc_kl(x, d["ref"], kl_type, 20.0, out_c, w), d["mask"], norm=d["mask"].sum())
    d["batch"] = dataclasses.replace(d["batch"], advantages=torch.zeros(len(LENGTHS), dtype=F64))
    kl_cfg = _nemo_kl(kl_type, 0.1, out_c, on_policy=True)
    assert kl_cfg.weight == "sampler_ratio"
    _check(d, want, x, LossConfig(objective=Grpo(), **_token_mean(d, kl=kl_cfg)))
    # the sampler as the old policy: the ratio weight (k3: k3_is) reads old_logp instead
    d["batch"] = dataclasses.replace(d["batch"], rollout_logp=None)
    ratio_cfgs = [dataclasses.replace(kl_cfg, weight="ratio")]
    if kl_type == "k3":
        ratio_cfgs.append(KLConfig("k3_is", 0.1, value_clamp=out_c))
    for cfg in ratio_cfgs:
        w = torch.exp(x - d["prev"])
        want = _mm(0.1 * _calc_kl(x, d["ref"], kl_type, 20.0, out_c, w), d["mask"], norm=d["mask"].sum())
        _check(d, want, x, LossConfig(objective=Grpo(), **_token_mean(d, kl=cfg)))


IS_CASES = [
    ("tis", None, 1.3, MismatchConfig(mode="truncate", cap=1.3)),
    ("tis", 0.5, 1.5, MismatchConfig(mode="truncate", floor=0.5, cap=1.5)),
    ("icepop", 0.5, 1.5, MismatchConfig(mode="mask", lo=0.5, hi=1.5)),
    ("seq-mask-tis", 0.95, 1.05, MismatchConfig(mode="seq_mask", lo=0.95, hi=1.05)),
    (None, None, None, MismatchConfig(mode="truncate", cap=1e30)),  # the correction untruncated
]


@pytest.mark.parametrize(("kind", "lo", "hi", "mm"), IS_CASES)
def test_importance_sampling_correction(kind: str | None, lo: float | None, hi: float | None, mm) -> None:
    """use_importance_sampling_correction with truncated_importance_sampling_type [006907a9]:
    w = exp(prev - generation) per token on the policy term only; tis clamps it to
    [ratio_min or 0, ratio], icepop zeroes it outside [ratio_min, ratio], seq-mask-tis zeroes a
    row whose geometric mean exp(masked_mean(prev - gen, token_mask)) is outside it (tokens keep
    their own w): mismatch_mode truncate (mismatch_floor, mismatch_cap), mask, seq_mask. Metrics:
    sampling_importance_ratio = mismatch_weight_mean; tis / icepop's is_oob_ratio =
    mismatch_clipped_frac (seq-mask-tis's counts rows, softgate's tokens); gen_kl_error with k1 /
    k3 = rollout_kl / rollout_k3_kl. The 1e-8 of the geometric mean's masked_mean is left out."""
    d = _data(15)
    x = d["logp"].clone().requires_grad_(True)
    r = torch.exp(x - d["prev"])
    w = torch.exp(d["prev"] - d["gen"])
    m, n = d["mask"], d["mask"].sum()
    oob = None
    if kind == "tis":
        lo0 = 0.0 if lo is None else lo
        oob = (w > hi) | (w < lo0)
        w = w.clamp(lo0, hi)
    elif kind == "icepop":
        oob = (w < lo) | (w > hi)
        w = torch.where(oob, torch.zeros_like(w), w)
    elif kind == "seq-mask-tis":
        geo = torch.exp(_mm(d["prev"] - d["gen"], d["tm"], dim=-1, eps=0.0))
        kept = (geo >= lo) & (geo <= hi)
        assert kept.any() and (~kept & (m.sum(-1) > 0)).any()  # rows with trained tokens dropped and kept
        w = w * kept.to(F64)[:, None]
    want = _mm(w * _clip_loss(r, r.clamp(0.8, 1.2), d["adv"], None), m, norm=n)
    res, _ = _check(d, want, x, LossConfig(objective=Grpo(), **_token_mean(d, mismatch=mm)))
    assert res.metrics["mismatch_weight_mean"] == pytest.approx(float(_mm(w, m, eps=0.0)), rel=1e-12)
    if oob is not None:
        assert (
            0
            < res.metrics["mismatch_clipped_frac"]
            == pytest.approx(float(_mm(oob.to(F64), m, eps=0)), rel=1e-12)
        )
    gen_kl = {k: _mm(_calc_kl(d["gen"], d["prev"], k, None, None), m, eps=0.0) for k in ("k1", "k3")}
    assert res.metrics["rollout_kl"] == pytest.approx(float(gen_kl["k1"]), rel=1e-12)
    assert res.metrics["rollout_k3_kl"] == pytest.approx(float(gen_kl["k3"]), rel=1e-12)


@pytest.mark.parametrize("kind", ["tis", "icepop"])
def test_sequence_level_importance_weights(kind: str) -> None:
    """With sequence_level_importance_ratios [006907a9] the IS weight is the row's
    exp(sum((prev - gen) * mask)), truncated (tis) or zeroed (icepop) as a whole: GSPO with
    mismatch_level sequence. sampling_importance_ratio is then its mean over sample_mask rows
    (softgate's mismatch_weight_mean is over tokens: not mapped)."""
    d = _data(16)
    x = d["logp"].clone().requires_grad_(True)
    s = torch.exp(_mm(x - d["prev"], d["tm"], dim=-1, eps=0.0))[:, None].expand_as(x)
    w = torch.exp(((d["prev"] - d["gen"]) * d["mask"]).sum(-1))[:, None]
    if kind == "tis":
        w, mm = w.clamp(max=1.2), MismatchConfig(level="sequence", mode="truncate", cap=1.2)
    else:
        w = torch.where((w >= 0.6) & (w <= 1.6), w, torch.zeros_like(w))
        mm = MismatchConfig(level="sequence", mode="mask", lo=0.6, hi=1.6)
    loss = w * _clip_loss(s, s.clamp(0.9, 1.15), d["adv"], None)
    want = _mm(_mm(loss, d["tm"], dim=-1, eps=0.0), d["sm"], norm=d["sm"].sum(), eps=0.0)
    _check(
        d, want, x, LossConfig(objective=Gspo(eps_low=0.1, eps_high=0.15), **_seq_mean(d, 0.0, mismatch=mm))
    )


def _baseline_std(gid: torch.Tensor, r: torch.Tensor, loo: bool):
    """calculate_baseline_and_std_per_prompt [utils.py @ 00439539], every sample valid: per prompt
    the (leave-one-out) mean and sqrt((E[R^2] - mean^2) n_v / (n_v - 1)) over n_v members (n - 1
    with leave-one-out), NaN -> 0; a prompt of one sample: baseline = R."""
    base, std = r.clone(), torch.zeros_like(r)
    for u in gid.unique():
        idx = (gid == u).nonzero()[:, 0]
        if len(idx) <= 1:
            continue
        mat = 1 - torch.eye(len(idx), dtype=F64) if loo else torch.ones(len(idx), len(idx), dtype=F64)
        nv = torch.tensor(len(idx) - int(loo), dtype=F64)
        b, sq = mat @ r[idx] / nv, mat @ r[idx].square() / nv
        base[idx], std[idx] = b, ((sq - b.square()) * (nv / (nv - 1))).sqrt().nan_to_num(0)
    return base, std


GIDS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 4, 5, 5, 5, 5])  # sizes 4, 3, 1, 3, 2, 4
REWARDS = torch.tensor([1, 0, 0.5, 0.2, 0.3, 0.3, 0.3, 0.7, 1, 0, 0, 0.2, 0.9, 0, 0, 0, 1], dtype=F64)


@pytest.mark.parametrize(
    ("loo", "normalize", "estimator", "scale"),
    [
        (False, True, "grpo", None),
        (False, False, "dr_grpo", None),
        (True, False, "rloo", None),
        (True, True, "rloo", "leave_one_out"),  # NeMo-RL's default
    ],
)
def test_grpo_advantage_estimator(loo: bool, normalize: bool, estimator: str, scale: str | None) -> None:
    """GRPOAdvantageEstimator [advantage_estimator.py @ 00925dd1]: A = R - baseline, divided by
    std + 1e-6 where std > 0 (normalize_rewards): use_leave_one_out_baseline false: grpo (unbiased
    group std, eps 1e-6; NeMo-RL versions without the epsilon: adv_eps=0) or dr_grpo;
    leave-one-out without normalize_rewards: rloo; with it (the default): rloo with scale
    leave_one_out, each member over the std of its others. Singleton (group 2) and all-equal
    (group 1) groups: 0 in both."""
    base, std = _baseline_std(GIDS, REWARDS, loo)
    want = REWARDS - base
    if normalize:
        want = torch.where(std > 0, want / (std + 1e-6), want)
    got = E.advantages(REWARDS, GIDS, AdvantageConfig(estimator=estimator, scale=scale)).advantages
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_default_leave_one_out_normalized_advantages_by_hand() -> None:
    """NeMo-RL's default divides each member's leave-one-out advantage by the std of the other
    members. Groups of two have no such std (0 / 0 -> 0): rloo's values there; a member whose
    peers all agree keeps R - mean(peers) undivided (group 3's first member: 1), its peers are
    divided (-0.5 / 0.707); scale leave_one_out does the same, plain rloo does not."""
    base, std = _baseline_std(GIDS, REWARDS, True)
    nemo = torch.where(std > 0, (REWARDS - base) / (std + 1e-6), REWARDS - base)
    rloo = E.advantages(REWARDS, GIDS, AdvantageConfig(estimator="rloo")).advantages
    loo = E.advantages(REWARDS, GIDS, AdvantageConfig(estimator="rloo", scale="leave_one_out")).advantages
    pair = GIDS == 4
    torch.testing.assert_close(nemo[pair], rloo[pair], rtol=1e-12, atol=0)
    assert float(nemo[8]) == 1.0 and float(nemo[9]) == pytest.approx(-0.5 / math.sqrt(0.5), rel=1e-5)
    assert float(loo[8]) == 1.0 and float(loo[9]) == pytest.approx(-0.5 / math.sqrt(0.5), rel=1e-5)
    assert not torch.allclose(nemo[~pair], rloo[~pair])


@pytest.mark.parametrize(
    ("minus_baseline", "estimator"), [(True, "reinforce_pp_baseline"), (False, "reinforce_pp")]
)
def test_reinforce_plus_plus(minus_baseline: bool, estimator: str) -> None:
    """ReinforcePlusPlusAdvantageEstimator [00925dd1]: R minus the group mean (minus_baseline), then
    (a - mean) * rsqrt(max(var, 1e-8)) over the trained tokens with the population variance:
    softgate's reinforce_pp_baseline / reinforce_pp with adv_eps=0 whiten with the unbiased one,
    so NeMo-RL's advantages are sqrt(N / (N - 1)) times softgate's (N trained tokens), here with no
    degenerate group (softgate keeps those members 0, NeMo-RL whitens their 0 to -mean / std)."""
    gid = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    r = torch.tensor([1, 0, 0.5, 0.3, 0.9, 0.1, 0, 0.2, 0.8, 1, 0, 0], dtype=F64)
    lengths = torch.tensor([3, 5, 0, 2, 4, 1, 6, 3, 2, 4, 5, 3])
    keep = torch.arange(int(lengths.max())) < lengths[:, None]
    mask = (keep & (torch.rand(keep.shape, generator=torch.Generator().manual_seed(0)) < 0.8)).to(F64)
    a = r - _baseline_std(gid, r, False)[0] if minus_baseline else r
    a = a[:, None].expand(mask.shape)
    mu = (a * mask).sum() / mask.sum()
    want = (a - mu) * (((a - mu).square() * mask).sum() / mask.sum()).clamp(min=1e-8).rsqrt()
    logp = -torch.rand(int(lengths.sum()), generator=torch.Generator().manual_seed(1), dtype=F64) - 0.1
    batch = Batch(
        logp=logp,
        offsets=Batch.offsets_from_lengths(lengths),
        mask=mask[keep].bool(),
        rewards=r,
        group_ids=gid,
    )
    cfg = LossConfig(objective=Grpo(), advantages=AdvantageConfig(estimator=estimator, eps=0.0))
    res = E.loss(batch, cfg)
    n = float(mask.sum())
    m = batch.mask
    torch.testing.assert_close(
        want[keep][m], res.advantages[m] * math.sqrt(n / (n - 1)), rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("kl_type", ["k1", "k3"])
@pytest.mark.parametrize(
    ("minus_baseline", "estimator"), [(True, "reinforce_pp_baseline"), (False, "reinforce_pp")]
)
def test_reinforce_plus_plus_use_kl_in_reward(minus_baseline: bool, estimator: str, kl_type: str) -> None:
    """ReinforcePlusPlusAdvantageEstimator with use_kl_in_reward [00925dd1]: each token's
    advantage less reference_policy_kl_penalty times its own calculate_kl (x = ref - prev clamped
    at 20, k clamped at 10 by its defaults), then whitened with the population variance: reward_kl
    at level immediate with value_clamp 10, the sqrt(N / (N - 1)) of the test above between them."""
    gid = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    r = torch.tensor([1, 0, 0.5, 0.3, 0.9, 0.1, 0, 0.2, 0.8, 1, 0, 0], dtype=F64)
    lengths = torch.tensor([3, 5, 0, 2, 4, 1, 6, 3, 2, 4, 5, 3])
    keep = torch.arange(int(lengths.max())) < lengths[:, None]
    g = torch.Generator().manual_seed(0)
    mask = (keep & (torch.rand(keep.shape, generator=g) < 0.8)).to(F64)
    prev = -torch.rand(keep.shape, generator=g, dtype=F64) * 2 - 0.05
    ref = (prev + 0.8 * torch.randn(keep.shape, generator=g, dtype=F64)).clamp(max=-1e-3)
    prev[1, 0], ref[1, 0], mask[1, 0] = -3.5, -0.01, 1.0  # k3 = e^3.49 - 4.49 > 10: clamped
    a = r - _baseline_std(gid, r, False)[0] if minus_baseline else r
    a = a[:, None].expand(mask.shape) - 0.05 * _calc_kl(prev, ref, kl_type)
    mu = (a * mask).sum() / mask.sum()
    want = (a - mu) * (((a - mu).square() * mask).sum() / mask.sum()).clamp(min=1e-8).rsqrt()
    batch = Batch(
        logp=prev[keep],
        offsets=Batch.offsets_from_lengths(lengths),
        mask=mask[keep].bool(),
        ref_logp=ref[keep],
        rewards=r,
        group_ids=gid,
    )
    rk = RewardKLConfig(beta=0.05, estimator=kl_type, level="immediate", value_clamp=10.0)
    cfg = LossConfig(objective=Grpo(), advantages=AdvantageConfig(estimator=estimator, eps=0.0), reward_kl=rk)
    res = E.loss(batch, cfg)
    n, m = float(mask.sum()), batch.mask
    torch.testing.assert_close(
        want[keep][m], res.advantages[m] * math.sqrt(n / (n - 1)), rtol=1e-12, atol=1e-15
    )
