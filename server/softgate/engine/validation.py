"""Input validation: every bad batch or configuration becomes one InputError listing all
violations found (field, reason, first offending index).

Reasons are "<code>: <text>"; the codes (REASON_CODES) are stable and feed the
rejected-inputs metric. Dtype rule for float inputs: float32 and float64 are accepted and may
be mixed; the computation runs in float64 when any log-prob tensor or the caller's advantages
are float64, else in float32 (`compute_dtype`). Rewards are reduced in float64 whatever their
dtype (integers and half precisions too). Half-precision (float16, bfloat16) log-probs and
advantages are refused.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Iterable, Mapping
from typing import TypeGuard

import torch
from torch import Tensor

from softgate.engine.batch import Batch
from softgate.engine.config import (
    AGGREGATION_MODES,
    ESTIMATORS,
    KL_ESTIMATORS,
    KL_WEIGHTS,
    MISMATCH_LEVELS,
    MISMATCH_MODES,
    NORMALISER,
    OBJECTIVES,
    OFF_POLICY_MASK_REFERENCES,
    REJECTION_LEVELS,
    REJECTION_STATISTICS,
    REWARD_KL_ESTIMATORS,
    REWARD_KL_LEVELS,
    SCALES,
    TOKEN_POSITIONS,
    WEIGHTED_KL_ESTIMATORS,
    AdvantageConfig,
    AggregationConfig,
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
    KLConfig,
    KlCov,
    LossConfig,
    MismatchConfig,
    Reinforce,
    RejectionCriterion,
    RewardKLConfig,
    Sapo,
    SapoSeq,
)
from softgate.engine.errors import FieldViolation, InputError
from softgate.engine.segments import host_shortcuts

REASON_CODES: dict[str, str] = {
    "non_finite": "a NaN or infinite value",
    "positive_logp": "a log-probability above 0 (beyond LOGP_TOLERANCE) on a trained token",
    "half_precision": "a float16/bfloat16 log-prob or advantage tensor (ratio noise larger than the clip band)",
    "bad_dtype": "a tensor of the wrong dtype (e.g. integer log-probs, float group ids)",
    "bad_device": "a tensor on the meta device (no data)",
    "bad_type": "an argument of the wrong type (a batch that is not a Batch, a config not a LossConfig)",
    "bad_shape": "a tensor that is not 1-D (rewards to advantages(): not [B] or [B, K], 1 <= K <= 64)",
    "length_mismatch": "a tensor whose length does not match the batch",
    "bad_offsets": "offsets not starting at 0, not ending at N, or decreasing",
    "bad_mask": "a loss mask with values other than 0 and 1",
    "missing": "a required input is absent",
    "ambiguous": "the advantages' level cannot be inferred from their length",
    "out_of_range": "a parameter outside its valid range, or a reward beyond MAX_ABS_REWARD",
    "unknown_name": "an unknown objective, estimator, mode or level name",
    "unsupported": "a combination not defined (per-token advantages with gspo, gmpo or sapo_seq, group scale "
    "or min_group_std with reinforce_pp, batch scale with gdpo, [B, K] rewards to loss(), seq_mask at "
    "sequence level, a floor without truncate, constant without token_sum_norm, optimal_token_baseline "
    "with a scale, a min_group_std, a per-sequence objective or in ComputeAdvantages)",
    "overflow": "finite inputs whose loss or gradient is not finite in the compute dtype",
}

# the objectives that take one advantage per sequence (per-token ones are refused)
PER_SEQUENCE_ADVANTAGE = (Gspo, Gmpo, SapoSeq)

# exp(80) = 5.5e34 stays finite in float32 (times an advantage above ~6e3 it does not: `overflow`)
MAX_LOG_RATIO_CLAMP = 80.0

LOGP_TOLERANCE = 1e-4
# how far a sum of squared probabilities may be rounded past its bounds: over 1, or under the
# token's own probability squared (float32 logits' rounding is ~1e-7)
SUM_PI_SQUARED_TOLERANCE = 1e-3
# rewards beyond this overflow the group statistics' float64 sums of squares (silent zeros)
MAX_ABS_REWARD = 1e100
# reward components of [B, K] rewards: gdpo reduces each over the groups in turn (a loop over
# K), and a reward of a million components in one small message must not hold a slot for long
MAX_REWARD_COMPONENTS = 64
MAX_REJECTION_CRITERIA = 16  # verl has 12 distinct rollout_rs options
# advantages.eps is 0 or at least this. A reward spread under ~1e-154 has squares that underflow
# float64 (its std reads 0 under ~1e-162): a smaller eps would be the whole divisor (rewards
# 1e-163 apart got advantages of 1e160 at eps 5e-324). From here up, eps dwarfs such a std.
MIN_ADVANTAGE_EPS = 1e-100
# fraction bits of the half precisions: half an ulp at |logp| in [8, 16) is 2^(2 - bits)
_FRACTION_BITS = {torch.float16: 10, torch.bfloat16: 7}

_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# the count each aggregation mode normalises by (token_sum_norm's constant is checked apart)
_NORMALISER = {m: f for m, f in NORMALISER.items() if f != "constant"}


def _unread_normalisers(agg: AggregationConfig, kl_mode: str | None, v: list[FieldViolation]) -> None:
    """Refuse a normaliser no term's mode reads, and a global one missing beside another given.
    A normaliser the mode ignores was silently dropped: a micro-batching trainer's global
    num_tokens beside the default mode left each micro-batch its own N_seq (an audit). Both
    num_tokens and num_seqs together stay accepted (common, and harmless). `kl_mode`: the KL
    term's own mode, if it has one."""
    if not _known(agg.mode, AGGREGATION_MODES):  # (refused by the caller; a list is unhashable)
        return
    modes = [agg.mode] + ([kl_mode] if kl_mode is not None and kl_mode != agg.mode else [])
    if modes[1:] == ["token_sum_norm"] and agg.constant is None:  # (the policy's: the caller's check)
        why = "missing: the KL term's token_sum_norm (kl.aggregation) needs the constant K"
        v.append(FieldViolation("aggregation.constant", why))
    reads = {_NORMALISER[m]: m for m in reversed(modes) if m in _NORMALISER}  # (the policy's first)
    given = [f for f in ("num_tokens", "num_seqs") if getattr(agg, f) is not None]
    for own, mode in reads.items():
        if getattr(agg, own) is None and given:
            term = f"{mode}" if mode == agg.mode else f"the KL term's {mode} (kl.aggregation)"
            unused = [g for g in given if g not in reads]
            tail = f"; {unused[0]} is not used by this mode" if unused else ""
            v.append(FieldViolation(f"aggregation.{own}", f"missing: {term} normalises by {own}{tail}"))
    if agg.constant is not None and "token_sum_norm" not in modes:
        own = _NORMALISER[agg.mode]
        why = f"unsupported: only token_sum_norm reads constant; {agg.mode} normalises by {own}"
        v.append(FieldViolation("aggregation.constant", why))
    if not reads and len(given) == 1:
        why = f"unsupported: token_sum_norm normalises by constant; {given[0]} is not used by this mode"
        v.append(FieldViolation(f"aggregation.{given[0]}", why))


