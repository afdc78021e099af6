"""softgate against AReaL's RL loss code, each formula written out on padded [B, T] float64
tensors (AReaL's 2-D layout), with autograd for AReaL's gradient, compared with softgate's
loss, per-token gradient and metrics (docs/peers.md, "From AReaL").

Files read (formulas transcribed, not copied):
- areal-project/AReaL areal/utils/functional/functional.py @ 2fd54e7d (ppo_actor_loss_fn,
  apply_rejection_sampling, sapo_loss_fn, cispo_loss_fn);
- inclusionAI/AReaL areal/utils/functional.py @ 072480e2 (the earlier ppo_actor_loss_fn with
  behav_imp_weight_cap);
- areal-project/AReaL areal/trainer/ppo/actor.py @ 5d10f4ee (compute_advantages, grpo_loss_fn,
  _apply_m2po_masking, the micro-batch weight loss_mask.count_nonzero());
- areal-project/AReaL areal/utils/data.py @ 1f7658c1 (Normalization, KLEstimator);
- areal-project/AReaL areal/api/cli_args.py @ 1171d1ca (NormConfig, PPOActorConfig,
  RejectionSamplingConfig defaults).

AReaL's three policies map onto softgate's three log-probs: pi_theta = logp, pi_proximal =
old_logp (the recomputed log-probs; AReaL's `prox_logp`), pi_behave = rollout_logp (the
inference engine's; AReaL's `old_logprobs` / `logprobs`).
"""

from __future__ import annotations

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
    RejectionCriterion,
    RewardKLConfig,
    Sapo,
    SapoSeq,
)

F64 = torch.float64
E = Engine(device="cpu", compile=False)
TOKEN_MEAN = AggregationConfig(mode="token_mean")
NO_CAP = 1e300  # a mismatch cap above every weight: AReaL's unbounded pi_proximal / pi_behave

# empty, length-1 and fully masked sequences, holes in the masks (seeded)
LENGTHS = [5, 0, 3, 7, 1, 6, 4, 2]
ADV = [1.3, 0.7, -0.6, 0.4, -1.1, -2.0, 0.0, 0.9]


