"""Rollout rejection sampling (LossConfig.rejection): verl's `rollout_rs` written out below,
padded [B, T] as verl computes it, against the engine's ragged version; and what a rejected
token is (out of the mask: the same loss and gradient as the caller's mask without it)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from reference_loss import reference_rejection_keep
from softgate.engine import (
    Batch,
    Engine,
    Grpo,
    InputError,
    KLConfig,
    LossConfig,
    MismatchConfig,
    RejectionCriterion,
    Sapo,
)

ENGINE = Engine(device="cpu", compile=False)
F64 = torch.float64


# ---------------------------------------------------------------- verl's rollout_rs, written out


def verl_rejection_mask(
    old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, options: str, thresholds: str
):
    """verl's compute_rollout_rejection_mask (verl-project/verl rollout_corr_helper.py @ 20c30bf8)
    on padded [B, T] tensors: the modified response mask."""
    log_ratio = (old - rollout).clamp(-20.0, 20.0)
    k1, k2, k3 = -log_ratio, 0.5 * log_ratio**2, torch.exp(log_ratio) - 1.0 - log_ratio
    specs = [s.strip() for s in thresholds.split(",")]
    opts = [o.strip() for o in options.split(",")]
    specs = specs * len(opts) if len(specs) == 1 else specs
    combined = torch.ones_like(mask)
    mf = mask.to(old.dtype)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:  # verl_F.masked_mean(x, mask, axis=-1)
        return (x * mf).sum(-1) / (mf.sum(-1) + 1e-8)

    for opt, spec in zip(opts, specs, strict=True):
        if opt.endswith("k1"):
            lo, hi = (float(x) for x in spec.split("_")) if "_" in spec else (1 / float(spec), float(spec))
            lo_log, hi_log = math.log(lo), math.log(hi)
        else:
            upper = float(spec)
        if opt == "binary_kl":
            eps = 1e-6
            p = torch.exp(old.float()).clamp(eps, 1 - eps)
            q = torch.exp(rollout.float()).clamp(eps, 1 - eps)
            fwd = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
            rev = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
            keep = torch.maximum(fwd, rev).to(old.dtype) <= upper
        elif opt.startswith("token"):
            stat = {"k1": k1, "k2": k2, "k3": k3}[opt[-2:]]
            keep = (stat >= lo_log) & (stat <= hi_log) if opt.endswith("k1") else stat <= upper
        else:
            stat = {"k1": k1, "k2": k2, "k3": k3}[opt[-2:]]
            if opt.startswith("seq_sum"):
                seq = (stat * mf).sum(-1)
            elif opt.startswith("seq_mean"):
                seq = masked_mean(stat)
            else:  # seq_max
                seq = stat.masked_fill(~mask.bool(), float("-inf")).max(-1).values
            keep = ((seq >= lo_log) & (seq <= hi_log) if opt.endswith("k1") else seq <= upper)[
                :, None
            ].expand_as(mask)
        combined = combined * keep.to(mask.dtype)
    return mask * combined


def criteria(options: str, thresholds: str) -> tuple[RejectionCriterion, ...]:
    """The same options as softgate's criteria."""
    specs = [s.strip() for s in thresholds.split(",")]
    opts = [o.strip() for o in options.split(",")]
    specs = specs * len(opts) if len(specs) == 1 else specs
    out = []
    for opt, spec in zip(opts, specs, strict=True):
        level, stat = ("token", "binary_kl") if opt == "binary_kl" else (opt[:-3], opt[-2:])
        lo, hi = (float(x) for x in spec.split("_")) if "_" in spec else (None, float(spec))
        out.append(RejectionCriterion(upper=hi, statistic=stat, level=level, lower=lo))
    return tuple(out)


def padded_batch(
    seed: int = 0, dtype: torch.dtype = F64
) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ragged batch of 12 sequences (one empty, one fully masked) with holes in its mask, and
    the same as padded [B, T] old, rollout and mask (0 past each length)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 9, 0, 3, 12, 7, 1, 8, 10, 4, 6, 11])
    b, t = len(lengths), int(lengths.max())
    pad = torch.arange(t)[None, :] < lengths[:, None]
    logp = -torch.rand(b, t, generator=g, dtype=F64) * 2 - 0.05
    old = (logp + torch.randn(b, t, generator=g, dtype=F64) * 0.2).clamp(max=-1e-3)
    # sequences off by a little, by a lot, and one token far off in an otherwise close sequence
    spread = torch.tensor([0.05, 0.4, 0.1, 0.8, 0.05, 0.3, 1.0, 0.02, 0.6, 0.1, 0.2, 0.05], dtype=F64)
    rollout = (old + torch.randn(b, t, generator=g, dtype=F64) * spread[:, None]).clamp(max=-1e-3)
    rollout[7, 3] = old[7, 3] - 3.0
    mask = pad & (torch.rand(b, t, generator=g) > 0.15)
    mask[5] = False  # a sequence with no trained token
    flat = pad.flatten()
    batch = Batch(
        logp=logp.flatten()[flat].to(dtype),
        old_logp=old.flatten()[flat].to(dtype),
        rollout_logp=rollout.flatten()[flat].to(dtype),
        mask=mask.flatten()[flat],
        offsets=Batch.offsets_from_lengths(lengths),
        advantages=torch.linspace(-1, 1, b, dtype=dtype),
    )
    return batch, old.to(dtype).to(F64), rollout.to(dtype).to(F64), mask.to(F64)


