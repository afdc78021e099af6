"""compute_loss: advantages -> ratios -> objective -> mismatch -> KL -> aggregation -> metrics.

Everything is closed form (no autograd): the per-token gradient is
    c = alpha * (v * d l / d logp + beta * d k / d logp)
with alpha the aggregation weight, v the mismatch weight, l the objective's per-token loss and k
the KL estimator. Masked tokens take part only through torch.where, so finite garbage there
never changes a result. The scalar losses are accumulated in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softgate.engine.advantages import group_advantages
from softgate.engine.aggregate import token_weights
from softgate.engine.batch import Batch
from softgate.engine.config import Gspo, GspoToken, LossConfig
from softgate.engine.kl import kl_terms
from softgate.engine.metrics import METRIC_NAMES, mean_std, to_floats
from softgate.engine.mismatch import mismatch_weights
from softgate.engine.objectives import policy_terms
from softgate.engine.result import LossResult
from softgate.engine.segments import Segments
from softgate.engine.validation import advantage_level, check, compute_dtype

F64 = torch.float64


def _share(num: Tensor, den: Tensor, empty: float = 0.0) -> Tensor:
    num = num.to(F64)
    den = den.to(F64)
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, empty))


def compute_loss(batch: Batch, config: LossConfig, *, validate: bool = True) -> LossResult:
    """Loss, exact per-token gradient d loss / d logp, per-token terms and metrics of one batch.

    All tensors of `batch` must be on one device; results are on that device, per-token
    tensors in the compute dtype (see validation.compute_dtype)."""
    if validate:
        check(batch, config)
    dt = compute_dtype(batch)
    dev = batch.logp.device
    logp = batch.logp.to(dt)
    n = logp.numel()
    seg = Segments(batch.offsets.to(device=dev, dtype=torch.int64), n)
    m = torch.ones(n, dtype=torch.bool, device=dev) if batch.mask is None else batch.mask.to(dev) != 0
    mf = m.to(dt)
    zero = torch.zeros_like(logp)
    ylen = seg.sum(mf)
    clamp = float(config.log_ratio_clamp)
    mx: dict[str, Tensor | float] = {}

    # ---- advantages A_{i,t}
    if batch.advantages is not None:
        adv = batch.advantages.to(device=dev, dtype=dt)
        a = adv if advantage_level(batch) == "token" else seg.expand(adv)
        mx["num_groups"] = 0.0
        mx["degenerate_group_frac"] = 0.0
    else:
        assert batch.rewards is not None and batch.group_ids is not None
        ga = group_advantages(batch.rewards.to(dev), batch.group_ids.to(dev), config.advantages, weights=ylen)
        a = seg.expand(ga.advantages.to(dt))
        mx["num_groups"] = ga.num_groups
        mx["degenerate_group_frac"] = ga.degenerate_group_frac

    # ---- ratios (raw log-ratio is 0 on masked tokens, so nothing there can overflow)
    old = batch.old_logp.to(dt) if batch.old_logp is not None else None
    raw = torch.where(m, logp - old, zero) if old is not None else zero
    d = raw.clamp(-clamp, clamp)
    obj = config.objective
    if isinstance(obj, (Gspo, GspoToken)):
        logs_raw = seg.sum(raw) / ylen.clamp(min=1)
        ratio = seg.expand(torch.exp(logs_raw.clamp(-clamp, clamp)))
        dratio = ratio  # s_{i,t} = sg[s_i] exp(logp - sg[logp])
        clamped = m & seg.expand(logs_raw.abs() > clamp)
    else:
        clamped = raw.abs() > clamp
        ratio = torch.exp(d)
        dratio = torch.where(clamped, zero, ratio)
    pt = policy_terms(obj, ratio, dratio, a, torch.where(m, logp, zero))

    # ---- mismatch weights v (stop-gradient)
    mm = config.mismatch
    if mm is not None:
        assert batch.rollout_logp is not None
        lv_raw = torch.where(m, (old if old is not None else logp) - batch.rollout_logp.to(dt), zero)
        v, vchanged = mismatch_weights(mm, lv_raw, seg, clamp)
        lpol = pt.loss * v
        gpol, gfree = pt.grad * v, pt.grad_free * v
    else:
        lpol, gpol, gfree = pt.loss, pt.grad, pt.grad_free

    # ---- aggregation
    alpha = token_weights(config.aggregation, mf, ylen, seg)
    policy_loss = (alpha * torch.where(m, lpol, zero)).sum(dtype=F64)
    grad = alpha * gpol
    gfree = alpha * gfree
    grad_policy_abs = grad.abs().sum(dtype=F64)

    # ---- KL
    kl = config.kl
    if kl is not None:
        assert batch.ref_logp is not None
        k, dk, kclamped = kl_terms(kl.estimator, torch.where(m, batch.ref_logp.to(dt) - logp, zero), clamp)
        kl_loss = kl.beta * (alpha * k).sum(dtype=F64)
        grad = grad + (kl.beta * alpha) * dk
    else:
        kl_loss = torch.zeros((), dtype=F64, device=dev)
    loss = policy_loss + kl_loss

    # ---- metrics
    cnt = mf.sum(dtype=F64)
    pos = m & (a > 0)
    neg = m & (a < 0)
    npos = pos.sum()
    nneg = neg.sum()
    mx["loss"] = loss
    mx["policy_loss"] = policy_loss
    mx["kl_loss"] = kl_loss
    mx["num_tokens"] = cnt
    mx["num_seqs"] = float(seg.num_seqs)
    mx["tokens_pos"] = npos
    mx["tokens_neg"] = nneg
    mx["tokens_zero"] = cnt - npos - nneg
    big = torch.finfo(dt).max
    if n:
        mx["ratio_mean"] = _share(torch.where(m, ratio, zero).sum(dtype=F64), cnt, 1.0)
        mx["ratio_min"] = torch.where(cnt > 0, torch.where(m, ratio, big).min().to(F64), 1.0)
        mx["ratio_max"] = torch.where(cnt > 0, torch.where(m, ratio, -big).max().to(F64), 1.0)
    else:
        mx["ratio_mean"] = mx["ratio_min"] = mx["ratio_max"] = 1.0
    mx["approx_kl"] = _share(-d.sum(dtype=F64), cnt)
    mx["clamped_tokens"] = clamped.sum()
    mx["clip_low"] = _share((pt.clip_low & m).sum(), nneg) if pt.clip_low is not None else 0.0
    mx["clip_high"] = _share((pt.clip_high & m).sum(), npos) if pt.clip_high is not None else 0.0
    mx["dual_clip"] = _share((pt.dual & m).sum(), nneg) if pt.dual is not None else 0.0
    mx["clip_fraction"] = _share((pt.clip & m).sum(), cnt)
    thr = config.saturation_threshold
    mx["gate_mean_pos"] = _share(torch.where(pos, pt.gate, zero).sum(dtype=F64), npos, 1.0)
    mx["gate_mean_neg"] = _share(torch.where(neg, pt.gate, zero).sum(dtype=F64), nneg, 1.0)
    mx["gate_saturation_pos"] = _share((pos & (pt.gate < thr)).sum(), npos)
    mx["gate_saturation_neg"] = _share((neg & (pt.gate < thr)).sum(), nneg)
    mx["grad_retained"] = _share(grad_policy_abs, gfree.abs().sum(dtype=F64), 1.0)
    am = torch.where(m, a, zero).to(F64)
    mx["adv_mean"], mx["adv_std"] = mean_std(cnt, am.sum(), (am * am).sum())
    if batch.rewards is not None and batch.rewards.numel() > 0:
        rw = batch.rewards.to(device=dev, dtype=F64)
        mx["reward_mean"] = rw.mean()
        mx["reward_std"] = rw.std(correction=0)
    else:
        mx["reward_mean"] = mx["reward_std"] = 0.0
    if kl is not None:
        mx["kl_mean"] = _share(torch.where(m, k, zero).sum(dtype=F64), cnt)
        mx["kl_clamped_tokens"] = kclamped.sum()
    else:
        mx["kl_mean"] = mx["kl_clamped_tokens"] = 0.0
    if mm is not None:
        mx["mismatch_weight_mean"] = _share(torch.where(m, v, zero).sum(dtype=F64), cnt, 1.0)
        mx["mismatch_clipped_frac"] = _share((vchanged & m).sum(), cnt)
    else:
        mx["mismatch_weight_mean"], mx["mismatch_clipped_frac"] = 1.0, 0.0

    metrics = to_floats({k: mx[k] for k in METRIC_NAMES})
    return LossResult(
        loss=metrics["loss"],
        policy_loss=metrics["policy_loss"],
        kl_loss=metrics["kl_loss"],
        grad=grad,
        advantages=a,
        ratio=torch.where(m, ratio, zero + 1),
        gate_weight=torch.where(m, pt.gate, zero),
        clip_mask=pt.clip & m,
        mask=m,
        metrics=metrics,
    )
