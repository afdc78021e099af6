"""Small dataclasses mirroring the proto's configuration messages.

Every field left at None takes the server's default (docs/spec.md), so a request carries only what
the caller chose. The same choices can be passed as keyword arguments to
`SoftgateClient.loss` (see `build_loss_config`). A number given as a one-element tensor or
numpy scalar is read when the configuration is built (a keyword option: at every call).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from softgate_client.errors import invalid_argument

OBJECTIVE_PARAMS: dict[str, tuple[str, ...]] = {
    "sapo": ("tau_pos", "tau_neg"),
    "grpo": ("eps_low", "eps_high", "dual_clip"),
    "gspo": ("eps_low", "eps_high", "dual_clip"),
    "gspo_token": ("eps_low", "eps_high"),
    "cispo": ("eps_low", "eps_high"),
    "gppo": ("eps_low", "eps_high"),
    "gmpo": ("eps_low", "eps_high"),
    "dppo_tv": ("eps_low", "eps_high", "ratio_cap"),
    "dppo_kl": ("eps_low", "eps_high", "ratio_cap"),
    "clip_cov": ("eps_low", "eps_high", "fraction", "cov_low", "cov_high", "seed"),
    "kl_cov": ("fraction", "coef"),
    "reinforce": (),
    "sapo_seq": ("tau_pos", "tau_neg"),
    "cispo_seq": ("eps_low", "eps_high"),
    "dro": ("coef",),
}
INTEGER_PARAMS = ("seed",)  # a uint64 on the wire; the others are doubles
OUTPUTS = ("advantages", "ratio", "gate_weight", "clip_mask", "mask")
_PLAIN = (str, int, float, bool, type(None), tuple, dict)


def plain_value(v: Any) -> Any:
    """A one-element tensor or numpy scalar as the Python number it holds now; anything else
    as it is. (A configuration keeps values, not tensors: the client remembers configurations
    it built, and a tensor updated in place, a normaliser after all_reduce say, kept its
    first value in every later call.)"""
    if isinstance(v, _PLAIN) or not hasattr(v, "item"):
        return v
    try:
        x = v.item()
    except (ValueError, RuntimeError):  # not one element: left for validation to name
        return v
    return x if isinstance(x, (int, float)) else v  # (a one-string array stays an array)


def _number(path: str, v: Any) -> float:
    """The option at `path` as a float, or refused naming it (`float("abc")`'s bare ValueError
    named nothing; an audit)."""
    if isinstance(v, bool):  # (True was sent as 1.0; the server refuses it in-process too)
        raise invalid_argument(path, f"bad_type: expected a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise invalid_argument(path, f"bad_type: expected a number, got {v!r:.80}") from None
    except OverflowError:  # an int past float64's range
        raise invalid_argument(path, f"out_of_range: {v!r:.80} is past float64's range") from None


def _flag(path: str, v: Any) -> bool:
    """The option at `path` as a bool (numpy's and torch's too), or refused naming it: 0 / 1
    and a string "False" are not bools."""
    v = plain_value(v)
    if not isinstance(v, bool):
        raise invalid_argument(path, f"bad_type: {v!r}; true or false")
    return v


def _choice(option: str, name: str, choices: Iterable[str]) -> str:
    """A peer's option value `name` if it is one of `choices`, else refused naming the option."""
    if name not in choices:
        raise invalid_argument(option, f"unknown_choice: {name!r}; one of {list(choices)}")
    return name


def _uint64(path: str, v: Any) -> int:
    """The option at `path` as an integer in [0, 2^64), or refused naming it."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise invalid_argument(path, f"bad_type: expected an integer, got {v!r:.80}")
    if not 0 <= v < 2**64:
        raise invalid_argument(path, f"out_of_range: {v} must be in [0, 2^64)")
    return v


def _plain_fields(obj: Any, path: str) -> None:
    """Read one-element tensors and numpy scalars; the number fields (`float | None`) as
    floats, a value that is none refused by its path (`config.aggregation.num_tokens`)."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        p = plain_value(v)
        if p is not None and f.type == "float | None":
            p = _number(f"{path}.{f.name}", p)
        if p is not v:
            object.__setattr__(obj, f.name, p)