OPTIONS = [
    ("token_k1", "0.6_1.5"),
    ("token_k1", "1.5"),
    ("token_k2", "0.02"),
    ("token_k3", "0.02"),
    ("seq_sum_k1", "0.5_1.6"),
    ("seq_sum_k2", "0.1"),
    ("seq_sum_k3", "0.1"),
    ("seq_mean_k1", "0.95_1.05"),
    ("seq_mean_k2", "0.01"),
    ("seq_mean_k3", "0.01"),
    ("seq_max_k2", "0.2"),
    ("seq_max_k3", "0.2"),
    ("binary_kl", "0.01"),
    ("token_k1,seq_mean_k3", "0.5_2.0,0.01"),
    ("token_k3,seq_max_k2,binary_kl", "0.05"),
]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(("options", "thresholds"), OPTIONS)
def test_rejection_is_verl_rollout_rs(options: str, thresholds: str, dtype: torch.dtype) -> None:
    """Every rollout_rs option of verl, alone and chained: the tokens left trained are verl's
    modified response mask, and the loss and gradient are those of the batch sent with that mask
    (no rejection): a rejected token is out of the loss, the gradient and the normalisers."""
    batch, old, rollout, mask = padded_batch(dtype=dtype)
    want = verl_rejection_mask(old, rollout, mask, options, thresholds)
    pad = torch.arange(old.shape[1])[None, :] < (batch.offsets[1:] - batch.offsets[:-1])[:, None]
    want_flat = want.flatten()[pad.flatten()].bool()
    for objective in (Grpo(), Sapo()):
        config = LossConfig(objective=objective, aggregation=dataclasses.replace(LossConfig().aggregation, mode="token_mean"),
                            rejection=criteria(options, thresholds))  # fmt: skip
        got = ENGINE.loss(batch, config)
        assert torch.equal(got.mask, want_flat), (options, objective)
        n_rejected = int((batch.mask & ~want_flat).sum())
        assert got.metrics["rejected_tokens"] == n_rejected
        # verl's rollout_rs_seq_masked_fraction: the rows with a token masked, of all rows
        seqs = int(((mask.bool() & ~want.bool()).any(-1)).sum())
        assert got.metrics["rejected_seqs"] == seqs
        plain = ENGINE.loss(
            dataclasses.replace(batch, mask=want_flat), dataclasses.replace(config, rejection=())
        )
        assert got.loss == plain.loss and torch.equal(got.grad, plain.grad)
        assert got.metrics["num_tokens"] == plain.metrics["num_tokens"] == int(want_flat.sum())
    if options not in ("seq_max_k2", "seq_max_k3"):  # (the batch's maxima are all below 0.2 there)
        assert 0 < n_rejected < int(batch.mask.sum()), (options, "the batch should test something")


def test_rejection_without_a_mask_and_with_a_kl_term() -> None:
    """Without a mask every token is trained until rejected; a rejected token's KL term goes too."""
    batch, *_ = padded_batch()
    batch = dataclasses.replace(batch, mask=None, ref_logp=batch.logp - 0.1)
    config = LossConfig(
        objective=Grpo(), kl=KLConfig("k3", beta=0.1), rejection=criteria("seq_mean_k3", "0.01")
    )
    got = ENGINE.loss(batch, config)
    assert 0 < got.metrics["rejected_tokens"] < batch.logp.numel()
    plain = ENGINE.loss(dataclasses.replace(batch, mask=got.mask), dataclasses.replace(config, rejection=()))
    assert got.loss == plain.loss and got.kl_loss == plain.kl_loss and torch.equal(got.grad, plain.grad)
    assert torch.all(got.grad[~got.mask] == 0)


def test_rejection_on_policy_reads_logp() -> None:
    """Without old_logp (on-policy) the statistic is of logp - rollout (verl's bypass mode)."""
    batch, *_ = padded_batch()
    on_policy = dataclasses.replace(batch, old_logp=None)
    config = LossConfig(objective=Grpo(), rejection=criteria("token_k1", "0.6_1.5"))
    got = ENGINE.loss(on_policy, config)
    as_old = ENGINE.loss(dataclasses.replace(batch, old_logp=batch.logp), config)
    assert torch.equal(got.mask, as_old.mask) and got.metrics["rejected_tokens"] > 0