def _rejection(criteria: object, v: list[FieldViolation]) -> None:
    """Rollout rejection's criteria: known statistics and levels, the combinations verl has,
    an upper bound > 0 and k1's lower bound in (0, upper]."""
    if not isinstance(criteria, tuple):
        v.append(FieldViolation("rejection", "bad_type: expected a tuple of RejectionCriterion"))
        return
    if len(criteria) > MAX_REJECTION_CRITERIA:
        why = f"out_of_range: {len(criteria)} criteria; at most {MAX_REJECTION_CRITERIA}"
        v.append(FieldViolation("rejection", why))
        return
    for i, c in enumerate(criteria):
        p = f"rejection[{i}]"
        if not isinstance(c, RejectionCriterion):
            v.append(FieldViolation(p, "bad_type: not a RejectionCriterion"))
            continue
        if not _known(c.statistic, REJECTION_STATISTICS):
            v.append(
                FieldViolation(
                    f"{p}.statistic", f"unknown_name: {c.statistic!r}; known: {list(REJECTION_STATISTICS)}"
                )
            )
        if not _known(c.level, REJECTION_LEVELS):
            v.append(
                FieldViolation(f"{p}.level", f"unknown_name: {c.level!r}; known: {list(REJECTION_LEVELS)}")
            )
        elif c.statistic == "binary_kl" and c.level != "token":
            v.append(FieldViolation(f"{p}.level", "unsupported: binary_kl is a token-level statistic"))
        if c.upper is None:
            v.append(FieldViolation(f"{p}.upper", "missing: a rejection criterion needs its upper bound"))
        elif not (_num_ok(c.upper) or c.upper == math.inf):
            why = f"out_of_range: {c.upper!r} is not a finite number or +inf (no upper bound)"
            v.append(FieldViolation(f"{p}.upper", why))
        elif not c.upper > 0:
            v.append(FieldViolation(f"{p}.upper", f"out_of_range: {c.upper!r} must be > 0"))
        elif (
            c.statistic == "k1" and c.lower is None and c.upper < 1
        ):  # (its window [1 / upper, upper] is empty)
            why = f"out_of_range: k1's upper {c.upper!r} < 1 with lower unset (1 / upper) keeps no token; give lower"
            v.append(FieldViolation(f"{p}.upper", why))
        if c.lower is None:
            continue
        if c.statistic != "k1":
            v.append(
                FieldViolation(
                    f"{p}.lower", f"unsupported: only k1 has a lower bound; {c.statistic} has upper"
                )
            )
        elif not _num_ok(c.lower):
            v.append(FieldViolation(f"{p}.lower", f"out_of_range: {c.lower!r} is not a finite number"))
        elif not c.lower >= 0:
            v.append(
                FieldViolation(f"{p}.lower", f"out_of_range: {c.lower!r} must be >= 0 (0: no lower bound)")
            )
        elif isinstance(c.upper, (int, float)) and c.lower > c.upper:
            v.append(
                FieldViolation(f"{p}.lower", f"out_of_range: lower {c.lower!r} must be <= upper {c.upper!r}")
            )


def half_reason(name: str, dtype: torch.dtype) -> str:
    """The refusal of a half-precision input `name`; a log-prob's with its dtype's own ratio
    noise (float16 quoted bfloat16's ~3%; an audit)."""
    dt = str(dtype).removeprefix("torch.")
    send = f"half_precision: {name} is {dt}; send {name} as float32 or float64"
    if name == "sum_pi_squared":  # (`.float()` keeps the rounding: 50x the advantages' error; a review)
        return (
            f"{send}: compute it in float32 from the old logits z (`torch.exp(torch.logsumexp(2 * z, -1) "
            "- 2 * torch.logsumexp(z, -1))` with `z = logits.float()`); `.float()` on it keeps its rounding"
        )
    if not name.endswith("logp"):
        return send
    # `.float()` on half log-probs passes this check and keeps their rounding (on-policy GSPO
    # clipped every token; an audit): the advice is where float32 log-probs come from
    src = "compute the log-probs in float32 from the logits (`logits.float().log_softmax(-1)`)"
    if name in ("old_logp", "rollout_logp"):
        src += ", or ask the sampler for float32 logprobs"
    noise = math.expm1(2.0 ** (2 - _FRACTION_BITS[dtype]))
    why = f"{dt} log-probs carry up to {noise:.1%} ratio noise per token at logp = -10, more than GSPO's clip band"
    return f"{send}: {src}; `.float()` on {dt} log-probs keeps their rounding ({why})"


def _num_ok(x: object) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int past float64's range (10**400)
        return False


def _fraction(x: object, fld: str, v: list[FieldViolation]) -> None:
    """A covariance objective's share of the trained tokens: in (0, 1]."""
    if not _num_ok(x):
        v.append(FieldViolation(fld, f"out_of_range: {x!r} is not a finite number"))
    elif not 0 < x <= 1:  # type: ignore[operator]
        v.append(FieldViolation(fld, f"out_of_range: {x!r} must be in (0, 1]"))


def _cov_window(obj: ClipCov, p: str, v: list[FieldViolation]) -> None:
    """Clip-Cov's covariance window cov_low < cov_high (finite) and its seed, a uint64."""
    for fld in ("cov_low", "cov_high"):
        x = getattr(obj, fld)
        if not _num_ok(x):
            v.append(FieldViolation(f"{p}.{fld}", f"out_of_range: {x!r} is not a finite number"))
    if _num_ok(obj.cov_low) and _num_ok(obj.cov_high) and not obj.cov_low < obj.cov_high:
        v.append(FieldViolation(f"{p}.cov_high", f"out_of_range: {obj.cov_high!r} must be > cov_low"))
    seed = obj.seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        v.append(FieldViolation(f"{p}.seed", f"bad_type: {seed!r} is not an integer"))
    elif not 0 <= seed < 2**64:
        v.append(FieldViolation(f"{p}.seed", f"out_of_range: {seed!r} must be in [0, 2^64)"))


