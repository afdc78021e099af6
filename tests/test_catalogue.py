"""ListAlgorithms' catalogue: the limits, default choices and loss-level parameters, each as the
server's limits and the engine's config say."""

from __future__ import annotations

import dataclasses

import pytest
from softgate.engine import config as c
from softgate.engine.validation import validate_config
from softgate.grpc import catalogue
from softgate.grpc.codec import Limits


def test_the_catalogue_reports_each_limit_as_configured() -> None:
    """every limit in its own field (distinct values, so a swap shows)."""
    r = catalogue.build(
        Limits(max_tokens=7001, max_sequences=503, max_groups=41, max_stream_chunks=29), 12345
    )
    lim = r.limits
    got = (lim.max_tokens, lim.max_sequences, lim.max_groups, lim.max_message_bytes, lim.max_stream_chunks)
    assert got == (7001, 503, 41, 12345, 29)


def test_a_choice_parameter_names_its_default_choice() -> None:
    """a parameter with choices and a default (the mismatch level) says which."""
    r = catalogue.build(Limits(), 1 << 20)
    for mode in r.mismatch_modes:
        if mode.name == "seq_mask":  # (token level only: no choice)
            assert [p.name for p in mode.parameters] == ["lo", "hi", "batch_normalize"]
            continue
        level = next(p for p in mode.parameters if p.name == "level")
        assert list(level.choices) == ["token", "sequence", "geometric"]
        assert level.default_choice == c.MismatchConfig().level == "token"
    # scale's default is the estimator's own: group for grpo, grpo_passk and gdpo
    defaults = {
        e.name: next(p for p in e.parameters if p.name == "scale").default_choice
        for e in r.advantage_estimators
    }
    assert {e for e, d in defaults.items() if d == "group"} == {"grpo", "grpo_passk", "gdpo"}
    assert {d for e, d in defaults.items() if e not in ("grpo", "grpo_passk", "gdpo")} == {"none"}
    # each estimator lists the scales it accepts: leave_one_out rloo's alone, group not reinforce_pp's
    scales = {
        e.name: set(next(p for p in e.parameters if p.name == "scale").choices)
        for e in r.advantage_estimators
    }
    assert scales["rloo"] == {"group", "batch", "none", "leave_one_out"}
    assert scales["reinforce_pp"] == {"batch", "none"} and scales["gdpo"] == {"group", "none"}
    assert scales["optimal_token_baseline"] == {"none"}


def test_the_loss_level_parameters_are_listed_with_their_defaults() -> None:
    """log_ratio_clamp and saturation_threshold, with LossConfig's defaults,
    off_policy_mask_threshold, off by default (no default value), and OPSM's reference, a
    choice; every LossConfig field that is not a section."""
    r = catalogue.build(Limits(), 1 << 20)
    got = {p.name: (p.default_value if p.HasField("default_value") else None) for p in r.loss_parameters}
    assert got == {
        "log_ratio_clamp": c.LossConfig().log_ratio_clamp,
        "saturation_threshold": c.LossConfig().saturation_threshold,
        "off_policy_mask_threshold": None,
        "off_policy_mask_reference": None,
    }
    sections = {"objective", "advantages", "aggregation", "kl", "mismatch", "rejection", "reward_kl"}
    assert set(got) == {f.name for f in dataclasses.fields(c.LossConfig)} - sections
    params = {p.name: p for p in r.loss_parameters}
    assert "OPSM" in params["off_policy_mask_threshold"].description
    ref = params["off_policy_mask_reference"]
    assert list(ref.choices) == ["rollout", "old"] and ref.default_choice == "rollout"