def _padded(seed: int, lengths: list[int] = LENGTHS, spread: float = 0.5):
    """logp, prox, behave, mask, keep ([B, T]); row 4 fully masked; a few ratios pushed far
    past any clip band (both sides), the rest within ~spread of 1 in log space."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    logp = -torch.rand(b, t, generator=g, dtype=F64) * 2 - 0.05
    prox = (logp + spread * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=-1e-3)
    behave = (prox + spread * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=-1e-3)
    keep = torch.arange(t) < torch.tensor(lengths)[:, None]
    mask = keep & (torch.rand(b, t, generator=g) < 0.8)
    mask[4] = False
    prox[0, 1] = logp[0, 1] - 3.0  # r = e^3
    logp[2, 0] = prox[2, 0] - 3.0  # r = e^-3
    prox[5, 2] = logp[5, 2] - 2.5  # an A < 0 token past the dual clip
    mask[0, 1] = mask[2, 0] = mask[5, 2] = True
    return logp, prox, behave, mask, keep


def _ragged(logp, prox, behave, mask, keep, lengths=LENGTHS, **kw) -> Batch:
    return Batch(
        logp=logp[keep],
        offsets=Batch.offsets_from_lengths(torch.tensor(lengths)),
        old_logp=prox[keep],
        rollout_logp=behave[keep],
        mask=mask[keep],
        **kw,
    )


def _adv(lengths=LENGTHS) -> torch.Tensor:
    return torch.tensor(ADV[: len(lengths)], dtype=F64)


def _areal_ppo(x, prox, a, m, eps, eps_hi=None, c=None, w=None, count_mask=None):
    """ppo_actor_loss_fn's surrogate: ratio = exp(logp - prox) on the mask, max(-A r, -A
    clip(r)), min with sign(A) c A under the dual clip, times the behaviour weight w, summed
    over the mask and divided by the mask's count (the pre-rejection one, `count_mask`).
    Returns the loss, clip_mask and dual_clip_mask (on the pre-rejection mask)."""
    stat_mask = m if count_mask is None else count_mask
    ratio = torch.where(stat_mask, torch.exp(x - prox), 0)
    clipped = torch.clamp(ratio, 1 - eps, 1 + (eps if eps_hi is None else eps_hi))
    l1, l2 = -a * ratio, -a * clipped
    clip_mask = (l1.detach() < l2.detach()) & stat_mask
    loss = torch.max(l1, l2)
    dual = torch.zeros_like(clip_mask)
    if c is not None:
        l3 = torch.sign(a) * c * a
        dual = (l3.detach() < loss.detach()) & stat_mask
        loss = torch.min(loss, l3)
    if w is not None:
        loss = loss * w
    count = stat_mask.count_nonzero().clamp(min=1)
    return torch.where(m, loss, 0).sum() / count, clip_mask, dual


def _check(res, want, x, keep, rel=1e-12):
    (grad,) = torch.autograd.grad(want, x)
    assert res.loss == pytest.approx(float(want.detach()), rel=rel, abs=1e-15)
    torch.testing.assert_close(res.grad, grad[keep], rtol=rel, atol=1e-15)


@pytest.mark.parametrize(("eps_hi", "c"), [(None, None), (0.28, None), (0.28, 3.0)])
def test_ppo_clip_and_its_metrics(eps_hi: float | None, c: float | None) -> None:
    """ppo_actor_loss_fn (functional.py @ 2fd54e7d) with eps_clip, eps_clip_higher, c_clip, token
    level, no rejection: objective="grpo", eps_low=eps_clip, eps_high=eps_clip_higher (or
    eps_clip), dual_clip=c_clip, token_mean. Its stats: clip_ratio (clip_mask over
    n_valid_tokens; dual-clipped tokens are not in it) = (clip_low tokens_neg + clip_high
    tokens_pos) / num_tokens, dual_clip_ratio = dual_clip tokens_neg / num_tokens,
    approx_kl = -approx_kl, importance_weight = ratio_mean."""
    logp, prox, behave, mask, keep = _padded(1)
    adv = _adv()
    x = logp.clone().requires_grad_(True)
    want, clip_mask, dual = _areal_ppo(x, prox, adv[:, None], mask, 0.2, eps_hi, c)
    batch = _ragged(logp, prox, behave, mask, keep, advantages=adv)
    batch.rollout_logp = None
    obj = Grpo(eps_low=0.2, eps_high=0.2 if eps_hi is None else eps_hi, dual_clip=c)
    res = E.loss(batch, LossConfig(objective=obj, aggregation=TOKEN_MEAN))
    _check(res, want, x, keep)
    mt = res.metrics
    n = mt["num_tokens"]
    assert n == mask.sum()
    clip_ratio = (mt["clip_low"] * mt["tokens_neg"] + mt["clip_high"] * mt["tokens_pos"]) / n
    assert clip_ratio == pytest.approx(clip_mask.sum().item() / n, abs=1e-15)
    assert mt["dual_clip"] * mt["tokens_neg"] / n == pytest.approx(dual.sum().item() / n, abs=1e-15)
    assert dual.any() == (c is not None)
    assert -mt["approx_kl"] == pytest.approx(float(((logp - prox) * mask).sum() / n), rel=1e-12)
    assert mt["ratio_mean"] == pytest.approx(float((torch.exp(logp - prox) * mask).sum() / n), rel=1e-12)


@pytest.mark.parametrize("cap", [None, 1.5])
def test_decoupled_ppo_behav_imp_weight_cap(cap: float | None) -> None:
    """The earlier decoupled loss (inclusionAI functional.py @ 072480e2): the clipped surrogate
    against pi_proximal times w = exp(prox - behave), w zeroed where above
    behav_imp_weight_cap, the count of the whole mask as normaliser: old_logp = prox,
    rollout_logp = behave, mismatch_mode="mask", mismatch_lo=0, mismatch_hi=cap (no cap:
    "truncate" with a cap above every weight). AReaL's behave_imp_weight stat (mean of w over
    the kept tokens) is sum(v) / (num_tokens (1 - mismatch_clipped_frac))."""
    logp, prox, behave, mask, keep = _padded(2, spread=0.6)
    adv = _adv()
    x = logp.clone().requires_grad_(True)
    w = torch.exp(prox - behave)
    kept = (w <= cap) & mask if cap is not None else mask
    if cap is not None:
        assert bool((~kept & mask).any())  # some tokens past the cap
    w = torch.where(kept, w, 0.0)
    want, _, _ = _areal_ppo(x, prox, adv[:, None], mask, 0.2, 0.28, 3.0, w=w)
    mm = (
        MismatchConfig(mode="truncate", cap=NO_CAP)
        if cap is None
        else MismatchConfig(mode="mask", lo=0.0, hi=cap)
    )
    cfg = LossConfig(
        objective=Grpo(eps_low=0.2, eps_high=0.28, dual_clip=3.0), aggregation=TOKEN_MEAN, mismatch=mm
    )
    res = E.loss(_ragged(logp, prox, behave, mask, keep, advantages=adv), cfg)
    _check(res, want, x, keep)
    mt = res.metrics
    n = mt["num_tokens"]
    assert mt["mismatch_clipped_frac"] * n == pytest.approx(float((~kept & mask).sum()), abs=1e-12)
    behave_mean = float(w.sum() / kept.sum())
    assert mt["mismatch_weight_mean"] * n / kept.sum().item() == pytest.approx(behave_mean, rel=1e-12)


@pytest.mark.parametrize(
    ("action", "lower", "upper"),
    [("mask", None, 1.5), ("mask", 0.7, 1.5), ("clamp", None, 1.5), ("clamp", 0.7, 1.5)],
)
def test_rejection_sampling_ratio_token(action: str, lower: float | None, upper: float) -> None:
    """rejection_sampling (functional.py @ 2fd54e7d) with metric="ratio", level="token": "mask"
    zeroes the tokens whose w = exp(prox - behave) is outside [lower, upper] (lower None: no
    bound), keeping them in the normaliser (the pre-rejection count); the kept ones weigh w:
    mismatch_mode="mask", mismatch_lo=lower or 0, mismatch_hi=upper. "clamp" clamps w to
    [lower or 0, upper]: mismatch_mode="truncate", mismatch_floor=lower or 0, mismatch_cap=upper.
    AReaL's rs_filtered_fraction is mismatch_clipped_frac."""
    logp, prox, behave, mask, keep = _padded(3, spread=0.6)
    adv = _adv()
    x = logp.clone().requires_grad_(True)
    w = torch.exp(prox - behave)
    lo = 0.0 if lower is None else lower
    if action == "mask":
        m2 = mask & (w <= upper) & (w >= lo)
        changed = mask & ~m2
        weight = torch.where(m2, w, 0.0)
        mm = MismatchConfig(mode="mask", lo=lo, hi=upper)
    else:
        m2 = mask
        weight = torch.where(mask, w.clamp(min=lo, max=upper), 0.0)
        changed = mask & (weight != w)
        mm = MismatchConfig(mode="truncate", floor=lo, cap=upper)
    assert bool(changed.any())
    want, _, _ = _areal_ppo(x, prox, adv[:, None], m2, 0.2, 0.28, None, w=weight, count_mask=mask)
    cfg = LossConfig(objective=Grpo(eps_low=0.2, eps_high=0.28), aggregation=TOKEN_MEAN, mismatch=mm)
    res = E.loss(_ragged(logp, prox, behave, mask, keep, advantages=adv), cfg)
    _check(res, want, x, keep)
    assert res.metrics["mismatch_clipped_frac"] == pytest.approx(
        changed.sum().item() / mask.sum().item(), abs=1e-15
    )


