"""token_terms: the one per-token kernel (every per-token output, every metric sum).

It reduces over tokens only what cannot be had more cheaply: `kernel_layout` names the values
a configuration needs, and `derived_terms` fills in the rest from them. With per-sequence
advantages the token counts and advantage sums are `|y_i|`-weighted sums over the B sequences
(`sequence_terms`, in the same compiled graph); for hard clips (grpo, gspo, gmpo) the gate is 0 / 1,
so gate sums, saturation counts and the clip count follow from the clip counts; without a KL
term the gradient is the policy gradient, so its absolute sum is `grad_abs`. Each reduction
left in the fused loop costs about as much as a pass over one input, so fewer reductions is
what makes the compiled kernel fast. Sums accumulate in float64, and the whole result is one
float64 vector (one host sync).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from softgate.engine.buckets import bucket_codes, bucket_edges
from softgate.engine.config import NORMALISER, ClipCov, LossConfig
from softgate.engine.errors import FieldViolation, InputError
from softgate.engine.kl import kl_terms
from softgate.engine.mismatch import mismatch_weights
from softgate.engine.objectives import (
    COV_KINDS,
    DPPO_KINDS,
    READS_LOGP,
    PolicyTerms,
    objective_params,
    policy_terms,
)
from softgate.engine.validation import LOGP_TOLERANCE

# token_terms' result: grad, advantages, ratio, gate, clip mask (uint8), the ratio's and the
# gate's bucket codes (uint8, see buckets.py), float64 values
Terms = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]

# the suffix of a per-sequence tensor of token_terms' dict expanded to its tokens (see per_token)
EXPANDED = "_tok"

# per-token entries of token_terms' tensor dict; the others are per sequence ([B]) or 0-d
PER_TOKEN = ("logp", "old", "m", "ms", "sel", "ids", "ref", "rollout", "grad_out")

# objective kinds whose gate weight is not a constant 0 / 1 pattern of the clip masks
_SOFT_GATE = ("sapo", "gppo", "cispo", *DPPO_KINDS)

# objective kinds that count the tokens their clip drops or bounds per sign of A
_SIGNED_CLIP = ("clip", "gppo", "cispo", "gmpo", *DPPO_KINDS, *COV_KINDS)


def kernel_layout(
    kind: str,
    seq_ratio: bool,
    adv_per_token: bool,
    kl: bool,
    mismatch: bool,
    dual: bool,
    opsm: bool = False,
    rollout: bool = False,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Names of token_terms' values, in order: float sums and integer counts over tokens, then
    the terms it reduces over sequences. `opsm`: off-policy sequence masking is on; `rollout`:
    the sampler's log-probs were sent (their KL from old_logp is summed)."""
    sums = ["policy_loss", "d_sum", "grad_abs"]
    counts = ["bad"]  # tokens with a bad input value (see token_terms)
    if not seq_ratio:  # gspo's ratio and clamp are per sequence
        sums += ["ratio_excess", "ratio_min", "ratio_max"]
        counts.append("clamped")
    if kind != "reinforce":  # reinforce: grad == grad_free
        sums.append("free_abs")
    if kind in _SOFT_GATE:
        sums += ["gate_pos", "gate_neg"]
        counts += ["sat_pos", "sat_neg"]
    if kind in _SIGNED_CLIP:
        counts += ["clip_low", "clip_high"]
    if dual:
        counts.append("dual")
    if kind in ("cispo", "kl_cov"):  # a clip whatever the sign of A (kl_cov: A = 0 too)
        counts.append("clip")
    if adv_per_token:
        sums += ["a_sum", "a_sq"]
        counts += ["npos", "nneg"]
    if kl:
        sums += ["kl_sum", "k_sum", "grad_total_abs"]
        counts.append("kl_clamped")
    if mismatch:
        sums.append("v_sum")
        counts.append("v_changed")
    if opsm:
        counts.append("opsm")  # tokens whose policy term OPSM dropped
    if rollout:
        sums += ["rollout_k1", "rollout_k3"]
    seq = ["cnt"]  # per-sequence terms, |y_i|-weighted sums over the B sequences
    if not adv_per_token:
        seq += ["npos", "nneg", "a_sum", "a_sq", "a_var"]
    if seq_ratio:
        seq += ["ratio_excess", "clamped", "ratio_min", "ratio_max"]
    return tuple(sums), tuple(counts), tuple(seq)


