"""Policy objectives: per-token loss l, closed-form d l / d logp, gate weight, clip masks.

Inputs per token: `ratio` rho (r = exp(clamp(logp - old)), or the sequence ratio s_i for the
sequence-ratio objectives gspo, gspo_token, sapo_seq and cispo_seq), `dratio` = d rho / d logp
(r where the log-ratio was not clamped, 0 where it was; s_i for the sequence-ratio objectives,
whose s_{i,t} = sg[s_i] exp(logp - sg[logp])), advantage `a`, `logp`. sapo_seq and cispo_seq
are the sapo and cispo kinds on that ratio.

gmpo clips as grpo does, but on the token's own log-ratio before the clamp (passed as `ratio`;
its bounds -eps_low and eps_high: gmpo_bounds), with the loss -A s_i at every token (`value`,
the sequence's geometric-mean ratio) and `dratio` s_i where d was not clamped: each of the
|y_i| tokens carries -A s_i and d s_i / d logp_t = s_i / |y_i|, so a token's gradient is -A s_i
times its aggregation weight (gspo's form), 0 where clipped. Its free gradient is the same at
the same s_i.

dppo_tv and dppo_kl weigh each token like cispo, by sg[min(r, ratio_cap)], and drop the tokens
whose probability p = exp(logp) moved too far from p_old = exp(old) the way A pushes it
(`old`: the old log-probs as given, any finite value on masked tokens): by p - p_old (dppo_tv) or the binary
KL of Bernoulli(p_old) to Bernoulli(p) (dppo_kl) past the sign's bound, eps_high or eps_low.

clip_cov and kl_cov read `sel`, the tokens the host's covariance selection picked
(covariance.py). clip_cov is grpo's clip (no dual clip) with the selected tokens' loss and
gradient 0 (gate 0; clipped where A != 0); kl_cov is reinforce's -A r with coef |logp - old| added on the
selected tokens (gradient + coef sign(logp - old), the log-ratio unclamped): its gate is 1
(the policy term is not scaled; the penalty is added), so its grad_retained can pass 1. Both
count the selected tokens as clipped, on A's side (`clip_low` A < 0, `clip_high` A > 0);
kl_cov every one of them in `clip`, an A = 0 token too (its penalty still acts), clip_cov not
a drawn A = 0 token (no gradient to drop, as cispo's; counting it, inductor reduced the count
in a pass of its own: its kernel 5.2 -> 1.9 ms at 1M tokens).

dro (Tinker's) is -A logp plus (coef / 2)(logp - old)^2 on every trained token, the
log-ratio unclamped (`old` 0 on masked tokens, as logp): gradient -A + coef (logp - old).
As kl_cov's, its gate is 1 (the penalty is added, not a scaling) and its free gradient -A (coef
0), so grad_retained shows how far the penalty moved the gradient; it clips nothing.

`grad_free` is the gradient of the same algorithm with the trust region removed (nothing
clipped, gate weight 1): -A d rho / d logp, and -A r for cispo and on gppo's clipped tokens
(whose gradient ignores the clamp too) and dppo. `gate` = grad / grad_free, the factor by which
the trust region scales each token's gradient (SAPO: 4p(1-p); hard clips: 1 or 0; gppo: bound / r
on clipped tokens; cispo: clip(r) / r; dppo: min(r, ratio_cap) / r, 0 where dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from softgate.engine.config import (
    Cispo,
    CispoSeq,
    ClipCov,
    DppoKl,
    DppoTv,
    Dro,
    Gmpo,
    Gppo,
    Grpo,
    Gspo,
    GspoToken,
    KlCov,
    Objective,
    Reinforce,
    Sapo,
    SapoSeq,
)


@dataclass
class PolicyTerms:
    loss: Tensor
    grad: Tensor
    grad_free: Tensor
    gate: Tensor
    clip: Tensor  # bool: the trust-region clip is active for this token
    clip_low: Tensor | None  # bool: A < 0 and past the low-side bound (rho < 1 - eps_low; above)
    clip_high: Tensor | None  # bool: A > 0 and past the high-side bound (rho > 1 + eps_high)
    dual: Tensor | None  # bool: A < 0 and rho > c


OBJECTIVE_KIND = {
    "sapo": "sapo",
    "sapo_seq": "sapo",
    "cispo_seq": "cispo",
    "grpo": "clip",
    "gspo": "clip",
    "gspo_token": "clip",
    "gppo": "gppo",
    "cispo": "cispo",
    "gmpo": "gmpo",
    "dppo_tv": "dppo_tv",
    "dppo_kl": "dppo_kl",
    "clip_cov": "clip_cov",
    "kl_cov": "kl_cov",
    "reinforce": "reinforce",
    "dro": "dro",
}

DPPO_KINDS = ("dppo_tv", "dppo_kl")
# kinds that read the host's covariance selection (covariance.py)
COV_KINDS = ("clip_cov", "kl_cov")
# kinds whose loss reads logp itself (0 on masked tokens), and dppo's and dro's the old
# log-probs too (dro's also 0 on masked tokens: its penalty reads logp - old there)
READS_LOGP = ("cispo", *DPPO_KINDS, "dro")


def objective_params(obj: Objective) -> dict[str, tuple[float, str]]:
    """The objective's numbers by the kernel's names, each with the field it comes from (the
    kernel reads them as 0-d tensors: kernel.kernel_params). A grpo or gspo without dual clip has no
    "dual" entry (so the kernel does not compute that mask). gmpo's bound the log-ratio
    (gmpo_bounds), dppo's the divergence ("trunc": its ratio_cap, when given)."""
    p = f"objective.{obj.name}"
    if isinstance(obj, (DppoTv, DppoKl)):
        lo, hi = _tiny_as_zero(obj.eps_low), _tiny_as_zero(obj.eps_high)
        vals = {"lo": (lo, f"{p}.eps_low"), "hi": (hi, f"{p}.eps_high")}
        if obj.ratio_cap is not None:
            vals["trunc"] = (obj.ratio_cap, f"{p}.ratio_cap")
        return vals
    if isinstance(obj, Gmpo):
        lo, hi = gmpo_bounds(obj)
        return {"lo": (lo, f"{p}.eps_low"), "hi": (hi, f"{p}.eps_high")}
    if isinstance(obj, (Sapo, SapoSeq)):
        return {"tau_pos": (obj.tau_pos, f"{p}.tau_pos"), "tau_neg": (obj.tau_neg, f"{p}.tau_neg")}
    if isinstance(obj, (KlCov, Dro)):
        return {"coef": (obj.coef, f"{p}.coef")}
    if isinstance(obj, (Grpo, Gppo, Gspo, GspoToken, Cispo, CispoSeq, ClipCov)):
        vals = {"lo": (1 - obj.eps_low, f"{p}.eps_low"), "hi": (1 + obj.eps_high, f"{p}.eps_high")}
        if isinstance(obj, (Grpo, Gspo)) and obj.dual_clip is not None:
            vals["dual"] = (obj.dual_clip, f"{p}.dual_clip")
        return vals
    assert isinstance(obj, Reinforce)
    return {}