@dataclass(frozen=True)
class Objective:
    """An objective by name (`sapo`, `grpo`, `gspo`, `gspo_token`, `cispo`, `gppo`, `gmpo`,
    `dppo_tv`, `dppo_kl`, `clip_cov`, `kl_cov`, `reinforce`, `sapo_seq`, `cispo_seq`, `dro`) and its
    parameters (`tau_pos`, `tau_neg`, `eps_low`, `eps_high`, `dual_clip`, `ratio_cap`,
    `fraction`, `cov_low`, `cov_high`, `seed` (an integer), `coef`)."""

    name: str = "sapo"
    params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.params, dict):
            object.__setattr__(self, "params", {k: plain_value(v) for k, v in self.params.items()})
        if self.name not in OBJECTIVE_PARAMS:
            raise invalid_argument(
                "config.objective", f"unknown_choice: {self.name!r}; one of {list(OBJECTIVE_PARAMS)}"
            )
        takes = OBJECTIVE_PARAMS[self.name]
        bad = sorted(set(self.params) - set(takes))
        if bad:
            raise invalid_argument(
                f"config.objective.{self.name}.{bad[0]}",
                f"unexpected: {self.name} takes {list(takes)}, not {', '.join(bad)}",
            )
        path = f"config.objective.{self.name}"
        params = {
            k: (_uint64 if k in INTEGER_PARAMS else _number)(f"{path}.{k}", v) for k, v in self.params.items()
        }
        object.__setattr__(self, "params", params)

    def __hash__(self) -> int:  # so LossConfig hashes (the client remembers built requests)
        return hash((self.name, tuple(sorted(self.params.items()))))


def sapo(tau_pos: float | None = None, tau_neg: float | None = None) -> Objective:
    return Objective("sapo", _given(tau_pos=tau_pos, tau_neg=tau_neg))


def grpo(
    eps_low: float | None = None, eps_high: float | None = None, dual_clip: float | None = None
) -> Objective:
    return Objective("grpo", _given(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip))


def gspo(
    eps_low: float | None = None, eps_high: float | None = None, dual_clip: float | None = None
) -> Objective:
    return Objective("gspo", _given(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip))


def _given(**kw: float | None) -> dict[str, float]:
    return {k: v for k, v in kw.items() if v is not None}  # (Objective reads them as floats)


@dataclass(frozen=True)
class AdvantageConfig:
    """Outcome-reward estimator: `grpo`, `dr_grpo`, `rloo`, `reinforce_pp_baseline`, `opo`, `gpg`,
    `grpo_passk`, `reinforce_pp`, `gdpo`, `optimal_token_baseline` (with the batch's
    `sum_pi_squared`; `position` "token" or "trained" pairs the group's tokens by index in the
    sequence or among its trained tokens, `zero_tail` is verl's handle_zero_tail);
    `reward_weights` for rewards of K components;
    scale `group`, `batch`, `none`, `leave_one_out` (rloo over the others' std: NeMo-RL's
    default; None: the estimator's own default); `gamma` in [0, 1],
    reinforce_pp's discount of each token's return (None: 1, none); `skip_nan_components`:
    a NaN reward component does not apply to its sequence (TRL's None)."""

    estimator: str | None = None
    scale: str | None = None
    eps: float | None = None
    min_group_std: float | None = None
    reward_weights: tuple[float, ...] | None = None  # one per reward component; None: 1 each
    gamma: float | None = None
    skip_nan_components: bool = False
    position: str | None = None
    zero_tail: bool = False

    def __post_init__(self) -> None:
        _plain_fields(self, "config.advantages")
        _flag(
            "config.advantages.skip_nan_components", self.skip_nan_components
        )  # (numpy's bool_ was read as bool)
        _flag("config.advantages.zero_tail", self.zero_tail)
        w = self.reward_weights
        if w is not None:  # (a list, an array, a tensor: a tuple of floats, hashable)
            path = "config.advantages.reward_weights"
            if isinstance(w, (str, bytes, bool)) or not (
                isinstance(w, (int, float)) or hasattr(w, "__iter__")
            ):
                raise invalid_argument(path, f"bad_type: expected a sequence of numbers, got {w!r:.60}")
            # (a one-element array arrives as its number: _plain_fields)
            items = [w] if isinstance(w, (int, float)) else (w.tolist() if hasattr(w, "tolist") else list(w))
            items = [plain_value(x) for x in items]  # (numpy's and torch's scalars, bools among them)
            for x in items:
                if isinstance(x, (str, bytes, bool)):
                    raise invalid_argument(path, f"bad_type: expected a number, got {x!r:.60}")
            object.__setattr__(self, "reward_weights", tuple(_number(path, x) for x in items))


