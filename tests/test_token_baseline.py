"""The optimal token baseline (estimator `optimal_token_baseline`): against verl's two functions
written out, against the loop reference over objectives and corrections, on a GPU's code path,
its edge cases, refusals, and through the client and server."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from reference_loss import random_batch, reference_loss
from softgate.engine import (
    AdvantageConfig,
    AggregationConfig,
    Batch,
    Engine,
    InputError,
    LossConfig,
    MismatchConfig,
    RejectionCriterion,
    RewardKLConfig,
)
from softgate.engine.config import Cispo, Grpo, Gspo, Sapo
from torch import Tensor

F64 = torch.float64
E = Engine(device="cpu", compile=False)
OTB = "optimal_token_baseline"


def _verl_otb(
    rewards: Tensor,
    mask: Tensor,
    index: list[int],
    old: Tensor,
    spp: Tensor,
    is_weights: Tensor | None,
    zero_tail: bool,
    tir: bool,
    eps: float = 1e-8,
) -> Tensor:
    """verl's compute_optimal_token_baseline_advantage (`tir=False`) and
    compute_multi_turn_optimal_token_baseline_advantage (`tir=True`) on padded [B, T] tensors,
    written out from verl/trainer/ppo/core_algos.py (outcome rewards on each row's last token)."""
    b, t = mask.shape
    lengths = mask.sum(-1).long()
    level = torch.zeros(b, t, dtype=F64)
    for i in range(b):
        nz = mask[i].nonzero()
        if len(nz):
            level[i, nz[-1]] = rewards[i]
    returns = (level * mask).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * torch.exp(old) + spp
    if is_weights is not None:
        w = w * is_weights**2
    wc = (w * mask).cumsum(-1)
    groups: dict[int, list[int]] = defaultdict(list)
    if not tir:
        for i in range(b):
            groups[index[i]].append(i)
        base = torch.zeros_like(returns)
        for ti in groups.values():
            if len(ti) == 1:
                continue
            idx = torch.tensor(ti)
            num = (returns[idx] * wc[idx] * mask[idx]).sum(0)
            den = (wc[idx] * mask[idx]).sum(0) + eps
            base[idx] = (num / den).unsqueeze(0).expand(len(ti), -1)
            if zero_tail:
                rl = mask[idx].sum(-1)
                srt, _ = torch.sort(rl)
                top, second = int(srt[-1]), int(srt[-2])
                at = (rl == top).nonzero(as_tuple=True)[0]
                if at.numel() == 1 and top > second:
                    base[ti[int(at[0])], second:] = 0.0
        return (returns - base) * mask
    width = int(lengths.max())
    aw = torch.zeros(b, width, dtype=F64)
    ar = torch.zeros_like(aw)
    for i in range(b):
        if lengths[i] == 0:
            continue
        mk = mask[i].bool()
        aw[i, : lengths[i]] = wc[i, mk]
        ar[i, : lengths[i]] = returns[i, mk]
    for i in range(b):
        if lengths[i] > 0:
            groups[index[i]].append(i)
    base = torch.zeros_like(ar)
    for ti in groups.values():
        idx = torch.tensor(ti)
        if len(ti) == 1:
            continue
        base[idx] = (ar[idx] * aw[idx]).sum(0) / (aw[idx].sum(0) + eps)
        if zero_tail:
            rl = lengths[idx]
            srt, _ = torch.sort(rl)
            top, second = int(srt[-1]), int(srt[-2])
            at = (rl == top).nonzero(as_tuple=True)[0]
            if at.numel() == 1 and top > second:
                base[ti[int(at[0])], second:] = 0.0
    adv = torch.zeros(b, t, dtype=F64)
    for i in range(b):
        if lengths[i] > 0:
            adv[i, mask[i].bool()] = (ar - base)[i, : lengths[i]]
    return adv * mask


def _padded_batch(seed: int, holes: bool) -> tuple[Tensor, ...]:
    """[B, T] padded rows (right padding), a contiguous or holed mask, 0/1 and real rewards."""
    g = torch.Generator().manual_seed(seed)
    b, t = 14, 11
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[int(torch.randint(0, b, (1,), generator=g))] = t  # a longest member, alone or not
    cols = torch.arange(t)
    mask = (cols < lengths[:, None]).to(F64)
    if holes:  # tool output inside a response: trained tokens with untrained ones between
        mask = mask * (torch.rand(b, t, generator=g) > 0.25)
        mask[:, 0] = 1.0
    p = torch.rand(b, t, generator=g, dtype=F64) * 0.98 + 0.01
    spp = p * p + (1 - p) ** 2 * torch.rand(b, t, generator=g, dtype=F64)
    rewards = torch.where(torch.rand(b, generator=g) < 0.5, torch.rand(b, generator=g, dtype=F64), 0.0)
    rewards[:3] = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    groups = [0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 0, 1, 5, 5]
    return lengths, mask, p.log(), spp, rewards, torch.tensor(groups)


def _ragged(x: Tensor, lengths: Tensor) -> Tensor:
    return torch.cat([x[i, : int(lengths[i])] for i in range(x.shape[0])])


def _engine_batch(
    lengths: Tensor, mask: Tensor, logp: Tensor, old: Tensor, spp: Tensor, **seq: Tensor
) -> Batch:
    """The padded rows as the engine's ragged batch, each row cut at its length."""
    return Batch(
        logp=_ragged(logp, lengths),
        old_logp=_ragged(old, lengths),
        offsets=Batch.offsets_from_lengths(lengths),
        mask=_ragged(mask, lengths).bool(),
        sum_pi_squared=_ragged(spp, lengths),
        **seq,
    )


@pytest.mark.parametrize(
    ("holes", "position", "zero_tail"),
    list(itertools.product((False, True), ("token", "trained"), (False, True))),
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_verl(seed: int, holes: bool, position: str, zero_tail: bool) -> None:
    """verl's optimal_token_baseline (position token) and tir_optimal_token_baseline (position
    trained), with and without handle_zero_tail, on contiguous and holed masks."""
    lengths, mask, old, spp, rewards, groups = _padded_batch(seed, holes)
    batch = _engine_batch(lengths, mask, old, old, spp, rewards=rewards, group_ids=groups)
    adv = AdvantageConfig(OTB, eps=1e-8, position=position, zero_tail=zero_tail)
    got = E.loss(batch, LossConfig(objective=Grpo(), advantages=adv)).advantages
    want = _ragged(
        _verl_otb(rewards, mask, groups.tolist(), old, spp, None, zero_tail, position == "trained"), lengths
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    if zero_tail:  # the case reaches it: a member alone at its group's longest
        plain = dataclasses.replace(adv, zero_tail=False)
        assert not torch.equal(E.loss(batch, LossConfig(objective=Grpo(), advantages=plain)).advantages, got)


def test_equals_verl_with_its_importance_weights() -> None:
    """Under rollout IS verl scales each w by the weight squared: softgate by the weight its
    loss applies (TIS, truncated at the cap, here on both sides of it)."""
    lengths, mask, old, spp, rewards, groups = _padded_batch(7, holes=False)
    g = torch.Generator().manual_seed(7)
    rollout = (old + 0.2 * torch.randn(old.shape, generator=g, dtype=F64)).clamp(max=-1e-4)
    cap = 1.1
    is_w = torch.exp(old - rollout).clamp(max=cap) * mask
    assert bool(((is_w > 1.0) & (is_w < cap)).any()) and bool((is_w == cap).any())
    batch = _engine_batch(
        lengths,
        mask,
        old,
        old,
        spp,
        rewards=rewards,
        group_ids=groups,
        rollout_logp=_ragged(rollout, lengths),
    )
    cfg = LossConfig(
        objective=Grpo(),
        advantages=AdvantageConfig(OTB, eps=1e-8),
        mismatch=MismatchConfig(mode="truncate", cap=cap),
    )
    got = E.loss(batch, cfg).advantages
    want = _ragged(_verl_otb(rewards, mask, groups.tolist(), old, spp, is_w, False, False), lengths)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)  # (v^2 rounded in another order)
    plain = E.loss(batch, dataclasses.replace(cfg, mismatch=None)).advantages
    assert not torch.allclose(plain, got)


def test_a_negative_w_counts_zero() -> None:
    """A sum_pi_squared rounded below pi^2 (by up to the 1e-3 allowed) can make 1 - 2 pi + S
    negative for a likely token: it counts 0 (verl's would subtract it from W)."""
    lengths, mask, old, _, rewards, groups = _padded_batch(5, holes=False)
    old[:, :3] = math.log(0.99)  # (1 - pi)^2 = 1e-4: S = pi^2 - 5e-4 makes w = -4e-4
    p = old.exp()
    low = (p * p - 5e-4).clamp(min=0.0)
    assert bool((1 - 2 * p + low < 0).any())
    batch = _engine_batch(lengths, mask, old, old, low, rewards=rewards, group_ids=groups)
    got = E.loss(batch, LossConfig(objective=Grpo(), advantages=AdvantageConfig(OTB, eps=1e-8))).advantages
    clamped = torch.maximum(low, 2 * p - 1)  # (w = 1 - 2 pi + S at least 0)
    want = _verl_otb(rewards, mask, groups.tolist(), old, clamped, None, False, False)
    torch.testing.assert_close(got, _ragged(want, lengths), rtol=0, atol=1e-14)
    raw = _verl_otb(rewards, mask, groups.tolist(), old, low, None, False, False)
    assert not torch.allclose(got, _ragged(raw, lengths))


@pytest.mark.parametrize("gpu_path", [False, True])
def test_confident_tokens_keep_their_digits(monkeypatch: pytest.MonkeyPatch, gpu_path: bool) -> None:
    """W early in a long sequence of confident tokens is ~1e-10 per token beside a batch whose
    running sum is ~1e4: each W sums its own sequence's values (verl's row-wise cumsum), so the
    advantages equal verl's to 1e-9 relative on the host and on a GPU's code path (a cumsum
    over the batch less each sequence's start was off by 15%: an audit)."""
    if gpu_path:
        _gpu_code_path(monkeypatch)
    b, t = 4, 20_000
    p = torch.full((b, t), 0.5, dtype=F64)
    p[:, : t // 2] = 1 - 1e-5
    p[0] = 0.5  # a first row of unsure tokens: the running sum is large before the others start
    old = p.log()
    spp = p * p + 0.3 * (1 - p) ** 2
    mask = torch.ones(b, t, dtype=F64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.25], dtype=F64)
    groups = torch.tensor([0, 0, 0, 0])
    lengths = torch.full((b,), t)
    batch = _engine_batch(lengths, mask, old, old, spp, rewards=rewards, group_ids=groups)
    got = E.loss(batch, LossConfig(objective=Grpo(), advantages=AdvantageConfig(OTB, eps=1e-8))).advantages
    want = _ragged(_verl_otb(rewards, mask, groups.tolist(), old, spp, None, False, False), lengths)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_eps_0_gives_no_baseline_where_nothing_weighs() -> None:
    """eps 0: at a position where every member's W is 0 (sure tokens, S = pi^2 = 1) the
    baseline is 0, not 0 / 0 (a NaN the kernel took for bad input: an audit)."""
    p = torch.tensor([1.0, 0.5, 1.0, 0.5], dtype=F64)
    batch = Batch(
        logp=torch.tensor([0.0, -0.5, 0.0, -0.7], dtype=F64),
        old_logp=p.log(),
        offsets=torch.tensor([0, 2, 4]),
        rewards=torch.tensor([1.0, 0.0], dtype=F64),
        group_ids=torch.tensor([0, 0]),
        sum_pi_squared=p * p,
    )
    a = _adv(batch, eps=0.0)
    assert a.tolist()[0] == 1.0 and a.tolist()[2] == 0.0  # position 0: W = 0 for both, B = 0
    assert bool(torch.isfinite(a).all())


def test_a_weight_whose_square_overflows_is_refused() -> None:
    """A mismatch weight above ~1e154 (a cap of 1e300) squares to infinity in W: refused as an
    overflow of `mismatch`, not a NaN baseline; a token whose w is 0 stays 0 whatever its v
    (0 x inf was a NaN)."""
    old = torch.tensor([-0.1, math.log(0.5), -0.5, -0.6], dtype=F64)
    rollout = torch.tensor([-0.1, -1e3, -0.5, -0.6], dtype=F64)  # v = e^999: inf, capped to 1e300
    batch = Batch(
        logp=old.clone(),
        old_logp=old,
        rollout_logp=rollout,
        offsets=torch.tensor([0, 2, 4]),
        rewards=torch.tensor([1.0, 0.0], dtype=F64),
        group_ids=torch.tensor([0, 0]),
        sum_pi_squared=old.exp().square() + 0.25 * (1 - old.exp()) ** 2,
    )
    cfg = LossConfig(
        objective=Grpo(),
        advantages=AdvantageConfig(OTB),
        mismatch=MismatchConfig(mode="truncate", cap=1e300),
    )
    with pytest.raises(InputError) as e:
        E.loss(batch, cfg)
    assert [v.field for v in e.value.violations] == ["mismatch"]
    assert e.value.violations[0].reason.startswith("overflow")
    # a sure token (pi = 1, S = 1: w = 1 - 2 + 1 = 0) with the same overflowing weight
    sure_old, sure_s = old.clone(), batch.sum_pi_squared.clone()
    sure_old[1], sure_s[1] = 0.0, 1.0
    sure = dataclasses.replace(batch, logp=sure_old.clone(), old_logp=sure_old, sum_pi_squared=sure_s)
    assert bool(torch.isfinite(E.loss(sure, cfg).advantages).all())


def _with_spp(b: Batch, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    assert b.old_logp is not None
    p = b.old_logp.to(F64).exp().clamp(max=1.0)
    spp = p * p + (1 - p) ** 2 * torch.rand(p.shape, generator=g, dtype=F64)
    return dataclasses.replace(b, sum_pi_squared=spp.to(b.logp.dtype))


CASES = {
    "grpo": LossConfig(objective=Grpo()),
    "sapo-token_mean": LossConfig(objective=Sapo(), aggregation=AggregationConfig(mode="token_mean")),
    "cispo-trained-zero_tail": LossConfig(
        objective=Cispo(), advantages=AdvantageConfig(OTB, position="trained", zero_tail=True)
    ),
    "grpo-sequence-tis-batch_normalize": LossConfig(
        objective=Grpo(),
        mismatch=MismatchConfig(level="sequence", mode="truncate", cap=1.3, batch_normalize=True),
    ),
    "grpo-icepop": LossConfig(objective=Grpo(), mismatch=MismatchConfig(mode="mask", lo=0.8, hi=1.25)),
    "grpo-seq_mask": LossConfig(objective=Grpo(), mismatch=MismatchConfig(mode="seq_mask", lo=0.7, hi=1.4)),
    "sapo-reward_kl-token": LossConfig(reward_kl=RewardKLConfig(beta=0.1, estimator="k3", level="token")),
    "sapo-reward_kl-sequence": LossConfig(
        reward_kl=RewardKLConfig(beta=0.1, estimator="k1", level="sequence")
    ),
    "grpo-rejection": LossConfig(objective=Grpo(), rejection=(RejectionCriterion(1.2, "k1", "token", 0.85),)),
    # a sequence's weight reads its tokens as sent, rejected ones included
    "grpo-rejection-sequence-tis": LossConfig(
        objective=Grpo(),
        rejection=(RejectionCriterion(1.2, "k1", "token", 0.85),),
        mismatch=MismatchConfig(level="sequence", mode="truncate", cap=1.3),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", range(6))
def test_equals_the_loop_reference(name: str, seed: int) -> None:
    """Loss and gradient equal the loop reference (tests/reference_loss.py) over ragged batches
    with empty sequences, masked garbage and non-contiguous groups."""
    base = CASES[name]
    adv = base.advantages if base.advantages.estimator == OTB else AdvantageConfig(OTB)
    cfg = dataclasses.replace(base, advantages=adv)
    batch = _with_spp(random_batch(900 + seed, max_seqs=8, max_len=7), seed)
    res = E.loss(batch, cfg)
    ref = reference_loss(batch, cfg)
    assert res.loss == pytest.approx(float(ref.loss.detach()), rel=1e-10, abs=1e-13)
    g = ref.grad()
    torch.testing.assert_close(
        res.grad, g, rtol=1e-9, atol=1e-12 * max(1.0, float(g.abs().max()) if g.numel() else 1.0)
    )


def _gpu_code_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device-generic code a GPU runs (sorted segment sums, gathers), here on the CPU."""
    from softgate.engine import (
        advantages,
        aggregate,
        chunked,
        compiled,
        loss,
        returns,
        segments,
        token_baseline,
        validation,
    )

    for m in (segments, loss, aggregate, validation, compiled, chunked, returns, token_baseline):
        monkeypatch.setattr(m, "host_shortcuts", lambda device: False)
    for m in (segments, advantages):
        monkeypatch.setattr(m, "use_segment_reduce", lambda device: True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("position", ["token", "trained"])
def test_on_cuda_equal_the_cpu(position: str) -> None:
    """On a GPU (its sorted segment sums, argsort and scan), float64 and float32, with a
    correction: the CPU's advantages and gradient to summation order, the same bits twice."""
    cuda = Engine(device="cuda", host_max_tokens=0, compile=False)
    for dtype in (F64, torch.float32):
        batch = _with_spp(random_batch(78, max_seqs=64, max_len=40, dtype=dtype), 78)
        cfg = LossConfig(
            objective=Grpo(),
            advantages=AdvantageConfig(OTB, position=position, zero_tail=True),
            mismatch=MismatchConfig(mode="truncate", cap=1.2),
        )
        want = E.loss(batch, cfg)
        got = cuda.loss(batch, cfg)
        again = cuda.loss(batch, cfg)
        assert torch.equal(got.advantages, again.advantages) and torch.equal(got.grad, again.grad)
        tol = 1e-12 if dtype == F64 else 1e-5
        torch.testing.assert_close(got.advantages.cpu(), want.advantages, rtol=tol, atol=tol)
        torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("position", ["token", "trained"])
def test_the_gpu_code_path_gives_the_same_advantages(monkeypatch: pytest.MonkeyPatch, position: str) -> None:
    """The device-generic code (sorted segment sums) a GPU runs, here on the CPU, gives the
    host's advantages to summation order."""
    batch = _with_spp(random_batch(77, max_seqs=16, max_len=12), 77)
    cfg = LossConfig(objective=Grpo(), advantages=AdvantageConfig(OTB, position=position, zero_tail=True))
    want = E.loss(batch, cfg)
    _gpu_code_path(monkeypatch)
    got = E.loss(batch, cfg)
    torch.testing.assert_close(got.advantages, want.advantages, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-15)


def _small(
    rewards: list[float], groups: list[int], lengths: list[int], mask: list[bool] | None = None
) -> Batch:
    n = sum(lengths)
    p = torch.linspace(0.2, 0.9, n, dtype=F64)
    return Batch(
        logp=p.log(),
        old_logp=p.log(),
        offsets=Batch.offsets_from_lengths(torch.tensor(lengths)),
        mask=None if mask is None else torch.tensor(mask),
        rewards=torch.tensor(rewards, dtype=F64),
        group_ids=torch.tensor(groups),
        sum_pi_squared=p * p + 0.5 * (1 - p) ** 2,
    )


def _adv(batch: Batch, **kw: object) -> Tensor:
    return E.loss(batch, LossConfig(objective=Grpo(), advantages=AdvantageConfig(OTB, **kw))).advantages  # type: ignore[arg-type]


def test_a_lone_member_keeps_its_return() -> None:
    """Groups of one (and a group whose other member trains no token) have baseline 0: A = R,
    where GRPO gives 0; an untrained token's advantage is 0."""
    batch = _small([0.7, -0.4, 1.0, 0.3], [1, 2, 3, 3], [3, 2, 2, 2], [True] * 7 + [False, False])
    a = _adv(batch)
    assert a.tolist() == [0.7, 0.7, 0.7, -0.4, -0.4, 1.0, 1.0, 0.0, 0.0]


def test_equal_rewards_leave_almost_nothing() -> None:
    """All members rewarded alike: the baseline is R sum W / (sum W + eps), R less a share of
    eps, and exactly 0 with eps 0."""
    batch = _small([1.0, 1.0, 1.0], [0, 0, 0], [2, 3, 4])
    assert float(_adv(batch).abs().max()) < 1e-5
    assert not bool(_adv(batch, eps=0.0).any())


def test_a_sequence_without_a_reward_is_no_member() -> None:
    """skip_nan_components: a NaN reward leaves its sequence out of its group's sums (advantage
    0), as if it were not sent."""
    with_nan = _small([1.0, math.nan, 0.0, 0.5], [0, 0, 0, 0], [3, 3, 2, 4])
    without = _small([1.0, 0.0, 0.5], [0, 0, 0], [3, 2, 4])
    without = dataclasses.replace(
        without,
        logp=torch.cat([with_nan.logp[:3], with_nan.logp[6:]]),
        old_logp=torch.cat([with_nan.old_logp[:3], with_nan.old_logp[6:]]),
        sum_pi_squared=torch.cat([with_nan.sum_pi_squared[:3], with_nan.sum_pi_squared[6:]]),
    )
    a = _adv(with_nan, skip_nan_components=True)
    assert not bool(a[3:6].any())
    torch.testing.assert_close(torch.cat([a[:3], a[6:]]), _adv(without), rtol=0, atol=0)


def test_a_confident_token_weighs_little() -> None:
    """w = (1 - pi)^2 + (sum_pi_squared - pi^2): a member whose tokens the policy was sure of
    barely moves the baseline; an unsure one pulls it to its own reward."""
    p = torch.tensor([0.999, 0.999, 0.2, 0.2], dtype=F64)
    batch = Batch(
        logp=p.log(),
        old_logp=p.log(),
        offsets=torch.tensor([0, 2, 4]),
        rewards=torch.tensor([1.0, 0.0], dtype=F64),
        group_ids=torch.tensor([0, 0]),
        sum_pi_squared=p * p,
    )
    a = _adv(batch)
    assert float(a[2]) > -1e-3  # the unsure member's baseline is ~ its own reward 0
    assert float(a[0]) > 0.99  # the sure member's advantage ~ R - 0


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (LossConfig(advantages=AdvantageConfig(OTB, scale="group")), "advantages.scale"),
        (LossConfig(advantages=AdvantageConfig(OTB, scale="batch")), "advantages.scale"),
        (LossConfig(advantages=AdvantageConfig(OTB, min_group_std=0.1)), "advantages.min_group_std"),
        (LossConfig(advantages=AdvantageConfig(OTB, gamma=0.9)), "advantages.gamma"),
        (LossConfig(objective=Gspo(), advantages=AdvantageConfig(OTB)), "advantages.estimator"),
        (LossConfig(advantages=AdvantageConfig(OTB, position="padded")), "advantages.position"),  # type: ignore[arg-type]
        (LossConfig(advantages=AdvantageConfig("grpo", position="trained")), "advantages.position"),
        (LossConfig(advantages=AdvantageConfig("grpo", zero_tail=True)), "advantages.zero_tail"),
        (LossConfig(advantages=AdvantageConfig(OTB, zero_tail=1)), "advantages.zero_tail"),  # type: ignore[arg-type]
    ],
)
def test_bad_settings_are_refused(cfg: LossConfig, field: str) -> None:
    batch = _small([1.0, 0.0], [0, 0], [2, 3])
    with pytest.raises(InputError) as e:
        E.loss(batch, cfg)
    assert field in [v.field for v in e.value.violations], e.value
    if field == "advantages.gamma":  # (it made one per sequence, an audit)
        assert "optimal_token_baseline's returns are undiscounted" in str(e.value)


@pytest.mark.parametrize(
    ("spp", "reason"),
    [
        (None, "missing"),
        (-0.1, "out_of_range"),
        (1.01, "out_of_range"),
        (math.nan, "non_finite"),
        # below the token's own pi^2 (0.55^2 = 0.3025) by more than 1e-3: another position's logits
        (0.3, "out_of_range: 0.3 on a trained token is below its own probability squared"),
    ],
)
def test_bad_sum_pi_squared_is_refused(spp: float | None, reason: str) -> None:
    batch = _small([1.0, 0.0], [0, 0], [2, 3], [True, True, True, True, False])
    batch.old_logp[1] = math.log(0.55)
    if spp is None:
        batch = dataclasses.replace(batch, sum_pi_squared=None)
    else:
        batch.sum_pi_squared[1] = spp
    with pytest.raises(InputError) as e:
        E.loss(batch, LossConfig(advantages=AdvantageConfig(OTB)))
    (v,) = e.value.violations
    assert (
        v.field == "sum_pi_squared"
        and v.reason.startswith(reason)
        and v.index == (None if spp is None else 1)
    )
    if spp == 0.3:  # (within the allowance: accepted)
        batch.sum_pi_squared[1] = 0.55**2 - 9e-4
        assert bool(
            torch.isfinite(E.loss(batch, LossConfig(advantages=AdvantageConfig(OTB))).advantages).all()
        )


def test_an_untrained_token_s_sum_pi_squared_is_any_finite_value() -> None:
    batch = _small([1.0, 0.0], [0, 0], [2, 3], [True, True, True, True, False])
    want = _adv(batch)
    batch.sum_pi_squared[4] = 7.5
    assert torch.equal(_adv(batch), want)
    batch.sum_pi_squared[1] = 1.0005  # (rounded over 1 by up to 1e-3: accepted)
    assert bool(torch.isfinite(_adv(batch)).all())


def test_advantages_sent_need_no_sum_pi_squared() -> None:
    """With the batch's own advantages the estimator is not run: sum_pi_squared may be absent,
    and is still checked when sent."""
    batch = _small([1.0, 0.0], [0, 0], [2, 3])
    sent = dataclasses.replace(batch, rewards=None, sum_pi_squared=None, advantages=torch.tensor([0.5, -0.5]))
    cfg = LossConfig(advantages=AdvantageConfig(OTB))
    assert E.loss(sent, cfg).loss == E.loss(sent, LossConfig()).loss
    bad = dataclasses.replace(sent, sum_pi_squared=torch.full((5,), 2.0, dtype=F64))
    with pytest.raises(InputError, match="sum_pi_squared"):
        E.loss(bad, cfg)


@pytest.mark.parametrize("where", ["client", "engine"])
def test_a_half_sum_pi_squared_is_refused_with_where_to_compute_it(where: str) -> None:
    """bf16 sum_pi_squared: `.float()` would keep its rounding (50x the advantages' error of a
    float32 one, a review): the refusal says to compute it in float32 from the logits."""
    batch = _small([1.0, 0.0], [0, 0], [2, 3])
    half = batch.sum_pi_squared.to(torch.bfloat16)
    if where == "client":
        from softgate_client import InvalidArgumentError
        from softgate_client.client import pack_batch

        with pytest.raises(InvalidArgumentError) as e:
            pack_batch(batch.logp, batch.old_logp, offsets=batch.offsets, sum_pi_squared=half)
        reason = e.value.violations[0].description
    else:
        with pytest.raises(InputError) as e2:
            E.loss(
                dataclasses.replace(batch, sum_pi_squared=half), LossConfig(advantages=AdvantageConfig(OTB))
            )
        reason = e2.value.violations[0].reason
    assert reason.startswith("half_precision: sum_pi_squared is bfloat16")
    assert ("sum_pi_squared(logits, temperature)" if where == "client" else "logsumexp(2 * z") in reason


def test_compute_advantages_refuses_it() -> None:
    with pytest.raises(InputError) as e:
        E.advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), AdvantageConfig(OTB))
    assert [v.field for v in e.value.violations] == ["advantages.estimator"]
    assert "per token" in e.value.violations[0].reason


def test_through_the_client_and_server(inprocess_server) -> None:
    """The client's padded [B, T] batch, its keywords and the served result equal the engine's."""
    from softgate_client import SoftgateClient

    _, mask, old, spp, rewards, groups = _padded_batch(3, holes=True)
    logp = (old + 0.05).clamp(max=-1e-4)
    srv = inprocess_server()
    with SoftgateClient(srv.target, timeout=60) as c:
        got = c.loss(
            logp.numpy(),
            old.numpy(),
            mask=mask.numpy(),
            rewards=rewards.numpy(),
            group_ids=groups.numpy(),
            sum_pi_squared=spp.numpy(),
            objective="grpo",
            estimator=OTB,
            adv_eps=1e-8,
            baseline_position="trained",
            zero_tail=True,
            outputs=("advantages",),
        )
    # the client sends rows trimmed to their last trained token, the engine's batch alike
    ends = (mask * torch.arange(1, mask.shape[1] + 1)).amax(-1).long()
    batch = _engine_batch(ends, mask, logp, old, spp, rewards=rewards, group_ids=groups)
    adv = AdvantageConfig(OTB, eps=1e-8, position="trained", zero_tail=True)
    want = E.loss(batch, LossConfig(objective=Grpo(), advantages=adv))
    assert got.loss == want.loss
    assert np.array_equal(got.advantages[mask.numpy() > 0], want.advantages[batch.mask].numpy())
    # the torch adapter: sum_pi_squared from the logits as docs/client.md computes it
    from softgate_client.torch import softgate_loss

    z = torch.randn(*mask.shape, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    old_z = z.log_softmax(-1)[..., 0]
    spp_z = torch.exp(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
    torch.testing.assert_close(spp_z, z.softmax(-1).square().sum(-1), rtol=1e-12, atol=0)
    lp = (old_z + 0.01).clamp(max=-1e-4).requires_grad_(True)
    with SoftgateClient(srv.target, timeout=60) as c:
        loss = softgate_loss(
            lp,
            old_z,
            client=c,
            mask=mask,
            rewards=rewards,
            group_ids=groups,
            sum_pi_squared=spp_z,
            objective="grpo",
            estimator=OTB,
        )
    loss.backward()
    batch = _engine_batch(ends, mask, lp.detach(), old_z, spp_z, rewards=rewards, group_ids=groups)
    want = E.loss(batch, LossConfig(objective=Grpo(), advantages=AdvantageConfig(OTB)))
    assert float(loss.detach()) == want.loss
    assert torch.equal(lp.grad[mask > 0], want.grad[batch.mask])