def terms_layout(
    t: dict[str, Tensor],
    prm: dict[str, Tensor],
    kind: str,
    seq_ratio: bool,
    adv_per_token: bool,
    kl: tuple[str, str] | None,
    mismatch: tuple[str, str] | None,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """kernel_layout for token_terms' own arguments."""
    has = (kl is not None, mismatch is not None, "dual" in prm, "opsm" in prm, "rollout" in t)
    return kernel_layout(kind, seq_ratio, adv_per_token, *has)


def kernel_params(config: LossConfig, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Every number token_terms reads, as 0-d tensors: the objective's (objective_params), the
    log-ratio clamp, the saturation threshold, the KL beta (and value bound), OPSM's threshold, the mismatch cap
    or bounds, and the histogram edges (`ratio_edges`, `gate_edges`, 1-d; buckets.bucket_edges). Passed
    as tensors, no value is baked into a compiled kernel (a float argument was: inductor's
    cache served a kernel compiled for one clamp to a process using another). Shared, read-only
    tensors per configuration. Raises InputError (`out_of_range`, naming the field) for a
    number `dtype` cannot hold (`unrepresentable`)."""
    obj = config.objective
    if isinstance(obj, ClipCov) and obj.seed:  # (not read here: a new seed each call, no new entry)
        config = dataclasses.replace(config, objective=dataclasses.replace(obj, seed=0))
    try:
        return _kernel_params(config, dtype, device)
    except TypeError:  # an unhashable configuration (not expected after validation)
        return _kernel_params.__wrapped__(config, dtype, device)


@functools.lru_cache(maxsize=256)
def _kernel_params(config: LossConfig, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    # a clip bound past the dtype's range is its largest value, as the mismatch bounds below:
    # an infinite bound means no clip (1e300 is how a caller asks for none)
    big = torch.finfo(dtype).max
    vals = objective_params(config.objective)
    if config.off_policy_mask_threshold is not None:
        # any finite threshold: one too small for the dtype as 0 (a mean of q - logp compares
        # the same), one past its range as its largest value (below)
        delta = config.off_policy_mask_threshold
        vals["opsm"] = (delta if abs(delta) >= torch.finfo(dtype).tiny else 0.0, "off_policy_mask_threshold")
    for k in ("lo", "hi", "dual", "trunc", "opsm"):
        if k in vals:
            vals[k] = (min(max(vals[k][0], -big), big), vals[k][1])
    vals["clamp"] = (config.log_ratio_clamp, "log_ratio_clamp")
    vals["threshold"] = (config.saturation_threshold, "saturation_threshold")
    vals["logp_tol"] = (LOGP_TOLERANCE, "logp_tol")
    if config.kl is not None:
        vals["beta"] = (config.kl.beta, "kl.beta")
        # a bound past the dtype's range is none: a k that overflows to inf is past the range,
        # not the bound, and refused as an overflow (as its largest value, inf read as clamped)
        if config.kl.value_clamp is not None and config.kl.value_clamp <= big:
            vals["kl_cap"] = (config.kl.value_clamp, "kl.value_clamp")
    mm = config.mismatch
    if mm is not None:
        # a bound past the dtype's largest value is that value: an overflowing weight (inf) is
        # still above it, and truncated or zeroed as the spec's v is (inf > inf is False)
        if mm.mode == "truncate":
            vals["cap"] = (min(mm.cap, big), "mismatch.cap")
            vals["floor"] = (mm.floor, "mismatch.floor")
        else:
            vals["vlo"], vals["vhi"] = (min(mm.lo, big), "mismatch.lo"), (min(mm.hi, big), "mismatch.hi")
    bad = unrepresentable(vals, dtype)
    # a normaliser the caller gives is read as its reciprocal, each token's weight, by the
    # policy term's mode and the KL term's own: one past the dtype's range, or below its normal
    # numbers (a subnormal's few bits made a loss of 0 and a wrong gradient), is refused
    agg = config.aggregation
    modes = (agg.mode, getattr(config.kl, "aggregation", None) or agg.mode)
    for name in dict.fromkeys(NORMALISER[m] for m in modes):
        x = getattr(agg, name)
        if x is not None and not torch.finfo(dtype).tiny <= 1.0 / x <= torch.finfo(dtype).max:
            bad.append(f"aggregation.{name}")
    if bad:
        name = str(dtype).replace("torch.", "")
        send = "send float64 or a value in range" if dtype != torch.float64 else "send a value in range"
        raise InputError(
            [FieldViolation(f, f"out_of_range: not representable in {name}; {send}") for f in bad]
        )
    prm = {k: torch.tensor(float(v), dtype=dtype, device=device) for k, (v, _) in vals.items()}
    prm["ratio_edges"], prm["gate_edges"] = bucket_edges(dtype, device)
    return prm


def unrepresentable(vals: dict[str, tuple[float, str]], dtype: torch.dtype) -> list[str]:
    """The fields of the numbers in `vals` (kernel name: (value, field)) that `dtype` turns
    into an infinity, or into 0 from a non-zero value, and of SAPO temperatures whose 4 / tau
    it cannot hold: the kernel would compute with another number (a float32 tau of 1e-40 was
    refused as `batch: overflow`, a beta of 1e-50 taken as 0)."""
    bad = []
    for k, (v, field) in vals.items():
        x = torch.tensor(float(v), dtype=dtype)
        held = bool(torch.isfinite(x)) and (v == 0 or bool(x != 0))
        if k in ("tau_pos", "tau_neg"):  # the loss's 4 / tau too
            held = held and bool(torch.isfinite(4 / x))
        if not held:
            bad.append(field)
    return bad


def derived_terms(s: dict[str, float], kind: str, kl: bool, mismatch: bool) -> dict[str, float]:
    """Complete token_terms' values `s` (named by kernel_layout) into every term compute_loss
    reads; counts are exact integers held as floats."""
    out = dict(s)
    npos, nneg = s["npos"], s["nneg"]
    if kind == "reinforce":
        out["free_abs"] = s["grad_abs"]
    if kind not in _SOFT_GATE:
        if kind in ("clip", "gmpo", "clip_cov"):
            low = s["clip_low"] + s.get("dual", 0.0)  # A < 0 tokens clipped (low and dual are disjoint)
            high = s["clip_high"]
        else:  # reinforce, kl_cov, dro: gate 1 everywhere
            low = high = 0.0
        out["gate_pos"], out["gate_neg"] = npos - high, nneg - low  # gate 1 unclipped, 0 clipped
        out["sat_pos"], out["sat_neg"] = high, low  # 0 < threshold <= 1
        out.setdefault("clip", high + low)  # (kl_cov counts its own: A = 0 tokens too)
    elif kind in ("gppo", *DPPO_KINDS):  # a clip on A's own side only
        out["clip"] = s["clip_low"] + s["clip_high"]
    elif kind == "sapo":
        out["clip"] = 0.0
    for k in ("clip_low", "clip_high", "dual", "opsm"):
        out.setdefault(k, 0.0)
    if not kl:
        out.update(kl_sum=0.0, k_sum=0.0, kl_clamped=0.0, grad_total_abs=out["grad_abs"])
    if not mismatch:
        out.update(v_sum=0.0, v_changed=0.0)
    return out


def token_terms(
    t: dict[str, Tensor],
    prm: dict[str, Tensor],
    kind: str,
    seq_ratio: bool,
    adv_per_token: bool,
    kl: tuple[str, str] | None,
    mismatch: tuple[str, str] | None,
    count_dtype: torch.dtype,
    stride: int = 1,
    codes: bool = False,
) -> Terms:
    """All per-token work: (grad, advantages, ratio, gate, clip_mask, ratio_bucket,
    gate_bucket, values), the bucket codes those of buckets.bucket_codes, the values one
    float64 vector in kernel_layout's order (token sums, token counts, sequence terms),
    followed by B zeros (see the end).

    `stride` > 1: ratio and gate (and their codes) come back for tokens 0, stride,
    2 stride, ... only (a dashboard's sample) and the clip mask empty. On the CPU, writing
    those three [N] outputs took more time than all the rest of the fused loop (16M tokens,
    SAPO: 132 -> 52 ms without them), and most requests ask for the gradient alone.

    `codes`: also the bucket codes of the ratio and gate that come back (else B zeros each,
    not codes), and their sums per sign after the values (buckets.BUCKET_SUMS).
    Compiled, they cost ~2 ms per million tokens on 2 CPU cores (46 compares a token), nearly
    as much as the rest of the loop, so compute_loss asks for them only when ratio and gate
    are the few tokens telemetry buckets anyway.

    The clip mask comes back as uint8 (0 / 1; `.view(torch.bool)` is free): inductor's CPU
    code stores a bool tensor several times slower than a uint8 one (measured: the whole
    kernel 3x slower at 16M tokens). It loads one lane by lane too, so the mask `m` comes in
    as uint8 and compiled code reads it through a float compare, which is vectorised (16M
    tokens, SAPO: 48 -> 41 ms); eager code views it as bool.

    `prm` is kernel_params(config); `kl` the KL (estimator, weight) (None: no KL term; k3_is
    comes as ("k3", "ratio"), kl.kernel_kl), `mismatch` the
    mismatch (level, mode) (None: no correction). `t` holds logp, old, m (the mask, uint8 0 /
    1; absent: every token trained), w (aggregation weight per sequence [B], or 0-d: one for
    all), adv ([N] or [B]), ylen ([B] trained tokens), ids (sequence id per token; only where
    something is per sequence: adv, w, sratio, lvseq, kls, klc, okl), and as configured sratio ([B],
    gspo, gmpo), sel (clip_cov, kl_cov: the covariance selection, uint8 0 / 1 like m), ref
    (KL), wkl (the KL term's own aggregation weight, like w; absent: w), rollout (the
    sampler's log-probs, whenever sent: their KL from old is summed over m, or over ms, the
    mask as sent, uint8 like m, when rejection took tokens out of m; a token-level mismatch
    weight reads them too), lvseq (mismatch at sequence level: a [B] sum or, for a geometric
    correction, a mean; seq_mask: its [B] mean log-weight), kls and
    klc (k3_is_seq: [B], kl.sequence_kl), okl (OPSM: [B], each sequence's mean of sampler
    log-prob - logp over its trained tokens; prm "opsm" the threshold). Any of those per-sequence values may come expanded to
    its tokens instead, as w_tok, adv_tok, ... (per_token; then there is no ids): the CPU
    engine expands them on the host, since inductor's CPU code gathers lane by lane. With
    grad_out ([N], compute_loss's) the gradient is stored there and returned as it: compiled,
    by the fused loop itself (16M tokens: ~10 ms less than the kernel's own [N] gradient and a
    copy of it into a server's response)."""
    sum_names, count_names, seq_names = terms_layout(t, prm, kind, seq_ratio, adv_per_token, kl, mismatch)
    logp, old, ids = t["logp"], t["old"], t.get("ids")
    # every token trained without "m": a constant in compiled code (no 16 MB read at 16M)
    m = _bits(t["m"], logp) if "m" in t else torch.ones_like(logp, dtype=torch.bool)
    sel = _bits(t["sel"], logp) if "sel" in t else None
    clamp = prm["clamp"]
    zero = torch.zeros_like(logp)
    alpha = _weight(t, "w", m, ids, zero)
    a = t["adv"] if adv_per_token else per_token(t, "adv", ids)
    # a masked token's own advantage may be any finite value: 0 in every term (a garbage 3e38
    # times a ratio overflowed), as given in the output
    ap = torch.where(m, a, zero) if adv_per_token else a
    sr = per_token(t, "sratio", ids) if seq_ratio or kind == "gmpo" else None
    d, clamped, ratio, pt = _policy(prm, kind, m, logp, old, sr, ap, sel)
    # sums and counts over tokens, each reduced as soon as its term exists: eager code then
    # holds a few [N] temporaries at a time instead of ~20 (compiled code fuses them all anyway)
    S: dict[str, Tensor] = {}
    C: dict[str, Tensor] = {}

    def total(name: str, x: Tensor) -> None:
        if name in sum_names:
            S[name] = x.sum(dtype=torch.float64)

    def count(name: str, x: Tensor) -> None:
        if name in count_names:
            C[name] = x.sum(dtype=count_dtype)

    # the value checks validation.check(token_values=False) leaves to this loop: non-finite
    # logp, old or per-token advantages, or a log-prob above the tolerance on a trained token
    # (compute_loss then names the culprit). Validation's own passes over the three inputs
    # took ~6 ms at 16M tokens; here they add 1-5 ms to the loop.
    tol = prm["logp_tol"]
    bad = ~torch.isfinite(logp) | ~torch.isfinite(old) | (m & ((logp > tol) | (old > tol)))
    count("bad", bad | ~torch.isfinite(a) if adv_per_token else bad)
    if clamped is not None:  # (gspo: the ratio and its clamp are per sequence)
        count("clamped", clamped)
        total("ratio_excess", torch.where(m, torch.expm1(d), zero))  # sum of ratio - 1 (see ratio_min)
    lpol, gpol, gfree = pt.loss, pt.grad, pt.grad_free
    if "rollout" in t:
        # the sampler's KL from old over the tokens as sent ("ms" with rejection; verl's
        # rollout_corr/kl and k3_kl): k1 = rollout - old unclamped, k3 = exp(d) - 1 - d of d =
        # old - rollout clamped at the log-ratio clamp. A masked token's garbage is selected
        # away (its difference may overflow), never multiplied by 0.
        ms = _bits(t["ms"], logp) if "ms" in t else m
        dr = torch.where(ms, old - t["rollout"], zero)
        total("rollout_k1", -dr)
        dc = torch.clamp(dr, -clamp, clamp)
        total("rollout_k3", torch.expm1(dc) - dc)
    if mismatch is not None:
        level, mode = mismatch
        if level == "sequence":
            lv, lgeo = per_token(t, "lvseq", ids), None
        else:  # (seq_mask: each token's own weight, its sequence's mean log-weight as the filter)
            lv = torch.where(m, old - t["rollout"], zero)
            lgeo = per_token(t, "lvseq", ids) if mode == "seq_mask" else None
        v, vch = mismatch_weights(mode, lv, prm, lgeo)
        lpol, gpol, gfree = lpol * v, gpol * v, gfree * v
        total("v_sum", torch.where(m, v, zero))
        count("v_changed", vch & m)
    if "opsm" in prm:  # OPSM: an A < 0 token of a sequence too far off the sampler drops out
        drop = m & (ap < 0) & (per_token(t, "okl", ids) > prm["opsm"])
        lpol, gpol, gfree = (
            torch.where(drop, zero, lpol),
            torch.where(drop, zero, gpol),
            torch.where(drop, zero, gfree),
        )
        count("opsm", drop)
    # every per-token term is finite on masked tokens (their log-ratios are 0), and alpha is 0 there
    total("policy_loss", alpha * lpol)
    grad = alpha * gpol
    # alpha >= 0, so alpha |g| == |alpha g| exactly; written so, the sum is fused into the loop
    # that writes grad instead of re-reading grad in a second pass
    total("grad_abs", alpha * gpol.abs())
    total("free_abs", alpha * gfree.abs())
    total("d_sum", torch.where(m, logp - old, zero))  # approx_kl's: unclamped (the spec's old - logp)
    if kl is not None:
        est, weighted = kl
        kw: Tensor | float | None = None  # the KL's weight (kl.kl_terms)
        if weighted == "ratio":  # the token's own, also where the policy's is its sequence's (d: clamped)
            kw = torch.exp(d)
        elif weighted == "sampler_ratio":
            kw = torch.exp(torch.where(m, logp - t["rollout"], zero).clamp(-clamp, clamp))
        elif weighted == "score":  # exp(logp - sg[logp]): 1, with derivative 1
            kw = 1.0
        elif est == "k3_is_seq":  # its sequence's ratio, s_i
            kw = per_token(t, "kls", ids)
        k, dk, kcl = kl_terms(est, torch.where(m, t["ref"] - logp, zero), clamp, kw, prm.get("kl_cap"))
        # the KL term's aggregation weight: its own (wkl), or the policy term's
        akl = _weight(t, "wkl", m, ids, zero) if "wkl" in t or "wkl" + EXPANDED in t else alpha
        total("kl_sum", akl * k)
        total("k_sum", torch.where(m, k, zero))
        grad = grad + (prm["beta"] * akl) * dk
        if est == "k3_is_seq":  # s_i's own gradient, s_i / |y_i| sum_u w_u k3_u (kl.sequence_kl)
            grad = grad + prm["beta"] * torch.where(m, per_token(t, "klc", ids), zero)
        total("grad_total_abs", grad.abs())  # not finite iff some gradient is not (overflow check)
        count("kl_clamped", kcl & m)
    pos = m & (a > 0)
    neg = m & (a < 0)
    if adv_per_token:
        total("a_sum", ap)
        total("a_sq", ap * ap)
        count("npos", pos)
        count("nneg", neg)
    gate = pt.gate
    if kind in _SOFT_GATE:
        total("gate_pos", torch.where(pos, gate, zero))
        total("gate_neg", torch.where(neg, gate, zero))
        sat = gate < prm["threshold"]
        count("sat_pos", pos & sat)
        count("sat_neg", neg & sat)
    if pt.clip_low is not None:
        count("clip_low", pt.clip_low & m)
    if pt.clip_high is not None:
        count("clip_high", pt.clip_high & m)
    if pt.dual is not None:
        count("dual", pt.dual & m)
    clip = pt.clip & m
    count("clip", clip)
    sums = []
    for name in sum_names:
        # the ratio's statistics from d, not from the ratio: inductor's CPU scheduler does not
        # fuse a reduction that reads a loop's output into a loop that holds reductions, so
        # the ratio went to memory for a second pass (a served 16M call's peak: 12 -> 8 B/token;
        # expm1 is one more exp a token, and the loop's time did not change measurably)
        if name == "ratio_min":
            sums.append(torch.where(m, d, float("inf")).min().exp() if d.numel() > 0 else logp.new_zeros(()))
        elif name == "ratio_max":
            sums.append(torch.where(m, d, -float("inf")).max().exp() if d.numel() > 0 else logp.new_zeros(()))
        else:
            # float64 accumulators: more accurate than float32 cascade summation, as fast
            # compiled, and one compiled kernel for every N (inductor's float32 cascade helper
            # guards on N > 4096, so small and large batches would compile separately)
            sums.append(S[name])
    counts = [C[name] for name in count_names]
    vals = [torch.stack(sums)]
    if counts:
        vals.append(torch.stack(counts).to(torch.float64))
    vals.append(torch.stack(sequence_terms(t, seq_names, adv_per_token, seq_ratio)))
    values = torch.cat(vals)
    if stride > 1:  # the sample, from strided inputs: only those tokens are computed and written
        every = slice(None, None, stride)
        m, a_s = m[every], ap[every]
        sr_s = sr[every] if sr is not None else None
        sel_s = sel[every] if sel is not None else None
        _, _, ratio, pt_s = _policy(prm, kind, m, logp[every], old[every], sr_s, a_s, sel_s)
        gate, pos, neg, zero = pt_s.gate, m & (a_s > 0), m & (a_s < 0), torch.zeros_like(ratio)
        clip = clip[:0]
    ratio, gate, clip8 = torch.where(m, ratio, zero + 1), torch.where(m, gate, zero), clip.to(torch.uint8)
    # Every output is as long as the batch, the values too (followed by B zeros): AOTInductor
    # returns an output of a constant size from a buffer of the calling thread, the same
    # tensor on every call of that thread, and when that thread exits, freeing the buffer
    # takes the GIL; a pool thread that exited while the interpreter finalised aborted
    # `softgate serve` after SIGTERM ("terminate called without an active exception").
    pad = torch.zeros_like(t["ylen"], dtype=torch.float64)
    if "grad_out" in t:
        grad = t["grad_out"].copy_(grad)
    if not codes:
        # two outputs of their own, not views of clip8: AOTInductor's stack-allocating
        # wrapper made an output that views another output from a handle it had already
        # given away (a segfault)
        none = torch.zeros_like(t["ylen"], dtype=torch.uint8)
        return grad, a, ratio, gate, clip8, none, none.clone(), torch.cat([values, pad])
    rcode, gcode, bsums = bucket_codes(ratio, gate, pos, neg, m, (prm["ratio_edges"], prm["gate_edges"]))
    return grad, a, ratio, gate, clip8, rcode, gcode, torch.cat([values, bsums, pad])


def _bits(x: Tensor, like: Tensor) -> Tensor:
    """A uint8 0 / 1 tensor as bool: compiled, through a float compare (vectorised; see m in
    token_terms), eager as a view."""
    return x.to(like.dtype) > 0.5 if torch.compiler.is_compiling() else x.view(torch.bool)


def per_token(t: dict[str, Tensor], name: str, ids: Tensor | None) -> Tensor:
    """The per-sequence tensor t[name] at every token: as the host expanded it
    (t[name + EXPANDED], see compute_loss), else gathered by sequence id."""
    expanded = t.get(name + EXPANDED)
    if expanded is not None:
        return expanded
    assert ids is not None  # (None would index as newaxis)
    return t[name][ids]


def _weight(t: dict[str, Tensor], name: str, m: Tensor, ids: Tensor | None, zero: Tensor) -> Tensor:
    """An aggregation weight (w or wkl: 0-d, one for all, or per sequence) at every token, 0 on
    masked ones."""
    w = t.get(name)
    return torch.where(m, w if w is not None and w.dim() == 0 else per_token(t, name, ids), zero)


def token_keys(t: dict[str, Tensor], adv_per_token: bool) -> tuple[str, ...]:
    """The per-token entries of token_terms' tensor dict `t` (the others are per sequence or 0-d)."""
    return tuple(k for k in t if k in PER_TOKEN or k.endswith(EXPANDED) or (k == "adv" and adv_per_token))


def _policy(
    prm: dict[str, Tensor],
    kind: str,
    m: Tensor,
    logp: Tensor,
    old: Tensor,
    sratio: Tensor | None,
    a: Tensor,
    sel: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor, PolicyTerms]:
    """(clamped log-ratio, clamp bits (None for gspo: its ratio and clamp are per sequence),
    ratio, policy terms) of the tokens given: all of them, or token_terms' sample. `sratio`:
    the sequence ratio at these tokens, GSPO's (the ratio) or GMPO's (read by its loss beside
    the token's own ratio); None: the ratio is per token. `sel`: the covariance selection
    (clip_cov, kl_cov)."""
    clamp = prm["clamp"]
    zero = torch.zeros_like(logp)
    raw = torch.where(m, logp - old, zero)
    d = raw.clamp(-clamp, clamp)
    clamped = None
    if kind == "gmpo":
        assert sratio is not None
        clamped = raw.abs() > clamp
        # clipped by the log-ratio, as the host clips its value (compared on the ratio, a
        # float32 eps near 0 let tokens the host clipped by up to 6e-8 keep their gradient: a
        # review); the unclamped one, which inductor fuses into one pass (d: two, 2.5x slower)
        dratio = torch.where(clamped, zero, sratio)
        return d, clamped, torch.exp(d), policy_terms(kind, raw, dratio, a, logp, prm, value=sratio)
    if sratio is not None:
        ratio = sratio
        dratio = ratio  # s_{i,t} = sg[s_i] exp(logp - sg[logp]): d s_{i,t} / d logp = s_i
    else:
        clamped = raw.abs() > clamp
        ratio = torch.exp(d)
        dratio = torch.where(clamped, zero, ratio)
    if kind not in READS_LOGP:
        return d, clamped, ratio, policy_terms(kind, ratio, dratio, a, logp, prm, old=old, sel=sel)
    # a masked token's logp may be any finite value, 0 here (its loss is -w A logp); its old
    # too, but dppo's drop tests read it as given: an old of 1e30 makes them +-inf, never NaN.
    # dro's penalty reads logp - old: 0 there too (1e30 squared would be inf, times w = 0 NaN)
    lp = torch.where(m, logp, zero)
    ol = torch.where(m, old, zero) if kind == "dro" else old
    return d, clamped, ratio, policy_terms(kind, ratio, dratio, a, lp, prm, old=ol)


def sequence_terms(
    t: dict[str, Tensor], names: tuple[str, ...], adv_per_token: bool, seq_ratio: bool
) -> list[Tensor]:
    """The per-sequence metric terms (float64 0-d tensors) named in `names`: token counts and
    advantage sums with per-sequence advantages, GSPO's ratio statistics. Every term weighs a
    sequence by its length or leaves out the empty ones: a one-sequence batch is compiled with
    an empty second sequence (compiled.two_sequences) that must add nothing."""
    yl = t["ylen"].to(torch.float64)
    out = {"cnt": yl.sum()}
    if not adv_per_token:
        adv = t["adv"].to(torch.float64)
        wa = yl * adv
        out["npos"] = torch.where(adv > 0, yl, 0.0).sum()
        out["nneg"] = torch.where(adv < 0, yl, 0.0).sum()
        out["a_sum"] = a_sum = wa.sum()
        out["a_sq"] = (wa * adv).sum()
        dev = adv - a_sum / out["cnt"].clamp(min=1)
        out["a_var"] = (yl * dev * dev).sum()  # two-pass: exact 0 for equal advantages
    if seq_ratio:
        sr = t["sratio"].to(torch.float64)
        out["ratio_excess"] = (yl * (sr - 1)).sum()
        out["clamped"] = torch.where(t["sclamped"], yl, 0.0).sum()
        if yl.numel() > 0:
            live = yl > 0
            out["ratio_min"] = torch.where(live, sr, float("inf")).min()
            out["ratio_max"] = torch.where(live, sr, -float("inf")).max()
        else:
            out["ratio_min"] = out["ratio_max"] = yl.sum()
    return [out[k] for k in names]