@dataclass(frozen=True)
class AggregationConfig:
    """`token_mean`, `seq_mean_token_mean`, `seq_mean_token_sum`, `token_sum_norm`; the global
    normalisers of a micro-batch or shard (`num_tokens`, `num_seqs`), `constant` = K. Each mode
    reads one (token_mean num_tokens, seq_mean_* num_seqs, token_sum_norm constant): the server
    refuses one given alone that the mode would ignore."""

    mode: str | None = None
    num_tokens: float | None = None
    num_seqs: float | None = None
    constant: float | None = None

    def __post_init__(self) -> None:
        _plain_fields(self, "config.aggregation")


@dataclass(frozen=True)
class KLConfig:
    """KL penalty to the reference policy: estimator `k1` / `k2` / `k3` / `k1_st` / `k3_st`
    (straight-through: k1's or k3's value, k2's gradient) / `k3_is` (k3 weighted by the
    policy ratio, TRL's use_bias_correction_kl) / `abs` / `abs_st` (|x|, verl's abs and abs+) /
    `k3_is_seq` (k3 weighted by the sequence ratio: TRL's at sequence level),
    coefficient `beta`
    (needed with an estimator: the server's default 0 is no KL term), `value_clamp` c (k
    clamped to [-c, c], gradient 0 past it; verl's low_var_kl: 10), `weight` on k1, k2, k3 or
    abs, with its gradient: `ratio` (exp(logp - old): slime's --use-unbiased-kl),
    `sampler_ratio` (exp(logp - rollout): NeMo-RL's use_on_policy_kl_approximation) or
    `score` (exp(logp - sg[logp]) = 1: NeMo-RL's KL); None: none."""

    estimator: str | None = None
    beta: float | None = None
    aggregation: str | None = None  # the KL term's own mode; None: the policy term's
    value_clamp: float | None = None
    weight: str | None = None

    def __post_init__(self) -> None:
        _plain_fields(self, "config.kl")


@dataclass(frozen=True)
class RewardKLConfig:
    """A KL penalty in the reward instead of a loss term (verl's use_kl_in_reward, OpenRLHF's
    init_kl_coef): coefficient `beta` (needed: the server's default 0 is none), estimator
    `k1` (the default) / `k2` / `k3` / `abs` of ref_logp - old_logp, `level` `token` (each
    token's advantage less beta times the KL to its sequence's end: REINFORCE++), `immediate`
    (each token's own KL alone: NeMo-RL's REINFORCE++) or
    `sequence` (each reward less beta times its sequence's KL: verl's GRPO), `value_clamp` c
    (each k clamped to [-c, c]; verl's low_var_kl: 10). Needs rewards and ref_logp."""

    beta: float | None = None
    estimator: str | None = None
    level: str | None = None
    value_clamp: float | None = None

    def __post_init__(self) -> None:
        _plain_fields(self, "config.reward_kl")


@dataclass(frozen=True)
class MismatchConfig:
    """Train/inference mismatch weight: level `token` / `sequence` (the product) / `geometric`
    (the geometric mean over the sequence), mode `truncate` / `mask` / `seq_mask` (token level:
    OpenRLHF's seq-mask-tis); `batch_normalize` divides the weights by their batch mean (verl's
    rollout_is_batch_normalize)."""

    level: str | None = None
    mode: str | None = None
    cap: float | None = None
    lo: float | None = None
    hi: float | None = None
    floor: float | None = None
    batch_normalize: bool = False

    def __post_init__(self) -> None:
        _plain_fields(self, "config.mismatch")
        _flag(
            "config.mismatch.batch_normalize", self.batch_normalize
        )  # (numpy's bool_ was read as bool; 0 / 1 are not)


@dataclass(frozen=True)
class RejectionCriterion:
    """One rollout rejection filter (verl's rollout_rs option `{level}_{statistic}`):
    `statistic` `k1` / `k2` / `k3` / `binary_kl` of old_logp - rollout_logp, or `k3_reverse`
    (AReaL's kl_k3, exp(-d) - 1 + d: no verl option, here only), per `level`
    `token` / `seq_sum` / `seq_mean` / `seq_max` / `seq_min`; a token or sequence past `upper`
    (k1: outside [lower, upper] on exp(k1), `lower` default 1 / upper, 0 none; `upper` +inf:
    none) leaves the loss mask.
    verl's veto tau (the keyword `rollout_token_veto_threshold`) is
    `RejectionCriterion(1 / tau, "k1", "seq_max", 0)`."""

    upper: float | None = None
    statistic: str | None = None
    level: str | None = None
    lower: float | None = None

    def __post_init__(self) -> None:
        _plain_fields(self, "config.rejection")


