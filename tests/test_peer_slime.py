"""softgate against slime (THUDM/slime, Megatron + SGLang RL), its loss formulas written out.

Each test transcribes one of slime's formulas in a few lines, on its own layout (a list of
per-sample tensors, as slime's `batch["log_probs"]`), with autograd for slime's gradient, and
checks softgate's loss and per-token gradient (and the metric where one maps) in float64.
Peer files read (cited by short commit below):
  slime/backends/megatron_utils/loss.py @ 00c2d6db (policy_loss_function, loss_function,
      vanilla_tis_function, icepop_function, compute_advantages_and_returns)
  slime/utils/ppo_utils.py @ 501dae9c (compute_policy_loss, compute_cispo_loss,
      compute_approx_kl, compute_gspo_kl, compute_opsm_mask, get_reinforce_plus_plus_returns)
  slime/backends/megatron_utils/cp_utils.py @ 04949ce1 (get_sum_of_sample_mean, cp_size 1)
  slime/utils/distributed_utils.py @ 358c7184 (distributed_masked_whiten)
  slime/ray/rollout.py @ a51f0714 (_post_process_rewards: the group normalisation)
  slime/utils/arguments.py @ 002fa9d6 (option names and defaults)
No slime code is copied; docs/peers.md ("From slime") maps the options.
"""

from __future__ import annotations

import dataclasses

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
from softgate_client import kl_from_slime
from torch import Tensor

E = Engine(device="cpu", compile=False)
F64 = torch.float64

# an empty sample, a one-token one, a fully masked one (slime's remove_sample), masks with holes
LENGTHS = [5, 0, 1, 4, 7, 3, 6, 2]
ADV = [1.3, 0.7, -0.8, -1.1, 0.9, 0.4, -0.5, 0.0]