# configuration objects found valid, by id (the server passes the same object for the same
# request bytes, see grpc.codec.decode_loss_config). By identity, not equality: a config equal
# to a valid one may still hold a bool where a number belongs (True == 1.0).
_VALID: dict[int, weakref.ref[LossConfig]] = {}


def _known(value: object, choices: Iterable[str]) -> TypeGuard[str]:
    """Whether `value` is one of the names `choices` (a one-name numpy array compared equal to
    it, then crashed the engine where it read the name as a string: a review)."""
    return isinstance(value, str) and value in choices


def validate_config(config: LossConfig) -> list[FieldViolation]:
    """Every out-of-range parameter or unknown name in `config` (a config object found valid
    once is not checked again: they are frozen)."""
    ref = _VALID.get(id(config))
    if ref is not None and ref() is config:
        return []
    v = _validate_config(config)
    if not v:
        with contextlib.suppress(TypeError):  # an object that takes no weak reference
            key = id(config)
            _VALID[key] = weakref.ref(config, functools.partial(_forget, key))
    return v


def _forget(key: int, _: object) -> None:
    _VALID.pop(key, None)


def _validate_config(config: LossConfig) -> list[FieldViolation]:
    v: list[FieldViolation] = []

    def need(ok: bool, fld: str, reason: str) -> None:
        if not ok:
            v.append(FieldViolation(fld, reason))

    def pos(x: object, fld: str, what: str = "must be > 0") -> None:
        if not _num_ok(x):
            v.append(FieldViolation(fld, f"out_of_range: {x!r} is not a finite number"))
        elif not x > 0:  # type: ignore[operator]
            v.append(FieldViolation(fld, f"out_of_range: {x!r} {what}"))

    def nonneg(x: object, fld: str) -> None:
        if not _num_ok(x):
            v.append(FieldViolation(fld, f"out_of_range: {x!r} is not a finite number"))
        elif x < 0:  # type: ignore[operator]
            v.append(FieldViolation(fld, f"out_of_range: {x!r} must be >= 0"))

    obj = config.objective
    name = getattr(obj, "name", None)
    if not _known(name, OBJECTIVES) or not isinstance(obj, OBJECTIVES[name]):
        v.append(
            FieldViolation("objective", f"unknown_name: objective {name!r}; known: {sorted(OBJECTIVES)}")
        )
    else:
        p = f"objective.{name}"
        if isinstance(obj, (Sapo, SapoSeq)):
            pos(obj.tau_pos, f"{p}.tau_pos")
            pos(obj.tau_neg, f"{p}.tau_neg")
        elif isinstance(obj, Dro):
            nonneg(obj.coef, f"{p}.coef")
        elif isinstance(obj, KlCov):
            _fraction(obj.fraction, f"{p}.fraction", v)
            nonneg(obj.coef, f"{p}.coef")
        elif isinstance(obj, (Grpo, Gspo, GspoToken, Cispo, CispoSeq, Gppo, Gmpo, DppoTv, DppoKl, ClipCov)):
            nonneg(obj.eps_low, f"{p}.eps_low")
            nonneg(obj.eps_high, f"{p}.eps_high")
            if isinstance(obj, (DppoTv, DppoKl)) and obj.ratio_cap is not None:
                pos(obj.ratio_cap, f"{p}.ratio_cap")
            if isinstance(obj, ClipCov):
                _fraction(obj.fraction, f"{p}.fraction", v)
                _cov_window(obj, p, v)
            if isinstance(obj, (Grpo, Gspo)) and obj.dual_clip is not None:
                if not _num_ok(obj.dual_clip):
                    v.append(FieldViolation(f"{p}.dual_clip", "out_of_range: not a finite number"))
                elif not obj.dual_clip > 1:
                    v.append(FieldViolation(f"{p}.dual_clip", f"out_of_range: {obj.dual_clip!r} must be > 1"))
        else:
            assert isinstance(obj, Reinforce)

    adv = config.advantages
    if not isinstance(adv, AdvantageConfig):
        v.append(FieldViolation("advantages", "unknown_name: not an AdvantageConfig"))
    else:
        need(
            _known(adv.estimator, ESTIMATORS),
            "advantages.estimator",
            f"unknown_name: {adv.estimator!r}; known: {list(ESTIMATORS)}",
        )
        need(
            adv.scale is None or _known(adv.scale, SCALES),
            "advantages.scale",
            f"unknown_name: {adv.scale!r}; known: {list(SCALES)}",
        )
        need(
            not (adv.estimator == "reinforce_pp" and adv.scale == "group"),
            "advantages.scale",
            "unsupported: reinforce_pp reads no groups (a group of one would be divided by eps); "
            "use batch or none",
        )
        need(
            not (adv.estimator == "reinforce_pp" and _num_ok(adv.min_group_std) and adv.min_group_std > 0),
            "advantages.min_group_std",
            "unsupported: reinforce_pp reads no groups, so it zeroes none",
        )
        need(
            adv.scale != "leave_one_out" or adv.estimator == "rloo",
            "advantages.scale",
            f"unsupported: leave_one_out divides rloo's leave-one-out baseline by the others' std; "
            f"not {adv.estimator!r}",
        )
        need(
            not (adv.estimator == "gdpo" and adv.scale == "batch"),
            "advantages.scale",
            "unsupported: gdpo divides each component by its group's std (group) or not (none); "
            "its batch normalisation is the whitening of their sum",
        )
        _token_baseline(config, v)
        _reward_weights(adv.reward_weights, v)
        need(
            isinstance(adv.skip_nan_components, bool),
            "advantages.skip_nan_components",
            f"bad_type: {adv.skip_nan_components!r}; true or false",
        )
        nonneg(adv.eps, "advantages.eps")
        if _num_ok(adv.eps) and 0 < adv.eps < MIN_ADVANTAGE_EPS:
            why = "a std that underflows float64 would leave eps alone as the divisor"
            v.append(
                FieldViolation(
                    "advantages.eps",
                    f"out_of_range: {adv.eps!r} must be 0 or >= {MIN_ADVANTAGE_EPS:g} ({why})",
                )
            )
        nonneg(adv.min_group_std, "advantages.min_group_std")
        _gamma(config, v)

    agg = config.aggregation
    if not isinstance(agg, AggregationConfig):
        v.append(FieldViolation("aggregation", "unknown_name: not an AggregationConfig"))
    else:
        need(
            _known(agg.mode, AGGREGATION_MODES),
            "aggregation.mode",
            f"unknown_name: {agg.mode!r}; known: {list(AGGREGATION_MODES)}",
        )
        for f in ("num_tokens", "num_seqs", "constant"):
            x = getattr(agg, f)
            if x is not None:
                pos(x, f"aggregation.{f}", "must be > 0 (a global normaliser)")
        if agg.mode == "token_sum_norm" and agg.constant is None:
            v.append(FieldViolation("aggregation.constant", "missing: token_sum_norm needs the constant K"))
        kl_mode = config.kl.aggregation if isinstance(config.kl, KLConfig) else None
        if kl_mode is not None and not _known(kl_mode, AGGREGATION_MODES):  # (a list: unhashable)
            kl_mode = None  # (refused below)
        _unread_normalisers(agg, kl_mode, v)

    kl = config.kl
    if kl is not None:
        if not isinstance(kl, KLConfig):
            v.append(FieldViolation("kl", "unknown_name: not a KLConfig"))
        else:
            need(
                _known(kl.estimator, KL_ESTIMATORS),
                "kl.estimator",
                f"unknown_name: {kl.estimator!r}; known: {list(KL_ESTIMATORS)}",
            )
            nonneg(kl.beta, "kl.beta")
            need(
                kl.aggregation is None or _known(kl.aggregation, AGGREGATION_MODES),
                "kl.aggregation",
                f"unknown_name: {kl.aggregation!r}; known: {list(AGGREGATION_MODES)}",
            )
            _value_clamp(kl.value_clamp, "kl.value_clamp", v)
            need(
                kl.value_clamp is None or kl.estimator != "k3_is_seq",
                "kl.value_clamp",
                "unsupported: k3_is_seq (k3 weighted by its sequence's ratio) takes no value bound; "
                "k3_is (the token's ratio) does",
            )
            if not _known(kl.weight, KL_WEIGHTS):
                v.append(
                    FieldViolation("kl.weight", f"unknown_name: {kl.weight!r}; known: {list(KL_WEIGHTS)}")
                )
            elif kl.weight != "none" and _known(kl.estimator, KL_ESTIMATORS):
                need(
                    _known(kl.estimator, WEIGHTED_KL_ESTIMATORS),
                    "kl.weight",
                    f"unsupported: {kl.estimator} takes no weight; a weight is for "
                    f"{list(WEIGHTED_KL_ESTIMATORS)} (k3_is is k3 with weight ratio)",
                )

    mm = config.mismatch
    if mm is not None:
        if not isinstance(mm, MismatchConfig):
            v.append(FieldViolation("mismatch", "unknown_name: not a MismatchConfig"))
        else:
            need(
                _known(mm.level, MISMATCH_LEVELS),
                "mismatch.level",
                f"unknown_name: {mm.level!r}; known: {list(MISMATCH_LEVELS)}",
            )
            need(
                _known(mm.mode, MISMATCH_MODES),
                "mismatch.mode",
                f"unknown_name: {mm.mode!r}; known: {list(MISMATCH_MODES)}",
            )
            need(
                not (mm.mode == "seq_mask" and mm.level != "token"),
                "mismatch.level",
                "unsupported: seq_mask weighs each token by its own weight (level token); its "
                "sequences are filtered by their geometric mean",
            )
            need(
                isinstance(mm.batch_normalize, bool),
                "mismatch.batch_normalize",
                f"bad_type: {mm.batch_normalize!r}; true or false",
            )
            # every bound is range-checked, the unused mode's too: a NaN there is still a bad request
            pos(mm.cap, "mismatch.cap")
            nonneg(mm.floor, "mismatch.floor")
            nonneg(mm.lo, "mismatch.lo")
            pos(mm.hi, "mismatch.hi")
            if mm.floor and _num_ok(mm.floor) and mm.mode in ("mask", "seq_mask"):  # (a bound it never reads)
                v.append(
                    FieldViolation(
                        "mismatch.floor",
                        f"unsupported: floor is the truncate mode's; {mm.mode} uses lo and hi",
                    )
                )
            elif mm.floor and _num_ok(mm.floor) and _num_ok(mm.cap) and not mm.floor < mm.cap:
                v.append(
                    FieldViolation(
                        "mismatch.floor", f"out_of_range: floor {mm.floor!r} must be < cap {mm.cap!r}"
                    )
                )
            if mm.mode in ("mask", "seq_mask") and _num_ok(mm.lo) and _num_ok(mm.hi) and not mm.lo < mm.hi:
                # named on the bound the caller moved: hi when lo is still its default
                moved = "hi" if mm.lo == MismatchConfig.lo and mm.hi != MismatchConfig.hi else "lo"
                v.append(
                    FieldViolation(f"mismatch.{moved}", f"out_of_range: lo {mm.lo!r} must be < hi {mm.hi!r}")
                )

    _reward_kl(config, v)
    _rejection(config.rejection, v)
    pos(config.log_ratio_clamp, "log_ratio_clamp")
    if _num_ok(config.log_ratio_clamp) and config.log_ratio_clamp > MAX_LOG_RATIO_CLAMP:
        v.append(
            FieldViolation(
                "log_ratio_clamp",
                f"out_of_range: {config.log_ratio_clamp!r} must be <= {MAX_LOG_RATIO_CLAMP:g} "
                "(exp of the bound must stay finite in float32)",
            )
        )
    opsm = config.off_policy_mask_threshold
    if opsm is not None and not _num_ok(opsm):
        v.append(
            FieldViolation("off_policy_mask_threshold", f"out_of_range: {opsm!r} is not a finite number")
        )
    ref = config.off_policy_mask_reference
    if not _known(ref, OFF_POLICY_MASK_REFERENCES):
        why = f"unknown_name: {ref!r}; known: {list(OFF_POLICY_MASK_REFERENCES)}"
        v.append(FieldViolation("off_policy_mask_reference", why))
    elif ref != "rollout" and opsm is None:
        why = f"unsupported: {ref!r} chooses OPSM's log-probs; off_policy_mask_threshold is unset (OPSM off)"
        v.append(FieldViolation("off_policy_mask_reference", why))
    if not _num_ok(config.saturation_threshold) or not 0 < config.saturation_threshold <= 1:
        v.append(
            FieldViolation(
                "saturation_threshold",
                f"out_of_range: {config.saturation_threshold!r} must be in (0, 1]",
            )
        )
    return v


