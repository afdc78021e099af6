"""verl's gradient-variance proxy (the variance_proxy_* metrics): against verl's
compute_variance_proxy_metrics written out, over estimators, corrections, holed masks and
untrained sequences; worked by hand; neutral without sum_pi_squared; on a GPU's code path."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from softgate.engine import (
    AdvantageConfig,
    Batch,
    Engine,
    LossConfig,
    MismatchConfig,
    RejectionCriterion,
)
from softgate.engine.config import Grpo, Sapo
from test_token_baseline import _engine_batch, _gpu_code_path, _padded_batch, _ragged
from torch import Tensor

F64 = torch.float64
E = Engine(device="cpu", compile=False)
NAMES = ("variance_proxy_w", "variance_proxy_a_squared", "variance_proxy_total_power")


def _verl_variance_proxy(
    old: Tensor, spp: Tensor, mask: Tensor, advantages: Tensor, is_weights: Tensor | None
) -> dict[str, float]:
    """verl's compute_variance_proxy_metrics (verl/trainer/ppo/metric_utils.py) on padded [B, T]
    tensors, written out (without a gradient norm: proxy 1 and 3 are the trainer's)."""

    def masked_mean(x: Tensor) -> Tensor:  # verl_F.masked_mean
        return (x * mask).sum(-1) / (mask.sum(-1) + 1e-8)

    w_tok = 1 - 2 * torch.exp(old) + spp
    if is_weights is not None:
        w_tok = w_tok * is_weights**2
    a = masked_mean(advantages)
    w = (w_tok * mask).sum(-1)
    if is_weights is not None:
        rho = masked_mean(is_weights)
        w_orig = (w_tok / torch.clamp(is_weights**2, min=1e-10) * mask).sum(-1).clamp(min=0.0)
        power = (rho**2 * a**2 * w_orig).mean()
    else:
        power = (a**2 * w.clamp(min=0.0)).mean()
    return {
        "variance_proxy_w": float(w.mean()),
        "variance_proxy_a_squared": float((a**2).mean()),
        "variance_proxy_total_power": float(power),
    }


def _padded(x: Tensor, lengths: Tensor, width: int) -> Tensor:
    """A ragged [N] tensor back to right-padded [B, width] rows (0 in the padding)."""
    out = torch.zeros(lengths.numel(), width, dtype=x.dtype)
    start = 0
    for i, n in enumerate(lengths.tolist()):
        out[i, :n] = x[start : start + n]
        start += n
    return out


def _case(seed: int) -> tuple[Tensor, ...]:
    """verl-shaped rows with holes in the mask and one row left untrained, a current policy off
    the old one and a sampler off both."""
    lengths, mask, old, spp, rewards, groups = _padded_batch(seed, holes=True)
    mask[5] = 0.0  # a sequence without a trained token: A = W = 0 in verl's means
    g = torch.Generator().manual_seed(seed)
    logp = (old + 0.1 * torch.randn(old.shape, generator=g, dtype=F64)).clamp(max=-1e-4)
    rollout = (old + 0.2 * torch.randn(old.shape, generator=g, dtype=F64)).clamp(max=-1e-4)
    return lengths, mask, logp, old, spp, rewards, groups, rollout


def _is_weights(mm: MismatchConfig, old: Tensor, rollout: Tensor, mask: Tensor) -> Tensor:
    """verl's rollout_is_weights for the corrections tested, from their definitions."""
    d = old - rollout
    v = torch.exp((d * mask).sum(-1, keepdim=True)).expand_as(d) if mm.level == "sequence" else torch.exp(d)
    v = v.clamp(max=mm.cap) if mm.mode == "truncate" else torch.where((v >= mm.lo) & (v <= mm.hi), v, 0.0)
    if mm.batch_normalize:
        some = mask.sum(-1) > 0
        mean = v[:, 0][some].mean() if mm.level == "sequence" else (v * mask).sum() / mask.sum()
        v = v / mean
    return v


CORRECTIONS = {
    "none": None,
    "token-tis": MismatchConfig(mode="truncate", cap=1.1),
    "token-icepop": MismatchConfig(mode="mask", lo=0.85, hi=1.15),  # v = 0 tokens count 0 in W'
    "sequence-tis-batch_normalize": MismatchConfig(
        level="sequence", mode="truncate", cap=1.5, batch_normalize=True
    ),
}
ESTIMATORS = ("grpo", "rloo", "optimal_token_baseline", "sent")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("correction", list(CORRECTIONS))
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_verl(seed: int, correction: str, estimator: str) -> None:
    """Equal to verl's over the advantages the loss reads (per sequence from rewards, per token
    from the optimal token baseline, or the caller's own per token) and its IS weights."""
    lengths, mask, logp, old, spp, rewards, groups, rollout = _case(seed)
    mm = CORRECTIONS[correction]
    extra: dict[str, Tensor] = {}
    if mm is not None:
        extra["rollout_logp"] = _ragged(rollout, lengths)
    if estimator == "sent":
        g = torch.Generator().manual_seed(100 + seed)
        extra["advantages"] = _ragged(torch.randn(mask.shape, generator=g, dtype=F64), lengths)
        adv = AdvantageConfig()
    else:
        extra.update(rewards=rewards, group_ids=groups)
        adv = AdvantageConfig(estimator)
    batch = _engine_batch(lengths, mask, logp, old, spp, **extra)
    res = E.loss(batch, LossConfig(objective=Sapo(), advantages=adv, mismatch=mm))
    t = mask.shape[1]
    a = _padded(res.advantages, lengths, t)  # (0 off the mask)
    if estimator == "sent":  # the caller's own, masked garbage included: verl's masked means skip it
        a = _padded(extra["advantages"], lengths, t)
    is_w = None if mm is None else _is_weights(mm, old, rollout, mask)
    want = _verl_variance_proxy(old, spp, mask, a, is_w)
    got = {k: res.metrics[k] for k in NAMES}
    assert got == pytest.approx(want, rel=1e-7, abs=1e-12)  # (verl's masked means add 1e-8 to counts)
    assert res.metrics["variance_proxy_tokens"] == res.metrics["num_tokens"] == float(mask.sum())
    assert got["variance_proxy_total_power"] > 0 and got["variance_proxy_a_squared"] > 0
    if mm is not None:  # the weights matter
        plain = _verl_variance_proxy(old, spp, mask, a, None)
        assert plain["variance_proxy_total_power"] != pytest.approx(
            got["variance_proxy_total_power"], rel=1e-4
        )


def _with_rewards(seed: int) -> tuple[Batch, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """_case's rows as the engine's batch with rewards and the sampler's log-probs, and the
    padded pieces verl reads (lengths, mask, old, spp, rollout)."""
    lengths, mask, logp, old, spp, rewards, groups, rollout = _case(seed)
    batch = _engine_batch(
        lengths,
        mask,
        logp,
        old,
        spp,
        rewards=rewards,
        group_ids=groups,
        rollout_logp=_ragged(rollout, lengths),
    )
    return batch, lengths, mask, old, spp, rollout


@pytest.mark.parametrize("correction", ["none", "sequence-tis-batch_normalize"])
def test_rejected_tokens_are_not_read(correction: str) -> None:
    """Rollout rejection takes tokens out of the mask the proxy reads, as it does verl's
    response_mask; a correction's weights read the mask as sent (rejected tokens included), as
    the loss's own weights and verl's rollout_is_weights do."""
    batch, lengths, mask, old, spp, rollout = _with_rewards(3)
    mm = CORRECTIONS[correction]
    res = E.loss(batch, LossConfig(mismatch=mm, rejection=(RejectionCriterion(1.15, "k1", "token", 0.87),)))
    assert 0 < res.metrics["rejected_tokens"] < float(mask.sum()) / 2
    left = _padded(res.mask.to(F64), lengths, mask.shape[1])
    a = _padded(res.advantages, lengths, mask.shape[1])
    is_w = None if mm is None else _is_weights(mm, old, rollout, mask)
    want = _verl_variance_proxy(old, spp, left, a, is_w)
    assert {k: res.metrics[k] for k in NAMES} == pytest.approx(want, rel=1e-7, abs=1e-12)
    assert res.metrics["variance_proxy_tokens"] == float(left.sum())
    if mm is not None:  # (weights over the mask left would differ)
        left_weights = _verl_variance_proxy(old, spp, left, a, _is_weights(mm, old, rollout, left))
        assert want["variance_proxy_w"] != pytest.approx(left_weights["variance_proxy_w"], rel=1e-4)


def test_a_rejected_token_s_infinite_weight_is_not_read() -> None:
    """seq_mask leaves each token its own weight, unbounded: a token rejection took out may
    hold v = inf, which must not turn W into NaN (and so 0)."""
    n = 200
    old = torch.full((n,), math.log(0.5))
    rollout = old.clone()
    rollout[7] = -95.0  # v = e^(old - rollout) overflows float32
    batch = Batch(
        logp=old.clone(),
        old_logp=old,
        offsets=torch.tensor([0, n]),
        advantages=torch.tensor([1.0]),
        advantage_level="sequence",
        rollout_logp=rollout,
        sum_pi_squared=torch.full((n,), 0.35),
    )
    cfg = LossConfig(
        mismatch=MismatchConfig(mode="seq_mask", lo=0.5, hi=2.0),
        rejection=(RejectionCriterion(2.0, "k1", "token", 0.5),),
    )
    m = E.loss(batch, cfg).metrics
    assert m["rejected_tokens"] == 1.0
    w = (n - 1) * (1 - 2 * 0.5 + 0.35)  # v = 1 on every token left
    assert m["variance_proxy_w"] == pytest.approx(w, rel=1e-5)
    assert m["variance_proxy_total_power"] == pytest.approx(w, rel=1e-5)


def test_a_tiny_weight_counts_as_verl_floors_it() -> None:
    """W' divides the weighted w by max(v^2, 1e-10) (verl's): a token of v = 1e-3 counts its
    whole w, one of v = 1e-7 counts w * 1e-14 / 1e-10."""
    p = torch.tensor([[1e-7, 1e-3, 0.5]], dtype=F64)
    rollout = torch.tensor([[0.0, 0.0, math.log(0.5)]], dtype=F64)  # v = 1e-7, 1e-3, 1
    spp = torch.tensor([[0.5, 0.3, 0.4]], dtype=F64)
    mask = torch.ones(1, 3, dtype=F64)
    batch = Batch(
        logp=p.log()[0],
        old_logp=p.log()[0],
        offsets=torch.tensor([0, 3]),
        advantages=torch.tensor([2.0], dtype=F64),
        advantage_level="sequence",
        rollout_logp=rollout[0],
        sum_pi_squared=spp[0],
    )
    m = E.loss(batch, LossConfig(mismatch=MismatchConfig(mode="truncate", cap=2.0))).metrics
    v = torch.exp(p.log() - rollout)
    want = _verl_variance_proxy(p.log(), spp, mask, torch.full((1, 3), 2.0, dtype=F64), v)
    assert {k: m[k] for k in NAMES} == pytest.approx(want, rel=1e-7)  # (verl's 1e-8 in its counts)
    w = 1 - 2 * p + spp
    by_hand = float((v.mean() * 2) ** 2 * (w[0, 0] * 1e-4 + w[0, 1] + w[0, 2]))
    assert m["variance_proxy_total_power"] == pytest.approx(by_hand, rel=1e-9)


def test_worked_by_hand() -> None:
    """Two sequences and an empty one: w = 1 - 2 pi + sum pi^2 per token, W and A per sequence,
    means over the three; under TIS the total power takes each sequence's mean weight squared
    and W without the weights."""
    p = torch.tensor([0.5, 0.25, 0.8], dtype=F64)
    spp = torch.tensor([0.5, 0.25, 0.68], dtype=F64)  # w = 0.5, 0.75, 0.08
    batch = Batch(
        logp=p.log(),
        old_logp=p.log(),
        offsets=torch.tensor([0, 2, 2, 3]),
        advantages=torch.tensor([1.0, 0.0, -2.0], dtype=F64),
        advantage_level="sequence",
        sum_pi_squared=spp,
    )
    m = E.loss(batch, LossConfig()).metrics
    w = (1.25, 0.0, 0.08)
    assert m["variance_proxy_w"] == pytest.approx(sum(w) / 3, rel=1e-14)
    assert m["variance_proxy_a_squared"] == pytest.approx((1 + 0 + 4) / 3, rel=1e-14)
    assert m["variance_proxy_total_power"] == pytest.approx((1.25 + 4 * 0.08) / 3, rel=1e-14)
    # TIS: token weights exp(old - rollout) capped at 1.5: 2 -> 1.5, 1 and 1.2
    rollout = p.log() - torch.tensor([2.0, 1.0, 1.2], dtype=F64).log()
    tis = LossConfig(mismatch=MismatchConfig(mode="truncate", cap=1.5))
    m = E.loss(dataclasses.replace(batch, rollout_logp=rollout), tis).metrics
    assert m["variance_proxy_w"] == pytest.approx((0.5 * 2.25 + 0.75 + 0.08 * 1.44) / 3, rel=1e-14)
    assert m["variance_proxy_a_squared"] == pytest.approx(5 / 3, rel=1e-14)
    assert m["variance_proxy_total_power"] == pytest.approx((1.25**2 * 1.25 + 1.44 * 4 * 0.08) / 3, rel=1e-14)


def test_neutral_without_sum_pi_squared() -> None:
    lengths, mask, logp, old, spp, rewards, groups, _ = _case(4)
    batch = _engine_batch(lengths, mask, logp, old, spp, rewards=rewards, group_ids=groups)
    m = E.loss(dataclasses.replace(batch, sum_pi_squared=None), LossConfig(objective=Grpo())).metrics
    assert [m[k] for k in ("variance_proxy_tokens", *NAMES)] == [0.0] * 4
    assert E.loss(batch, LossConfig(objective=Grpo())).metrics["variance_proxy_tokens"] > 0


def test_a_rounded_negative_energy_is_kept_in_w_and_cut_in_the_power() -> None:
    """sum_pi_squared may fall below pi^2 by its tolerance (1e-3): W then reads as sent, as
    verl's expected_w, and the total power takes max(W, 0), as verl's."""
    p = torch.tensor([1.0 - 1e-9, 1.0 - 1e-9], dtype=F64)
    batch = Batch(
        logp=p.log(),
        old_logp=p.log(),
        offsets=torch.tensor([0, 2]),
        advantages=torch.tensor([1.0], dtype=F64),
        sum_pi_squared=p.square() - 5e-4,
    )
    tis = LossConfig(mismatch=MismatchConfig(mode="truncate", cap=2.0))
    for cfg, b in ((LossConfig(), batch), (tis, dataclasses.replace(batch, rollout_logp=p.log() - 0.5))):
        m = E.loss(b, cfg).metrics
        assert m["variance_proxy_w"] == pytest.approx(
            -1e-3 * (1.0 if cfg.mismatch is None else math.e), rel=1e-5
        )
        assert m["variance_proxy_total_power"] == 0.0


@pytest.mark.parametrize("correction", ["none", "sequence-tis-batch_normalize"])
def test_the_gpu_code_path_gives_the_same(monkeypatch: pytest.MonkeyPatch, correction: str) -> None:
    batch = _with_rewards(5)[0]
    cfg = LossConfig(advantages=AdvantageConfig("optimal_token_baseline"), mismatch=CORRECTIONS[correction])
    want = E.loss(batch, cfg).metrics
    _gpu_code_path(monkeypatch)
    got = E.loss(batch, cfg).metrics
    assert {k: got[k] for k in NAMES} == pytest.approx({k: want[k] for k in NAMES}, rel=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_equal_the_cpu() -> None:
    batch = _with_rewards(6)[0]
    cfg = LossConfig(mismatch=CORRECTIONS["token-tis"])
    want = E.loss(batch, cfg).metrics
    got = Engine(device="cuda", compile=False).loss(batch, cfg).metrics
    assert {k: got[k] for k in NAMES} == pytest.approx({k: want[k] for k in NAMES}, rel=1e-12)


def test_values_past_float64_saturate_and_a_zero_weight_stays_zero() -> None:
    """Advantages of 1e200 square past float64: the largest float, not to_floats' 0 for a
    non-finite metric; a sequence whose every weight v is 0 (IcePop) has no gradient, so its
    term is 0 whatever its advantage (not 0 * inf = NaN)."""
    p = torch.tensor([0.5, 0.25, 0.8], dtype=F64)
    batch = Batch(
        logp=p.log(),
        old_logp=p.log(),
        offsets=torch.tensor([0, 2, 3]),
        advantages=torch.tensor([1e200, 1.0], dtype=F64),
        advantage_level="sequence",
        sum_pi_squared=p * p + 0.01,
    )
    m = E.loss(batch, LossConfig()).metrics
    big = torch.finfo(F64).max
    assert m["variance_proxy_a_squared"] == m["variance_proxy_total_power"] == big
    # the first sequence's weights are 2 and 4, outside IcePop's [0.5, 1.5]: v = 0 there
    rollout = p.log() - torch.tensor([2.0, 4.0, 1.0], dtype=F64).log()
    icepop = LossConfig(mismatch=MismatchConfig(mode="mask", lo=0.5, hi=1.5))
    m = E.loss(dataclasses.replace(batch, rollout_logp=rollout), icepop).metrics
    assert m["variance_proxy_a_squared"] == big
    assert m["variance_proxy_total_power"] == pytest.approx(
        (0.0 + 1.0 * (1 - 1.6 + 0.64 + 0.01)) / 2, rel=1e-12
    )