# verl's KL types (core_algos.kl_penalty): softgate's estimator, and the bound verl puts on its
# value (low_var_kl's clamp to [-10, 10]); "+": straight-through (the value, k2's gradient)
VERL_KL_TYPES: dict[str, tuple[str, float | None]] = {
    **dict.fromkeys(("kl", "k1"), ("k1", None)),
    "abs": ("abs", None),
    **dict.fromkeys(("mse", "k2", "mse+", "k2+"), ("k2", None)),  # (k2+ is k2: its own gradient)
    **dict.fromkeys(("low_var_kl", "k3"), ("k3", 10.0)),
    **dict.fromkeys(("kl+", "k1+"), ("k1_st", None)),
    "abs+": ("abs_st", None),
    **dict.fromkeys(("low_var_kl+", "k3+"), ("k3_st", 10.0)),
}


def _verl_kl_type(option: str, name: str) -> tuple[str, float | None]:
    return VERL_KL_TYPES[_choice(option, name, VERL_KL_TYPES)]


def kl_from_verl(kl_loss_type: str, kl_loss_coef: float) -> KLConfig:
    """verl's KL loss (`use_kl_loss` with `kl_loss_type` and `kl_loss_coef`) as a KLConfig for
    `kl=`: its estimator, and verl's bound of 10 on low_var_kl's value (`k3`, `k3+`: `value_clamp`)."""
    estimator, bound = _verl_kl_type("kl_loss_type", str(kl_loss_type))
    return KLConfig(estimator, kl_loss_coef, value_clamp=bound)


# slime's --kl-loss-type (compute_approx_kl): softgate's estimator, and the bound slime puts on
# low_var_kl's value (after --use-unbiased-kl's weight)
SLIME_KL_TYPES: dict[str, tuple[str, float | None]] = {
    "k1": ("k1", None),
    "k2": ("k2", None),
    "k3": ("k3", None),
    "low_var_kl": ("k3", 10.0),
}


def kl_from_slime(kl_loss_type: str, kl_loss_coef: float, use_unbiased_kl: bool = False) -> KLConfig:
    """slime's KL loss (`--use-kl-loss` with `--kl-loss-type`, `--kl-loss-coef` and
    `--use-unbiased-kl`) as a KLConfig for `kl=`: its estimator, low_var_kl's bound of 10 on the
    (weighted) value, and the ratio weight exp(logp - old) for `--use-unbiased-kl`."""
    estimator, bound = SLIME_KL_TYPES[_choice("kl_loss_type", str(kl_loss_type), SLIME_KL_TYPES)]
    weight = "ratio" if _flag("use_unbiased_kl", use_unbiased_kl) else None
    return KLConfig(
        estimator, _number("kl_loss_coef", plain_value(kl_loss_coef)), value_clamp=bound, weight=weight
    )


def kl_from_nemo_rl(
    reference_policy_kl_type: str,
    reference_policy_kl_penalty: float,
    kl_output_clamp_value: float | None = 10.0,
    use_on_policy_kl_approximation: bool = False,
) -> KLConfig | None:
    """NeMo-RL's KL loss (ClippedPGLossFn at 006907a9, its defaults for the clamp) as a KLConfig
    for `kl=`: k1 / k2 / k3, the output clamp on the weighted value (None: none), weighted by
    exp(logp - sg[logp]) (the score-function gradient), or by exp(logp - generation_logprobs)
    with `use_on_policy_kl_approximation` (send generation_logprobs as `rollout_logp`). A
    penalty of 0 is None, no KL term: NeMo-RL then reads no reference log-probs (its
    `use_kl_in_reward` sets the penalty to 0 that way)."""
    name = _choice("reference_policy_kl_type", str(reference_policy_kl_type), ("k1", "k2", "k3"))
    on_policy = _flag("use_on_policy_kl_approximation", use_on_policy_kl_approximation)
    beta = _number("reference_policy_kl_penalty", plain_value(reference_policy_kl_penalty))
    if beta == 0:
        return None
    weight = "sampler_ratio" if on_policy else "score"
    return KLConfig(name, beta, value_clamp=kl_output_clamp_value, weight=weight)