def _first(bad: Tensor) -> int:
    return int(torch.nonzero(bad)[0, 0].item())


def _float_tensor(
    v: list[FieldViolation],
    name: str,
    x: object,
    n: int | None,
    *,
    allow_int: bool = False,
    allow_half: bool = False,
    maxima: dict[str, float] | None = None,
    values: bool = True,
) -> bool:
    """dtype / shape / length / finiteness of one 1-D float tensor; True when usable. The
    tensor's maximum is stored in `maxima[name]` when given; `values=False` reads no value."""
    if not isinstance(x, Tensor):
        v.append(FieldViolation(name, f"bad_dtype: expected a torch.Tensor, got {type(x).__name__}"))
        return False
    if x.dtype in _HALVES and not allow_half:
        v.append(FieldViolation(name, half_reason(name, x.dtype)))
        return False
    if not (x.dtype in _FLOATS or (allow_int and x.dtype in _INTS) or (allow_half and x.dtype in _HALVES)):
        want = "a float or integer dtype" if allow_int else "float32 or float64"
        v.append(FieldViolation(name, f"bad_dtype: {x.dtype} given, {want} expected"))
        return False
    if x.dim() != 1:
        v.append(FieldViolation(name, f"bad_shape: expected a 1-D tensor, got shape {tuple(x.shape)}"))
        return False
    if n is not None and x.numel() != n:
        v.append(FieldViolation(name, f"length_mismatch: length {x.numel()}, expected {n}"))
        return False
    if values and x.dtype.is_floating_point and x.numel() > 0:
        lo, hi = torch.stack(torch.aminmax(x)).tolist()  # one pass, one sync; NaN propagates to both
        if maxima is not None:
            maxima[name] = hi
        if not (math.isfinite(lo) and math.isfinite(hi)):
            i = _first(~torch.isfinite(x))
            what = "NaN" if math.isnan(float(x[i])) else "infinite"
            v.append(FieldViolation(name, f"non_finite: value is {what}", i))
            return False
    return True