def _areal_kl_metric(metric: str, d: torch.Tensor) -> torch.Tensor:
    """KLEstimator._compute_approx_kl(prox, behave) unclamped (data.py @ 1f7658c1): k1 = d,
    k2 = d^2 / 2, k3 = exp(-d) - 1 + d, d = prox - behave."""
    if metric == "kl_k1":
        return d
    if metric == "kl_k2":
        return d * d / 2
    return torch.exp(-d) - 1 + d


def _areal_reject(metric, level, agg, lower, upper, d, m):
    """apply_rejection_sampling's kept mask for the KL metrics (action "mask")."""
    k = _areal_kl_metric(metric, d)
    if level == "sequence":
        cnt = m.sum(-1, keepdim=True).clamp(min=1)
        masked = torch.where(m, k, 0.0)
        if agg == "sum":
            k = masked.sum(-1, keepdim=True)
        elif agg == "mean":
            k = masked.sum(-1, keepdim=True) / cnt
        else:
            k = k.masked_fill(~m, -math.inf).max(-1, keepdim=True).values
            k = torch.where(m.sum(-1, keepdim=True) == 0, 0.0, k)
    ok = k <= upper
    if lower is not None:
        ok = ok & (k >= lower)
    return m & ok.expand_as(m)


@pytest.mark.parametrize(
    ("metric", "level", "agg", "lower", "upper"),
    [
        ("kl_k2", "token", "mean", None, 0.08),
        ("kl_k2", "sequence", "sum", None, 0.3),
        ("kl_k2", "sequence", "mean", None, 0.1),
        ("kl_k2", "sequence", "max", None, 0.2),
        ("kl_k1", "token", "mean", -0.3, 0.4),
        ("kl_k1", "token", "mean", None, 0.2),
        ("kl_k1", "sequence", "mean", -0.25, 0.35),
        ("kl_k1", "sequence", "sum", None, 0.2),
        ("kl_k1", "sequence", "max", 0.2, 0.6),
        ("kl_k1", "sequence", "max", None, 0.5),
        ("kl_k3", "token", "mean", None, 0.05),
        ("kl_k3", "sequence", "sum", None, 0.3),
        ("kl_k3", "sequence", "mean", None, 0.06),
        ("kl_k3", "sequence", "max", None, 0.15),
    ],
)
def test_rejection_sampling_kl_mask(
    metric: str, level: str, agg: str, lower: float | None, upper: float
) -> None:
    """rejection_sampling with metric kl_k1 / kl_k2 / kl_k3, action "mask": the rejected tokens lose
    their loss but stay in AReaL's normaliser, and the kept ones weigh the raw w = exp(prox -
    behave): rejection=[RejectionCriterion(...)] with mismatch_mode="truncate",
    mismatch_cap=NO_CAP and num_tokens= the mask's count before rejection. kl_k2 maps as it
    is (level token / seq_sum / seq_mean / seq_max for sequence with agg sum / mean / max), and
    kl_k3, exp(-d) - 1 + d, as statistic="k3_reverse" (softgate's k3 is exp(d) - 1 - d, verl's).
    softgate's k1 is -d where AReaL's is d = prox - behave, and its bounds are ratios: AReaL's
    kl_k1 in [l, u] is statistic="k1", lower=exp(-u), upper=exp(-l) (l None: upper=inf), at
    level token, seq_sum or seq_mean, and seq_min for agg max (the largest d is minus the
    smallest -d)."""
    logp, prox, behave, mask, keep = _padded(4, spread=0.35)
    adv = _adv()
    x = logp.clone().requires_grad_(True)
    d = prox - behave
    m2 = _areal_reject(metric, level, agg, lower, upper, d, mask)
    assert bool((mask & ~m2).any()) and bool(m2.any())  # some rejected, some kept
    w = torch.where(m2, torch.exp(d), 0.0)
    want, _, _ = _areal_ppo(x, prox, adv[:, None], m2, 0.2, 0.28, 3.0, w=w, count_mask=mask)
    lvl = "token" if level == "token" else {"sum": "seq_sum", "mean": "seq_mean", "max": "seq_max"}[agg]
    lvl = "seq_min" if (metric, lvl) == ("kl_k1", "seq_max") else lvl
    if metric in ("kl_k2", "kl_k3"):
        stat = {"kl_k2": "k2", "kl_k3": "k3_reverse"}[metric]
        crit = RejectionCriterion(upper=upper, statistic=stat, level=lvl)
    else:
        crit = RejectionCriterion(
            upper=math.inf if lower is None else math.exp(-lower),
            lower=math.exp(-upper),
            statistic="k1",
            level=lvl,
        )
    cfg = LossConfig(
        objective=Grpo(eps_low=0.2, eps_high=0.28, dual_clip=3.0),
        aggregation=AggregationConfig(mode="token_mean", num_tokens=float(mask.sum())),
        mismatch=MismatchConfig(mode="truncate", cap=NO_CAP),
        rejection=(crit,),
    )
    res = E.loss(_ragged(logp, prox, behave, mask, keep, advantages=adv), cfg)
    _check(res, want, x, keep)
    assert res.metrics["rejected_tokens"] == float((mask & ~m2).sum())