# verl's advantage estimators with a softgate counterpart, by where a KL in the reward enters:
# REINFORCE++'s per-token return, or the outcome estimators' sum of the token-level rewards
VERL_REWARD_KL_LEVELS = {
    "reinforce_plus_plus": "token",
    **dict.fromkeys(
        ("grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo", "gpg",
         "grpo_passk"),
        "sequence",
    ),
}  # fmt: skip


def reward_kl_from_verl(kl_penalty: str, kl_coef: float, adv_estimator: str) -> RewardKLConfig:
    """verl's KL in the reward (`use_kl_in_reward` with `kl_penalty` and `kl_ctrl.kl_coef`) as a
    RewardKLConfig for `reward_kl=`: level token under its `reinforce_plus_plus` (the per-token
    return), sequence under its outcome estimators (VERL_REWARD_KL_LEVELS: they sum the
    token-level rewards; remax, gae and the others have no counterpart here); low_var_kl
    bounded at 10 as verl's. A "+" type's value is its base's (a reward takes no gradient)."""
    estimator, bound = _verl_kl_type("kl_penalty", str(kl_penalty))
    level = VERL_REWARD_KL_LEVELS.get(adv_estimator) if isinstance(adv_estimator, str) else None
    if level is None:
        raise invalid_argument(
            "adv_estimator",
            f"unknown_choice: {adv_estimator!r:.60}; one of {list(VERL_REWARD_KL_LEVELS)} "
            "(verl's estimators with a softgate counterpart)",
        )
    return RewardKLConfig(kl_coef, estimator.removesuffix("_st"), level, value_clamp=bound)


# verl's rollout_rs options (rollout_corr_helper.SUPPORTED_ROLLOUT_RS_OPTIONS)
VERL_ROLLOUT_RS = (
    *(f"token_{k}" for k in ("k1", "k2", "k3")),
    *(f"seq_{a}_{k}" for a in ("sum", "mean") for k in ("k1", "k2", "k3")),
    "seq_max_k2",
    "seq_max_k3",
    "binary_kl",
)


# an earlier verl's rollout_rs levels (rollout_corr_helper with rollout_rs_threshold_lower):
# the IS weight exp(d), exp(sum d) or exp(mean d) of d = old - rollout kept in [lower, upper]
VERL_ROLLOUT_RS_LEVELS = {"token": "token", "sequence": "seq_sum", "geometric": "seq_mean"}
VERL_WEIGHT_BOUND_MIN = math.exp(-20.0)  # verl's SAFETY_BOUND on a log-weight
DEFAULT_LOG_RATIO_CLAMP = 20.0  # the server's (docs/spec.md)