@pytest.mark.parametrize(
    ("garbage", "dtype"),
    [(-1e300, F64), (1e300, F64), (50.0, F64), (3e38, torch.float32), (-3e38, torch.float32)],
)
def test_rejection_ignores_garbage_on_masked_tokens(garbage: float, dtype: torch.dtype) -> None:
    """Finite garbage on masked tokens (non-finite values are refused wherever they are) changes
    nothing: not the statistics of the sequences, not the loss, not a metric (the sampler's KL
    of float32 garbage of opposite signs overflows before its mask zeroes it: clamped first)."""
    batch, *_ = padded_batch(dtype=dtype)
    config = LossConfig(
        objective=Grpo(),
        rejection=(
            *criteria(
                "token_k3,seq_sum_k1,seq_max_k2,binary_kl,seq_max_k1,seq_min_k1",
                "0.5,0.5_2.0,0.5,0.5,2.0,1.1",
            ),
            RejectionCriterion(0.5, "k3_reverse", "seq_sum"),
        ),
    )
    clean = ENGINE.loss(batch, config)
    dirty = batch
    for name in ("logp", "old_logp", "rollout_logp"):
        x = getattr(batch, name).clone()
        x[~batch.mask] = garbage if name != "rollout_logp" else -garbage
        dirty = dataclasses.replace(dirty, **{name: x})
    got = ENGINE.loss(dirty, config)
    assert got.loss == clean.loss and torch.equal(got.grad, clean.grad) and torch.equal(got.mask, clean.mask)
    assert got.metrics == clean.metrics and clean.metrics["rollout_k3_kl"] > 0


@pytest.mark.parametrize(("field", "value", "reason"), [("old_logp", float("nan"), "non_finite"),
                                                         ("old_logp", 3.0, "positive_logp"),
                                                         ("logp", float("nan"), "non_finite"),
                                                         ("logp", 3.0, "positive_logp")])  # fmt: skip
def test_a_bad_value_is_refused_not_rejected(field: str, value: float, reason: str) -> None:
    """A NaN or positive log-prob on a trained token is refused, naming it, even where rejection
    would have taken the token out (the kernel, which checks them otherwise, never sees it)."""
    batch, *_ = padded_batch()
    i = int(torch.nonzero(batch.mask)[3, 0])
    x = getattr(batch, field).clone()
    x[i] = value
    batch = dataclasses.replace(batch, **{field: x})
    with pytest.raises(InputError) as e:
        ENGINE.loss(batch, LossConfig(objective=Grpo(), rejection=criteria("token_k1", "1.01")))
    assert any(v.field == field and v.reason.startswith(reason) and v.index == i for v in e.value.violations)


@pytest.mark.parametrize(
    ("criterion", "field", "reason"),
    [
        (RejectionCriterion(), "rejection[0].upper", "missing"),
        (RejectionCriterion(upper=-1.0), "rejection[0].upper", "out_of_range"),
        (RejectionCriterion(upper=float("nan")), "rejection[0].upper", "out_of_range"),
        (RejectionCriterion(upper=2.0, lower=3.0), "rejection[0].lower", "out_of_range"),
        (RejectionCriterion(upper=0.5), "rejection[0].upper", "out_of_range"),  # [2, 0.5]: empty
        (RejectionCriterion(upper=2.0, lower=-1.0), "rejection[0].lower", "out_of_range"),
        (RejectionCriterion(upper=-math.inf), "rejection[0].upper", "out_of_range"),
        (RejectionCriterion(upper=2.0, statistic="k3", lower=0.5), "rejection[0].lower", "unsupported"),
        (
            RejectionCriterion(upper=2.0, statistic="binary_kl", level="seq_mean"),
            "rejection[0].level",
            "unsupported",
        ),
        (
            RejectionCriterion(upper=2.0, statistic="binary_kl", level="seq_min"),
            "rejection[0].level",
            "unsupported",
        ),
        (RejectionCriterion(upper=2.0, statistic="k4"), "rejection[0].statistic", "unknown_name"),  # type: ignore[arg-type]
        (RejectionCriterion(upper=2.0, level="seq"), "rejection[0].level", "unknown_name"),  # type: ignore[arg-type]
    ],
)
def test_bad_criteria_are_refused(criterion: RejectionCriterion, field: str, reason: str) -> None:
    batch, *_ = padded_batch()
    with pytest.raises(InputError) as e:
        ENGINE.loss(batch, LossConfig(rejection=(RejectionCriterion(upper=2.0), criterion)[1:]))
    assert [(v.field, v.reason.split(":")[0]) for v in e.value.violations] == [(field, reason)]