def test_rejection_kl_k3_is_k3_reverse_not_k3() -> None:
    """AReaL's kl_k3 metric is exp(-d) - 1 + d of d = prox - behave (KLEstimator with
    log_probs = prox, base = behave): softgate's k3_reverse; its k3 (verl's) is exp(d) - 1 - d,
    the mirror, which disagrees off d = 0."""
    from softgate.engine.rejection import token_statistic

    d = torch.tensor([-0.8, 0.8], dtype=F64)
    areal = _areal_kl_metric("kl_k3", d)
    torch.testing.assert_close(token_statistic("k3_reverse", d, d, d), areal, rtol=1e-15, atol=0.0)
    assert not torch.allclose(token_statistic("k3", d, d, d), areal)


def _areal_gspo(x, prox, a, m, eps, eps_hi, c):
    """ppo_actor_loss_fn at importance_sampling_level="sequence": each row's ratio exp(masked
    mean of logp - prox), its advantage the masked mean of its tokens' (2fd54e7d's 2-D path),
    then the token-level surrogate above and the token mean."""
    cnt = m.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(torch.where(m, x - prox, 0.0).sum(-1, keepdim=True) / cnt).expand_as(x)
    adv = (torch.where(m, a, 0.0).sum(-1, keepdim=True) / cnt).expand_as(x)
    ratio = torch.where(m, ratio, 0.0)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps_hi)
    loss = torch.max(-adv * ratio, -adv * clipped)
    if c is not None:
        loss = torch.min(loss, torch.sign(adv) * c * adv)
    return torch.where(m, loss, 0).sum() / m.count_nonzero().clamp(min=1)