def rejection_from_verl(
    rollout_rs: str, rollout_rs_threshold: str | float, rollout_rs_threshold_lower: float | None = None
) -> tuple[RejectionCriterion, ...]:
    """verl's `rollout_rs` ("token_k1,seq_mean_k3", "binary_kl", ...) and
    `rollout_rs_threshold` (one per option or one for all, comma separated; k1's "lower_upper"
    or its upper alone) as criteria; or an earlier verl's `rollout_rs` "token", "sequence" or
    "geometric" with its upper and `rollout_rs_threshold_lower` (unset: 1 / upper) on the IS
    weight: k1 = -log weight, so the k1 window is [1 / upper, 1 / lower]."""
    level = VERL_ROLLOUT_RS_LEVELS.get(str(rollout_rs).strip())
    if level is not None:
        hi = _number("rollout_rs_threshold", rollout_rs_threshold)
        if not hi > 0:
            raise invalid_argument("rollout_rs_threshold", f"out_of_range: {hi!r} must be > 0")
        if rollout_rs_threshold_lower is None:
            lo, lo_field = 1 / hi, "rollout_rs_threshold"
        else:
            lo, lo_field = (
                _number("rollout_rs_threshold_lower", rollout_rs_threshold_lower),
                "rollout_rs_threshold_lower",
            )
            if not lo >= 0:
                raise invalid_argument(lo_field, f"out_of_range: {lo!r} must be >= 0")
        if lo > hi:
            raise invalid_argument(lo_field, f"out_of_range: the window [{lo!r}, {hi!r}] keeps no weight")
        # verl compares exp of the log-weight clamped at +-20: a bound past e^+-20 never
        # rejects (softgate's sum of clamped tokens is not clamped), so that side stays open
        k1_upper = math.inf if lo <= VERL_WEIGHT_BOUND_MIN else 1 / lo
        k1_lower = 0.0 if hi >= 1 / VERL_WEIGHT_BOUND_MIN else 1 / hi
        return (RejectionCriterion(k1_upper, "k1", level, k1_lower),)
    if rollout_rs_threshold_lower is not None:
        raise invalid_argument(
            "rollout_rs_threshold_lower",
            f"unsupported: it goes with rollout_rs {list(VERL_ROLLOUT_RS_LEVELS)}; "
            "k1 options take their bounds as 'lower_upper'",
        )
    options = [o.strip() for o in str(rollout_rs).split(",") if o.strip()]
    unknown = [o for o in options if o not in VERL_ROLLOUT_RS]
    if unknown or not options:
        raise invalid_argument(
            "rollout_rs",
            f"unknown_choice: {unknown or rollout_rs!r}; one of {list(VERL_ROLLOUT_RS)}, or one of "
            f"{list(VERL_ROLLOUT_RS_LEVELS)}",
        )
    specs = [t.strip() for t in str(rollout_rs_threshold).split(",") if t.strip()]
    if len(specs) not in (1, len(options)):
        raise invalid_argument(
            "rollout_rs_threshold",
            f"bad_value: {len(specs)} thresholds for {len(options)} rollout_rs options",
        )
    out = []
    for opt, spec in zip(options, specs * len(options) if len(specs) == 1 else specs, strict=True):
        level, _, stat = ("token", "", "binary_kl") if opt == "binary_kl" else opt.rpartition("_")
        lower, _, upper = spec.rpartition("_")
        try:
            out.append(RejectionCriterion(float(upper), stat, level, float(lower) if lower else None))
        except ValueError:
            raise invalid_argument(
                "rollout_rs_threshold", f"bad_value: {spec!r} is not a threshold"
            ) from None
    return tuple(out)


def veto_from_verl(rollout_token_veto_threshold: float) -> RejectionCriterion:
    """verl's `rollout_token_veto_threshold` tau (a sequence holding one trained token whose
    pi_old / pi_rollout is below tau is rejected) as a criterion: the sequence's largest k1 at
    most log(1 / tau), with no lower bound."""
    tau = _threshold(rollout_token_veto_threshold, "rollout_token_veto_threshold")
    return RejectionCriterion(1 / tau, "k1", "seq_max", 0.0)


def _threshold(value: Any, field: str) -> float:
    """A ratio bound given to a verl keyword: a finite number > 0 whose inverse is finite."""
    x = _number(field, value)
    if not (x > 0 and math.isfinite(x) and math.isfinite(1 / x)):
        raise invalid_argument(
            field, f"out_of_range: {x!r} must be a finite number > 0 with a finite inverse"
        )
    return x


@dataclass(frozen=True)
class LossConfig:
    """Everything that chooses how a batch's loss and gradient are computed, plus which
    per-token outputs to send back (any of `OUTPUTS`; the gradient always comes back).
    `rejection`: rollout rejection criteria (RejectionCriterion), all of which a token must
    pass to stay trained. `off_policy_mask_reference`: the log-probs OPSM measures drift from,
    "rollout" (rollout_logp when sent, else old_logp; the default) or "old" (old_logp: slime's
    beside TIS)."""

    objective: Objective = field(default_factory=Objective)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    kl: KLConfig | None = None
    mismatch: MismatchConfig | None = None
    log_ratio_clamp: float | None = None
    saturation_threshold: float | None = None
    off_policy_mask_threshold: float | None = None
    rejection: tuple[RejectionCriterion, ...] = ()
    outputs: tuple[str, ...] = ()
    reward_kl: RewardKLConfig | None = None
    off_policy_mask_reference: str | None = None

    def __post_init__(self) -> None:
        _plain_fields(self, "config")
        rejection = (self.rejection,) if isinstance(self.rejection, RejectionCriterion) else self.rejection
        if not isinstance(rejection, (tuple, list)) or not all(
            isinstance(c, RejectionCriterion) for c in rejection
        ):
            raise _not_a("config.rejection", RejectionCriterion, rejection)
        object.__setattr__(self, "rejection", tuple(rejection))
        for name, cls in (("objective", Objective), *_SECTIONS.items()):
            v = getattr(self, name)
            if not isinstance(v, cls) and not (v is None and name in ("kl", "mismatch", "reward_kl")):
                raise _not_a(f"config.{name}", cls, v)
        for name, others, what_kl in (
            ("kl", ("estimator", "aggregation", "value_clamp", "weight"), "KL term"),
            ("reward_kl", ("estimator", "level", "value_clamp"), "KL in the reward"),
        ):
            kl = getattr(self, name)
            given = [] if kl is None else [f for f in others if getattr(kl, f) is not None]
            if kl is not None and kl.beta is None and given:
                # (beta's default, 0, made such a KL term silently nothing: kl_loss 0.0; an audit)
                what = given[0]
                raise invalid_argument(
                    f"config.{name}.beta",
                    f"missing: a KL {what} ({getattr(kl, what)!r}) was set without beta, "
                    f"which defaults to 0 (no {what_kl}); pass {name}_beta",
                )
        outputs = (self.outputs,) if isinstance(self.outputs, str) else self.outputs
        try:
            outputs = tuple(outputs)
        except TypeError:
            raise invalid_argument(
                "outputs", f"bad_type: expected output names, got {outputs!r:.80}"
            ) from None
        object.__setattr__(self, "outputs", outputs)
        bad = set(outputs) - set(OUTPUTS)
        if bad:
            raise invalid_argument(
                "outputs", f"unknown_choice: {sorted(bad, key=str)}; one of {list(OUTPUTS)}"
            )