def _sum_pi_squared(v: list[FieldViolation], x: object, n: int, m: Tensor | None, old: Tensor) -> None:
    """sum_pi_squared: [N] float, finite, and on trained tokens a sum of squared probabilities
    that holds the token's own: in [pi^2, 1], pi = exp(old), either bound passed by up to
    SUM_PI_SQUARED_TOLERANCE for rounding. (One below pi^2 comes from other logits: the next
    position's, another temperature's or policy's; a review.)"""
    if not _float_tensor(v, "sum_pi_squared", x, n):
        return
    assert isinstance(x, Tensor)
    tol = SUM_PI_SQUARED_TOLERANCE
    own = torch.exp(old.to(x.dtype).clamp(max=0.0)).square()  # (masked garbage: clamped, never read)
    over, under = x > 1 + tol, x < own - tol
    bad = over | under
    if m is not None:
        bad = bad & m
    if bool(bad.any()):
        i = _first(bad)
        if bool(over[i]):
            why = f"out_of_range: {float(x[i]):.6g} on a trained token; a sum of squared probabilities is at most 1"
        else:
            why = (
                f"out_of_range: {float(x[i]):.6g} on a trained token is below its own probability squared, "
                f"exp(old_logp)^2 = {float(own[i]):.6g}: computed from other logits (the next position's, "
                "another temperature's or policy's)?"
            )
        v.append(FieldViolation("sum_pi_squared", why, i))


def compute_dtype(batch: Batch) -> torch.dtype:
    """float64 when any log-prob tensor or the caller's advantages are float64, else float32."""
    for t in (batch.logp, batch.old_logp, batch.ref_logp, batch.rollout_logp, batch.advantages):
        if isinstance(t, Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def advantage_level(batch: Batch) -> str:
    """'sequence' or 'token' for the caller's advantages (after validation)."""
    if batch.advantage_level is not None:
        return batch.advantage_level
    assert batch.advantages is not None
    return "sequence" if batch.advantages.numel() == batch.num_seqs else "token"


def _numbers(w: object) -> TypeGuard[tuple[float, ...]]:
    """A non-empty tuple of Python numbers (bools aside): reward_weights as the config makes them."""
    return (
        isinstance(w, tuple)
        and bool(w)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)
    )


def _reward_weights(w: object, v: list[FieldViolation]) -> None:
    """AdvantageConfig.reward_weights: None, or a non-empty tuple of finite numbers of magnitude
    at most MAX_ABS_REWARD (a weighted sum must stay within float64's squares as rewards do)."""
    name = "advantages.reward_weights"
    if w is None:
        return
    if not _numbers(w):
        v.append(FieldViolation(name, "bad_dtype: expected a non-empty sequence of numbers"))
        return
    if len(w) > MAX_REWARD_COMPONENTS:
        v.append(
            FieldViolation(
                name, f"out_of_range: {len(w)} weights; at most {MAX_REWARD_COMPONENTS} components"
            )
        )
        return
    for i, x in enumerate(w):
        if not _num_ok(x) or abs(x) > MAX_ABS_REWARD:
            v.append(
                FieldViolation(
                    name, f"out_of_range: {x!r:.40} is not a finite number of magnitude <= 1e100", i
                )
            )
            return


def _nan_hint(reason: str) -> str:
    """A NaN reward's refusal, with the setting that reads NaN as "no reward" named."""
    if reason != "non_finite: value is NaN":
        return reason
    return reason + "; set skip_nan_components if NaN marks a reward that does not apply (TRL's None)"