def gmpo_bounds(obj: Gmpo) -> tuple[float, float]:
    """GMPO's bounds on the log-ratio, (-eps_low, eps_high), each _tiny_as_zero (host and
    kernel clip at the same numbers)."""
    return -_tiny_as_zero(obj.eps_low), _tiny_as_zero(obj.eps_high)


def _tiny_as_zero(eps: float) -> float:
    """A bound eps below 1e-30 as 0, so that float32 holds it (1e-50 would be refused as not
    representable in float32, though any eps >= 0 is valid)."""
    return eps if eps >= 1e-30 else 0.0


def policy_terms(
    kind: str,
    ratio: Tensor,
    dratio: Tensor,
    a: Tensor,
    logp: Tensor,
    prm: dict[str, Tensor],
    value: Tensor | None = None,
    old: Tensor | None = None,
    sel: Tensor | None = None,
) -> PolicyTerms:
    """`kind` is OBJECTIVE_KIND[name]; `prm` holds objective_params' numbers as 0-d tensors;
    `value` gmpo's sequence ratio s_i at each token, `old` the old log-probs (read by dppo and
    kl_cov), `sel` the covariance selection (bool, clip_cov and kl_cov)."""
    one = torch.ones_like(ratio)
    no = torch.zeros_like(ratio, dtype=torch.bool)
    if kind == "sapo":
        free = -a * dratio
        tau = torch.where(a > 0, prm["tau_pos"], prm["tau_neg"])
        p = torch.sigmoid(tau * (ratio - 1))
        w = 4 * p * (1 - p)
        return PolicyTerms(-(4 / tau) * p * a, w * free, free, w, no, None, None, None)
    if kind == "reinforce":
        free = -a * dratio
        return PolicyTerms(-ratio * a, free, free, one, no, None, None, None)
    if kind == "dro":
        assert old is not None
        # the log-ratio unclamped (no exp of it is taken); 0 on masked tokens, whose logp and
        # old both come in as 0
        x = logp - old
        coef = prm["coef"]
        free = -a * one
        return PolicyTerms(-a * logp + (coef / 2) * x * x, free + coef * x, free, one, no, None, None, None)
    if kind == "kl_cov":
        assert old is not None and sel is not None
        # a masked token is never selected, so its logp - old (any finite values) is never read
        x = torch.where(sel, logp - old, torch.zeros_like(logp))
        free = -a * dratio
        coef = prm["coef"]
        loss = -ratio * a + coef * x.abs()
        return PolicyTerms(
            loss, free + coef * torch.sign(x), free, one, sel, sel & (a < 0), sel & (a > 0), None
        )
    lo, hi = prm["lo"], prm["hi"]
    if kind in DPPO_KINDS:
        assert old is not None
        p, q = torch.exp(logp), torch.exp(old)
        if kind == "dppo_tv":
            high = (a > 0) & (p - q > hi)
            low = (a < 0) & (q - p > lo)
        else:
            div = binary_kl(old, logp)
            high = (a > 0) & (p > q) & (div > hi)
            low = (a < 0) & (p < q) & (div > lo)
        clip = high | low
        wgt = torch.minimum(ratio, prm["trunc"]) if "trunc" in prm else ratio
        return _weighted(torch.where(clip, torch.zeros_like(wgt), wgt), ratio, a, logp, clip, low, high)
    high = (a > 0) & (ratio > hi)
    low = (a < 0) & (ratio < lo)
    if kind == "cispo":
        # either side whatever A's sign, but not where A = 0: such a token has no gradient to
        # clip, and grpo / gppo / gspo never count it either
        clip = ((ratio < lo) | (ratio > hi)) & (a != 0)
        return _weighted(torch.minimum(torch.maximum(ratio, lo), hi), ratio, a, logp, clip, low, high)
    clip = high | low
    bound = torch.where(high, hi, lo)
    if kind == "gmpo":
        assert value is not None
        loss = -a * value
    else:
        loss = -a * torch.where(clip, bound, ratio)
    dual = None
    if "dual" in prm:
        c = prm["dual"]
        dual = (a < 0) & (ratio > c)
        loss = torch.where(dual, -c * a, loss)
        clip = clip | dual
    if kind == "gppo":
        # clipped tokens keep the gradient of their bound, -bound A, by definition (SPEC): also
        # where the log-ratio was clamped, so not d/dlogp of r * sg[bound / r] with r clamped.
        # Their free gradient is -A r likewise (cispo's), not the clamp's 0: gate = bound / r
        # is then grad / grad_free, and grad_retained does not jump at the clamp
        free = -a * torch.where(clip, ratio, dratio)
        grad = torch.where(clip, -a * bound, free)
        gate = torch.where(clip, bound / ratio, one)
    else:
        free = -a * dratio
        grad = torch.where(clip, torch.zeros_like(free), free)
        gate = torch.where(clip, torch.zeros_like(one), one)
    if kind == "clip_cov":  # the selected tokens drop out (the host left out those clipped above)
        assert sel is not None
        zero = torch.zeros_like(free)
        loss, grad, gate = (
            torch.where(sel, zero, loss),
            torch.where(sel, zero, grad),
            torch.where(sel, zero, gate),
        )
        low, high = low | (sel & (a < 0)), high | (sel & (a > 0))
        clip = clip | low | high
    return PolicyTerms(loss, grad, free, gate, clip, low, high, dual)


def _weighted(
    wgt: Tensor, ratio: Tensor, a: Tensor, logp: Tensor, clip: Tensor, low: Tensor, high: Tensor
) -> PolicyTerms:
    """The terms of a stop-gradient IS weight `wgt` (cispo, dppo): l = -wgt A logp, gradient
    -wgt A, free gradient -A r."""
    return PolicyTerms(-wgt * a * logp, -wgt * a, -ratio * a, wgt / ratio, clip, low, high, None)


def binary_kl(old: Tensor, logp: Tensor) -> Tensor:
    """KL(Bernoulli(q) || Bernoulli(p)) of the old and new probabilities q = exp(old) and
    p = exp(logp), with DPPO's (and verl's) 1e-8 beside 1 - q and 1 - p: q (old - logp) +
    (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8)). 1 - p as -expm1(logp), exact near p = 1,
    and 0 for a log-prob within the tolerance above 0 (whose 1 - exp(logp) is negative)."""
    one_q = (-torch.expm1(old)).clamp(min=0)
    one_p = (-torch.expm1(logp)).clamp(min=0)
    return torch.exp(old) * (old - logp) + one_q * (torch.log(one_q + 1e-8) - torch.log(one_p + 1e-8))