def _not_a(path: str, cls: type, v: Any) -> Exception:
    """The refusal of a section (or config) that is not a `cls` (an AttributeError later; an audit)."""
    article = "an" if cls.__name__[0] in "AEIOU" else "a"  # (an Objective, an AdvantageConfig)
    return invalid_argument(path, f"bad_type: expected {article} {cls.__name__}, got {type(v).__name__}")


_FLAT_ALIASES = {
    # keyword -> (section, field)
    "estimator": ("advantages", "estimator"),
    "scale": ("advantages", "scale"),
    "adv_eps": ("advantages", "eps"),
    "min_group_std": ("advantages", "min_group_std"),
    "reward_weights": ("advantages", "reward_weights"),
    "gamma": ("advantages", "gamma"),
    "skip_nan_components": ("advantages", "skip_nan_components"),
    "baseline_position": ("advantages", "position"),
    "zero_tail": ("advantages", "zero_tail"),
    "aggregation": ("aggregation", "mode"),
    "num_tokens": ("aggregation", "num_tokens"),
    "num_seqs": ("aggregation", "num_seqs"),
    "constant": ("aggregation", "constant"),
    "kl_estimator": ("kl", "estimator"),
    "kl_beta": ("kl", "beta"),
    "kl_aggregation": ("kl", "aggregation"),
    "kl_value_clamp": ("kl", "value_clamp"),
    "kl_weight": ("kl", "weight"),
    "beta": ("kl", "beta"),
    "mismatch_level": ("mismatch", "level"),
    "mismatch_mode": ("mismatch", "mode"),
    "mismatch_cap": ("mismatch", "cap"),
    "mismatch_lo": ("mismatch", "lo"),
    "mismatch_hi": ("mismatch", "hi"),
    "mismatch_floor": ("mismatch", "floor"),
    "mismatch_batch_normalize": ("mismatch", "batch_normalize"),
    "reward_kl_beta": ("reward_kl", "beta"),
    "reward_kl_estimator": ("reward_kl", "estimator"),
    "reward_kl_level": ("reward_kl", "level"),
    "reward_kl_value_clamp": ("reward_kl", "value_clamp"),
}
_SECTIONS: dict[str, type] = {
    "advantages": AdvantageConfig,
    "aggregation": AggregationConfig,
    "kl": KLConfig,
    "mismatch": MismatchConfig,
    "reward_kl": RewardKLConfig,
}