def test_a_sequence_mismatch_weight_is_the_sampled_sequence_s() -> None:
    """A sequence-level mismatch weight (verl's rollout_is: sequence) sums old - rollout over the
    mask as sent, rejected tokens included, as verl computes its IS weights before and apart from
    rejection (a review: one rejected token made the weight 1 where verl's is e): the loss of a
    batch sent with the kept mask and each sequence's rejected log-weight moved onto one of its
    kept tokens."""
    batch, *_ = padded_batch()
    config = LossConfig(
        objective=Grpo(),
        mismatch=MismatchConfig(level="sequence", mode="truncate", cap=5.0),
        rejection=criteria("token_k1", "0.7_1.4"),
    )
    got = ENGINE.loss(batch, config)
    kept, sent = got.mask, batch.mask
    lv = torch.where(sent, batch.old_logp - batch.rollout_logp, torch.zeros_like(batch.logp))
    rollout, moved = batch.rollout_logp.clone(), 0
    for i in range(batch.num_seqs):
        lo, hi = int(batch.offsets[i]), int(batch.offsets[i + 1])
        rejected, kept_idx = sent[lo:hi] & ~kept[lo:hi], torch.nonzero(kept[lo:hi])
        if rejected.any() and len(kept_idx):
            rollout[lo + int(kept_idx[0, 0])] -= lv[lo:hi][rejected].sum()
            moved += 1
    assert moved >= 3
    plain = ENGINE.loss(
        dataclasses.replace(batch, mask=kept, rollout_logp=rollout), dataclasses.replace(config, rejection=())
    )
    assert got.loss == pytest.approx(plain.loss, rel=1e-12)
    torch.testing.assert_close(got.grad, plain.grad, rtol=1e-12, atol=1e-15)
    # and not the weight of the kept tokens alone
    alone = ENGINE.loss(dataclasses.replace(batch, mask=kept), dataclasses.replace(config, rejection=()))
    assert alone.loss != pytest.approx(got.loss, rel=1e-6)


def verl_geometric_is(old, rollout, mask, mode: str, upper: float, lower: float | None, eps: float = 1e-8):
    """verl's compute_rollout_importance_weights at rollout_is_level="geometric" (volcengine/verl
    verl/trainer/ppo/mismatch_helper.py @ 10350b61) on padded [B, T] tensors: (the weights,
    the modified response mask). Each row's weight is exp of its masked mean of old - rollout
    (clamped at +-20); truncate clamps it at upper, mask keeps it and drops the rows outside
    [lower, upper] (lower None: 1 / upper) from the response mask. `eps`: masked_mean's."""
    mf = mask.to(old.dtype)
    count = mf.sum(-1, keepdim=True)
    mean = ((old - rollout) * mf).sum(-1, keepdim=True) / (count + eps if eps else count.clamp(min=1))
    w = torch.exp(mean.clamp(-20.0, 20.0)).expand_as(old)
    lower = 1.0 / upper if lower is None else lower
    if mode == "truncate":
        return w.clamp(max=upper) * mf, mf
    return w * mf, mf * ((w >= lower) & (w <= upper)).to(old.dtype)


@pytest.mark.parametrize(("mode", "lower"), [("truncate", None), ("mask", None), ("mask", 0.98)])
def test_verl_geometric_rollout_is(mode: str, lower: float | None) -> None:
    """verl's rollout_is_level geometric with its vanilla PPO loss (dual clip 3, token-mean over
    the modified mask): truncate is mismatch_level="geometric", mismatch_cap=upper; mask keeps
    each kept row's raw weight and takes the rejected rows out of the normaliser, verl's
    seq_mean_k1 rejection with the window inverted (k1 = -d): a "geometric" weight with a cap
    above every weight and RejectionCriterion("k1", "seq_mean", lower=1 / upper, upper=1 / lower)."""
    batch, old, rollout, mask = padded_batch(3)
    b, t = mask.shape
    upper = 1.3  # (the rows' weights: 0.96 to 1.57)
    # verl's masked_mean adds 1e-8 to each row's count, a relative 1e-8 / |y_i| of its
    # log-weight (the results then agree to ~1e-8): left out here, they agree to rounding
    w, m2 = verl_geometric_is(old, rollout, mask, mode, upper, lower, eps=0.0)
    pad = torch.arange(t)[None, :] < (batch.offsets[1:] - batch.offsets[:-1])[:, None]
    logp = torch.zeros(b, t, dtype=F64)
    logp[pad] = batch.logp
    x = logp.clone().requires_grad_(True)
    adv = batch.advantages[:, None].expand(b, t)
    ratio = torch.exp(x - old)
    l1 = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    pg = torch.where(adv < 0, torch.minimum(-adv * 3.0, l1), l1) * w
    want = (pg * m2).sum() / m2.sum()
    (grad,) = torch.autograd.grad(want, x)
    if mode == "truncate":
        mm, rejection = MismatchConfig(level="geometric", mode="truncate", cap=upper), ()
        assert bool((w > upper - 1e-12).any())
    else:
        lo = 1.0 / upper if lower is None else lower
        mm = MismatchConfig(level="geometric", mode="truncate", cap=1e300)
        rejection = (RejectionCriterion(upper=1.0 / lo, statistic="k1", level="seq_mean", lower=1.0 / upper),)
        assert 0 < int((mask - m2).sum()) < int(m2.sum())
    cfg = LossConfig(
        objective=Grpo(eps_low=0.2, eps_high=0.2, dual_clip=3.0), mismatch=mm, rejection=rejection
    )
    cfg = dataclasses.replace(cfg, aggregation=dataclasses.replace(cfg.aggregation, mode="token_mean"))
    got = ENGINE.loss(batch, cfg)
    assert got.loss == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(got.grad, grad[pad], rtol=1e-12, atol=1e-15)
    assert torch.equal(got.mask, m2[pad].bool())