@pytest.mark.parametrize("c", [None, 3.0])
def test_gspo_sequence_level(c: float | None) -> None:
    """importance_sampling_level="sequence" (GSPO, dual clip included): objective="gspo",
    eps_low=eps_clip, eps_high=eps_clip_higher, dual_clip=c_clip, token_mean (AReaL weighs each
    sequence's loss by its trained tokens). AReaL's own eps_clip (0.2) applies, not GSPO's
    3e-4 / 4e-4 defaults; per-token advantages enter as their per-row mean."""
    logp, prox, behave, mask, keep = _padded(5, spread=0.3)
    prox[5] = logp[5] - 1.4  # row 5 (A < 0): s = e^1.4 > c, dual-clipped
    adv = _adv()
    x = logp.clone().requires_grad_(True)
    want = _areal_gspo(x, prox, adv[:, None].expand_as(logp), mask, 0.2, 0.28, c)
    batch = _ragged(logp, prox, behave, mask, keep, advantages=adv)
    batch.rollout_logp = None
    res = E.loss(
        batch, LossConfig(objective=Gspo(eps_low=0.2, eps_high=0.28, dual_clip=c), aggregation=TOKEN_MEAN)
    )
    _check(res, want, x, keep)
    assert (res.metrics["dual_clip"] > 0) == (c is not None)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sapo(level: str) -> None:
    """sapo_loss_fn (use_sapo_loss, sapo_tau_pos / sapo_tau_neg): -(4 / tau) sigmoid(tau (r -
    1)) A, tau by A > 0, the token mean: objective="sapo" (level sequence, the row's geometric
    mean ratio and mean advantage: "sapo_seq"), tau_pos=, tau_neg=, token_mean."""
    logp, prox, behave, mask, keep = _padded(6, spread=0.3)
    adv = _adv()
    x = logp.clone().requires_grad_(True)
    a = adv[:, None].expand_as(logp)
    cnt = mask.sum(-1, keepdim=True).clamp(min=1)
    if level == "token":
        ratio = torch.exp(x - prox)
    else:
        ratio = torch.exp(torch.where(mask, x - prox, 0.0).sum(-1, keepdim=True) / cnt).expand_as(x)
    tau_pos, tau_neg = 1.0, 1.05
    gate = torch.where(
        a > 0,
        torch.sigmoid(tau_pos * (ratio - 1)) * 4 / tau_pos,
        torch.sigmoid(tau_neg * (ratio - 1)) * 4 / tau_neg,
    )
    want = torch.where(mask, -gate * a, 0).sum() / mask.count_nonzero()
    batch = _ragged(logp, prox, behave, mask, keep, advantages=adv)
    batch.rollout_logp = None
    obj = (
        Sapo(tau_pos=tau_pos, tau_neg=tau_neg)
        if level == "token"
        else SapoSeq(tau_pos=tau_pos, tau_neg=tau_neg)
    )
    _check(E.loss(batch, LossConfig(objective=obj, aggregation=TOKEN_MEAN)), want, x, keep)


@pytest.mark.parametrize("decoupled", [False, True])
def test_cispo(decoupled: bool) -> None:
    """cispo_loss_fn (use_cispo_loss): -sg[clip(r, 1 - eps_clip, 1 + eps_clip_higher)] A logp,
    the token mean; decoupled with token "mask" rejection it also weighs by w: objective="cispo",
    eps_low=eps_clip, eps_high=eps_clip_higher (mismatch_mode="mask" as for PPO). AReaL's
    clip_ratio counts every trained token whose ratio left the band, A = 0 ones too; softgate's
    clip_fraction leaves A = 0 tokens out (they have no gradient to clip)."""
    logp, prox, behave, mask, keep = _padded(7, spread=0.6)
    prox[6, 0], mask[6, 0] = logp[6, 0] - 1.0, True  # an A = 0 token out of the band
    adv = _adv()
    x = logp.clone().requires_grad_(True)
    a = adv[:, None].expand_as(logp)
    ratio = torch.exp(x - prox).detach()
    clipped = ratio.clamp(1 - 1.0, 1 + 0.28)
    loss = -clipped * a * x
    m2 = mask
    if decoupled:
        w = torch.exp(prox - behave)
        m2 = mask & (w <= 2.0)
        loss = loss * torch.where(m2, w, 0.0)
    want = torch.where(m2, loss, 0).sum() / mask.count_nonzero()
    mm = MismatchConfig(mode="mask", lo=0.0, hi=2.0) if decoupled else None
    batch = _ragged(logp, prox, behave, mask, keep, advantages=adv)
    res = E.loss(
        batch, LossConfig(objective=Cispo(eps_low=1.0, eps_high=0.28), aggregation=TOKEN_MEAN, mismatch=mm)
    )
    _check(res, want, x, keep)
    areal_clip = ((clipped != ratio) & mask).sum().item()
    zero_a_out = ((clipped != ratio) & mask & (a == 0)).sum().item()
    assert zero_a_out > 0
    assert res.metrics["clip_fraction"] * res.metrics["num_tokens"] == pytest.approx(areal_clip - zero_a_out)


def _areal_norm(x: torch.Tensor, group: int, leave1out: bool, std: bool, unbiased: bool, eps: float):
    """Normalization (data.py @ 1f7658c1) of per-sequence rewards [B] (no mask), mean_level
    "group" (leave-one-out or not), std_level "group" or None, fixed-size contiguous groups."""
    out = torch.empty_like(x)
    for s in range(0, x.numel(), group):
        xx = x[s : s + group]
        n = xx.numel()
        loo = xx if n == 1 else (xx.sum() - xx) / max(n - 1, 1)
        mean = loo if leave1out else xx.mean().expand_as(xx)
        if not std:
            out[s : s + group] = xx - mean
            continue
        if n == 1 and unbiased:
            sd = torch.ones((), dtype=x.dtype)
        else:
            sd = (((xx - mean) ** 2).sum() / (n - 1 if unbiased else n)).sqrt()
        out[s : s + group] = (xx - mean) / (sd + eps)
    return out


