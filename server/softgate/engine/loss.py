"""compute_loss: advantages -> ratios -> objective -> mismatch -> KL -> aggregation -> metrics.

Everything is closed form (no autograd): the per-token gradient is
    c = alpha * (v * d l / d logp + beta * d k / d logp)
with alpha the aggregation weight, v the mismatch weight, l the objective's per-token loss and k
the KL estimator. Masked tokens take part only through torch.where, so finite garbage there
never changes a result.

The work is split in two: per-sequence preparation (segment ids, counts, advantages, the
sequence-level ratio and mismatch weight, aggregation weights, and every metric term that
follows from per-sequence values, e.g. token counts and advantage sums when advantages are per
sequence; eager; for clip_cov and kl_cov also their token selection, a few host-side passes
over the tokens: covariance.py) and `kernel.token_terms`, one pure function over the N tokens
that returns every per-token output and the remaining token sums. `Engine(compile=True)` runs
`token_terms` through torch.compile (one fused loop); eager and compiled runs execute the same
code. Float32 token sums are accumulated in float32 (cascade summation); per-sequence terms
in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from softgate.engine.advantages import WHITENED, group_advantages, whiten_tokens
from softgate.engine.aggregate import kl_aggregation, sequence_weights
from softgate.engine.batch import Batch
from softgate.engine.buckets import BUCKET_SUMS
from softgate.engine.chunked import chunked_token_terms
from softgate.engine.config import CispoSeq, ClipCov, Gmpo, Gspo, GspoToken, KlCov, LossConfig, SapoSeq
from softgate.engine.covariance import covariance_selection
from softgate.engine.errors import FieldViolation, InputError
from softgate.engine.kernel import EXPANDED, Terms, derived_terms, kernel_layout, kernel_params
from softgate.engine.kl import kernel_kl, sequence_kl
from softgate.engine.metrics import METRIC_NAMES, to_floats
from softgate.engine.mismatch import applied_weights, batch_norm_factor, sequence_log_weights
from softgate.engine.objectives import OBJECTIVE_KIND, gmpo_bounds
from softgate.engine.rejection import keep_mask
from softgate.engine.result import LossResult
from softgate.engine.returns import token_returns
from softgate.engine.reward_kl import check_bounded, sequence_kl_mean, sequence_sums, token_kl
from softgate.engine.segments import Segments, host_shortcuts
from softgate.engine.token_baseline import optimal_token_baseline
from softgate.engine.validation import advantage_level, check, compute_dtype
from softgate.engine.variance_proxy import NAMES as PROXY_NAMES
from softgate.engine.variance_proxy import score_energy, variance_proxy

F64 = torch.float64
INT32_MAX = 2**31 - 1

TokenTerms = Callable[..., Terms]


def compute_loss(
    batch: Batch,
    config: LossConfig,
    *,
    validate: bool = True,
    kernel: TokenTerms | None = None,
    sample_tokens: int | None = None,
    grad_out: Tensor | None = None,
) -> LossResult:
    """Loss, exact per-token gradient d loss / d logp, per-token terms and metrics of one batch.

    `sample_tokens` (None: everything in full): on the CPU, a batch of more tokens gets ratio
    and gate_weight for an evenly strided sample of at most that many tokens (but at least 2,
    the smallest size a compiled kernel serves) only, and an empty clip_mask
    (`LossResult.sample_stride`); for callers that want the gradient, not those. When ratio
    and gate come back for at most that many tokens, so do their histogram codes and sums
    (`LossResult.ratio_bucket`, `gate_bucket`, `bucket_sums`; else those are empty).

    `validate`: raise InputError for a bad batch or configuration (validation.check; the
    values of logp, old_logp and per-token advantages are checked by the kernel, in its loop).

    All tensors of `batch` must be on one device; results are on that device, per-token
    tensors in the compute dtype (validation.compute_dtype). `kernel` replaces the eager
    `token_terms` (run in slices of a large batch on the host: chunked.py); the Engine passes
    its compiled version. Inputs that require grad are fine: nothing here records an autograd
    graph, and `logp.backward(result.grad)` applies the gradient.

    `grad_out`: a contiguous [N] tensor of the compute dtype on the batch's device that the
    gradient is written into (the kernel's loop stores it there: no [N] tensor of its own and
    no copy after); `result.grad` is then `grad_out`. A server gives it the bytes of the
    response it will send."""
    if not torch.is_grad_enabled():  # (a server's threads run with grad off: no ~2 us context)
        return _compute_loss(batch, config, validate, kernel, sample_tokens, grad_out)
    with torch.no_grad():
        return _compute_loss(batch, config, validate, kernel, sample_tokens, grad_out)


def _check_rewards_fit(adv: Tensor, dt: torch.dtype) -> None:
    """InputError (`overflow`, on `rewards`, at the first) when an advantage computed from the
    rewards is not finite cast to the compute dtype `dt` (a caller's own advantages set it)."""
    bad = ~torch.isfinite(adv)
    if not bool(bad.any()):
        return
    where = str(dt).replace("torch.", "")
    why = f"overflow: its advantage is not finite in {where} (the log-probs' dtype); send float64 log-probs or smaller rewards"
    raise InputError([FieldViolation("rewards", why, int(torch.nonzero(bad)[0, 0]))])


@functools.lru_cache(maxsize=256)
def _value_names(
    kind: str,
    seq_ratio: bool,
    adv_per_token: bool,
    kl: bool,
    mismatch: bool,
    dual: bool,
    opsm: bool,
    rollout: bool,
    codes: bool,
) -> tuple[str, ...]:
    """The names of token_terms' values, in order (kernel_layout, then the bucket sums)."""
    layout = kernel_layout(kind, seq_ratio, adv_per_token, kl, mismatch, dual, opsm, rollout)
    return (*layout[0], *layout[1], *layout[2], *(BUCKET_SUMS if codes else ()))


def _cast(x: Tensor, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """`x` in `dtype` (and on `device`, when given); `x` itself when it already is: a no-op
    `Tensor.to` still costs ~1-3 us a call in a small request."""
    if x.dtype == dtype and (device is None or x.device == device):
        return x
    return x.to(dtype=dtype, device=device)


def _token_baseline(
    returns: Tensor,
    batch: Batch,
    config: LossConfig,
    energy: Tensor,
    v: Tensor | None,
    m: Tensor,
    seg: Segments,
    unscored: Tensor | None,
) -> Tensor:
    """optimal_token_baseline's advantages from the returns, over the trained tokens of the
    sequences with a reward, W weighted by the squared mismatch weights v when a correction is
    configured (verl's)."""
    assert batch.group_ids is not None  # (validated)
    member = m.contiguous() if unscored is None else m & ~unscored
    adv = config.advantages
    return optimal_token_baseline(
        returns,
        energy,
        member,
        seg,
        batch.group_ids.to(m.device),
        adv.position,
        adv.zero_tail,
        adv.eps,
        v,
    )


def _masked_difference(a: Tensor, b: Tensor, m: Tensor) -> Tensor:
    """a - b on the tokens of the mask m, 0 off it. A masked token's garbage may overflow the
    difference, so it is kept in the dtype's range, then zeroed by multiplying by the mask's
    bytes: on the CPU ~2x faster than a select against 0 (which converts the bool mask), and
    NaN-free, as validation refuses a non-finite log-prob on any token. A broadcast all-True
    mask (no mask sent) multiplies nothing."""
    big = torch.finfo(a.dtype).max
    d = torch.sub(a, b).clamp_(-big, big)
    return d if m.stride(0) == 0 else d.mul_(m.view(torch.uint8))


@functools.lru_cache(maxsize=8)
def _no_codes(device: torch.device) -> Tensor:
    """LossResult's bucket codes when the kernel wrote none: one empty tensor per device."""
    return torch.empty(0, dtype=torch.uint8, device=device)


def _scaled_mean_std(x: Tensor) -> tuple[float, float]:
    """Mean and population std of finite values whose sums would overflow: taken of x / max|x|."""
    if x.numel() == 0:
        return 0.0, 0.0
    x = x.to(torch.float64)
    scale = x.abs().max().clamp(min=1e-300)
    y = x / scale
    return float(scale * y.mean()), float(scale * y.std(correction=0))


def _centred_mean_std(a: Tensor, m: Tensor, mean: float, cnt: float) -> tuple[float, float]:
    """Mean and population std of a[m] (cnt values) taken about `mean`, their one-pass mean:
    the deviations are small, so their squares keep the digits (one [N] temporary in a's dtype)."""
    c = torch.tensor(mean, dtype=a.dtype, device=a.device)  # (rounded to a's dtype)
    d = a - c
    d.mul_(m)  # (the untrained tokens' deviations: 0)
    shift = float(d.sum(dtype=torch.float64)) / cnt  # the mean less c
    var = float(d.square_().sum(dtype=torch.float64)) / cnt - shift * shift
    return float(c) + shift, max(var, 0.0) ** 0.5


def _compute_loss(
    batch: Batch,
    config: LossConfig,
    validate: bool,
    kernel: TokenTerms | None,
    sample_tokens: int | None,
    grad_out: Tensor | None,
) -> LossResult:
    if validate:
        check(batch, config, token_values=False)  # the kernel checks the token values
    dt = compute_dtype(batch)
    dev = batch.logp.device
    logp = _cast(batch.logp, dt)
    old = _cast(batch.old_logp, dt) if batch.old_logp is not None else logp
    rollout = _cast(batch.rollout_logp, dt) if batch.rollout_logp is not None else None  # (cast once)
    n = logp.numel()
    seg = Segments(_cast(batch.offsets, torch.int64, dev), n)
    if batch.mask is None and not config.rejection:  # every token trained: a broadcast True
        m = torch.ones(1, dtype=torch.bool, device=dev).expand(n)
    elif batch.mask is None:  # (rejection makes a mask of it: a real one is counted by words, fast)
        m = torch.ones(n, dtype=torch.bool, device=dev)
    else:
        m = batch.mask.to(dev)
        m = m if m.dtype == torch.bool else m != 0
    # rollout rejection: its tokens leave the mask before anything reads it; the mask as sent
    # and its counts (ms, ms_counts) are what sequence mismatch weights and the sampler's KL read
    sent = None
    if config.rejection:
        assert rollout is not None  # (validated)
        checked = None if batch.old_logp is None else logp  # (on-policy, old is logp)
        sent, m = m, m & keep_mask(old, rollout, m, seg, config, checked)
        batch = dataclasses.replace(batch, mask=m)
    if batch.mask is None:
        ylen, counts = seg.lengths, seg.host_lengths  # (counts: the same in numpy, or None)
    else:
        ylen, counts = seg.count(m), None
    ms, ms_counts = (m, ylen) if sent is None else (sent, seg.count(sent))
    clamp = float(config.log_ratio_clamp)
    obj = config.objective
    kind = OBJECTIVE_KIND[obj.name]
    t: dict[str, Tensor] = {"logp": logp, "old": old}
    if batch.mask is not None:  # (token_terms: no "m", every token trained)
        t["m"] = m.view(torch.uint8)
    t["w"] = sequence_weights(config.aggregation, ylen if counts is None else counts, dt)  # [B] or 0-d
    kl_agg = kl_aggregation(config)
    if kl_agg is not None:  # the KL term's own weights
        t["wkl"] = sequence_weights(kl_agg, ylen if counts is None else counts, dt)
    t["ylen"] = ylen
    extra: dict[str, Tensor] = {}  # metric terms computed here, fetched with the kernel's
    if sent is not None:
        extra["rejected_tokens"] = (ms_counts.sum() - ylen.sum()).to(F64)
        extra["rejected_seqs"] = (ms_counts != ylen).sum().to(F64)
    # the sampler and the mismatch weights (before the advantages: optimal_token_baseline reads
    # the weights as applied, v_applied, as the variance proxy does)
    norm = v_applied = None
    prm = kernel_params(config, dt, dev)
    mm = config.mismatch
    if rollout is not None:  # the sampler's KL from old_logp, summed by the kernel over the tokens as sent
        t["rollout"] = rollout
        if sent is not None:
            t["ms"] = sent.view(torch.uint8)
        extra["rollout_tokens"] = ms_counts.sum().to(F64)
    if mm is not None:
        assert rollout is not None
        seq_weight = mm.level != "token" or mm.mode == "seq_mask"  # (seq_mask: the mean, its filter)
        if seq_weight or mm.batch_normalize or batch.sum_pi_squared is not None:
            # the log-weights over the mask as sent, rejected tokens included (verl's): a
            # sequence's weight, batch_normalize's mean and the weights as applied read them
            lv_sent = _masked_difference(old, rollout, ms)
            if seq_weight:  # (geometric and seq_mask: the mean)
                t["lvseq"] = sequence_log_weights(lv_sent, seg, ms_counts, mean=mm.level != "sequence")
            if mm.batch_normalize:  # verl's: v divided by its mean over the batch as sent, through w
                # but seq_mask's over the tokens rejection left: it leaves a token's weight
                # untruncated, and the outlier rejection took out (e^94) scaled every other
                # token's gradient by 1e-38 (an audit)
                nm, nm_counts = (m, ylen) if mm.mode == "seq_mask" else (ms, ms_counts)
                norm = batch_norm_factor(mm.level, mm.mode, lv_sent, nm, seg, nm_counts, t.get("lvseq"), prm)
                extra["mismatch_norm_factor"] = norm
                if config.kl is not None and "wkl" not in t:  # (the KL term keeps the weights it had)
                    t["wkl"] = t["w"]
                t["w"] = (t["w"].to(F64) / norm).to(dt)  # v multiplies only the policy term, as w does
            if batch.sum_pi_squared is not None:  # v at every token, as the loss applies it
                v_applied = applied_weights(mm.level, mm.mode, lv_sent, seg, t.get("lvseq"), norm, prm)
            del lv_sent  # (read no more: not held through the kernel)
    # each token's score energy: optimal_token_baseline's W and the variance-proxy metrics read
    # it (variance_proxy.py)
    energy = None if batch.sum_pi_squared is None else score_energy(old, batch.sum_pi_squared.to(dev))

    # ---- advantages (per sequence unless the caller gave them per token)
    adv_per_token = False
    num_groups = unscored_seqs = 0
    weighted: Tensor | None = None
    if batch.advantages is not None:
        t["adv"] = _cast(batch.advantages, dt, dev)
        adv_per_token = advantage_level(batch) == "token"
    else:
        assert batch.rewards is not None and batch.group_ids is not None
        rk = config.reward_kl
        kr = penalty = k_abs_sums = None
        sent_mask = None if batch.mask is None else ms  # (after rejection batch.mask is the mask left)
        if rk is not None:  # a KL penalty in the reward (reward_kl.py), over the mask as sent
            assert batch.ref_logp is not None
            kr = token_kl(rk, old, batch.ref_logp.to(dev), sent_mask, clamp)
            sums, k_abs_sums = sequence_sums(rk, kr, seg)
            check_bounded(rk.beta, k_abs_sums)
            extra["reward_kl_mean"] = sequence_kl_mean(sums, ms_counts)
            penalty = rk.beta * sums if rk.level == "sequence" else None
        kl_per_token = rk is not None and rk.level != "sequence"
        gamma = config.advantages.gamma
        otb = config.advantages.estimator == "optimal_token_baseline"
        per_token = kl_per_token or gamma != 1.0 or otb  # (returns.py)
        ga = group_advantages(
            batch.rewards.to(dev),
            batch.group_ids.to(dev),
            config.advantages,
            weights=ylen,
            penalty=penalty,
            whiten=not per_token,
        )
        if per_token:
            beta = rk.beta if rk is not None and kl_per_token else 0.0  # (sequence level: in the rewards)
            if rk is not None and rk.level == "immediate":  # each token's own KL, not its return
                assert kr is not None
                a_tok = token_returns(ga.advantages, seg, gamma, sent=sent_mask).sub_(kr, alpha=beta)
            else:
                a_tok = token_returns(ga.advantages, seg, gamma, kr, beta, sent_mask, k_abs_sums)
            unscored = None if ga.scored is None else seg.expand(~ga.scored)  # (skip_nan_components)
            if otb:
                assert energy is not None  # (validated: sum_pi_squared is required)
                a_tok = _token_baseline(a_tok, batch, config, energy, v_applied, m, seg, unscored)
            if config.advantages.estimator in WHITENED:
                trained = None if batch.mask is None else m
                if unscored is not None:
                    trained = ~unscored if trained is None else trained & ~unscored
                a_tok = whiten_tokens(a_tok, trained, config.advantages.eps)
            if unscored is not None:  # no reward: 0 at every token, the KL in the reward too
                a_tok = a_tok.masked_fill(unscored, 0.0)
            # (one pass; "not <=": NaN too, which no finite input should give, in float64 as well)
            if n and not max(map(abs, torch.aminmax(a_tok))) <= torch.finfo(dt).max:
                where = str(dt).replace("torch.", "")
                fld, what = (
                    ("reward_kl.beta", "with the KL in the reward ") if kl_per_token else ("rewards", "")
                )
                why = f"overflow: a token's advantage {what}is not finite in {where}"
                raise InputError([FieldViolation(fld, why)])
            t["adv"] = a_tok.to(dt)
            del a_tok  # (float64: not held through the kernel beside its cast)
            adv_per_token = True
        else:
            t["adv"] = ga.advantages.to(dt)
        num_groups = ga.num_groups
        extra["degenerate_group_frac"] = ga.degenerate_group_frac
        weighted = ga.scored_rewards()  # (times reward_weights, when given)
    if batch.rewards is not None:
        rw = weighted if weighted is not None else batch.rewards.to(dev, F64)
        if weighted is None and config.advantages.skip_nan_components:  # (beside advantages sent)
            rw = rw[~rw.isnan()]
        if rw.numel() > 0:  # (the sequences with a reward)
            extra["reward_std"], extra["reward_mean"] = torch.std_mean(rw, correction=0)
        unscored_seqs = batch.rewards.shape[0] - rw.numel()  # (skip_nan_components: those without)

    if energy is not None:  # verl's gradient-variance proxy, on the advantages as the loss reads them
        vp = variance_proxy(energy, t["adv"], adv_per_token, m, seg, ylen, v_applied)
        extra.update(zip(PROXY_NAMES, vp.unbind(), strict=True))
        energy = v_applied = None  # (read no more: not held through the kernel)

    # ---- sequence-level pieces
    seq_ratio = isinstance(obj, (Gspo, GspoToken, SapoSeq, CispoSeq))
    if seq_ratio:
        logs = seg.mean(_masked_difference(logp, old, m), ylen)
        t["sratio"] = torch.exp(logs.clamp(-clamp, clamp))
        t["sclamped"] = logs.abs() > clamp
    elif isinstance(obj, Gmpo):
        # the geometric mean of the log-ratios, each clamped and clipped on the side its
        # sequence's A picks (one advantage per sequence: validation): one clamp with bounds
        # per sequence, min(clamp(d), eps_high) = clamp(d, -C, min(eps_high, C)) and alike
        # below (the kernel clips at the same bounds: gmpo_bounds)
        adv = t["adv"]
        lo, hi = gmpo_bounds(obj)
        bound = torch.tensor([max(lo, -clamp), min(hi, clamp), clamp], dtype=dt, device=dev)
        below = seg.expand(torch.where(adv < 0, bound[0], -bound[2]))  # per token
        above = seg.expand(torch.where(adv > 0, bound[1], bound[2]))
        d = torch.clamp(logp - old, below, above)
        if batch.mask is not None:
            d.mul_(m.view(torch.uint8))  # (clamped: finite; see _masked_difference)
        t["sratio"] = torch.exp(seg.mean(d, ylen))
    if config.kl is not None:
        assert batch.ref_logp is not None
        t["ref"] = _cast(batch.ref_logp, dt)
        if config.kl.estimator == "k3_is_seq":  # its sequence ratio, and that ratio's gradient
            wkl = t["wkl"] if "wkl" in t else t["w"]
            mk = m if batch.mask is not None else None
            t["kls"], t["klc"] = sequence_kl(t["ref"] - logp, logp - old, mk, seg, ylen, wkl, clamp)

    if config.off_policy_mask_threshold is not None:  # OPSM: each sequence's mean KL from the sampler
        sampler = old if rollout is None or config.off_policy_mask_reference == "old" else rollout
        t["okl"] = seg.mean(_masked_difference(sampler, logp, m), ylen)

    if isinstance(obj, (ClipCov, KlCov)):  # the tokens they clip or penalise (covariance.py)
        a_tok = t["adv"] if adv_per_token else seg.expand(t["adv"])
        mask = None if batch.mask is None else m
        t["sel"] = covariance_selection(obj, logp, old, a_tok, mask, prm)

    # what is per sequence reaches the tokens: advantages, the weight, GSPO's ratio, a
    # sequence-level mismatch weight (token_terms reads nothing per sequence otherwise)
    gathered: list[str] = [
        k for k in ("w", "wkl", "sratio", "lvseq", "kls", "klc", "okl") if k in t and t[k].dim()
    ]
    gathered += [] if adv_per_token else ["adv"]
    if gathered and host_shortcuts(dev):
        # expanded to their tokens here: a vector load in the kernel, not a gather, which
        # inductor's CPU code does lane by lane (16M tokens, SAPO, a weight per sequence: the
        # in-process engine 46 -> 42 ms)
        for k in gathered:
            t[k + EXPANDED] = seg.expand(t[k])
            if k in (
                "w",
                "wkl",
                "lvseq",
                "kls",
                "klc",
                "okl",
            ):  # (the others' [B] values go into sequence_terms too)
                del t[k]
    elif gathered:
        t["ids"] = seg.ids  # the sequence id of every token, for the gathers
    if grad_out is None:  # always one: a call with and one without are one compiled configuration
        grad_out = torch.empty(n, dtype=dt, device=dev)
    elif (
        grad_out.shape != (n,)
        or grad_out.dtype != dt
        or grad_out.device != dev
        or not grad_out.is_contiguous()
    ):
        raise ValueError(
            f"grad_out must be a contiguous [{n}] {dt} tensor on {dev}; got {tuple(grad_out.shape)} "
            f"{grad_out.dtype} on {grad_out.device}"
        )
    t["grad_out"] = grad_out
    stride = 1
    if sample_tokens is not None and dev.type == "cpu" and n > sample_tokens:
        stride = -(-n // max(sample_tokens, 2))
    codes = sample_tokens is not None and -(-n // stride) <= max(sample_tokens, 2)
    fn = kernel or chunked_token_terms
    grad, a, ratio, gate, clip, rcode, gcode, vals = fn(
        t,
        prm,
        kind,
        seq_ratio,
        adv_per_token,
        kernel_kl(config.kl),
        # (geometric is the sequence level's kernel: either reads its weight from lvseq)
        ("token" if mm.level == "token" else "sequence", mm.mode) if mm is not None else None,
        torch.int32 if n <= INT32_MAX else torch.int64,
        stride,
        codes,
    )

    # ---- metrics (one host sync)
    names = _value_names(
        kind,
        seq_ratio,
        adv_per_token,
        config.kl is not None,
        mm is not None,
        "dual" in prm,
        "opsm" in prm,
        rollout is not None,
        codes,
    )
    vals = vals[: len(names)]  # (the kernel's values are followed by B zeros: see token_terms)
    if extra:
        vals = torch.cat([vals, torch.stack(list(extra.values()))])
        names += tuple(extra)
    got = vals.tolist()  # (one host sync on a GPU)
    s = derived_terms(dict(zip(names, got, strict=True)), kind, config.kl is not None, mm is not None)
    if not codes:  # the kernel's code outputs are placeholders
        rcode = gcode = _no_codes(dev)

    if validate and s["bad"] > 0:
        check(batch, config)  # raises, naming the field, the first bad token and the reason
        raise AssertionError("the kernel found a bad input value that validation did not")

    def share(num: float, den: float, empty: float = 0.0) -> float:
        return num / den if den > 0 else empty

    if not all(math.isfinite(s[k]) for k in ("policy_loss", "kl_sum", "grad_total_abs")):
        if batch.advantages is None:  # (an advantage past the compute dtype: its reward named)
            _check_rewards_fit(t["adv"], dt)
        bad = ~torch.isfinite(grad)
        idx = int(torch.nonzero(bad)[0, 0]) if bool(bad.any()) else None
        where = "the gradient at this token is" if idx is not None else "the loss is"
        raise InputError(
            [
                FieldViolation(
                    "logp" if idx is not None else "batch",  # the token, or the batch as a whole
                    f"overflow: {where} not finite in {str(dt).replace('torch.', '')}; advantages, "
                    "rewards, normalisers, temperatures, penalty coefficients, log-ratios or mismatch weights "
                    "are too large in magnitude",
                    idx,
                )
            ]
        )
    cnt, npos, nneg = s["cnt"], s["npos"], s["nneg"]
    policy_loss = s["policy_loss"]
    kl_loss = config.kl.beta * s["kl_sum"] if config.kl is not None else 0.0
    loss = policy_loss + kl_loss
    if not math.isfinite(loss):  # beta * KL, or the parts' sum, past float64's range
        kl_ok = math.isfinite(kl_loss)
        why = "the policy and KL parts together are" if kl_ok else "beta times the KL term is"
        raise InputError(
            [
                FieldViolation(
                    "batch" if kl_ok else "kl.beta",
                    f"overflow: the loss is not finite in float64; {why} too large in magnitude",
                )
            ]
        )
    mx: dict[str, float] = {}
    mx["loss"] = loss
    mx["policy_loss"] = policy_loss
    mx["kl_loss"] = kl_loss
    mx["num_tokens"] = cnt
    mx["num_seqs"] = float(seg.num_seqs)
    mx["tokens_pos"] = npos
    mx["tokens_neg"] = nneg
    mx["tokens_zero"] = cnt - npos - nneg
    mx["ratio_min"] = s["ratio_min"] if cnt else 1.0
    mx["ratio_max"] = s["ratio_max"] if cnt else 1.0
    # 1 + mean(r - 1) has the absolute precision of 1 (float32's expm1 rounds a ratio of
    # e^-20 to -1, so the mean read 0): kept within min and max, each one exp of a log-ratio
    mean = 1.0 + share(s["ratio_excess"], cnt)
    mx["ratio_mean"] = min(max(mean, mx["ratio_min"]), mx["ratio_max"])
    mx["approx_kl"] = share(-s["d_sum"], cnt)
    mx["clamped_tokens"] = s["clamped"]
    mx["clip_low"] = share(s["clip_low"], nneg)
    mx["clip_high"] = share(s["clip_high"], npos)
    mx["dual_clip"] = share(s["dual"], nneg)
    mx["clip_fraction"] = share(s["clip"], cnt)
    mx["gate_mean_pos"] = share(s["gate_pos"], npos, 1.0)
    mx["gate_mean_neg"] = share(s["gate_neg"], nneg, 1.0)
    mx["gate_saturation_pos"] = share(s["sat_pos"], npos)
    mx["gate_saturation_neg"] = share(s["sat_neg"], nneg)
    mx["grad_retained"] = share(s["grad_abs"], s["free_abs"], 1.0)
    adv_mean = share(s["a_sum"], cnt)
    mx["adv_mean"] = adv_mean
    a_var = share(s["a_var"], cnt) if "a_var" in s else share(s["a_sq"], cnt) - adv_mean * adv_mean
    mx["adv_std"] = max(a_var, 0.0) ** 0.5
    mx["reward_mean"] = s.get("reward_mean", 0.0)
    mx["reward_std"] = s.get("reward_std", 0.0)
    mx["unscored_seqs"] = float(unscored_seqs)
    mx["num_groups"] = float(num_groups)
    mx["degenerate_group_frac"] = s.get("degenerate_group_frac", 0.0)
    mx["kl_mean"] = share(s["k_sum"], cnt)
    mx["kl_clamped_tokens"] = s["kl_clamped"]
    mx["mismatch_weight_mean"] = share(s["v_sum"], cnt, 1.0) if mm is not None else 1.0
    mx["mismatch_clipped_frac"] = share(s["v_changed"], cnt)
    mx["mismatch_norm_factor"] = s.get("mismatch_norm_factor", 1.0)
    mx["off_policy_masked_frac"] = share(s["opsm"], cnt)
    mx["rejected_tokens"] = s.get("rejected_tokens", 0.0)
    mx["rejected_seqs"] = s.get("rejected_seqs", 0.0)
    mx["rollout_tokens"] = s.get("rollout_tokens", 0.0)
    mx["rollout_kl"] = share(s.get("rollout_k1", 0.0), mx["rollout_tokens"])
    mx["rollout_k3_kl"] = share(s.get("rollout_k3", 0.0), mx["rollout_tokens"])
    mx["reward_kl_mean"] = s.get("reward_kl_mean", 0.0)
    mx["variance_proxy_tokens"] = cnt if batch.sum_pi_squared is not None else 0.0
    for k in PROXY_NAMES:
        mx[k] = s.get(k, 0.0)

    if not math.isfinite(mx["adv_std"] + mx["adv_mean"]):  # a sum of squares past float64's range
        mx["adv_mean"], mx["adv_std"] = _scaled_mean_std(a[m])
    elif "a_var" not in s and a_var < 1e-3 * share(s["a_sq"], cnt):
        # per-token advantages far from 0 next to their spread: the one-pass variance kept few of
        # its digits (each square rounds in the compute dtype; a constant float32 100.1 read a
        # std of 0.008), so it is taken again about the mean
        mx["adv_mean"], mx["adv_std"] = _centred_mean_std(a, m, adv_mean, cnt)
    if not math.isfinite(mx["approx_kl"]):  # log-probs near -float64's max
        mx["approx_kl"] = _scaled_mean_std((old - logp)[m])[0]
    metrics = {k: mx[k] for k in METRIC_NAMES}  # floats, each finite unless something overflowed
    if not all(map(math.isfinite, metrics.values())):
        metrics = to_floats(metrics)
    return LossResult(
        loss=metrics["loss"],
        policy_loss=metrics["policy_loss"],
        kl_loss=metrics["kl_loss"],
        grad=grad,
        advantages=a,
        ratio=ratio,
        gate_weight=gate,
        clip_mask=clip.view(torch.bool),
        mask=m,
        ratio_bucket=rcode,
        gate_bucket=gcode,
        bucket_sums=tuple(s[k] for k in BUCKET_SUMS) if codes else (),
        metrics=metrics,
        sample_stride=stride,
    )