@pytest.mark.parametrize(
    "criterion",
    [
        RejectionCriterion(1.5, "k1", "seq_max", 0.9),
        RejectionCriterion(1.3, "k1", "seq_min", 0.5),
        RejectionCriterion(math.inf, "k1", "seq_min", 0.7),
        RejectionCriterion(0.002, "k2", "seq_min"),
        RejectionCriterion(0.005, "k3", "seq_min"),
        RejectionCriterion(0.005, "k3_reverse", "seq_min"),
        RejectionCriterion(0.05, "k3_reverse", "token"),
        RejectionCriterion(0.1, "k3_reverse", "seq_sum"),
        RejectionCriterion(0.02, "k3_reverse", "seq_mean"),
    ],
)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_the_largest_and_smallest_of_a_sequence(criterion: RejectionCriterion, dtype: torch.dtype) -> None:
    """Levels seq_max and seq_min (k1 too: its window bounds the sequence's largest or smallest
    -d), and k3_reverse (AReaL's kl_k3) at every level, against the reference's, written
    sequence by sequence (tests/reference_loss.py)."""
    batch, *_ = padded_batch(dtype=dtype)
    config = LossConfig(objective=Grpo(), rejection=(criterion,))
    got = ENGINE.loss(batch, config)
    want = batch.mask & reference_rejection_keep(batch, config, batch.mask)
    assert torch.equal(got.mask, want)
    assert 0 < got.metrics["rejected_tokens"] < int(batch.mask.sum())


@pytest.mark.parametrize("level", ["token", "seq_sum", "seq_mean", "seq_max", "seq_min"])
def test_k3_reverse_is_not_its_mirror(level: str) -> None:
    """k3_reverse (AReaL's kl_k3, exp(-d) - 1 + d) against the reference on a batch whose
    one-token sequence has d = -1.5 (k3_reverse 1.98, k3 0.72), bounded at 1: its mask is not
    k3's (a review: on the plain batch the two gave the same masks, so the tests could not tell
    them apart)."""
    batch, *_ = padded_batch()
    assert batch.old_logp is not None and batch.rollout_logp is not None and batch.mask is not None
    i = int(batch.offsets[6])  # (sequence 6 has one token)
    old, rollout, mask = batch.old_logp.clone(), batch.rollout_logp.clone(), batch.mask.clone()
    old[i], rollout[i], mask[i] = -2.0, -0.5, True
    batch = dataclasses.replace(batch, old_logp=old, rollout_logp=rollout, mask=mask)
    upper = 1.0
    config = LossConfig(objective=Grpo(), rejection=(RejectionCriterion(upper, "k3_reverse", level),))
    got = ENGINE.loss(batch, config)
    assert torch.equal(got.mask, batch.mask & reference_rejection_keep(batch, config, batch.mask))
    mirror = dataclasses.replace(config, rejection=(RejectionCriterion(upper, "k3", level),))
    assert not torch.equal(got.mask, ENGINE.loss(batch, mirror).mask)


