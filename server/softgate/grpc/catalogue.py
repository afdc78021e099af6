"""ListAlgorithmsResponse, built from the engine's config dataclasses (defaults are read from
them, never restated here) and `METRIC_NAMES`."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

from softgate import __version__
from softgate.engine import config as c
from softgate.engine.advantages import DEFAULT_SCALE
from softgate.engine.metrics import METRIC_NAMES
from softgate.engine.validation import validate_config
from softgate.grpc.codec import Limits

PARAM_HELP: dict[str, str] = {
    "tau_pos": "gate temperature for tokens with positive advantage, > 0",
    "tau_neg": "gate temperature for tokens with non-positive advantage, > 0",
    "sapo_seq.tau_pos": "gate temperature for sequences with positive advantage, > 0",
    "sapo_seq.tau_neg": "gate temperature for sequences with non-positive advantage, > 0",
    "eps_low": "lower clip bound: the ratio is clipped below 1 - eps_low, >= 0",
    "eps_high": "upper clip bound: the ratio is clipped above 1 + eps_high, >= 0",
    "gmpo.eps_low": "lower clip bound on the token log-ratio where A < 0 (the ratio below exp(-eps_low)), >= 0",
    "gmpo.eps_high": "upper clip bound on the token log-ratio where A > 0 (the ratio above exp(eps_high)), >= 0",
    "dppo_tv.eps_low": "bound on the fall of a token's probability, p_old - p, where A < 0, >= 0",
    "dppo_tv.eps_high": "bound on the rise of a token's probability, p - p_old, where A > 0, >= 0",
    "dppo_kl.eps_low": "bound on the binary KL where A < 0 and the token's probability fell, >= 0",
    "dppo_kl.eps_high": "bound on the binary KL where A > 0 and the token's probability rose, >= 0",
    "ratio_cap": "truncation of the ratio weight, > 0; unset: none",
    "clip_cov.fraction": "share of the trained tokens whose gradient is dropped, in (0, 1]; at least one when any qualifies",
    "kl_cov.fraction": "share of the trained tokens penalised, in (0, 1]; at least one when any is trained",
    "cov_low": "lower end (exclusive) of the covariance window a dropped token's covariance lies in",
    "cov_high": "upper end (exclusive) of the covariance window, > cov_low",
    "seed": "seed of the random draw of the dropped tokens (same request and seed: same tokens)",
    "kl_cov.coef": "coefficient of the |logp - old_logp| penalty on the selected tokens, >= 0",
    "dro.coef": "coefficient of the (logp - old_logp)^2 / 2 penalty on every trained token, >= 0",
    "dual_clip": "dual clip c > 1 for negative advantages; unset: none",
    "scale": "which std divides the centred rewards; unset: the estimator's own default",
    "eps": "added to the std before dividing (optimal_token_baseline: to its sum of W), 0 or >= 1e-100",
    "min_group_std": "groups with reward std below this get advantage 0, >= 0",
    "reward_weights": "one weight per component of [B, K] rewards (ComputeAdvantages); unset: 1 each",
    "gamma": "discount of REINFORCE++'s per-token return toward each sequence's last sent token, "
    "in [0, 1]; 1: none",
    "skip_nan_components": "if set, a NaN reward component does not apply to its sequence (TRL's None): "
    "0 in the weighted sum, left out of gdpo's group statistics; a sequence with none that applies "
    "has advantage 0 and is left out of every statistic; default false",
    "position": "which tokens of a group share optimal_token_baseline's baseline: token (index in the "
    "sequence, verl's optimal_token_baseline) or trained (index among its trained tokens, verl's "
    "tir_optimal_token_baseline); default token",
    "zero_tail": "if set, a member with more trained tokens than every other of its group has baseline 0 "
    "past the second-longest's count (verl's handle_zero_tail); default false",
    "num_tokens": "global N_tok normaliser, > 0; unset: this request's trained tokens",
    "num_seqs": "global N_seq normaliser (sequences with a trained token), > 0; unset: this request's",
    "constant": "K of token_sum_norm, > 0 (required by that mode)",
    "beta": "KL coefficient, >= 0",
    "aggregation": "the KL term's own aggregation mode, with the loss's normalisers; unset: the policy term's",
    "value_clamp": "bound c on each token's k (weighted: w k), > 0: clamped to [-c, c], its gradient 0 past "
    "it (straight-through: the value only; verl's low_var_kl: 10); unset: none",
    "KLConfig.weight": "w on each token's k, with w's gradient (term w k, gradient w (k + dk)): ratio "
    "exp(clamp(logp - old)) (slime's --use-unbiased-kl), sampler_ratio exp(clamp(logp - rollout)) "
    "(NeMo-RL's on-policy KL approximation; needs rollout_logp), score exp(logp - sg[logp]) = 1 "
    "(NeMo-RL's KL); default none",
    "RewardKLConfig.value_clamp": "bound c on each token's k, > 0: k clamped to [-c, c] in the reward "
    "(verl's low_var_kl: 10); unset: none",
    "level": "token, sequence (product) or geometric (mean) mismatch weight",
    "RewardKLConfig.beta": "coefficient of the KL in the reward, >= 0",
    "RewardKLConfig.level": "at token level each token's advantage less beta times the KL to its sequence's "
    "end (REINFORCE++), before whitening; at immediate level less beta times its own KL (NeMo-RL's "
    "REINFORCE++); at sequence level each reward less beta times its sequence's KL (verl's grpo)",
    "cap": "truncation cap C of the mismatch weight (truncate mode), > 0",
    "lo": "lower bound of the masking window (mask and seq_mask modes), >= 0",
    "hi": "upper bound of the masking window (mask and seq_mask modes), > lo",
    "floor": "weights below it raised to it (truncate mode), >= 0 and < cap; 0: none",
    "batch_normalize": "if set, the weights are divided by their mean over the batch as sent (verl's "
    "rollout_is_batch_normalize; the mismatch_norm_factor metric); default false",
    "log_ratio_clamp": "bound on |logp - old_logp| before exponentiation, in (0, 80]",
    "saturation_threshold": "gate weight below which a token counts as saturated, in (0, 1]",
    "RejectionCriterion.upper": "required, > 0: k1's bound on exp(k1), the others' on the statistic; +inf: none",
    "RejectionCriterion.lower": "k1 only, in [0, upper]: its lower bound on exp(k1), 0: none; unset: 1 / upper",
    "RejectionCriterion.level": "token, or the sum, mean, max or min over the sequence's trained tokens: "
    "the whole sequence rejected or kept (k1's max under upper 1 / tau: verl's veto of a token below tau)",
    "off_policy_mask_reference": "OPSM's sampler log-probs: rollout (rollout_logp when sent, else old_logp) or "
    "old (old_logp: slime's beside TIS)",
    "off_policy_mask_threshold": "OPSM: A < 0 tokens of a sequence whose mean (sampler - current log-prob) "
    "exceeds it lose their policy term; unset: off",
}

REJECTION_HELP = {
    "k1": "rollout_logp - old_logp per token (clamped), kept within [log lower, log upper]",
    "k2": "(old_logp - rollout_logp)^2 / 2 per token, kept at most upper",
    "k3": "exp(d) - 1 - d of d = old_logp - rollout_logp per token, kept at most upper",
    "binary_kl": "KPop: the larger Bernoulli KL between exp(old_logp) and exp(rollout_logp) per token (token "
    "level only), kept at most upper",
    "k3_reverse": "exp(-d) - 1 + d of d = old_logp - rollout_logp per token, k3 of the inverse ratio "
    "(AReaL's kl_k3), kept at most upper",
}

# the levels each statistic has where not all (validation refuses the others: unsupported)
REJECTION_LEVELS = {"binary_kl": ("token",)}

ESTIMATOR_HELP = {
    "grpo": "GRPO: (R - group mean) / (group std + eps)",
    "dr_grpo": "Dr. GRPO: R - group mean, no std division",
    "rloo": "RLOO: n/(n-1) (R - group mean), the leave-one-out baseline",
    "reinforce_pp_baseline": "REINFORCE++ baseline: R - group mean, whitened over the batch's trained tokens",
    "opo": "OPO: R - the group's mean weighted by each sequence's trained tokens",
    "gpg": "GPG: B / #(R != 0) x (R - group mean), over the batch's B sequences",
    "grpo_passk": "Pass@k: the group's best alone gets (R_max - R_second) / (group std + eps), the others 0",
    "reinforce_pp": "REINFORCE++: R (no group baseline), whitened over the batch's trained tokens",
    "gdpo": "GDPO: each reward component of [B, K] rewards normalised in its group, their weighted sum "
    "whitened over the batch's trained tokens",
    "optimal_token_baseline": "OTB (ComputeLoss): each token's return less its group's baseline at its "
    "position, sum G W / (sum W + eps), W the running sum of 1 - 2 pi + sum_pi_squared (needs "
    "batch.sum_pi_squared)",
}
# the advantage parameters only some estimators take, and those some refuse (validation's)
OWN_PARAMETERS = {
    "gamma": ("reinforce_pp",),
    "position": ("optimal_token_baseline",),
    "zero_tail": ("optimal_token_baseline",),
}
REFUSED_PARAMETERS = {"min_group_std": ("optimal_token_baseline", "reinforce_pp")}

AGGREGATION_HELP = {
    "token_mean": "sum m l / N_tok",
    "seq_mean_token_mean": "(1/N_seq) sum_i (sum_t m l / |y_i|), the SAPO / GRPO paper form",
    "seq_mean_token_sum": "(1/N_seq) sum_i sum_t m l",
    "token_sum_norm": "sum m l / K with a constant K (Dr. GRPO)",
}
KL_HELP = {
    "k1": "k1 = -x, x = ref - logp",
    "k2": "k2 = x^2 / 2",
    "k3": "k3 = exp(x) - x - 1",
    "k1_st": "k1's value with k2's gradient -x (straight-through; verl's k1+)",
    "k3_st": "k3's value with k2's gradient -x (straight-through; verl's k3+)",
    "k3_is": "r k3, r = exp(clamp(logp - old)) the token's own ratio, with its gradient: gradient -x r "
    "(DeepSeek-V3.2's unbiased KL; TRL's use_bias_correction_kl)",
    "abs": "|x|, gradient -sign(x) (verl's abs)",
    "abs_st": "|x|'s value with k2's gradient -x (straight-through; verl's abs+)",
    "k3_is_seq": "s k3, s = exp(clamp(mean logp - old)) the sequence's ratio, with its gradient "
    "(TRL's use_bias_correction_kl at importance_sampling_level=sequence)",
}
REWARD_KL_HELP = {
    "k1": "k1 = -x, x = ref - old (verl's kl, OpenRLHF's k1), in each token's reward",
    "k2": "k2 = x^2 / 2 (verl's mse), in each token's reward",
    "k3": "k3 = exp(x) - x - 1, x clamped from above at log_ratio_clamp (verl's low_var_kl), in each token's reward",
    "abs": "|x| (verl's abs), in each token's reward",
}
MISMATCH_HELP = {
    "truncate": "truncated importance sampling: v = clamp(exp(old - rollout), floor, cap)",
    "mask": "masking (IcePop): v = 0 outside [lo, hi]",
    "seq_mask": "sequence masking (seq-mask-tis): each token's own v, 0 for every token of a sequence whose "
    "geometric-mean weight is outside [lo, hi]; token level only",
}


def _doc(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def _choices(cls: type, name: str) -> list[str]:
    tp = typing.get_type_hints(cls)[name]
    out: list[str] = []

    def walk(t: Any) -> None:
        if typing.get_origin(t) is typing.Literal:
            out.extend(str(a) for a in typing.get_args(t))
        else:
            for a in typing.get_args(t):
                walk(a)

    walk(tp)
    return out


def _param(cls: type, f: dataclasses.Field[Any]) -> pb.ParameterInfo:
    # an objective's own help ("gmpo.eps_low") or a class's ("RejectionCriterion.level") first
    own = f"{getattr(cls, 'name', cls.__name__)}.{f.name}"
    p = pb.ParameterInfo(name=f.name, description=PARAM_HELP.get(own, PARAM_HELP.get(f.name, "")))
    default = f.default
    if isinstance(default, (int, float)) and not isinstance(default, bool) and math.isfinite(default):
        p.default_value = float(default)
    choices = _choices(cls, f.name)
    if choices:
        p.choices.extend(choices)
        if isinstance(default, str):
            p.default_choice = default
    return p


def _params(cls: type, skip: tuple[str, ...] = ("name",)) -> list[pb.ParameterInfo]:
    return [_param(cls, f) for f in dataclasses.fields(cls) if f.name not in skip]


def _default_first(cls: type, name: str) -> list[str]:
    """`cls.name`'s choices with its default first (as objectives are listed)."""
    default = getattr(cls(), name)
    return sorted(_choices(cls, name), key=lambda x: x != default)