def build_loss_config(config: LossConfig | None = None, **kw: Any) -> LossConfig:
    """A LossConfig from an optional base plus flat keyword arguments, e.g.

        build_loss_config(objective="sapo", tau_pos=1.0, tau_neg=1.05, estimator="grpo",
                          aggregation="token_mean", num_tokens=8192, kl_beta=0.01,
                          outputs=("ratio",))

    `objective` may be a name or an `Objective`; objective parameters (`tau_pos`, `eps_low`, ...)
    are flat keywords; sections (`advantage_config=AdvantageConfig(...)`, `kl=KLConfig(...)`, ...)
    may be given whole, and flat keywords then change fields of them (`kl=KLConfig("k3"),
    kl_beta=0.5`); `aggregation` may be a mode name or an `AggregationConfig`.
    """
    if config is not None and not isinstance(config, LossConfig):
        raise _not_a("config", LossConfig, config)
    base = config or LossConfig()
    values: dict[str, Any] = {f.name: getattr(base, f.name) for f in fields(LossConfig)}
    obj = values["objective"]
    obj_name, obj_params = obj.name, dict(obj.params)
    sections: dict[str, dict[str, Any]] = {}
    for s, cls in _SECTIONS.items():
        cur = values[s]
        sections[s] = {} if cur is None else {f.name: getattr(cur, f.name) for f in fields(cls)}
    touched: set[str] = {s for s in _SECTIONS if values[s] is not None}

    all_params = {p for ps in OBJECTIVE_PARAMS.values() for p in ps}
    val = kw.pop("objective", None)
    if isinstance(val, Objective):
        obj_name, obj_params = val.name, dict(val.params)
    elif val is not None:
        if str(val) != obj_name:
            obj_params = {}
        obj_name = str(val)
    # whole sections first, so a flat keyword refines a section given whole in any order
    whole = tuple(_SECTIONS.values())
    for key, val in sorted(kw.items(), key=lambda kv: not isinstance(kv[1], whole)):
        if val is None:
            continue
        if key == "advantage_config":  # `advantages=` of SoftgateClient.loss is the batch's own
            key = "advantages"
        if key in all_params:
            obj_params[key] = val
        elif key in _SECTIONS and not (key == "aggregation" and isinstance(val, str)):
            if not isinstance(val, _SECTIONS[key]):
                raise _not_a(f"config.{key}", _SECTIONS[key], val)
            sections[key] = {f.name: getattr(val, f.name) for f in fields(_SECTIONS[key])}
            touched.add(key)
        elif key in _FLAT_ALIASES:
            s, f = _FLAT_ALIASES[key]
            if key == "mismatch_batch_normalize" and plain_value(val) is False and s not in touched:
                continue  # (off asks for no correction; numpy's and torch's False too)
            sections[s][f] = val
            touched.add(s)
        elif key in (
            "outputs",
            "log_ratio_clamp",
            "saturation_threshold",
            "off_policy_mask_threshold",
            "off_policy_mask_reference",
            "rejection",
        ):
            values[key] = val  # (LossConfig checks them)
        elif key == "rollout_rs":  # (its threshold alone, or with rollout_rs None, is verl's "off")
            if kw.get("rollout_rs_threshold") is None:
                raise invalid_argument(
                    "rollout_rs_threshold", "missing: rollout_rs is given, so is its threshold"
                )
            if kw.get("rejection"):
                raise invalid_argument("rollout_rs", "conflict: give rejection= or rollout_rs=, not both")
            values["rejection"] = rejection_from_verl(
                val, kw["rollout_rs_threshold"], kw.get("rollout_rs_threshold_lower")
            )
        elif key in ("rollout_rs_threshold", "rollout_rs_threshold_lower", "rollout_token_veto_threshold"):
            continue
        else:
            raise TypeError(f"unknown loss option {key!r}")
    tau = kw.get("rollout_token_veto_threshold")
    if tau is not None:  # (verl's veto joins the rejection criteria given, once)
        tau = _threshold(tau, "rollout_token_veto_threshold")
        veto = veto_from_verl(tau)
        given = LossConfig(rejection=values["rejection"]).rejection
        values["rejection"] = given if veto in given else (*given, veto)
        clamp = plain_value(values["log_ratio_clamp"])
        clamp = DEFAULT_LOG_RATIO_CLAMP if clamp is None else clamp
        number = isinstance(clamp, (int, float)) and not isinstance(clamp, bool)
        if number and tau <= math.exp(-clamp):  # (a clamp not a number is refused below)
            raise invalid_argument(
                "rollout_token_veto_threshold",
                f"out_of_range: {tau:.3g} is at most exp(-log_ratio_clamp) = {math.exp(-clamp):.3g}: "
                "old - rollout is clamped there first, so the veto would never fire",
            )
    values["objective"] = Objective(obj_name, obj_params)
    for s, cls in _SECTIONS.items():
        if s in touched:
            values[s] = cls(**sections[s])
    for s in ("kl", "reward_kl"):  # (a section whose fields are all unset is no section)
        if values[s] is not None and all(getattr(values[s], f.name) is None for f in fields(_SECTIONS[s])):
            values[s] = None
    return LossConfig(**values)