def _samples(lengths: list[int], seed: int, fully_masked: int | None = 5):
    """Per-sample logp, old, ref, rollout log-probs and 0/1 loss masks with holes; sample 4's
    log-ratios sit inside, at (1e-9) and far outside every clip band."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[Tensor]] = {k: [] for k in ("logp", "old", "ref", "rollout", "mask")}
    for n in lengths:
        lp = -torch.rand(n, generator=g, dtype=F64) * 2 - 0.05
        out["logp"].append(lp)
        out["old"].append((lp + 0.35 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-3))
        out["ref"].append((lp + 0.5 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-3))
        out["rollout"].append(
            (out["old"][-1] + 0.4 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-3)
        )
        out["mask"].append((torch.rand(n, generator=g) < 0.8).to(F64))
    if len(lengths) > 4 and lengths[4] == 7:
        out["logp"][4] = out["logp"][4] - 2.5  # room below 0 for old = logp + 2
        out["old"][4] = out["logp"][4] + torch.tensor([0.0, 0.5, -0.6, 2.0, -3.0, 1e-9, 0.1], dtype=F64)
        out["old"][6][0] = out["logp"][6][0] - 1.5  # A < 0 at ratio e^1.5, past a dual clip of 3
        out["mask"][6][0] = 1.0
    if fully_masked is not None:
        out["mask"][fully_masked] = torch.zeros(lengths[fully_masked], dtype=F64)
    return out


def _batch(s: dict[str, list[Tensor]], lengths: list[int], **kw) -> Batch:
    fields = {
        "logp": torch.cat(s["logp"]),
        "offsets": Batch.offsets_from_lengths(torch.tensor(lengths)),
        "old_logp": torch.cat(s["old"]),
        "mask": torch.cat(s["mask"]).bool(),
        "ref_logp": torch.cat(s["ref"]),
        "rollout_logp": torch.cat(s["rollout"]),
    }
    fields.update(kw)
    return Batch(**fields)


def _per_token(values: list[float], lengths: list[int]) -> list[Tensor]:
    return [torch.full((n,), float(a), dtype=F64) for n, a in zip(lengths, values, strict=True)]


def _reduce(x: Tensor, masks: list[Tensor], per_token: bool) -> Tensor:
    """slime's step loss of a flat per-token tensor: get_sum_of_sample_mean (cp_utils @ 04949ce1;
    without --calculate-per-token-loss each sample's masked mean, its mask sum clamped at 1, summed)
    then loss_function's scaling with Megatron's (loss.py @ 00c2d6db): / step_global_batch_size
    (every sample of the step, empty and fully masked ones too), or with --calculate-per-token-loss
    the masked sum / num_tokens = sum over samples of clamp_min(mask.sum(), 1)."""
    xs = x.split([m.numel() for m in masks])
    if per_token:
        return sum((xi * m).sum() for xi, m in zip(xs, masks, strict=True)) / sum(
            m.sum().clamp(min=1) for m in masks
        )
    return sum((xi * m).sum() / m.sum().clamp(min=1) for xi, m in zip(xs, masks, strict=True)) / len(masks)


def _aggregation(masks: list[Tensor], per_token: bool) -> AggregationConfig:
    if per_token:
        return AggregationConfig(
            mode="token_mean", num_tokens=float(sum(m.sum().clamp(min=1) for m in masks))
        )
    return AggregationConfig(mode="seq_mean_token_mean", num_seqs=len(masks))


def _ppo(ppo_kl: Tensor, a: Tensor, eps: float, eps_high: float, c: float | None) -> tuple[Tensor, Tensor]:
    """compute_policy_loss (ppo_utils @ 501dae9c): ratio = exp(-ppo_kl), max(-r A, -clamp(r) A),
    clipfrac = the clipped term above the plain one; dual clip min(., -c A) where A < 0."""
    r = (-ppo_kl).exp()
    l1, l2 = -r * a, -r.clamp(1 - eps, 1 + eps_high) * a
    loss = torch.maximum(l1, l2)
    if c is not None:
        loss = torch.where(a < 0, torch.min(-c * a, loss), loss)
    return loss, (l2 > l1).to(F64)


def _grad(loss: Tensor, x: list[Tensor]) -> Tensor:
    return torch.cat(
        [
            g if g is not None else torch.zeros_like(xi)
            for g, xi in zip(torch.autograd.grad(loss, x, allow_unused=True), x, strict=True)
        ]
    )


def _close(res, loss: Tensor, grad: Tensor, rel: float = 1e-12) -> None:
    assert res.loss == pytest.approx(float(loss.detach()), rel=rel, abs=1e-15)
    torch.testing.assert_close(res.grad, grad, rtol=rel, atol=1e-15)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize(("eps", "eps_high", "c"), [(0.2, 0.2, None), (0.2, 0.28, 3.0)])
def test_ppo_clip(per_token: bool, eps: float, eps_high: float, c: float | None) -> None:
    """--eps-clip / --eps-clip-high / --eps-clip-c (loss.py @ 00c2d6db: ppo_kl = old - logp per
    token, compute_policy_loss), both reducers: `grpo` with `dual_clip` only when --eps-clip-c is
    set; the reducer is seq_mean_token_mean over every sample of the step, or token_mean over
    sum max(|y_i|, 1). pg_clipfrac is softgate's clip_mask less its dual-clipped tokens, and at token level
    (clip_low tokens_neg + clip_high tokens_pos) / num_tokens; ppo_kl is approx_kl rescaled."""
    s = _samples(LENGTHS, 3)
    x = [t.clone().requires_grad_(True) for t in s["logp"]]
    a, old = torch.cat(_per_token(ADV, LENGTHS)), torch.cat(s["old"])
    pg, clipfrac = _ppo(old - torch.cat(x), a, eps, eps_high, c)
    want = _reduce(pg, s["mask"], per_token)
    cfg = LossConfig(
        objective=Grpo(eps, eps_high, dual_clip=c), aggregation=_aggregation(s["mask"], per_token)
    )
    res = E.loss(_batch(s, LENGTHS, advantages=torch.tensor(ADV, dtype=F64)), cfg)
    _close(res, want, _grad(want, x))
    m = res.mask
    dual = (a < 0) & (res.ratio > c) if c is not None else torch.zeros_like(m)
    assert bool((m & dual).any()) == (c is not None)  # pg_clipfrac leaves dual-clipped tokens out
    assert (res.clip_mask & ~dual)[m].tolist() == clipfrac.bool()[m].tolist()
    if per_token:
        mt, n = res.metrics, cfg.aggregation.num_tokens
        pg_clipfrac = float(_reduce(clipfrac, s["mask"], True))
        assert (mt["clip_low"] * mt["tokens_neg"] + mt["clip_high"] * mt["tokens_pos"]) / n == pytest.approx(
            pg_clipfrac, rel=1e-12
        )
        ppo_kl = float(_reduce(old - torch.cat(s["logp"]), s["mask"], True))
        assert mt["approx_kl"] * mt["num_tokens"] / n == pytest.approx(ppo_kl, rel=1e-12)


@pytest.mark.parametrize("per_token", [False, True])
def test_gspo(per_token: bool) -> None:
    """--advantage-estimator gspo (compute_gspo_kl, ppo_utils @ 501dae9c): ppo_kl = the sample's
    masked mean of old - logp (mask sum clamped at 1), the same on each token, into
    compute_policy_loss with slime's eps (0.2 by default, not GSPO's 3e-4) and --eps-clip-c:
    `gspo` with those bounds and `dual_clip`."""
    s = _samples(LENGTHS, 4)
    x = [t.clone().requires_grad_(True) for t in s["logp"]]
    kl = torch.cat(
        [
            (((o - lp) * m).sum() / m.sum().clamp(min=1)).expand_as(lp)
            for lp, o, m in zip(x, s["old"], s["mask"], strict=True)
        ]
    )
    pg, clipfrac = _ppo(kl, torch.cat(_per_token(ADV, LENGTHS)), 0.2, 0.27, 3.0)
    want = _reduce(pg, s["mask"], per_token)
    cfg = LossConfig(objective=Gspo(0.2, 0.27, dual_clip=3.0), aggregation=_aggregation(s["mask"], per_token))
    res = E.loss(_batch(s, LENGTHS, advantages=torch.tensor(ADV, dtype=F64)), cfg)
    _close(res, want, _grad(want, x))
    assert res.clip_mask[res.mask].tolist() == clipfrac.bool()[res.mask].tolist()
    assert 0 < clipfrac[res.mask].mean() < 1


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize(("eps", "eps_high"), [(1.0, 4.0), (0.2, 0.2)])
def test_cispo(per_token: bool, eps: float, eps_high: float) -> None:
    """--advantage-estimator cispo (compute_cispo_loss, ppo_utils @ 501dae9c):
    -sg[clamp(r, 1 - eps_clip, 1 + eps_clip_high)] A logp, the value with its logp: `cispo` with
    eps_low = eps_clip, eps_high = eps_clip_high (slime's default 0.2 / 0.2; its canonical
    1.0 / 4.0). pg_clipfrac (ratio_truncated != ratio) is clip_mask but for A = 0 tokens."""
    s = _samples(LENGTHS, 5)
    x = [t.clone().requires_grad_(True) for t in s["logp"]]
    lp, a = torch.cat(x), torch.cat(_per_token(ADV, LENGTHS))
    r = (lp - torch.cat(s["old"])).exp()
    rt = r.clamp(1 - eps, 1 + eps_high)
    want = _reduce(-rt.detach() * a * lp, s["mask"], per_token)
    cfg = LossConfig(objective=Cispo(eps, eps_high), aggregation=_aggregation(s["mask"], per_token))
    res = E.loss(_batch(s, LENGTHS, advantages=torch.tensor(ADV, dtype=F64)), cfg)
    _close(res, want, _grad(want, x))
    counted = res.mask & (a != 0)
    assert res.clip_mask[counted].tolist() == (rt != r)[counted].tolist()


@pytest.mark.parametrize("tis", [False, True])
def test_reinforce(tis: bool) -> None:
    """--pg-loss-type reinforce (loss.py @ 00c2d6db): -A.detach() logp, no ratio; with --use-tis
    its weight is exp(logp.detach() - rollout), the current policy's (train_log_probs_for_tis):
    `cispo` with eps_low = eps_high = 0, and no old_logp (softgate's old is then logp), the
    mismatch against the rollout log-probs."""
    s = _samples(LENGTHS, 6)
    x = [t.clone().requires_grad_(True) for t in s["logp"]]
    lp, a = torch.cat(x), torch.cat(_per_token(ADV, LENGTHS))
    pg = -a * lp
    if tis:
        pg = pg * torch.exp(lp.detach() - torch.cat(s["rollout"])).clamp(min=0.0, max=2.0)
    want = _reduce(pg, s["mask"], False)
    cfg = LossConfig(
        objective=Cispo(0.0, 0.0),
        aggregation=_aggregation(s["mask"], False),
        mismatch=MismatchConfig(mode="truncate", cap=2.0) if tis else None,
    )
    res = E.loss(_batch(s, LENGTHS, old_logp=None, advantages=torch.tensor(ADV, dtype=F64)), cfg)
    _close(res, want, _grad(want, x))


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize(
    ("kl_loss_type", "unbiased", "kl"),
    [
        ("k1", False, KLConfig(estimator="k1", beta=0.3)),
        ("k2", False, KLConfig(estimator="k2", beta=0.3)),
        ("k3", False, KLConfig(estimator="k3", beta=0.3)),
        ("low_var_kl", False, KLConfig(estimator="k3", beta=0.3, value_clamp=10.0)),
        ("k3", True, KLConfig(estimator="k3_is", beta=0.3)),
        ("k1", True, KLConfig(estimator="k1", beta=0.3, weight="ratio")),
        ("k2", True, KLConfig(estimator="k2", beta=0.3, weight="ratio")),
        ("k3", True, KLConfig(estimator="k3", beta=0.3, weight="ratio")),
        ("low_var_kl", True, KLConfig(estimator="k3", beta=0.3, value_clamp=10.0, weight="ratio")),
    ],
)
def test_kl_loss(per_token: bool, kl_loss_type: str, unbiased: bool, kl: KLConfig) -> None:
    """--use-kl-loss --kl-loss-coef b --kl-loss-type (compute_approx_kl, ppo_utils @ 501dae9c, on
    logp - ref; low_var_kl clamps the value to [-10, 10]; --use-unbiased-kl multiplies by
    exp(logp - old) with its gradient, before that clamp), reduced like the policy term:
    `kl_estimator` k1 / k2 / k3 (low_var_kl: k3 with kl_value_clamp=10), kl_beta = b, and for
    --use-unbiased-kl `kl_weight="ratio"` (k3's: also k3_is); the client's kl_from_slime gives
    that configuration."""
    mapped = kl_from_slime(kl_loss_type, 0.3, unbiased)
    est, weight = ("k3", "ratio") if kl.estimator == "k3_is" else (kl.estimator, kl.weight)
    assert (mapped.estimator, mapped.beta, mapped.value_clamp, mapped.weight or "none") == (
        est,
        kl.beta,
        kl.value_clamp,
        weight,
    )
    s = _samples(LENGTHS, 7)
    s["logp"][6][1], s["ref"][6][1] = -3.5, -1e-4  # k3 = e^3.5 - 4.5 > 10: low_var_kl's clamp
    s["ref"][6][2] = s["logp"][6][2] - 12.0  # k1 and k2 far out
    x = [t.clone().requires_grad_(True) for t in s["logp"]]
    lp, a, old, ref = (
        torch.cat(x),
        torch.cat(_per_token(ADV, LENGTHS)),
        torch.cat(s["old"]),
        torch.cat(s["ref"]),
    )
    d = lp - ref
    k = {"k1": d, "k2": d**2 / 2}.get(kl_loss_type, torch.exp(-d) - 1 + d)
    if unbiased:
        k = torch.exp(lp - old) * k
    if kl_loss_type == "low_var_kl":
        k = k.clamp(-10, 10)
    pg, _ = _ppo(old - lp, a, 0.2, 0.2, None)
    want = _reduce(pg, s["mask"], per_token) + 0.3 * _reduce(k, s["mask"], per_token)
    cfg = LossConfig(objective=Grpo(), aggregation=_aggregation(s["mask"], per_token), kl=kl)
    res = E.loss(_batch(s, LENGTHS, advantages=torch.tensor(ADV, dtype=F64)), cfg)
    _close(res, want, _grad(want, x))


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize(
    ("mode", "lo", "hi", "mismatch"),
    [
        ("tis", 0.0, 1.5, MismatchConfig(mode="truncate", cap=1.5)),
        ("tis", 0.8, 1.5, MismatchConfig(mode="truncate", cap=1.5, floor=0.8)),
        ("icepop", 0.5, 1.5, MismatchConfig(mode="mask", lo=0.5, hi=1.5)),
    ],
)
def test_tis(per_token: bool, mode: str, lo: float, hi: float, mismatch: MismatchConfig) -> None:
    """--use-tis --tis-clip C --tis-clip-low l (vanilla_tis_function, loss.py @ 00c2d6db): the
    policy loss times clamp(exp(old - rollout), l, C), old the recomputed log-probs; with
    --custom-tis-function-path ...icepop_function the weight is 0 outside [l, C]. tis_clipfrac
    (weight != ratio) is mismatch_clipped_frac, rescaled at token level."""
    s = _samples(LENGTHS, 8)
    x = [t.clone().requires_grad_(True) for t in s["logp"]]
    lp, a, old = torch.cat(x), torch.cat(_per_token(ADV, LENGTHS)), torch.cat(s["old"])
    w = torch.exp(old - torch.cat(s["rollout"]))
    ww = (
        w.clamp(min=lo, max=hi)
        if mode == "tis"
        else torch.where((w >= lo) & (w <= hi), w, torch.zeros_like(w))
    )
    pg, _ = _ppo(old - lp, a, 0.2, 0.2, None)
    want = _reduce(pg * ww, s["mask"], per_token)
    cfg = LossConfig(objective=Grpo(), aggregation=_aggregation(s["mask"], per_token), mismatch=mismatch)
    res = E.loss(_batch(s, LENGTHS, advantages=torch.tensor(ADV, dtype=F64)), cfg)
    _close(res, want, _grad(want, x))
    if per_token:
        tis_clipfrac = float(_reduce((ww != w).to(F64), s["mask"], True))
        assert tis_clipfrac > 0
        mt = res.metrics
        assert mt["mismatch_clipped_frac"] * mt["num_tokens"] / cfg.aggregation.num_tokens == pytest.approx(
            tis_clipfrac
        )


def test_gspo_with_tis_gradient_differs() -> None:
    """GSPO with --use-tis: slime weighs each token's term l(s_i) by its own TIS weight, and
    autograd spreads the sample's weighted sum through s_i: softgate's loss is the same, its
    gradient (each token's own weight) is not (as TRL's, docs/peers.md)."""
    s = _samples(LENGTHS, 9)
    x = [t.clone().requires_grad_(True) for t in s["logp"]]
    kl = torch.cat(
        [
            (((o - lp) * m).sum() / m.sum().clamp(min=1)).expand_as(lp)
            for lp, o, m in zip(x, s["old"], s["mask"], strict=True)
        ]
    )
    pg, _ = _ppo(kl, torch.cat(_per_token(ADV, LENGTHS)), 0.2, 0.2, None)
    ww = torch.exp(torch.cat(s["old"]) - torch.cat(s["rollout"])).clamp(max=1.5)
    want = _reduce(pg * ww, s["mask"], False)
    cfg = LossConfig(
        objective=Gspo(0.2, 0.2), aggregation=_aggregation(s["mask"], False), mismatch=MismatchConfig(cap=1.5)
    )
    res = E.loss(_batch(s, LENGTHS, advantages=torch.tensor(ADV, dtype=F64)), cfg)
    assert res.loss == pytest.approx(float(want.detach()), rel=1e-12)
    assert not torch.allclose(res.grad, _grad(want, x), rtol=1e-3)


def _slime_opsm_keep(
    x: list[Tensor], old: list[Tensor], a: list[Tensor], masks: list[Tensor], delta: float
) -> Tensor:
    """compute_opsm_mask (ppo_utils @ 501dae9c): 0 at the tokens with A < 0 of a sample whose
    masked mean of old - logp exceeds delta, 1 elsewhere (all samples' tokens, concatenated)."""
    keep = []
    for lp, o, ai, m in zip(x, old, a, masks, strict=True):
        seq_kl = ((o - lp) * m).sum() / m.sum().clamp(min=1)
        keep.append(1 - ((ai < 0) & (seq_kl > delta)).to(F64))
    return torch.cat(keep)


@pytest.mark.parametrize("use_rollout_logprobs", [False, True])
def test_opsm(use_rollout_logprobs: bool) -> None:
    """--use-opsm --opsm-delta d (compute_opsm_mask, ppo_utils @ 501dae9c): a token with A < 0 of
    a sample whose masked mean of old - logp exceeds d loses its policy term; old is the recomputed
    log-probs, or the rollout's with --use-rollout-logprobs (then also the ratio's old):
    off_policy_mask_threshold=d with that old_logp and no rollout_logp."""
    s = _samples(LENGTHS, 10)
    if use_rollout_logprobs:
        s["old"] = s["rollout"]
    x = [t.clone().requires_grad_(True) for t in s["logp"]]
    a = _per_token(ADV, LENGTHS)
    keep = _slime_opsm_keep(x, s["old"], a, s["mask"], 0.05)
    pg, _ = _ppo(torch.cat(s["old"]) - torch.cat(x), torch.cat(a), 0.2, 0.2, None)
    want = _reduce(pg * keep, s["mask"], False)
    cfg = LossConfig(
        objective=Grpo(), aggregation=_aggregation(s["mask"], False), off_policy_mask_threshold=0.05
    )
    res = E.loss(_batch(s, LENGTHS, rollout_logp=None, advantages=torch.tensor(ADV, dtype=F64)), cfg)
    _close(res, want, _grad(want, x))
    assert 0 < res.metrics["off_policy_masked_frac"] < 1


@pytest.mark.parametrize("reference", ["old", "rollout"])
def test_opsm_with_tis(reference: str) -> None:
    """--use-opsm beside --use-tis: slime's OPSM still reads the recomputed old log-probs while
    TIS weighs each token by exp(old - rollout): off_policy_mask_reference="old" with
    rollout_logp sent. softgate's default ("rollout") reads the sampler's, rollout_logp, and
    differs from slime's here (it is TRL's and DeepSeek-V3.2's)."""
    s = _samples(LENGTHS, 16)  # (A < 0 samples 3 and 6: one past d by old, the other by rollout)
    x = [t.clone().requires_grad_(True) for t in s["logp"]]
    a = _per_token(ADV, LENGTHS)
    keep = _slime_opsm_keep(x, s["old"], a, s["mask"], 0.05)
    old, rollout = torch.cat(s["old"]), torch.cat(s["rollout"])
    pg, _ = _ppo(old - torch.cat(x), torch.cat(a), 0.2, 0.2, None)
    want = _reduce(pg * torch.exp(old - rollout).clamp(max=1.5) * keep, s["mask"], False)
    cfg = LossConfig(
        objective=Grpo(),
        aggregation=_aggregation(s["mask"], False),
        mismatch=MismatchConfig(mode="truncate", cap=1.5),
        off_policy_mask_threshold=0.05,
        off_policy_mask_reference=reference,
    )
    res = E.loss(_batch(s, LENGTHS, advantages=torch.tensor(ADV, dtype=F64)), cfg)
    assert 0 < res.metrics["off_policy_masked_frac"] < 1
    if reference == "old":
        _close(res, want, _grad(want, x))
    else:
        assert res.loss != pytest.approx(float(want.detach()), rel=1e-6)


# ---------------------------------------------------------------- advantages

ADV_LENGTHS = [5, 3, 1, 4, 7, 3, 6, 2, 4, 2, 3, 5]
REWARDS = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 0.9, 0.0, 0.4, 1.0, 1.0, 1.0, 1.0], dtype=F64)


def _adv_batch(n_groups_used: int = 3) -> tuple[dict[str, list[Tensor]], Batch]:
    s = _samples(ADV_LENGTHS, 11, fully_masked=None)
    s["mask"] = [
        m if m.sum() > 0 else torch.ones_like(m) for m in s["mask"]
    ]  # slime's REINFORCE++ asserts it
    b = _batch(s, ADV_LENGTHS, rewards=REWARDS, group_ids=torch.arange(12) // 4)
    return s, b


def _group_norm(std: bool, eps: float = 1e-6) -> Tensor:
    """_post_process_rewards (rollout.py @ a51f0714): contiguous groups of n_samples_per_prompt,
    R - mean, then / (std + 1e-6) (unbiased std) unless --disable-grpo-std-normalization.
    (`eps` 0: the exact twin of softgate's adv_eps=0, an all-equal group left at 0.)"""
    r = REWARDS.reshape(-1, 4)
    r = r - r.mean(-1, keepdim=True)
    sd = r.std(-1, keepdim=True)
    return (torch.where(sd + eps > 0, r / (sd + eps).clamp(min=1e-300), r) if std else r).flatten()


def _whiten(v: Tensor, m: Tensor, eps: float = 1e-8) -> Tensor:
    """--normalize-advantages: distributed_masked_whiten (distributed_utils @ 358c7184): over the
    masked tokens, (v - mean) * rsqrt(var + 1e-8), var with Bessel's correction."""
    n = m.sum()
    mean = (v * m).sum() / n
    var = ((v**2 * m).sum() / n - mean**2) * n / (n - 1)
    return (v - mean) * torch.rsqrt(var + eps)


@pytest.mark.parametrize(("std", "estimator"), [(True, "grpo"), (False, "dr_grpo")])
def test_group_advantages(std: bool, estimator: str) -> None:
    """--advantage-estimator grpo / gspo / cispo: the group-normalised reward on every token
    (get_grpo_returns; --kl-coef is not read there): estimator grpo (eps 1e-6, unbiased std, as
    slime's), dr_grpo with --disable-grpo-std-normalization; an all-equal group gets 0 in both."""
    _, b = _adv_batch()
    want = torch.cat(_per_token(_group_norm(std).tolist(), ADV_LENGTHS))
    res = E.loss(b, LossConfig(objective=Grpo(), advantages=AdvantageConfig(estimator=estimator)))
    torch.testing.assert_close(res.advantages, want, rtol=1e-14, atol=1e-15)
    assert (res.advantages[-14:] == 0).all()


@pytest.mark.parametrize(
    ("kl_loss_type", "est", "clamp"), [("k1", "k1", None), ("k2", "k2", None), ("low_var_kl", "k3", 10.0)]
)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus(kl_loss_type: str, est: str, clamp: float | None, gamma: float) -> None:
    """--advantage-estimator reinforce_plus_plus --kl-coef b --gamma g (get_reinforce_plus_plus_returns,
    ppo_utils @ 501dae9c): token rewards -b k(old, ref) on the masked tokens, R added at the last
    masked token, G_t = r_t + g G_{t+1} through the holes, then whitened: estimator reinforce_pp,
    gamma=g, reward_kl beta b at level token (its estimator; low_var_kl: value clamp 10), adv_eps=0.
    slime's rsqrt(var + 1e-8) against softgate's 1 / std: equal with slime's eps set to 0."""
    s, b = _adv_batch()
    s["ref"][4][1] = s["old"][4][1] - 4.0  # a token past low_var_kl's clamp
    b.ref_logp = torch.cat(s["ref"])
    rets = []
    for r, o, rf, m in zip(REWARDS, s["old"], s["ref"], s["mask"], strict=True):
        d = o - rf
        k = {"k1": d, "k2": d**2 / 2}.get(kl_loss_type, (torch.exp(-d) - 1 + d).clamp(-10, 10))
        tok = -0.1 * k * m
        tok[m.nonzero()[-1, 0]] += r
        ret, run = torch.zeros_like(tok), 0.0
        for t in reversed(range(tok.numel())):
            run = tok[t] + gamma * run
            ret[t] = run
        rets.append(ret)
    m = b.mask.to(F64)
    cfg = LossConfig(
        objective=Grpo(),
        advantages=AdvantageConfig(estimator="reinforce_pp", eps=0.0, gamma=gamma),
        reward_kl=RewardKLConfig(beta=0.1, estimator=est, level="token", value_clamp=clamp),
    )
    got = E.loss(b, cfg).advantages[b.mask]
    torch.testing.assert_close(got, _whiten(torch.cat(rets), m)[b.mask], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, _whiten(torch.cat(rets), m, eps=0.0)[b.mask], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("kl_loss_type", "est", "clamp"), [("k1", "k1", None), ("low_var_kl", "k3", 10.0)])
def test_reinforce_plus_plus_baseline_with_kl_coef(kl_loss_type: str, est: str, clamp: float | None) -> None:
    """--advantage-estimator reinforce_plus_plus_baseline --kl-coef b
    (get_reinforce_plus_plus_baseline_advantages, ppo_utils @ 501dae9c): each token's R - mean less
    b times its own k(old, ref), no sum to the end, then whitened over the masked tokens: estimator
    reinforce_pp_baseline with reward_kl at level immediate, adv_eps=0 (slime's rsqrt(var + 1e-8)
    set to 0). A degenerate group keeps its KL part in both; level token (the return) differs."""
    s, b = _adv_batch()
    s["ref"][4][1] = s["old"][4][1] - 4.0  # a token past low_var_kl's clamp
    b.ref_logp = torch.cat(s["ref"])
    centred = _group_norm(False).tolist()
    adv = []
    for a, o, rf, m in zip(centred, s["old"], s["ref"], s["mask"], strict=True):
        d = o - rf
        k = {"k1": d}.get(kl_loss_type, (torch.exp(-d) - 1 + d).clamp(-10, 10))
        adv.append(a - 0.1 * k * m)
    m = b.mask.to(F64)
    rk = RewardKLConfig(beta=0.1, estimator=est, level="immediate", value_clamp=clamp)
    cfg = LossConfig(
        objective=Grpo(), advantages=AdvantageConfig(estimator="reinforce_pp_baseline", eps=0.0), reward_kl=rk
    )
    got = E.loss(b, cfg).advantages[b.mask]
    torch.testing.assert_close(got, _whiten(torch.cat(adv), m, eps=0.0)[b.mask], rtol=1e-12, atol=1e-13)
    ret = dataclasses.replace(cfg, reward_kl=dataclasses.replace(rk, level="token"))
    assert not torch.allclose(E.loss(b, ret).advantages[b.mask], got)


@pytest.mark.parametrize(("std", "estimator"), [(False, "reinforce_pp_baseline"), (True, "gdpo")])
def test_whitened_group_advantages(std: bool, estimator: str) -> None:
    """--normalize-advantages on group advantages (compute_advantages_and_returns): every masked
    token whitened, a degenerate group's too. reinforce_plus_plus_baseline (R - mean, --kl-coef 0)
    is estimator reinforce_pp_baseline, grpo with it gdpo on the [B] rewards (one component):
    slime's numbers to 1e-5 (its eps inside rsqrt, and its 1e-6 as adv_eps for gdpo), exactly with
    both eps 0. Where no group is degenerate: a degenerate group's members stay 0 in softgate,
    slime whitens them to -mean / std."""
    _, b = _adv_batch()
    m, live = b.mask.to(F64), b.mask.clone()
    live[-14:] = False  # the all-equal group's tokens
    slime = _whiten(torch.cat(_per_token(_group_norm(std).tolist(), ADV_LENGTHS)), m)
    cfg = LossConfig(
        objective=Grpo(), advantages=AdvantageConfig(estimator=estimator, eps=1e-6 if std else 0.0)
    )
    got = E.loss(b, cfg).advantages
    torch.testing.assert_close(got[live], slime[live], rtol=1e-5, atol=1e-6)
    assert (got[b.mask & ~live] == 0).all() and (slime[b.mask & ~live].abs() > 1e-3).all()
    exact = _whiten(torch.cat(_per_token(_group_norm(std, eps=0.0).tolist(), ADV_LENGTHS)), m, eps=0.0)
    cfg = LossConfig(objective=Grpo(), advantages=AdvantageConfig(estimator=estimator, eps=0.0))
    torch.testing.assert_close(E.loss(b, cfg).advantages[live], exact[live], rtol=1e-12, atol=1e-13)