def _own_scales(p: pb.ParameterInfo, est: str) -> pb.ParameterInfo:
    """`scale` with the choices the engine accepts with `est` (validation decides) and `est`'s
    default; other parameters as they are (OWN_PARAMETERS: listed only with their estimators)."""
    if p.name != "scale":
        return p
    own = pb.ParameterInfo()
    own.CopyFrom(p)
    del own.choices[:]
    for s in p.choices:
        cfg = c.LossConfig(advantages=c.AdvantageConfig(estimator=est, scale=s))  # type: ignore[arg-type]
        if not any(v.field == "advantages.scale" for v in validate_config(cfg)):
            own.choices.append(s)
    own.default_choice = DEFAULT_SCALE[est]
    return own


def build(limits: Limits, max_message_bytes: int) -> pb.ListAlgorithmsResponse:
    r = pb.ListAlgorithmsResponse(server_version=__version__)
    default_obj = c.LossConfig().objective.name
    names = sorted(c.OBJECTIVES, key=lambda n: (n != default_obj, list(c.OBJECTIVES).index(n)))
    for name in names:
        cls = c.OBJECTIVES[name]
        r.objectives.add(name=name, description=_doc(cls), parameters=_params(cls))
    adv_params = _params(c.AdvantageConfig, skip=("estimator",))
    for est in _default_first(c.AdvantageConfig, "estimator"):
        adv_own = [
            _own_scales(p, est)
            for p in adv_params
            if est in OWN_PARAMETERS.get(p.name, (est,)) and est not in REFUSED_PARAMETERS.get(p.name, ())
        ]
        r.advantage_estimators.add(name=est, description=ESTIMATOR_HELP.get(est, ""), parameters=adv_own)
    agg_params = _params(c.AggregationConfig, skip=("mode",))
    for mode in _default_first(c.AggregationConfig, "mode"):
        # the normaliser it reads alone (validation refuses another alone)
        normaliser = [p for p in agg_params if p.name == c.NORMALISER[mode]]
        r.aggregations.add(name=mode, description=AGGREGATION_HELP.get(mode, ""), parameters=normaliser)
    kl_params = _params(c.KLConfig, skip=("estimator",))
    for est in _default_first(c.KLConfig, "estimator"):
        # a weight only where one applies; no bound on k3_is_seq's (validation refuses them)
        ps = [
            p
            for p in kl_params
            if (p.name != "weight" or est in c.WEIGHTED_KL_ESTIMATORS)
            and (p.name != "value_clamp" or est != "k3_is_seq")
        ]
        r.kl_estimators.add(name=est, description=KL_HELP.get(est, ""), parameters=ps)
    rk_params = _params(c.RewardKLConfig, skip=("estimator",))
    for est in _default_first(c.RewardKLConfig, "estimator"):
        r.reward_kl_estimators.add(name=est, description=REWARD_KL_HELP[est], parameters=rk_params)
    by_mode = {
        "truncate": ("level", "cap", "floor", "batch_normalize"),
        "mask": ("level", "lo", "hi", "batch_normalize"),
        "seq_mask": ("lo", "hi", "batch_normalize"),
    }
    fields = {f.name: f for f in dataclasses.fields(c.MismatchConfig)}
    for mode in _default_first(c.MismatchConfig, "mode"):
        r.mismatch_modes.add(
            name=mode,
            description=MISMATCH_HELP.get(mode, ""),
            parameters=[_param(c.MismatchConfig, fields[n]) for n in by_mode.get(mode, ())],
        )
    r.loss_parameters.extend(
        _param(c.LossConfig, f)
        for f in dataclasses.fields(c.LossConfig)
        if f.name
        in (
            "log_ratio_clamp",
            "saturation_threshold",
            "off_policy_mask_threshold",
            "off_policy_mask_reference",
        )
    )
    rs_fields = {f.name: f for f in dataclasses.fields(c.RejectionCriterion)}
    for stat in _default_first(c.RejectionCriterion, "statistic"):
        own = ("upper", "level", "lower") if stat == "k1" else ("upper", "level")  # (k1's lower bound)
        params = [_param(c.RejectionCriterion, rs_fields[n]) for n in own]
        levels = params[1].choices
        levels[:] = [lv for lv in levels if lv in REJECTION_LEVELS.get(stat, levels)]
        r.rejection_statistics.add(name=stat, description=REJECTION_HELP[stat], parameters=params)
    for name, desc in METRIC_NAMES.items():
        r.metrics.add(name=name, description=desc)
    r.limits.max_tokens = limits.max_tokens
    r.limits.max_sequences = limits.max_sequences
    r.limits.max_groups = limits.max_groups
    r.limits.max_message_bytes = max_message_bytes
    r.limits.max_stream_chunks = limits.max_stream_chunks
    return r