@pytest.mark.parametrize(
    ("leave1out", "std", "estimator", "eps"),
    [(False, True, "grpo", 1e-5), (False, False, "dr_grpo", 1e-6), (True, False, "rloo", 1e-6)],
)
def test_reward_norm_group(leave1out: bool, std: bool, estimator: str, eps: float) -> None:
    """reward_norm = NormConfig(mean_level="group", std_level="group", group_size=G) (the
    GRPO recipe; std_unbiased True and eps 1e-5 by default): estimator="grpo", adv_eps=1e-5;
    std_level None: "dr_grpo"; mean_leave1out with std_level None: "rloo". Groups of G
    consecutive sequences (group_ids = index // G). Singleton and all-equal groups give 0 in
    both (AReaL: the singleton's own mean; an all-equal group's deviation is 0)."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0, 0.25], dtype=F64)
    g = 4
    want = _areal_norm(rewards, g, leave1out, std, True, 1e-5)
    res = E.advantages(
        rewards, torch.arange(rewards.numel()) // g, AdvantageConfig(estimator=estimator, eps=eps)
    )
    torch.testing.assert_close(res.advantages, want, rtol=1e-13, atol=1e-15)
    assert want[-1] == 0 and bool((want[4:8] == 0).all())


def test_adv_norm_batch_whitening() -> None:
    """adv_norm = NormConfig(mean_level="batch", std_level="batch") with reward_norm off, kl_ctl
    0: each trained token's advantage R (GAE, discount = gae_lambda = 1, no values) whitened
    over the trained tokens with the unbiased std, (A - mean) / (std + 1e-5):
    estimator="reinforce_pp", adv_eps=1e-5, with rewards."""
    logp, prox, behave, mask, keep = _padded(8)
    rewards = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 0.0, 1.0, 3.0], dtype=F64)
    a = torch.where(mask, rewards[:, None], 0.0)
    n = mask.sum()
    mean = a.sum() / n
    sd = ((torch.where(mask, a - mean, 0.0) ** 2).sum() / (n - 1)).sqrt()
    want = (a - mean) * mask / (sd + 1e-5)
    batch = _ragged(logp, prox, behave, mask, keep, rewards=rewards, group_ids=torch.arange(8))
    batch.rollout_logp = None
    cfg = LossConfig(
        objective=Grpo(),
        aggregation=TOKEN_MEAN,
        advantages=AdvantageConfig(estimator="reinforce_pp", eps=1e-5),
    )
    res = E.loss(batch, cfg)
    torch.testing.assert_close(res.advantages[batch.mask], want[keep][batch.mask], rtol=1e-12, atol=1e-14)


def test_reward_norm_then_adv_norm_is_gdpo_on_one_component() -> None:
    """reward_norm (group mean and unbiased std, eps 1e-5) and then adv_norm (batch whitening of
    the trained tokens, eps 1e-5): estimator="gdpo" on the [B] rewards, adv_eps=1e-5, as slime's
    --normalize-advantages (docs/peers.md). Where no group is degenerate; a degenerate group's
    members stay 0 in softgate, AReaL whitens their 0 to -mean / (std + eps)."""
    logp, prox, behave, mask, keep = _padded(8)
    rewards = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 0.0, 1.0, 3.0], dtype=F64)
    grouped = _areal_norm(rewards, 4, False, True, True, 1e-5)
    a = torch.where(mask, grouped[:, None], 0.0)
    n = mask.sum()
    mean = a.sum() / n
    sd = ((torch.where(mask, a - mean, 0.0) ** 2).sum() / (n - 1)).sqrt()
    want = (a - mean) * mask / (sd + 1e-5)
    batch = _ragged(logp, prox, behave, mask, keep, rewards=rewards, group_ids=torch.arange(8) // 4)
    batch.rollout_logp = None
    cfg = LossConfig(
        objective=Grpo(), aggregation=TOKEN_MEAN, advantages=AdvantageConfig(estimator="gdpo", eps=1e-5)
    )
    res = E.loss(batch, cfg)
    torch.testing.assert_close(res.advantages[batch.mask], want[keep][batch.mask], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_kl_in_reward(kl_estimator: str) -> None:
    """compute_advantages (actor.py @ 5d10f4ee) with kl_ctl beta and kl_estimator: each
    trained token earns -beta clamp(k(old, ref), -10, 10) (KLEstimator(old, ref): k1 = old -
    ref, k2 = (old - ref)^2 / 2, k3 = exp(ref - old) - 1 - (ref - old)), the group-normalised R
    at the response's last token, and GAE with discount = gae_lambda = 1 sums them from each
    token to the end over the trained tokens: reward_kl_beta=kl_ctl,
    reward_kl_estimator=kl_estimator, reward_kl_level="token", reward_kl_value_clamp=10 beside
    estimator="grpo", adv_eps=1e-5 (the penalty after the normalisation, as AReaL's). This
    needs each response's last token trained: AReaL drops R when it is not."""
    logp, prox, behave, mask, keep = _padded(9, spread=0.8)
    lengths = torch.tensor(LENGTHS)
    rows = torch.arange(len(LENGTHS))
    last = (lengths - 1).clamp(min=0)
    mask[rows[lengths > 0], last[lengths > 0]] = True
    mask[4] = False
    ref = (prox + 3.0 * torch.randn(prox.shape, generator=torch.Generator().manual_seed(3), dtype=F64)).clamp(
        max=-1e-3
    )
    ref[3, 2] = prox[3, 2] + 25.0 if prox[3, 2] + 25.0 < 0 else -1e-3  # a |k| past 10
    old = prox  # the policy that sampled (recomputed), AReaL's data["logprobs"]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=F64)
    beta = 0.1
    r_norm = _areal_norm(rewards, 4, False, True, True, 1e-5)
    diff = old - ref
    k = {"k1": diff, "k2": diff**2 / 2, "k3": torch.exp(-diff) - 1 + diff}[kl_estimator].clamp(-10, 10)
    tok_r = -beta * k
    tok_r[rows, last] += r_norm
    adv = torch.zeros_like(tok_r)
    lastgae = torch.zeros(len(LENGTHS), dtype=F64)
    for t in reversed(range(tok_r.shape[1])):
        m = mask[:, t].to(F64)
        lastgae = lastgae * (1 - m) + (tok_r[:, t] + lastgae) * m
        adv[:, t] = lastgae
    x = logp.clone().requires_grad_(True)
    want, _, _ = _areal_ppo(x, old, adv, mask, 0.2)
    batch = _ragged(
        logp, old, behave, mask, keep, rewards=rewards, group_ids=torch.arange(8) // 4, ref_logp=ref[keep]
    )
    batch.rollout_logp = None
    cfg = LossConfig(
        objective=Grpo(),
        aggregation=TOKEN_MEAN,
        advantages=AdvantageConfig(estimator="grpo", eps=1e-5),
        reward_kl=RewardKLConfig(beta=beta, estimator=kl_estimator, level="token", value_clamp=10.0),
    )
    res = E.loss(batch, cfg)
    torch.testing.assert_close(res.advantages[batch.mask], adv[keep][batch.mask], rtol=1e-12, atol=1e-14)
    _check(res, want, x, keep)


def test_micro_batches_weighted_by_their_tokens() -> None:
    """The engine weighs each micro-batch's token mean by loss_mask.count_nonzero() and divides by
    their total (actor.py's loss_weight_fn): the step's token mean. softgate: each micro-batch
    with num_tokens= the step's trained tokens; the losses and gradients add up."""
    logp, prox, behave, mask, keep = _padded(10)
    adv = _adv()
    x = logp.clone().requires_grad_(True)
    halves = [slice(0, 3), slice(3, 8)]
    parts = [_areal_ppo(x[h], prox[h], adv[h, None], mask[h], 0.2, 0.28)[0] for h in halves]
    counts = [mask[h].sum() for h in halves]
    want = sum(p * c for p, c in zip(parts, counts, strict=True)) / sum(counts)
    (grad,) = torch.autograd.grad(want, x)
    total, grads = 0.0, []
    for h in halves:
        lens = LENGTHS[h]
        b = _ragged(logp[h], prox[h], behave[h], mask[h], keep[h], lengths=lens, advantages=adv[h])
        b.rollout_logp = None
        agg = AggregationConfig(mode="token_mean", num_tokens=float(mask.sum()))
        r = E.loss(b, LossConfig(objective=Grpo(eps_low=0.2, eps_high=0.28), aggregation=agg))
        total += r.loss
        grads.append(r.grad)
    assert total == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(torch.cat(grads), grad[keep], rtol=1e-12, atol=1e-15)


def _m2po_keep(old: torch.Tensor, prox: torch.Tensor, m: torch.Tensor, threshold: float) -> torch.Tensor:
    """_apply_m2po_masking (actor.py @ 5d10f4ee): drop the trained tokens of largest (old -
    prox)^2 until the mean of the rest is below the threshold (all but one at worst)."""
    m2 = ((old - prox) ** 2)[m]
    order = torch.argsort(m2, descending=True)
    s = m2[order]
    suffix = s.flip(0).cumsum(0).flip(0) / torch.arange(s.numel(), 0, -1, dtype=F64)
    below = torch.nonzero(suffix < threshold)
    drop = int(below[0]) if below.numel() else s.numel() - 1
    kept_sorted = torch.arange(s.numel()) >= drop
    kept = torch.empty_like(kept_sorted)
    kept[order] = kept_sorted
    out = torch.zeros_like(m)
    out[m] = kept
    return out


def test_m2po_mask_from_the_trainer() -> None:
    """m2_threshold (M2PO) drops tokens by the second moment of behave - prox over the micro-batch,
    before the loss, from the log-probs the trainer already has (no logp): compute the mask in
    the trainer and send it as mask=. With one micro-batch (ppo_n_minibatches=1) AReaL's
    normaliser is the kept count, softgate's default; with several, each micro-batch's kept
    token mean is weighted by its count before M2PO (not one softgate normaliser)."""
    logp, prox, behave, mask, keep = _padded(11, spread=0.5)
    adv = _adv()
    m2 = _m2po_keep(behave, prox, mask, 0.2)
    assert 0 < m2.sum() < mask.sum()
    x = logp.clone().requires_grad_(True)
    want, _, _ = _areal_ppo(x, prox, adv[:, None], m2, 0.2, 0.28)
    b = _ragged(logp, prox, behave, m2, keep, advantages=adv)
    b.rollout_logp = None
    _check(
        E.loss(b, LossConfig(objective=Grpo(eps_low=0.2, eps_high=0.28), aggregation=TOKEN_MEAN)),
        want,
        x,
        keep,
    )


@pytest.mark.parametrize(
    ("action", "lower"), [("mask", 0.8), ("mask", None), ("clamp", 0.8), ("clamp", None)]
)
def test_rejection_sampling_ratio_sequence(action: str, lower: float | None) -> None:
    """rejection_sampling with level="sequence", metric="ratio" weighs every token of a row by
    the row's geometric-mean weight exp(masked mean of prox - behave) ("mask": 0 outside
    [lower, upper], the row kept in the normaliser; "clamp": clamped to it; lower None: no
    bound): mismatch_level="geometric" with mode "mask" (lo=lower or 0, hi=upper) or
    "truncate" (floor=lower or 0, cap=upper); rs_filtered_fraction is mismatch_clipped_frac."""
    logp, prox, behave, mask, keep = _padded(12, spread=0.5)
    adv = _adv()
    x = logp.clone().requires_grad_(True)
    cnt = mask.sum(-1).clamp(min=1)
    w_seq = torch.exp(torch.where(mask, prox - behave, 0.0).sum(-1) / cnt)
    lo, upper = (0.0 if lower is None else lower), 1.25
    if action == "mask":
        ok = (w_seq >= lo) & (w_seq <= upper)
        assert bool((~ok & (mask.sum(-1) > 0)).any()) and bool((ok & (mask.sum(-1) > 0)).any())
        w_seq = torch.where(ok, w_seq, 0.0)
        m2 = mask & ok[:, None]
        changed = mask & ~ok[:, None]
        mm = MismatchConfig(level="geometric", mode="mask", lo=lo, hi=upper)
    else:
        clamped = w_seq.clamp(lo, upper)
        changed = mask & (clamped != w_seq)[:, None]
        w_seq, m2 = clamped, mask
        mm = MismatchConfig(level="geometric", mode="truncate", floor=lo, cap=upper)
    assert bool(changed.any())
    w = torch.where(m2, w_seq[:, None], 0.0)
    want, _, _ = _areal_ppo(x, prox, adv[:, None], m2, 0.2, 0.28, 3.0, w=w, count_mask=mask)
    cfg = LossConfig(
        objective=Grpo(eps_low=0.2, eps_high=0.28, dual_clip=3.0), aggregation=TOKEN_MEAN, mismatch=mm
    )
    res = E.loss(_ragged(logp, prox, behave, mask, keep, advantages=adv), cfg)
    _check(res, want, x, keep)
    assert res.metrics["mismatch_clipped_frac"] == pytest.approx(
        changed.sum().item() / mask.sum().item(), abs=1e-15
    )


def test_joint_distillation_kdrl() -> None:
    """grpo_loss_fn's joint distillation (actor.py @ 5d10f4ee) with teacher_logp and
    rl_loss_weight > 0: rl_loss_weight times the policy loss plus distill_loss_weight times the
    token mean of logp - teacher_logp: kl_estimator="k1", kl_beta=distill_loss_weight,
    ref_logp=teacher_logp (softgate's k1 is logp - ref, gradient 1), the advantages times
    rl_loss_weight (the surrogate is positively homogeneous in A)."""
    logp, prox, behave, mask, keep = _padded(13, spread=0.3)
    teacher = (
        logp + 0.7 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    ).clamp(max=-1e-3)
    adv = _adv()
    rl_w, kd_w = 0.8, 0.005
    x = logp.clone().requires_grad_(True)
    pg, _, _ = _areal_ppo(x, prox, adv[:, None], mask, 0.2, 0.28)
    want = rl_w * pg + kd_w * ((x - teacher) * mask).sum() / mask.sum().clamp(min=1)
    batch = _ragged(logp, prox, behave, mask, keep, advantages=adv * rl_w, ref_logp=teacher[keep])
    batch.rollout_logp = None
    cfg = LossConfig(
        objective=Grpo(eps_low=0.2, eps_high=0.28),
        aggregation=TOKEN_MEAN,
        kl=KLConfig(estimator="k1", beta=kd_w),
    )
    _check(E.loss(batch, cfg), want, x, keep)
