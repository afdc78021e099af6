"""compute_loss: advantages -> ratios -> objective -> mismatch -> KL -> aggregation -> metrics.

Everything is closed form (no autograd): the per-token gradient is
    c = alpha * (v * d l / d logp + beta * d k / d logp)
with alpha the aggregation weight, v the mismatch weight, l the objective's per-token loss and k
the KL estimator. Masked tokens take part only through torch.where, so finite garbage there
never changes a result.

The work is split in two: per-sequence preparation (segment ids, counts, advantages, the
sequence-level ratio and mismatch weight, aggregation weights; eager) and `token_terms`, one
pure function over the N tokens that returns every per-token output and every metric sum.
`Engine(compile=True)` runs `token_terms` through torch.compile (one fused kernel family);
eager and compiled runs execute the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from softgate.engine.advantages import group_advantages
from softgate.engine.aggregate import sequence_weights
from softgate.engine.batch import Batch
from softgate.engine.config import Gspo, GspoToken, LossConfig
from softgate.engine.errors import FieldViolation, InputError
from softgate.engine.kl import kl_terms
from softgate.engine.metrics import METRIC_NAMES, to_floats
from softgate.engine.mismatch import mismatch_log_weights, mismatch_weights
from softgate.engine.objectives import OBJECTIVE_KIND, objective_params, policy_terms
from softgate.engine.result import LossResult
from softgate.engine.segments import Segments
from softgate.engine.validation import advantage_level, check, compute_dtype

F64 = torch.float64

# order of the float sums and integer counts returned by token_terms
SUMS = (
    "policy_loss", "kl_sum", "ratio_sum", "ratio_min", "ratio_max", "d_sum", "gate_pos", "gate_neg",
    "grad_abs", "free_abs", "a_sum", "a_sq", "k_sum", "v_sum", "grad_total_abs",
)  # fmt: skip
COUNTS = (
    "cnt", "npos", "nneg", "clamped", "clip_low", "clip_high", "dual", "clip",
    "sat_pos", "sat_neg", "kl_clamped", "v_changed",
)  # fmt: skip


def token_terms(
    t: dict[str, Tensor],
    prm: dict[str, Tensor],
    kind: str,
    seq_ratio: bool,
    adv_per_token: bool,
    kl: Any,
    mismatch: Any,
    clamp: float,
    threshold: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """All per-token work: (grad, advantages, ratio, gate, clip_mask, float sums, int counts).

    `t` holds logp, old, m (bool), ids (sequence id per token), w (aggregation weight per
    sequence), adv ([N] or [B]), and as configured sratio/sclamped ([B], gspo), ref (KL),
    rollout or lvseq (mismatch, token or sequence level)."""
    logp, old, m, ids = t["logp"], t["old"], t["m"], t["ids"]
    zero = torch.zeros_like(logp)
    a = t["adv"] if adv_per_token else t["adv"][ids]
    alpha = torch.where(m, t["w"][ids], zero)
    raw = torch.where(m, logp - old, zero)
    d = raw.clamp(-clamp, clamp)
    if seq_ratio:
        ratio = t["sratio"][ids]
        dratio = ratio  # s_{i,t} = sg[s_i] exp(logp - sg[logp]): d s_{i,t} / d logp = s_i
        clamped = m & t["sclamped"][ids]
    else:
        clamped = raw.abs() > clamp
        ratio = torch.exp(d)
        dratio = torch.where(clamped, zero, ratio)
    lp = torch.where(m, logp, zero) if kind == "cispo" else logp  # only cispo's loss reads logp
    pt = policy_terms(kind, ratio, dratio, a, lp, prm)
    lpol, gpol, gfree = pt.loss, pt.grad, pt.grad_free
    v_sum = zero.sum()
    v_changed = torch.zeros((), dtype=torch.int64, device=logp.device)
    if mismatch is not None:
        if mismatch.level == "sequence":
            lv = t["lvseq"][ids]
        else:
            lv = torch.where(m, old - t["rollout"], zero).clamp(-clamp, clamp)
        v, vch = mismatch_weights(mismatch, lv)
        lpol, gpol, gfree = lpol * v, gpol * v, gfree * v
        v_sum = torch.where(m, v, zero).sum()
        v_changed = (vch & m).sum()
    # every per-token term is finite on masked tokens (their log-ratios are 0), and alpha is 0 there
    policy_loss = (alpha * lpol).sum()
    gpol = alpha * gpol
    grad_abs = gpol.abs().sum()
    free_abs = (alpha * gfree).abs().sum()
    grad = gpol
    kl_sum = k_sum = zero.sum()
    kl_clamped = torch.zeros((), dtype=torch.int64, device=logp.device)
    if kl is not None:
        k, dk, kcl = kl_terms(kl.estimator, torch.where(m, t["ref"] - logp, zero), clamp)
        kl_sum = (alpha * k).sum()
        k_sum = torch.where(m, k, zero).sum()
        grad = grad + (kl.beta * alpha) * dk
        kl_clamped = (kcl & m).sum()

    pos = m & (a > 0)
    neg = m & (a < 0)
    am = torch.where(m, a, zero)
    inf = torch.full_like(ratio, float("inf"))
    if ratio.numel() > 0:
        rmin, rmax = torch.where(m, ratio, inf).min(), torch.where(m, ratio, -inf).max()
    else:
        rmin = rmax = zero.sum()
    nob = torch.zeros((), dtype=torch.int64, device=logp.device)
    gate = pt.gate
    sums = torch.stack(
        [
            policy_loss,
            kl_sum,
            torch.where(m, ratio, zero).sum(),
            rmin,
            rmax,
            d.sum(),
            torch.where(pos, gate, zero).sum(),
            torch.where(neg, gate, zero).sum(),
            grad_abs,
            free_abs,
            am.sum(),
            (am * am).sum(),
            k_sum,
            v_sum,
            grad.abs().sum(),  # not finite iff some gradient is not (overflow check)
        ]
    )
    counts = torch.stack(
        [
            m.sum(),
            pos.sum(),
            neg.sum(),
            clamped.sum(),
            (pt.clip_low & m).sum() if pt.clip_low is not None else nob,
            (pt.clip_high & m).sum() if pt.clip_high is not None else nob,
            (pt.dual & m).sum() if pt.dual is not None else nob,
            (pt.clip & m).sum(),
            (pos & (gate < threshold)).sum(),
            (neg & (gate < threshold)).sum(),
            kl_clamped,
            v_changed,
        ]
    )
    return grad, a, torch.where(m, ratio, zero + 1), torch.where(m, gate, zero), pt.clip & m, sums, counts


TokenTerms = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]


def compute_loss(
    batch: Batch, config: LossConfig, *, validate: bool = True, kernel: TokenTerms | None = None
) -> LossResult:
    """Loss, exact per-token gradient d loss / d logp, per-token terms and metrics of one batch.

    All tensors of `batch` must be on one device; results are on that device, per-token
    tensors in the compute dtype (validation.compute_dtype). `kernel` replaces `token_terms`
    (the Engine passes its compiled version). Inputs that require grad are fine: nothing here
    records an autograd graph, and `logp.backward(result.grad)` applies the gradient."""
    with torch.no_grad():
        return _compute_loss(batch, config, validate, kernel)


def _compute_loss(batch: Batch, config: LossConfig, validate: bool, kernel: TokenTerms | None) -> LossResult:
    if validate:
        check(batch, config)
    dt = compute_dtype(batch)
    dev = batch.logp.device
    logp = batch.logp.to(dt)
    n = logp.numel()
    seg = Segments(batch.offsets.to(device=dev, dtype=torch.int64), n)
    if batch.mask is None:
        m = torch.ones(n, dtype=torch.bool, device=dev)
    else:
        m = batch.mask.to(dev)
        m = m if m.dtype == torch.bool else m != 0
    ylen = seg.count(m)
    clamp = float(config.log_ratio_clamp)
    obj = config.objective
    old = batch.old_logp.to(dt) if batch.old_logp is not None else logp
    t: dict[str, Tensor] = {"logp": logp, "old": old, "m": m, "ids": seg.ids}
    t["w"] = sequence_weights(config.aggregation, ylen, dt)
    mx: dict[str, Tensor | float] = {}

    # ---- advantages (per sequence unless the caller gave them per token)
    adv_per_token = False
    if batch.advantages is not None:
        t["adv"] = batch.advantages.to(device=dev, dtype=dt)
        adv_per_token = advantage_level(batch) == "token"
        mx["num_groups"] = mx["degenerate_group_frac"] = 0.0
    else:
        assert batch.rewards is not None and batch.group_ids is not None
        ga = group_advantages(batch.rewards.to(dev), batch.group_ids.to(dev), config.advantages, weights=ylen)
        t["adv"] = ga.advantages.to(dt)
        mx["num_groups"] = float(ga.num_groups)
        mx["degenerate_group_frac"] = ga.degenerate_group_frac

    # ---- sequence-level pieces
    seq_ratio = isinstance(obj, (Gspo, GspoToken))
    if seq_ratio:
        logs = seg.sum(torch.where(m, logp - old, torch.zeros_like(logp))) / ylen.clamp(min=1).to(dt)
        t["sratio"] = torch.exp(logs.clamp(-clamp, clamp))
        t["sclamped"] = logs.abs() > clamp
    mm = config.mismatch
    if mm is not None:
        assert batch.rollout_logp is not None
        rollout = batch.rollout_logp.to(dt)
        if mm.level == "sequence":
            lv_raw = torch.where(m, old - rollout, torch.zeros_like(logp))
            t["lvseq"] = mismatch_log_weights("sequence", lv_raw, seg, clamp)
        else:
            t["rollout"] = rollout
    if config.kl is not None:
        assert batch.ref_logp is not None
        t["ref"] = batch.ref_logp.to(dt)

    prm = objective_params(obj, dt, dev)
    fn = kernel or token_terms
    grad, a, ratio, gate, clip, sums_t, counts_t = fn(
        t,
        prm,
        OBJECTIVE_KIND[obj.name],
        seq_ratio,
        adv_per_token,
        config.kl,
        mm,
        clamp,
        float(config.saturation_threshold),
    )

    # ---- metrics (one host sync)
    s = dict(zip(SUMS, sums_t.to(F64).cpu().tolist(), strict=True))
    c = dict(zip(COUNTS, counts_t.cpu().tolist(), strict=True))

    def share(num: float, den: float, empty: float = 0.0) -> float:
        return num / den if den > 0 else empty

    if not all(math.isfinite(s[k]) for k in ("policy_loss", "kl_sum", "grad_total_abs")):
        bad = ~torch.isfinite(grad)
        idx = int(torch.nonzero(bad)[0, 0]) if bool(bad.any()) else None
        raise InputError(
            [
                FieldViolation(
                    "batch",
                    f"overflow: the loss or its gradient is not finite in {str(dt).replace('torch.', '')}; "
                    "advantages, rewards, normalisers or log-ratios are too large in magnitude",
                    idx,
                )
            ]
        )
    cnt, npos, nneg = c["cnt"], c["npos"], c["nneg"]
    policy_loss = s["policy_loss"]
    kl_loss = config.kl.beta * s["kl_sum"] if config.kl is not None else 0.0
    mx["loss"] = policy_loss + kl_loss
    mx["policy_loss"] = policy_loss
    mx["kl_loss"] = kl_loss
    mx["num_tokens"] = cnt
    mx["num_seqs"] = seg.num_seqs
    mx["tokens_pos"] = npos
    mx["tokens_neg"] = nneg
    mx["tokens_zero"] = cnt - npos - nneg
    mx["ratio_mean"] = share(s["ratio_sum"], cnt, 1.0)
    mx["ratio_min"] = s["ratio_min"] if cnt else 1.0
    mx["ratio_max"] = s["ratio_max"] if cnt else 1.0
    mx["approx_kl"] = share(-s["d_sum"], cnt)
    mx["clamped_tokens"] = c["clamped"]
    mx["clip_low"] = share(c["clip_low"], nneg)
    mx["clip_high"] = share(c["clip_high"], npos)
    mx["dual_clip"] = share(c["dual"], nneg)
    mx["clip_fraction"] = share(c["clip"], cnt)
    mx["gate_mean_pos"] = share(s["gate_pos"], npos, 1.0)
    mx["gate_mean_neg"] = share(s["gate_neg"], nneg, 1.0)
    mx["gate_saturation_pos"] = share(c["sat_pos"], npos)
    mx["gate_saturation_neg"] = share(c["sat_neg"], nneg)
    mx["grad_retained"] = share(s["grad_abs"], s["free_abs"], 1.0)
    adv_mean = share(s["a_sum"], cnt)
    mx["adv_mean"] = adv_mean
    mx["adv_std"] = max(share(s["a_sq"], cnt) - adv_mean * adv_mean, 0.0) ** 0.5
    if batch.rewards is not None and batch.rewards.numel() > 0:
        rw = batch.rewards.to(F64)
        mx["reward_mean"] = rw.mean()
        mx["reward_std"] = rw.std(correction=0)
    else:
        mx["reward_mean"] = mx["reward_std"] = 0.0
    mx["kl_mean"] = share(s["k_sum"], cnt)
    mx["kl_clamped_tokens"] = c["kl_clamped"]
    mx["mismatch_weight_mean"] = share(s["v_sum"], cnt, 1.0) if mm is not None else 1.0
    mx["mismatch_clipped_frac"] = share(c["v_changed"], cnt)

    metrics = to_floats({k: mx[k] for k in METRIC_NAMES})
    return LossResult(
        loss=metrics["loss"],
        policy_loss=metrics["policy_loss"],
        kl_loss=metrics["kl_loss"],
        grad=grad,
        advantages=a,
        ratio=ratio,
        gate_weight=gate,
        clip_mask=clip,
        mask=m,
        metrics=metrics,
    )
