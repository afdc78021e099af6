"""Typed configuration of one loss computation: objective, advantages, KL, mismatch, aggregation.

Every parameter's default is the one in SPEC.md. Objects are frozen and validated by
`validate_config` (see `validation.py`); adapters build them from their wire formats. A number
given as a one-element tensor or a numpy scalar is kept as the Python number it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args


def _plain_numbers(config: Any) -> None:
    """Replace each field of the frozen dataclass `config` that holds a one-element tensor or a
    numpy scalar (`mask.sum()`, a normaliser after all_reduce, `np.float32(1.0)`) with the
    Python number it holds: a configuration holds values, equal and hashed by them (the
    kernel's parameters are cached by configuration). Anything else is left for validation."""
    numbers = {}
    for name, v in vars(config).items():  # (its fields: faster than fields(), run per config built)
        if type(v) in _PLAIN or not hasattr(v, "item"):
            continue
        try:
            x = v.item()
        except (ValueError, RuntimeError, TypeError):  # not one element (or no data): refused later
            continue
        if isinstance(x, (int, float)):
            numbers[name] = x
    for name, x in numbers.items():
        object.__setattr__(config, name, x)


_PLAIN = (int, float, bool, str, type(None))


def _number_tuple(w: Any) -> Any:
    """A sequence of numbers (a list, a tuple, an array, a tensor, numpy scalars inside) as a
    tuple of Python floats and ints; anything else as given, for validation to refuse."""
    if isinstance(w, (str, bytes)):
        return w
    items = w.tolist() if hasattr(w, "tolist") else w
    if not isinstance(items, (list, tuple)):
        return w  # (a scalar: refused)
    out = []
    for x in items:
        x = x.item() if hasattr(x, "item") and not isinstance(x, (int, float)) else x
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            return w
        out.append(x)
    return tuple(out)


# ---------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Sapo:
    """SAPO soft gate: l = -(4/tau) sigmoid(tau (r - 1)) A, tau by the sign of A."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05
    name: Literal["sapo"] = "sapo"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class SapoSeq:
    """SAPO's gate on GSPO's sequence ratio s_i (TRL's SAPO at importance_sampling_level
    "sequence"): l = -(4/tau) sigmoid(tau (s_i - 1)) A, one advantage per sequence."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05
    name: Literal["sapo_seq"] = "sapo_seq"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class Grpo:
    """PPO/GRPO clip with asymmetric bounds and optional dual clip c > 1."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    name: Literal["grpo"] = "grpo"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class Gspo:
    """GSPO: sequence-level geometric-mean ratio, whole sequence clipped together; optional
    dual clip c > 1 on it for negative advantages (TRL's `delta` at sequence level)."""

    eps_low: float = 3e-4
    eps_high: float = 4e-4
    dual_clip: float | None = None
    name: Literal["gspo"] = "gspo"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class GspoToken:
    """GSPO-token: sequence ratio value with per-token advantages, clipped per token."""

    eps_low: float = 3e-4
    eps_high: float = 4e-4
    name: Literal["gspo_token"] = "gspo_token"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class Cispo:
    """CISPO: stop-gradient clipped IS weight times A logp."""

    eps_low: float = 1.0
    eps_high: float = 0.28
    name: Literal["cispo"] = "cispo"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class CispoSeq:
    """CISPO's stop-gradient clipped weight on GSPO's sequence ratio s_i (TRL's CISPO at
    importance_sampling_level "sequence"): l = -sg[clip(s_i)] A logp."""

    eps_low: float = 1.0
    eps_high: float = 0.28
    name: Literal["cispo_seq"] = "cispo_seq"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class Gppo:
    """GPPO: GRPO's loss value, clipped tokens keep the gradient of their bound."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    name: Literal["gppo"] = "gppo"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class Gmpo:
    """GMPO: the sequence ratio is the geometric mean of its token ratios, each clipped in log
    space on the side A's sign picks (bounds on the log-ratio); one advantage per sequence."""

    eps_low: float = 0.4
    eps_high: float = 0.4
    name: Literal["gmpo"] = "gmpo"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class DppoTv:
    """DPPO-Binary-TV: l = -sg[min(r, ratio_cap)] A logp, masked where the token's probability
    moved past its sign's bound: p - p_old > eps_high (A > 0), p_old - p > eps_low (A < 0)."""

    eps_low: float = 0.15
    eps_high: float = 0.15
    ratio_cap: float | None = None
    name: Literal["dppo_tv"] = "dppo_tv"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class DppoKl:
    """DPPO-Binary-KL: as dppo_tv, masked where the binary KL KL(Bern(p_old) || Bern(p))
    passes its sign's bound with p moving the way A pushes it."""

    eps_low: float = 0.05
    eps_high: float = 0.05
    ratio_cap: float | None = None
    name: Literal["dppo_kl"] = "dppo_kl"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class ClipCov:
    """Clip-Cov: GRPO's clip, and no gradient for max(1, floor(fraction n)) of the n trained
    tokens (all of them when fewer qualify), drawn at random by `seed` among those the clip left
    alone whose covariance (A - mean A)(logp - mean logp) lies in (cov_low, cov_high)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    fraction: float = 2e-4
    cov_low: float = 1.0
    cov_high: float = 5.0
    seed: int = 0
    name: Literal["clip_cov"] = "clip_cov"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class KlCov:
    """KL-Cov: l = -r A, plus coef |logp - old| on the max(1, floor(fraction n)) of the n
    trained tokens of largest covariance (A - mean A)(logp - mean logp)."""

    fraction: float = 2e-4
    coef: float = 0.1
    name: Literal["kl_cov"] = "kl_cov"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class Dro:
    """DRO as Tinker runs it (its loss_fn "dro", after Richemond et al. 2024 and Kimi k1.5):
    l = -A logp + (coef / 2) (logp - old)^2, the log-ratio unclamped. No clip: the quadratic
    penalty is the trust region."""

    coef: float = 0.05
    name: Literal["dro"] = "dro"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class Reinforce:
    """Plain importance sampling, no trust region: l = -r A."""

    name: Literal["reinforce"] = "reinforce"


Objective = (
    Sapo
    | Grpo
    | Gspo
    | GspoToken
    | Cispo
    | Gppo
    | Gmpo
    | DppoTv
    | DppoKl
    | ClipCov
    | KlCov
    | Reinforce
    | SapoSeq
    | CispoSeq
    | Dro
)
OBJECTIVES: dict[str, type] = {
    cls.name: cls  # type: ignore[attr-defined]
    for cls in (
        Sapo,
        Grpo,
        Gspo,
        GspoToken,
        Cispo,
        Gppo,
        Gmpo,
        DppoTv,
        DppoKl,
        ClipCov,
        KlCov,
        Reinforce,
        SapoSeq,
        CispoSeq,
        Dro,
    )
}

# ---------------------------------------------------------------- the other choices

Estimator = Literal[
    "grpo",
    "dr_grpo",
    "rloo",
    "reinforce_pp_baseline",
    "opo",
    "gpg",
    "grpo_passk",
    "reinforce_pp",
    "gdpo",
    "optimal_token_baseline",
]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
KlEstimator = Literal["k1", "k2", "k3", "k1_st", "k3_st", "k3_is", "abs", "abs_st", "k3_is_seq"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KlEstimator)
KlWeight = Literal["none", "ratio", "sampler_ratio", "score"]
KL_WEIGHTS: tuple[str, ...] = get_args(KlWeight)
# the estimators a weight applies to (the others are straight-through or already weighted)
WEIGHTED_KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
RewardKlEstimator = Literal["k1", "k2", "k3", "abs"]
REWARD_KL_ESTIMATORS: tuple[str, ...] = get_args(RewardKlEstimator)
RewardKlLevel = Literal["token", "sequence", "immediate"]
REWARD_KL_LEVELS: tuple[str, ...] = get_args(RewardKlLevel)
# where optimal_token_baseline aligns a group's tokens: the index in the sequence, or among its trained tokens
TokenPosition = Literal["token", "trained"]
TOKEN_POSITIONS: tuple[str, ...] = get_args(TokenPosition)
Scale = Literal["group", "batch", "none", "leave_one_out"]
SCALES: tuple[str, ...] = get_args(Scale)
AggregationMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"]
AGGREGATION_MODES: tuple[str, ...] = get_args(AggregationMode)
# the normaliser each mode reads (AggregationConfig's num_tokens, num_seqs or constant)
NORMALISER = {
    "token_mean": "num_tokens",
    "seq_mean_token_mean": "num_seqs",
    "seq_mean_token_sum": "num_seqs",
    "token_sum_norm": "constant",
}
OffPolicyMaskReference = Literal["rollout", "old"]
OFF_POLICY_MASK_REFERENCES: tuple[str, ...] = get_args(OffPolicyMaskReference)
MismatchLevel = Literal["token", "sequence", "geometric"]
MISMATCH_LEVELS: tuple[str, ...] = get_args(MismatchLevel)
MismatchMode = Literal["truncate", "mask", "seq_mask"]
MISMATCH_MODES: tuple[str, ...] = get_args(MismatchMode)


@dataclass(frozen=True)
class AdvantageConfig:
    """Outcome-reward advantage estimator; `scale=None` takes the estimator's own default
    (group std for `grpo`, `grpo_passk` and `gdpo`, none for the others); `leave_one_out`
    (rloo only: NeMo-RL's default) divides by the std of the member's others. `reward_weights`:
    one weight per reward component of [B, K] rewards (None: 1 each), for gdpo's weighted sum
    of its normalised components and the others' of the raw ones. `gamma` in [0, 1]:
    reinforce_pp's discount, each token's advantage gamma^(steps to its sequence's last token
    of the mask as sent) times the sequence's (returns.py; OpenRLHF's and verl's gamma), 1
    for the others. `skip_nan_components`: a NaN reward component does not apply to its
    sequence (TRL's reward function returning None): left out of the weighted sum and of its
    group's statistics; a sequence none applies to has advantage 0 and no statistic reads it.
    `position` and `zero_tail`: optimal_token_baseline's alignment of a group's tokens and
    verl's handle_zero_tail (token_baseline.py)."""

    estimator: Estimator = "grpo"
    scale: Scale | None = None
    eps: float = 1e-6
    min_group_std: float = 0.0
    reward_weights: tuple[float, ...] | None = None
    gamma: float = 1.0
    skip_nan_components: bool = False
    position: TokenPosition = "token"
    zero_tail: bool = False

    def __post_init__(self) -> None:
        w = self.reward_weights
        if w is not None:  # a list, an array, a tensor: a tuple of Python numbers (hashable)
            object.__setattr__(self, "reward_weights", _number_tuple(w))
        _plain_numbers(self)


@dataclass(frozen=True)
class KLConfig:
    """KL penalty to the reference policy, x = ref - logp, added as beta * k per token.
    `aggregation`: the KL term's own aggregation mode (verl aggregates SAPO's and GSPO's policy
    term seq_mean_token_mean and the KL term token_mean), with LossConfig.aggregation's
    normalisers; None: the policy term's mode. `value_clamp` c: k clamped to [-c, c], gradient 0
    past it (straight-through estimators: the value only; verl's low_var_kl: 10); None: none.
    `weight` w (k1, k2, k3, abs): the term is w k with w's gradient, w (k + dk); w the token's
    ratio to old (`ratio`, slime's --use-unbiased-kl), to the sampler (`sampler_ratio`, NeMo-RL's
    on-policy KL approximation) or exp(logp - sg[logp]) (`score`: value 1, NeMo-RL's KL);
    value_clamp then bounds w k."""

    estimator: KlEstimator = "k3"
    beta: float = 0.0
    aggregation: AggregationMode | None = None
    value_clamp: float | None = None
    weight: KlWeight = "none"

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class MismatchConfig:
    """Train/inference mismatch weight v = exp(old - rollout) per token, per sequence (exp of
    the sum over its trained tokens) or `geometric` (exp of their mean, on every token of the
    sequence: AReaL's sequence-level ratio, verl's rollout_is_level geometric), truncated at
    `cap` (TIS; weights below `floor` raised to it, 0: none) or zeroed outside [lo, hi] (mask,
    "IcePop"); seq_mask (token level, OpenRLHF's seq-mask-tis): each token's own v, zeroed in a
    sequence whose geometric-mean weight is outside [lo, hi]. `batch_normalize` (verl's
    rollout_is_batch_normalize): the weights are divided by their mean over the batch as sent
    (its trained tokens at token level, its sequences with any at the other levels; seq_mask's
    over the tokens rollout rejection left), so they average 1; the factor is the
    `mismatch_norm_factor` metric (1 where the mean is at most 1e-8: nothing is divided)."""

    level: MismatchLevel = "token"
    mode: MismatchMode = "truncate"
    cap: float = 2.0
    lo: float = 0.5
    hi: float = 2.0
    floor: float = 0.0
    batch_normalize: bool = False

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class RewardKLConfig:
    """The KL to the reference policy as a penalty in the reward instead of a loss term
    (verl's use_kl_in_reward, OpenRLHF's init_kl_coef): beta * k per token of the mask as
    sent, k the estimator (kl.py's, without a gradient) of x = ref - old (logp on-policy).
    `level` token: each token's advantage less beta times the KL from that token to its
    sequence's end (REINFORCE++'s return), before the estimator's whitening; sequence: each
    reward less beta times its sequence's KL sum, before the estimator (verl's grpo, rloo);
    immediate: each token's advantage less beta times its own KL, before the whitening
    (NeMo-RL's REINFORCE++, slime's reinforce_plus_plus_baseline). `value_clamp` c: each k
    clamped to [-c, c] (verl's low_var_kl: 10); None: none."""

    beta: float = 0.0
    estimator: RewardKlEstimator = "k1"
    level: RewardKlLevel = "token"
    value_clamp: float | None = None

    def __post_init__(self) -> None:
        _plain_numbers(self)


RejectionStatistic = Literal["k1", "k2", "k3", "binary_kl", "k3_reverse"]
REJECTION_STATISTICS: tuple[str, ...] = get_args(RejectionStatistic)
RejectionLevel = Literal["token", "seq_sum", "seq_mean", "seq_max", "seq_min"]
REJECTION_LEVELS: tuple[str, ...] = get_args(RejectionLevel)


@dataclass(frozen=True)
class RejectionCriterion:
    """One rollout rejection filter (verl's `rollout_rs` option `{level}_{statistic}`, e.g.
    seq_mean_k3): a statistic of d = old - rollout per token (k1 = -d, k2 = d^2 / 2, k3 =
    exp(d) - 1 - d, k3_reverse = exp(-d) - 1 + d (AReaL's kl_k3; no verl option), d clamped at
    log_ratio_clamp; binary_kl: KPop's larger Bernoulli KL of the two probabilities), taken per token, or the sum, mean, largest or smallest over each
    sequence's trained tokens. Kept: k1 in [log lower, log upper] (`lower` None: 1 / upper; 0:
    no lower bound), the others <= upper (+inf: no upper bound). A rejected token leaves the
    loss mask: no loss, no gradient, not in the normalisers."""

    upper: float | None = None
    statistic: RejectionStatistic = "k1"
    level: RejectionLevel = "token"
    lower: float | None = None

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class AggregationConfig:
    """How per-token losses become one scalar. `num_tokens` / `num_seqs` are the global
    normalisers of a micro-batch or shard (default: this request's own counts);
    `constant` is K of `token_sum_norm`."""

    mode: AggregationMode = "seq_mean_token_mean"
    num_tokens: float | None = None
    num_seqs: float | None = None
    constant: float | None = None

    def __post_init__(self) -> None:
        _plain_numbers(self)


@dataclass(frozen=True)
class LossConfig:
    """Everything that chooses how a batch's loss and gradient are computed.
    `off_policy_mask_threshold` delta: off-policy sequence masking (OPSM, DeepSeek-V3.2; TRL's
    off_policy_mask_threshold): a token with A < 0 whose sequence's mean of (sampler log-prob -
    logp) over its trained tokens exceeds delta loses its policy term (the KL term stays); the
    sampler's log-probs are rollout_logp when the batch has them, else old_logp
    (`off_policy_mask_reference` "rollout"), or old_logp always ("old": slime's, beside TIS).
    None: off.
    `rejection`: rollout rejection sampling (verl's rollout_rs), criteria that must all hold
    for a token to stay trained (RejectionCriterion); needs rollout_logp. Empty: off.
    `reward_kl`: a KL penalty in the reward (RewardKLConfig); needs rewards and ref_logp."""

    objective: Objective = field(default_factory=Sapo)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    kl: KLConfig | None = None
    mismatch: MismatchConfig | None = None
    log_ratio_clamp: float = 20.0
    saturation_threshold: float = 0.5
    off_policy_mask_threshold: float | None = None
    rejection: tuple[RejectionCriterion, ...] = ()
    reward_kl: RewardKLConfig | None = None
    off_policy_mask_reference: OffPolicyMaskReference = "rollout"

    def __post_init__(self) -> None:
        _plain_numbers(self)
        if isinstance(self.rejection, list):  # a list of criteria is kept as a tuple (hashable)
            object.__setattr__(self, "rejection", tuple(self.rejection))