def test_reward_kl_estimators_are_listed_with_beta_and_level() -> None:
    """A KL in the reward: k1 (its default) first, then k2, k3, abs, each with beta (default 0),
    level (token, the default, sequence or immediate) and value_clamp (no default: none), each named
    after the engine's own."""
    r = catalogue.build(Limits(), 1 << 20)
    assert [e.name for e in r.reward_kl_estimators] == ["k1", "k2", "k3", "abs"]
    for e in r.reward_kl_estimators:
        params = {p.name: p for p in e.parameters}
        assert set(params) == {"beta", "level", "value_clamp"} and params["beta"].default_value == 0.0
        assert not params["value_clamp"].HasField("default_value")
        assert "in the reward" in params["value_clamp"].description
        assert list(params["level"].choices) == ["token", "sequence", "immediate"]
        assert params["level"].default_choice == "token" and "REINFORCE++" in params["level"].description
        assert "reward" in e.description


@pytest.mark.parametrize(("param", "value"), [("value_clamp", 10.0), ("weight", "ratio")])
def test_kl_parameters_are_listed_where_they_are_accepted(param: str, value: object) -> None:
    """A KL estimator lists value_clamp (every one but k3_is_seq) and weight (k1, k2, k3, abs)
    exactly where validation accepts them."""
    r = catalogue.build(Limits(), 1 << 20)
    listed = {e.name for e in r.kl_estimators if param in {p.name for p in e.parameters}}
    accepted = {
        est
        for est in c.KL_ESTIMATORS
        if not validate_config(c.LossConfig(kl=c.KLConfig(estimator=est, **{param: value})))  # type: ignore[arg-type]
    }
    assert listed == accepted
    assert len(accepted) == (len(c.KL_ESTIMATORS) - 1 if param == "value_clamp" else 4)
    k3 = {p.name: p for p in next(e for e in r.kl_estimators if e.name == "k3").parameters}
    assert "low_var_kl: 10" in k3["value_clamp"].description
    assert list(k3["weight"].choices) == ["none", "ratio", "sampler_ratio", "score"]
    assert k3["weight"].default_choice == "none" and "unbiased" in k3["weight"].description


def test_gamma_is_reinforce_pp_s_alone() -> None:
    """REINFORCE++ lists its discount (default 1, no discount); the estimators that give one
    advantage per sequence, which refuse any other gamma, do not list it."""
    r = catalogue.build(Limits(), 1 << 20)
    for e in r.advantage_estimators:
        params = {p.name: p for p in e.parameters}
        assert ("gamma" in params) == (e.name == "reinforce_pp"), e.name
        if e.name == "reinforce_pp":
            assert params["gamma"].default_value == c.AdvantageConfig().gamma == 1.0
            assert "[0, 1]" in params["gamma"].description


def test_position_and_zero_tail_are_optimal_token_baseline_s_alone() -> None:
    """The optimal token baseline lists its alignment (a choice, default token) and verl's
    zero tail; validation refuses either set with another estimator, which does not list them."""
    r = catalogue.build(Limits(), 1 << 20)
    for e in r.advantage_estimators:
        params = {p.name: p for p in e.parameters}
        own = e.name == "optimal_token_baseline"
        assert ("position" in params) == own and ("zero_tail" in params) == own, e.name
        # (it zeroes no group; reinforce_pp has none): listed where validation accepts it
        cfg = c.LossConfig(objective=c.Grpo(), advantages=c.AdvantageConfig(e.name, min_group_std=0.1))
        accepted = not any(v.field == "advantages.min_group_std" for v in validate_config(cfg))
        assert ("min_group_std" in params) == accepted != (own or e.name == "reinforce_pp"), e.name
        if own:
            assert list(params["position"].choices) == ["token", "trained"]
            assert params["position"].default_choice == c.AdvantageConfig().position == "token"
            assert "sum_pi_squared" in e.description
        for name, value in (("position", "trained"), ("zero_tail", True)):
            cfg = c.LossConfig(objective=c.Grpo(), advantages=c.AdvantageConfig(e.name, **{name: value}))
            refused = any(v.field == f"advantages.{name}" for v in validate_config(cfg))
            assert refused != own, (e.name, name)