def verl_veto_mask(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """verl's rollout_is_veto_threshold (volcengine/verl verl/trainer/ppo/mismatch_helper.py @
    10350b61) on padded [B, T] tensors: a row holding one trained token with old - rollout
    (unclamped) below log tau leaves the response mask, in either rollout_is_mode."""
    catastrophic = ((old - rollout) < math.log(tau)) & mask.bool()
    return mask * (~catastrophic.any(-1, keepdim=True)).to(mask.dtype)


@pytest.mark.parametrize("tau", [0.8, 0.6])
def test_verl_veto_is_k1_at_seq_max(tau: float) -> None:
    """verl's veto is k1's largest over a sequence under log(1 / tau), with a lower bound below
    every clamped k1: RejectionCriterion(1 / tau, "k1", "seq_max", 0). (softgate clamps d
    at log_ratio_clamp first: the two differ only for a tau below exp(-20).)"""
    batch, old, rollout, mask = padded_batch()
    pad = torch.arange(old.shape[1])[None, :] < (batch.offsets[1:] - batch.offsets[:-1])[:, None]
    want = verl_veto_mask(old, rollout, mask, tau).flatten()[pad.flatten()].bool()
    config = LossConfig(objective=Grpo(), rejection=(RejectionCriterion(1 / tau, "k1", "seq_max", 0.0),))
    got = ENGINE.loss(batch, config)
    assert torch.equal(got.mask, want)
    assert 0 < got.metrics["rejected_tokens"] < int(batch.mask.sum())


def test_an_empty_batch_and_empty_sequences() -> None:
    config = LossConfig(
        objective=Grpo(), rejection=criteria("seq_max_k2,seq_mean_k1,token_k3", "0.1,0.9_1.1,0.1")
    )
    empty = Batch(logp=torch.zeros(0, dtype=F64), old_logp=torch.zeros(0, dtype=F64), rollout_logp=torch.zeros(0, dtype=F64),
                  offsets=torch.tensor([0, 0, 0]), advantages=torch.zeros(2, dtype=F64))  # fmt: skip
    for b in (
        empty,
        dataclasses.replace(empty, offsets=torch.tensor([0]), advantages=torch.zeros(0, dtype=F64)),
    ):
        r = ENGINE.loss(b, config)
        assert r.loss == 0.0 and r.metrics["rejected_tokens"] == 0.0


def test_rejection_needs_rollout_logp() -> None:
    batch, *_ = padded_batch()
    with pytest.raises(InputError) as e:
        ENGINE.loss(
            dataclasses.replace(batch, rollout_logp=None), LossConfig(rejection=criteria("token_k1", "2"))
        )
    assert [v.field for v in e.value.violations] == ["rollout_logp"]


# ---------------------------------------------------------------- the client's keywords


def test_client_maps_verl_keywords_to_criteria() -> None:
    from softgate_client import RejectionCriterion as C
    from softgate_client import build_loss_config, rejection_from_verl

    assert rejection_from_verl("token_k1,seq_max_k3, binary_kl", "0.5_2.0,0.1,0.02") == (
        C(2.0, "k1", "token", 0.5),
        C(0.1, "k3", "seq_max"),
        C(0.02, "binary_kl", "token"),
    )
    assert rejection_from_verl("seq_sum_k1,seq_mean_k2", 1.5) == (
        C(1.5, "k1", "seq_sum"),
        C(1.5, "k2", "seq_mean"),
    )
    c = build_loss_config(objective="grpo", rollout_rs="token_k2", rollout_rs_threshold="0.1")
    assert c.rejection == (C(0.1, "k2", "token"),)
    assert build_loss_config(rejection=C(2.0)).rejection == (C(2.0),)
    # verl's "off": rollout_rs null beside its threshold's default
    assert build_loss_config(rollout_rs=None, rollout_rs_threshold=2.0).rejection == ()
    assert build_loss_config(rollout_rs_threshold=2.0).rejection == ()
    # an earlier verl's levels bound the IS weight exp(-k1): the k1 window is [1 / upper, 1 / lower]
    assert rejection_from_verl("geometric", 1.25, 0.5) == (C(2.0, "k1", "seq_mean", 0.8),)
    assert rejection_from_verl("sequence", "2") == (C(2.0, "k1", "seq_sum", 0.5),)
    # its veto joins the criteria given, or stands alone
    veto = C(1e4, "k1", "seq_max", 0.0)
    assert build_loss_config(rollout_token_veto_threshold=1e-4).rejection == (veto,)
    c = build_loss_config(rollout_rs="token_k2", rollout_rs_threshold=0.1, rollout_token_veto_threshold=1e-4)
    assert c.rejection == (C(0.1, "k2", "token"), veto)
    assert build_loss_config(rejection=C(2.0), rollout_token_veto_threshold=1e-4).rejection == (C(2.0), veto)
    again = build_loss_config(
        build_loss_config(rollout_token_veto_threshold=1e-4), rollout_token_veto_threshold=1e-4
    )
    assert again.rejection == (veto,)  # (not twice)


def verl_earlier_rejection_mask(old, rollout, mask, rollout_rs, upper, lower, veto):
    """An earlier verl's compute_rollout_correction_and_rejection_mask (volcengine/verl
    verl/trainer/ppo/rollout_corr_helper.py @ 0b4e2a81) on padded [B, T] tensors: the IS weight
    exp(d), exp(sum d) or exp(mean d) of d = old - rollout (clamped at +-20 after the sum) kept
    in [lower, upper] (lower None: 1 / upper), then the veto (None: off): a row holding one
    trained token with d below log veto leaves the mask. verl's masked_mean adds 1e-8 to a
    row's count: left out here (no row sits within 1e-8 of a bound)."""
    d = old - rollout
    if rollout_rs == "token":
        y = d
    else:
        y = (d * mask).sum(-1, keepdim=True)
        y = y / mask.sum(-1, keepdim=True).clamp(min=1) if rollout_rs == "geometric" else y
    w = torch.exp(y.clamp(-20.0, 20.0)).expand_as(d)
    lower = 1.0 / upper if lower is None else lower
    out = mask * ((w >= lower) & (w <= upper)).to(mask.dtype)
    if veto is not None:
        catastrophic = (d < math.log(veto)) & mask.bool()
        out = out * (~catastrophic.any(-1, keepdim=True)).to(mask.dtype)
    return out


@pytest.mark.parametrize(
    ("rollout_rs", "upper", "lower", "veto"),
    [
        ("token", 1.5, None, None),
        ("token", 1.3, 0.6, 0.7),
        ("sequence", 1.4, 0.5, None),
        ("geometric", 1.05, None, 0.6),
        ("geometric", 1.1, 0.97, None),
    ],
)
def test_client_keywords_of_an_earlier_verl(rollout_rs: str, upper: float, lower: float | None, veto) -> None:
    """rollout_rs token / sequence / geometric with rollout_rs_threshold(_lower) and
    rollout_token_veto_threshold, through the client's keywords: the tokens left trained are
    that verl's modified response mask."""
    from softgate_client import build_loss_config

    batch, old, rollout, mask = padded_batch()
    want = verl_earlier_rejection_mask(old, rollout, mask, rollout_rs, upper, lower, veto)
    pad = torch.arange(old.shape[1])[None, :] < (batch.offsets[1:] - batch.offsets[:-1])[:, None]
    want_flat = want.flatten()[pad.flatten()].bool()
    kw = {"rollout_rs_threshold_lower": lower, "rollout_token_veto_threshold": veto}
    client = build_loss_config(rollout_rs=rollout_rs, rollout_rs_threshold=upper, **kw)
    rejection = tuple(RejectionCriterion(**dataclasses.asdict(c)) for c in client.rejection)
    got = ENGINE.loss(batch, LossConfig(objective=Grpo(), rejection=rejection))
    assert torch.equal(got.mask, want_flat)
    assert 0 < got.metrics["rejected_tokens"] < int(batch.mask.sum())


def test_client_leaves_open_a_bound_verl_never_reaches() -> None:
    """That verl clamps a row's log-weight at +-20 before the bounds: rows of 1000 tokens whose
    sum of d is +800 and -800 are kept by an upper of 1e10 (> e^20) or a lower of 1e-10
    (< e^-20), so the client leaves those sides open (k1's lower 0, upper +inf) rather than
    bound softgate's unclamped sum of clamped d (a bound of 1e300 would reject |800| > 690).
    A lower of 0.5 or an upper of 2 rejects the row past it, as verl does; so does a veto."""
    from softgate_client import build_loss_config

    d = torch.tensor([[0.8] * 1000, [-0.8] * 1000, [0.0005] * 1000], dtype=F64)
    old = torch.full((3, 1000), -30.0, dtype=F64)
    rollout, mask = old - d, torch.ones(3, 1000, dtype=F64)
    batch = Batch(
        logp=old.flatten(),
        old_logp=old.flatten(),
        rollout_logp=rollout.flatten(),
        offsets=Batch.offsets_from_lengths(torch.tensor([1000, 1000, 1000])),
        advantages=torch.tensor([1.0, -1.0, 0.5], dtype=F64),
    )
    for upper, lower, veto, kept in (
        (1e10, None, None, 3),
        (1e10, 0.5, None, 2),
        (2.0, 1e-10, None, 2),
        (math.inf, 0.0, None, 3),
        (1e10, None, 0.5, 2),
    ):
        want = verl_earlier_rejection_mask(old, rollout, mask, "sequence", upper, lower, veto)
        kw = {"rollout_rs_threshold_lower": lower, "rollout_token_veto_threshold": veto}
        client = build_loss_config(rollout_rs="sequence", rollout_rs_threshold=upper, **kw)
        rejection = tuple(RejectionCriterion(**dataclasses.asdict(c)) for c in client.rejection)
        got = ENGINE.loss(batch, LossConfig(objective=Grpo(), rejection=rejection))
        assert torch.equal(got.mask, want.flatten().bool()), (upper, lower, veto)
        assert int(want.sum()) == 1000 * kept, (upper, lower, veto)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"rollout_rs": "token_k1"}, "rollout_rs_threshold"),
        ({"rollout_rs": "seqmean_k3", "rollout_rs_threshold": 2.0}, "rollout_rs"),
        ({"rollout_rs": "token_k4", "rollout_rs_threshold": 2.0}, "rollout_rs"),
        ({"rollout_rs": "seq_max_k1", "rollout_rs_threshold": 2.0}, "rollout_rs"),
        (
            {"rollout_rs": "token_k2", "rollout_rs_threshold": 2.0, "rejection": [RejectionCriterion(1.0)]},
            "rollout_rs",
        ),
        ({"rollout_rs": "token_k1,seq_mean_k3", "rollout_rs_threshold": "1,2,3"}, "rollout_rs_threshold"),
        ({"rollout_rs": "token_k1", "rollout_rs_threshold": "high"}, "rollout_rs_threshold"),
        ({"rejection": ["token_k1"]}, "config.rejection"),
        (
            {"rollout_rs": "token_k1", "rollout_rs_threshold": 2.0, "rollout_rs_threshold_lower": 0.5},
            "rollout_rs_threshold_lower",
        ),
        ({"rollout_rs": "geometric", "rollout_rs_threshold": "0.5_2.0"}, "rollout_rs_threshold"),
        (
            {"rollout_rs": "token", "rollout_rs_threshold": 2.0, "rollout_rs_threshold_lower": -1},
            "rollout_rs_threshold_lower",
        ),
        ({"rollout_token_veto_threshold": 0.0}, "rollout_token_veto_threshold"),
        ({"rollout_token_veto_threshold": "low"}, "rollout_token_veto_threshold"),
        ({"rollout_token_veto_threshold": float("nan")}, "rollout_token_veto_threshold"),
        ({"rollout_token_veto_threshold": 5e-324}, "rollout_token_veto_threshold"),  # (1 / tau: inf)
        ({"rollout_token_veto_threshold": True}, "rollout_token_veto_threshold"),
        # below exp(-log_ratio_clamp): d is clamped there first, so it could never fire
        ({"rollout_token_veto_threshold": 1e-4, "log_ratio_clamp": 5.0}, "rollout_token_veto_threshold"),
        ({"rollout_token_veto_threshold": 2e-9}, "rollout_token_veto_threshold"),
        # an empty window: verl rejects every token
        ({"rollout_rs": "token", "rollout_rs_threshold": 0.5}, "rollout_rs_threshold"),
        (
            {"rollout_rs": "geometric", "rollout_rs_threshold": 2.0, "rollout_rs_threshold_lower": 3.0},
            "rollout_rs_threshold_lower",
        ),
    ],
)
def test_client_refuses_bad_rejection_keywords(kw: dict, field: str) -> None:
    from softgate_client import InvalidArgumentError, build_loss_config

    with pytest.raises(InvalidArgumentError) as e:
        build_loss_config(**kw)
    assert [v.field for v in e.value.violations] == [field]