def reward_tensor(
    v: list[FieldViolation],
    rewards: object,
    n: int | None,
    weights: object = None,
    components: bool = False,
    skip_nan: bool = False,
) -> bool:
    """`_float_tensor` for rewards (integers and half precisions allowed: they are reduced in
    float64), and every |reward| <= MAX_ABS_REWARD. `components`: [B, K] rewards (K reward
    components) allowed too, violations indexed by sequence. `weights` (reward_weights, when
    valid): one per component (1 for [B] rewards), their weighted sum within MAX_ABS_REWARD.
    `skip_nan` (skip_nan_components): a NaN component does not apply (a sequence none
    applies to has no reward), and counts as 0 in these checks; else NaN is refused."""
    if skip_nan and isinstance(rewards, Tensor) and rewards.is_floating_point():
        rewards = rewards.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf)
    k = 1
    if components and isinstance(rewards, Tensor) and rewards.dim() == 2:
        k = rewards.shape[1]
        if not 0 < k <= MAX_REWARD_COMPONENTS:
            why = f"bad_shape: {tuple(rewards.shape)}; 1 to {MAX_REWARD_COMPONENTS} reward components"
            v.append(FieldViolation("rewards", why))
            return False
        flat: list[FieldViolation] = []
        ok = _float_tensor(flat, "rewards", rewards.reshape(-1), None, allow_int=True, allow_half=True)
        v += [
            FieldViolation(f.field, _nan_hint(f.reason), None if f.index is None else f.index // k)
            for f in flat
        ]
        if not ok:
            return False
        if n is not None and rewards.shape[0] != n:
            v.append(FieldViolation("rewards", f"length_mismatch: length {rewards.shape[0]}, expected {n}"))
            return False
    elif not _float_tensor(v, "rewards", rewards, n, allow_int=True, allow_half=True):
        if components and isinstance(rewards, Tensor) and rewards.dim() > 2:
            v[-1] = FieldViolation(
                "rewards", f"bad_shape: shape {tuple(rewards.shape)}; [B] or [B, K] expected"
            )
        else:
            v[-1] = FieldViolation(v[-1].field, _nan_hint(v[-1].reason), v[-1].index)
        return False
    assert isinstance(rewards, Tensor)
    if rewards.dtype in _FLOATS and rewards.numel() > 0:
        big = rewards.abs() > MAX_ABS_REWARD
        if bool(big.any()):
            i = _first(big.reshape(-1))
            v.append(
                FieldViolation(
                    "rewards",
                    f"out_of_range: |reward| {float(rewards.reshape(-1)[i]):.3g} exceeds {MAX_ABS_REWARD:.0e}; "
                    "the group statistics would overflow float64",
                    i // k,
                )
            )
            return False
    if (
        _numbers(weights) and len(weights) <= MAX_REWARD_COMPONENTS and all(map(_num_ok, weights))
    ):  # (else refused)
        if len(weights) != k:
            where = f"rewards have {k} components" if k > 1 else "[B] rewards are one component"
            v.append(
                FieldViolation(
                    "advantages.reward_weights", f"length_mismatch: {len(weights)} weights; {where}"
                )
            )
            return False
        if rewards.numel() > 0:
            w = torch.tensor(weights, dtype=torch.float64, device=rewards.device)
            s = (rewards.to(torch.float64).reshape(-1, k) @ w).abs()
            if bool((s > MAX_ABS_REWARD).any()):
                i = _first(s > MAX_ABS_REWARD)
                why = f"out_of_range: the weighted reward {float(s[i]):.3g} exceeds {MAX_ABS_REWARD:.0e}"
                v.append(FieldViolation("rewards", why, i))
                return False
    return True


def _token_baseline(config: LossConfig, v: list[FieldViolation]) -> None:
    """The violations of optimal_token_baseline's settings (and of its options elsewhere)."""
    adv = config.advantages
    otb = adv.estimator == "optimal_token_baseline"
    if not _known(adv.position, TOKEN_POSITIONS):
        why = f"unknown_name: {adv.position!r}; known: {list(TOKEN_POSITIONS)}"
        v.append(FieldViolation("advantages.position", why))
    elif adv.position != "token" and not otb:
        why = f"unsupported: position aligns optimal_token_baseline's tokens; not {adv.estimator!r}"
        v.append(FieldViolation("advantages.position", why))
    if not isinstance(adv.zero_tail, bool):
        v.append(FieldViolation("advantages.zero_tail", f"bad_type: {adv.zero_tail!r}; true or false"))
    elif adv.zero_tail and not otb:
        why = f"unsupported: zero_tail is optimal_token_baseline's; not {adv.estimator!r}"
        v.append(FieldViolation("advantages.zero_tail", why))
    if not otb:
        return
    if adv.scale in ("group", "batch"):
        why = "unsupported: optimal_token_baseline's advantage is G - B, not divided by a std; use none"
        v.append(FieldViolation("advantages.scale", why))
    if _num_ok(adv.min_group_std) and adv.min_group_std > 0:
        why = "unsupported: optimal_token_baseline zeroes no group; a lone member keeps its return"
        v.append(FieldViolation("advantages.min_group_std", why))
    if isinstance(config.objective, PER_SEQUENCE_ADVANTAGE):
        why = f"unsupported: {config.objective.name} uses one advantage per sequence; optimal_token_baseline makes one per token"
        v.append(FieldViolation("advantages.estimator", why))


def _gamma(config: LossConfig, v: list[FieldViolation]) -> None:
    """The violations of config.advantages.gamma, REINFORCE++'s discount, appended to `v`."""
    gamma = config.advantages.gamma
    if not _num_ok(gamma) or not 0.0 <= gamma <= 1.0:
        v.append(FieldViolation("advantages.gamma", f"out_of_range: {gamma!r} must be in [0, 1]"))
    elif gamma != 1.0 and config.advantages.estimator != "reinforce_pp":
        est = config.advantages.estimator
        what = (
            "'s returns are undiscounted"
            if est == "optimal_token_baseline"
            else " gives one advantage per sequence"
        )
        why = f"unsupported: {est}{what}; gamma discounts reinforce_pp's per-token returns"
        v.append(FieldViolation("advantages.gamma", why))
    elif gamma != 1.0 and isinstance(config.objective, PER_SEQUENCE_ADVANTAGE):
        why = (
            f"unsupported: {config.objective.name} uses one advantage per sequence; gamma makes one per token"
        )
        v.append(FieldViolation("advantages.gamma", why))


def _reward_kl(config: LossConfig, v: list[FieldViolation]) -> None:
    """The violations of config.reward_kl, a KL penalty in the reward, appended to `v`."""
    rk = config.reward_kl
    if rk is None:
        return
    if not isinstance(rk, RewardKLConfig):
        v.append(FieldViolation("reward_kl", "unknown_name: not a RewardKLConfig"))
        return
    if _known(rk.estimator, KL_ESTIMATORS) and not _known(rk.estimator, REWARD_KL_ESTIMATORS):
        why = f"unsupported: {rk.estimator} shapes a loss term's gradient; a reward takes {list(REWARD_KL_ESTIMATORS)}"
        v.append(FieldViolation("reward_kl.estimator", why))
    elif not _known(rk.estimator, REWARD_KL_ESTIMATORS):
        why = f"unknown_name: {rk.estimator!r}; known: {list(REWARD_KL_ESTIMATORS)}"
        v.append(FieldViolation("reward_kl.estimator", why))
    if not _known(rk.level, REWARD_KL_LEVELS):
        v.append(
            FieldViolation("reward_kl.level", f"unknown_name: {rk.level!r}; known: {list(REWARD_KL_LEVELS)}")
        )
    elif rk.level != "sequence" and isinstance(config.objective, PER_SEQUENCE_ADVANTAGE):
        why = f"unsupported: {config.objective.name} uses one advantage per sequence; level sequence puts the KL there"
        v.append(FieldViolation("reward_kl.level", why))
    elif rk.level == "sequence" and getattr(config.advantages, "estimator", None) == "gdpo":
        why = "unsupported: gdpo normalises each reward component apart; levels token and immediate add the KL after it"
        v.append(FieldViolation("reward_kl.level", why))
    if not _num_ok(rk.beta):
        v.append(FieldViolation("reward_kl.beta", f"out_of_range: {rk.beta!r} is not a finite number"))
    elif rk.beta < 0:
        v.append(FieldViolation("reward_kl.beta", f"out_of_range: {rk.beta!r} must be >= 0"))
    _value_clamp(rk.value_clamp, "reward_kl.value_clamp", v)


def _value_clamp(c: object, fld: str, v: list[FieldViolation]) -> None:
    """A KL value bound: unset (None) or a finite number > 0."""
    if c is None:
        return
    if not _num_ok(c):
        v.append(FieldViolation(fld, f"out_of_range: {c!r} is not a finite number"))
    elif not c > 0:  # type: ignore[operator]
        v.append(FieldViolation(fld, f"out_of_range: {c!r} must be > 0 (unset: no bound)"))


def validate_batch(
    batch: Batch, config: LossConfig | None = None, *, token_values: bool = True
) -> list[FieldViolation]:
    """Every violation in `batch` (and its fit with `config`, when given). `token_values=False`
    leaves out the values of logp, old_logp and per-token advantages (NaN, infinity, positive
    log-probs), which the loss kernel checks in its own pass over the tokens."""
    v: list[FieldViolation] = []
    maxima: dict[str, float] = {}
    if not _float_tensor(v, "logp", batch.logp, None, maxima=maxima, values=token_values):
        return v
    n = batch.logp.numel()

    # offsets
    off = batch.offsets
    b = None
    if not isinstance(off, Tensor) or off.dtype not in _INTS:
        v.append(FieldViolation("offsets", "bad_dtype: offsets must be an integer tensor"))
    elif off.dim() != 1 or off.numel() < 1:
        v.append(FieldViolation("offsets", "bad_shape: offsets must be 1-D of length B+1 >= 1"))
    else:
        # on the CPU through numpy: three torch ops and their dispatch cost ~25 us a call
        o = off.numpy() if host_shortcuts(off.device) else off.to(torch.int64)
        if int(o[0]) != 0:
            v.append(FieldViolation("offsets", f"bad_offsets: offsets[0] = {int(o[0])}, must be 0", 0))
        elif len(o) > 1 and bool((o[1:] < o[:-1]).any()):
            i = _first(torch.as_tensor(o[1:] < o[:-1])) + 1
            v.append(FieldViolation("offsets", "bad_offsets: offsets must be non-decreasing", i))
        elif int(o[-1]) != n:
            v.append(
                FieldViolation(
                    "offsets",
                    f"bad_offsets: offsets[-1] = {int(o[-1])}, must equal the number of tokens {n}",
                    len(o) - 1,
                )
            )
        else:
            b = len(o) - 1

    # mask
    m: Tensor | None = None
    if batch.mask is not None:
        mk = batch.mask
        if not isinstance(mk, Tensor):
            v.append(FieldViolation("mask", "bad_dtype: expected a torch.Tensor"))
        elif mk.dim() != 1:
            v.append(FieldViolation("mask", f"bad_shape: expected a 1-D tensor, got shape {tuple(mk.shape)}"))
        elif mk.numel() != n:
            v.append(FieldViolation("mask", f"length_mismatch: length {mk.numel()}, expected {n}"))
        elif mk.dtype == torch.bool:
            m = mk
        elif mk.dtype in _INTS or mk.dtype in _FLOATS:
            bad = (mk != 0) & (mk != 1)
            if bool(bad.any()):
                v.append(FieldViolation("mask", "bad_mask: values must be 0 or 1", _first(bad)))
            else:
                m = mk != 0
        else:
            v.append(FieldViolation("mask", f"bad_dtype: {mk.dtype}; bool or 0/1 expected"))

    # log-prob tensors
    def logp_range(name: str, x: Tensor) -> None:
        if x.numel() == 0 or maxima.get(name, float("inf")) <= LOGP_TOLERANCE:
            return
        over = x > LOGP_TOLERANCE
        if m is not None:
            over = over & m
        if bool(over.any()):
            i = _first(over)
            v.append(
                FieldViolation(
                    name, f"positive_logp: log-probability {float(x[i]):.6g} > 0 on a trained token", i
                )
            )

    if token_values:
        logp_range("logp", batch.logp)
    in_reward = config is not None and config.reward_kl is not None  # (old_logp read before the kernel)
    for name in ("old_logp", "ref_logp", "rollout_logp"):
        x = getattr(batch, name)
        values = token_values or name != "old_logp" or in_reward
        if x is not None and _float_tensor(v, name, x, n, maxima=maxima, values=values) and values:
            logp_range(name, x)

    if batch.sum_pi_squared is not None:
        old = batch.old_logp if isinstance(batch.old_logp, Tensor) else batch.logp
        if isinstance(old, Tensor) and old.dim() == 1 and old.numel() == n:  # (else refused above)
            _sum_pi_squared(v, batch.sum_pi_squared, n, m, old)

    if config is not None:
        if config.kl is not None and batch.ref_logp is None:
            v.append(FieldViolation("ref_logp", "missing: a KL term is configured, ref_logp is required"))
        if config.reward_kl is not None and batch.ref_logp is None:
            v.append(
                FieldViolation("ref_logp", "missing: a KL in the reward is configured, ref_logp is required")
            )
        if config.reward_kl is not None and batch.advantages is not None:
            why = "unsupported: a KL in the reward changes advantages computed from rewards; the batch carries advantages"
            v.append(FieldViolation("reward_kl", why))
        gamma = getattr(config.advantages, "gamma", 1.0)
        if _num_ok(gamma) and gamma != 1.0 and batch.advantages is not None:  # (else: validate_config's)
            why = "unsupported: gamma discounts the returns of advantages computed from rewards; the batch carries advantages"
            v.append(FieldViolation("advantages.gamma", why))
        otb = getattr(config.advantages, "estimator", None) == "optimal_token_baseline"
        if otb and batch.sum_pi_squared is None and batch.advantages is None:
            why = "missing: the optimal_token_baseline estimator is configured, sum_pi_squared is required"
            v.append(FieldViolation("sum_pi_squared", why))
        if config.mismatch is not None and batch.rollout_logp is None:
            v.append(
                FieldViolation(
                    "rollout_logp", "missing: a mismatch correction is configured, rollout_logp is required"
                )
            )
        elif getattr(config.kl, "weight", None) == "sampler_ratio" and batch.rollout_logp is None:
            v.append(
                FieldViolation(
                    "rollout_logp",
                    "missing: the KL is weighted by the sampler's ratio, rollout_logp is required",
                )
            )
        elif config.rejection and batch.rollout_logp is None:
            v.append(
                FieldViolation(
                    "rollout_logp", "missing: rollout rejection is configured, rollout_logp is required"
                )
            )

    # advantages / rewards
    if batch.advantages is not None:
        a = batch.advantages
        lvl = batch.advantage_level
        if lvl is not None and lvl not in ("sequence", "token"):
            v.append(
                FieldViolation("advantage_level", f"unknown_name: {lvl!r}; known: ['sequence', 'token']")
            )
        elif b is not None and _float_tensor(v, "advantages", a, None, values=token_values):
            k = a.numel()
            if lvl is None:
                if k not in (b, n):
                    v.append(
                        FieldViolation(
                            "advantages",
                            f"length_mismatch: length {k}, expected {b} (per sequence) or {n} (per token)",
                        )
                    )
                elif b == n and n > 0:
                    lens = batch.offsets[1:] - batch.offsets[:-1]
                    if not bool((lens == 1).all()):
                        v.append(
                            FieldViolation(
                                "advantage_level",
                                "ambiguous: B == N but sequences are not one token each; "
                                "set advantage_level to 'sequence' or 'token'",
                            )
                        )
                lvl = "sequence" if k == b else "token"
            elif k != (b if lvl == "sequence" else n):
                v.append(
                    FieldViolation(
                        "advantages",
                        f"length_mismatch: length {k}, expected {b if lvl == 'sequence' else n} per {lvl}",
                    )
                )
            if not token_values and lvl == "sequence":  # per-sequence values: the kernel does not read them
                _float_tensor(v, "advantages", a, None)
            if config is not None and isinstance(config.objective, PER_SEQUENCE_ADVANTAGE) and lvl == "token":
                name = config.objective.name
                instead = {"gspo": "gspo_token", "sapo_seq": "sapo or cispo_seq"}.get(name)
                instead = f"; use {instead} for per-token advantages" if instead else ""
                v.append(
                    FieldViolation(
                        "advantages", f"unsupported: {name} uses one advantage per sequence{instead}"
                    )
                )
    elif batch.rewards is None:
        v.append(FieldViolation("rewards", "missing: give rewards and group_ids, or advantages"))
    if batch.rewards is not None and b is not None:
        if isinstance(batch.rewards, Tensor) and batch.rewards.dim() == 2:
            why = (
                "unsupported: [B, K] rewards (K reward components) are ComputeAdvantages' input "
                "(Engine.advantages); send its advantages, or the components' weighted sum as [B] rewards"
            )
            v.append(FieldViolation("rewards", why))
        else:
            adv = getattr(config, "advantages", None)
            skip_nan = getattr(adv, "skip_nan_components", False) is True
            reward_tensor(v, batch.rewards, b, getattr(adv, "reward_weights", None), skip_nan=skip_nan)
        if batch.advantages is None and batch.group_ids is None:
            v.append(FieldViolation("group_ids", "missing: rewards need group_ids"))
    g = batch.group_ids
    if g is not None and b is not None:  # beside advantages too, where they go unused: bad input is refused
        if not isinstance(g, Tensor) or g.dtype not in _INTS:
            v.append(FieldViolation("group_ids", "bad_dtype: group_ids must be an integer tensor"))
        elif g.dim() != 1:
            v.append(FieldViolation("group_ids", f"bad_shape: expected 1-D, got shape {tuple(g.shape)}"))
        elif g.numel() != b:
            v.append(FieldViolation("group_ids", f"length_mismatch: length {g.numel()}, expected {b}"))
    return v


def check(batch: Batch, config: LossConfig, *, token_values: bool = True) -> None:
    """Raise InputError listing every violation of `config` and `batch`. `token_values=False`:
    see validate_batch; when anything else is wrong, the values are checked too, so that the
    error still lists every violation."""
    if not torch.is_grad_enabled():  # (compute_loss calls it with grad off: no ~2 us context)
        return _check(batch, config, token_values)
    with torch.no_grad():
        return _check(batch, config, token_values)


def _check(batch: Batch, config: LossConfig, token_values: bool) -> None:
    v = validate_config(config)
    vb = validate_batch(batch, config, token_values=token_values)
    if (v or vb) and not token_values:  # list the token values' violations too
        vb = validate_batch(batch, config)
    v += vb
    if v:
        raise InputError(v)


def check_arguments(batch: object, config: object, sample_tokens: object = None) -> None:
    """Raise InputError unless `batch` is a Batch, `config` a LossConfig and `sample_tokens`
    None or an int >= 1: Engine.loss's arguments, before it reads the batch."""
    v: list[FieldViolation] = []
    if not isinstance(batch, Batch):
        v.append(
            FieldViolation("batch", f"bad_type: expected a softgate.engine.Batch, got {type(batch).__name__}")
        )
    if not isinstance(config, LossConfig):
        v.append(
            FieldViolation(
                "config", f"bad_type: expected a softgate.engine.LossConfig, got {type(config).__name__}"
            )
        )
    if sample_tokens is not None and (
        not isinstance(sample_tokens, int) or isinstance(sample_tokens, bool) or sample_tokens < 1
    ):
        v.append(
            FieldViolation(
                "sample_tokens", f"out_of_range: {sample_tokens!r} must be an int >= 1 (None: all)"
            )
        )
    if v:
        raise InputError(v)


def check_devices(tensors: Mapping[str, object]) -> None:
    """Raise InputError naming each tensor of `tensors` on the meta device: it has a shape and
    no data, nothing to compute on or copy (torch's own NotImplementedError otherwise)."""
    v = [
        FieldViolation(name, "bad_device: a meta tensor holds no data; give it on the CPU or a CUDA device")
        for name, x in tensors.items()
        if isinstance(x, Tensor) and x.is_meta
    ]
    if v:
        raise InputError(v)