def test_skip_nan_components_is_every_estimator_s() -> None:
    """Every estimator reads [B, K] rewards (gdpo normalises the components, the others sum
    them), so each lists skip_nan_components with its help."""
    r = catalogue.build(Limits(), 1 << 20)
    for e in r.advantage_estimators:
        p = next(p for p in e.parameters if p.name == "skip_nan_components")
        assert "TRL's None" in p.description and not p.HasField("default_value"), e.name


def test_gmpo_says_its_bounds_are_on_the_log_ratio() -> None:
    """A review: gmpo's eps_low / eps_high read as the other objectives' (1 - eps_low, a ratio)
    while they bound the log-ratio; every other objective keeps the shared text."""
    r = catalogue.build(Limits(), 1 << 20)
    by_name = {o.name: {p.name: p for p in o.parameters} for o in r.objectives}
    gmpo = by_name["gmpo"]
    assert "log-ratio" in gmpo["eps_low"].description and "exp(-eps_low)" in gmpo["eps_low"].description
    assert "log-ratio" in gmpo["eps_high"].description and gmpo["eps_high"].default_value == 0.4
    assert by_name["grpo"]["eps_low"].description == catalogue.PARAM_HELP["eps_low"]


def test_dppo_says_its_bounds_are_on_the_divergence() -> None:
    """DPPO's eps bound how far a probability moved (TV) or its binary KL, not the ratio."""
    r = catalogue.build(Limits(), 1 << 20)
    by_name = {o.name: {p.name: p for p in o.parameters} for o in r.objectives}
    tv, kl = by_name["dppo_tv"], by_name["dppo_kl"]
    assert "p_old - p" in tv["eps_low"].description and tv["eps_high"].default_value == 0.15
    assert "binary KL" in kl["eps_high"].description and kl["eps_low"].default_value == 0.05
    assert not tv["ratio_cap"].HasField("default_value") and "unset: none" in kl["ratio_cap"].description


def test_rejection_statistics_are_listed_with_their_parameters() -> None:
    """LossConfig.rejection's statistics, the default (k1) first, each with upper, lower and the
    level choices; the level's help is rejection's own, not the mismatch weight's."""
    r = catalogue.build(Limits(), 1 << 20)
    assert [a.name for a in r.rejection_statistics] == ["k1", "k2", "k3", "binary_kl", "k3_reverse"]
    every = ["token", "seq_sum", "seq_mean", "seq_max", "seq_min"]
    levels = {"k1": every, "k2": every, "k3": every, "binary_kl": ["token"], "k3_reverse": every}
    for a in r.rejection_statistics:
        params = {p.name: p for p in a.parameters}
        assert set(params) == ({"upper", "lower", "level"} if a.name == "k1" else {"upper", "level"})
        assert a.description and list(params["level"].choices) == levels[a.name], a.name
        assert params["level"].default_choice == "token" and "sequence" in params["level"].description
        assert "mismatch" not in params["level"].description
        # every combination listed is accepted, every other one refused
        for level in c.REJECTION_LEVELS:
            crit = c.RejectionCriterion(upper=2.0, statistic=a.name, level=level)
            refused = validate_config(c.LossConfig(rejection=(crit,)))
            assert bool(refused) == (level not in levels[a.name]), (a.name, level, refused)


def test_each_aggregation_mode_lists_the_normaliser_it_reads() -> None:
    """An audit: every mode listed num_tokens, num_seqs and constant, though validation refuses
    any one alone that the mode does not read. Each now lists its own, which validation accepts."""
    r = catalogue.build(Limits(), 1 << 20)
    listed = {a.name: [p.name for p in a.parameters] for a in r.aggregations}
    assert listed == {
        "seq_mean_token_mean": ["num_seqs"],
        "token_mean": ["num_tokens"],
        "seq_mean_token_sum": ["num_seqs"],
        "token_sum_norm": ["constant"],
    }
    for mode, (name,) in listed.items():
        agg = c.AggregationConfig(mode=mode, **{name: 4.0})  # type: ignore[arg-type]
        assert validate_config(c.LossConfig(aggregation=agg)) == [], mode