def test_many_criteria_are_refused_without_reading_each() -> None:
    """A review: 200k criteria, each with an unknown field, made 200k violations (0.8 s) and the
    decode cache kept every such request's (~157 MB each). Now a repeated field's first items are
    scanned, the count refused, and a refused decode not cached."""
    from softgate.grpc import codec
    from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

    one = pb.RejectionCriterion(upper=1.0).SerializeToString() + b"\x48\x01"  # + unknown field 9
    raw = (b"\x4a" + bytes([len(one)]) + one) * 5000  # LossConfig.rejection (field 9) x 5000
    msg = pb.LossConfig.FromString(raw)
    assert len(msg.rejection) == 5000
    v: list = []
    codec.decode_loss_config(msg, v)
    assert any(x.field == "config.rejection" and x.reason.startswith("out_of_range") for x in v)
    assert len(v) <= codec.MAX_REPEATED_SCANNED + 1
    assert not any(key[0] == msg.SerializeToString(deterministic=True) for key in codec._CONFIGS)


# ---------------------------------------------------------------- the sampler's divergence


def verl_offpolicy_kl(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """verl's compute_offpolicy_metrics' `kl` and `k3_kl` (rollout_corr_helper.py @ 20c30bf8)."""
    mf = mask.to(old.dtype)
    kl = ((rollout - old) * mf).sum() / (mf.sum() + 1e-8)
    log_ratio = old - rollout
    k3 = ((torch.exp(log_ratio) - log_ratio - 1) * mf).sum() / (mf.sum() + 1e-8)
    return float(kl), float(k3)


def test_rollout_divergence_is_verl_s_offpolicy_kl() -> None:
    """rollout_kl and rollout_k3_kl are verl's rollout_corr/kl and k3_kl over the mask as sent,
    with or without rejection (it would hide the mismatch it removes); 0 without rollout_logp;
    on-policy, of logp."""
    batch, old, rollout, mask = padded_batch()
    kl, k3 = verl_offpolicy_kl(old, rollout, mask)
    n = int(mask.sum())
    for rejection in ((), criteria("token_k1", "0.7_1.4")):
        got = ENGINE.loss(batch, LossConfig(objective=Grpo(), rejection=rejection)).metrics
        assert got["rollout_tokens"] == n
        assert got["rollout_kl"] == pytest.approx(kl * (n + 1e-8) / n, rel=1e-12)
        assert got["rollout_k3_kl"] == pytest.approx(k3 * (n + 1e-8) / n, rel=1e-12)
    assert kl < 0 < k3
    # k1 unclamped, as verl's (a review: one token 30 nats off read 5.0 where verl's is 7.475)
    far = dataclasses.replace(batch, old_logp=batch.old_logp.clone())
    far.old_logp[int(torch.nonzero(batch.mask)[0, 0])] = (
        far.rollout_logp[int(torch.nonzero(batch.mask)[0, 0])] - 30.0
    )
    want = float((far.rollout_logp - far.old_logp)[far.mask].mean())
    got = ENGINE.loss(far, LossConfig(objective=Grpo())).metrics
    assert got["rollout_kl"] == pytest.approx(want, rel=1e-12) and want > kl + 29 / n
    none = ENGINE.loss(dataclasses.replace(batch, rollout_logp=None), LossConfig(objective=Grpo())).metrics
    assert none["rollout_tokens"] == none["rollout_kl"] == none["rollout_k3_kl"] == 0.0
    on = ENGINE.loss(dataclasses.replace(batch, old_logp=None), LossConfig(objective=Grpo())).metrics
    as_old = ENGINE.loss(
        dataclasses.replace(batch, old_logp=batch.logp), LossConfig(objective=Grpo())
    ).metrics
    assert on["rollout_kl"] == as_old["rollout_kl"] != got["rollout_kl"]
