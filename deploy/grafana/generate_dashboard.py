#!/usr/bin/env python3
"""Writes deploy/grafana/softgate-dashboard.json (run it after editing the panels below).

python3 deploy/grafana/generate_dashboard.py          # rewrite the JSON
python3 deploy/grafana/generate_dashboard.py --check  # exit 1 if the JSON is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("softgate-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
R = 'run=~"$run"'
LATENCY = "softgate_request_duration_seconds"
# every run with a successful RPC has it (a run that only calls ComputeAdvantages has no loss batch)
RUN_VALUES = "label_values(softgate_processed_sequences_total, run)"


def avg(metric: str, by: str, extra: str = "") -> str:
    """Mean of a per-batch summary's values over the rate interval: each batch counts once,
    however many tokens it has."""
    sel = "{" + R + (", " + extra if extra else "") + "}"
    return (
        f"sum by ({by}) (rate({metric}_sum{sel}[$__rate_interval]))"
        f" / (sum by ({by}) (rate({metric}_count{sel}[$__rate_interval])) > 0)"
    )


def signed_avg(metric: str, by: str) -> str:
    """avg() of a statistic that may be negative, exported as its positive and negative parts
    (a summary's _sum that goes down reads as a counter reset to rate())."""
    sel = "{" + R + "}"
    return (
        f"(sum by ({by}) (rate({metric}_positive_sum{sel}[$__rate_interval]))"
        f" - sum by ({by}) (rate({metric}_negative_sum{sel}[$__rate_interval])))"
        f" / (sum by ({by}) (rate({metric}_positive_count{sel}[$__rate_interval])) > 0)"
    )


def share(counter: str, by: str, tokens: str = "", ignoring: str = "") -> str:
    """Share of trained tokens over the rate interval: the rate of `counter` over that of
    softgate_loss_tokens_total (`tokens` narrows it), of the series that have `counter` only
    (`ignoring` the labels it lacks): an objective without the quantity exports none (SAPO,
    REINFORCE and DRO no clip counters), and its tokens are left out instead of counting as unclipped."""
    sel = "{" + R + (", " + tokens if tokens else "") + "}"
    match = f" ignoring ({ignoring})" if ignoring else ""
    return (
        f"sum by ({by}) (rate({counter}{{{R}}}[$__rate_interval]))"
        f" / (sum by ({by}) (rate(softgate_loss_tokens_total{sel}[$__rate_interval]) and{match} {counter}) > 0)"
    )


# what a CISPO clip leaves out of clip_low and clip_high (its IS weight is clipped whatever A's sign)
CISPO_CLIP = (
    "CISPO: A>0 tokens below 1-eps_low and A<0 tokens above 1+eps_high are in neither clip_low nor "
    "clip_high (ComputeLoss's clip_fraction counts them)."
)
PER_BATCH = "Mean of per-batch values (each batch counts once, whatever its size)."

_next_id = 0


def panel(
    title: str,
    targets: list[tuple[str, str]],
    x: int,
    y: int,
    w: int = 12,
    h: int = 8,
    unit: str = "short",
    description: str = "",
    kind: str = "timeseries",
    minmax: tuple[float | None, float | None] = (None, None),
    overrides: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    global _next_id
    _next_id += 1
    defaults: dict[str, Any] = {"unit": unit}
    if minmax[0] is not None:
        defaults["min"] = minmax[0]
    if minmax[1] is not None:
        defaults["max"] = minmax[1]
    p: dict[str, Any] = {
        "id": _next_id,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "targets": [
            # (a table shows the last values: an instant query; a range one filled it with frames)
            {"refId": chr(65 + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            | ({"instant": True, "range": False} if kind == "table" else {"range": True})
            for i, (expr, legend) in enumerate(targets)
        ],
    }
    if kind == "timeseries":
        p["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}
        }
    return p


def right_axis(legend_regex: str, unit: str, label: str) -> dict[str, Any]:
    """A field override: the series whose legend matches go on a right axis of their own unit."""
    return {
        "matcher": {"id": "byRegexp", "options": legend_regex},
        "properties": [
            {"id": "unit", "value": unit},
            {"id": "custom.axisPlacement", "value": "right"},
            {"id": "custom.axisLabel", "value": label},
        ],
    }


def heatmap(title: str, metric: str, sign: str, x: int, y: int, description: str) -> dict[str, Any]:
    p = panel(
        title,
        [(f'sum by (le) (rate({metric}_bucket{{{R}, sign="{sign}"}}[$__rate_interval]))', "{{le}}")],
        x,
        y,
        description=description,
        kind="heatmap",
    )
    p["targets"][0]["format"] = "heatmap"
    p["options"] = {
        "calculate": False,
        "yAxis": {"axisPlacement": "left"},
        "cellGap": 1,
        "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5},
        "rowsFrame": {"layout": "le"},
        "tooltip": {"show": True, "yHistogram": True},
    }
    return p


def row(title: str, y: int) -> dict[str, Any]:
    global _next_id
    _next_id += 1
    return {
        "id": _next_id,
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        "panels": [],
    }


def build() -> dict[str, Any]:
    global _next_id
    _next_id = 0
    panels: list[dict[str, Any]] = []
    y = 0
    panels.append(row("Trust region", y))
    y += 1
    panels.append(
        panel(
            "Gate saturation by advantage sign",
            [(share("softgate_gate_saturated_tokens_total", "sign"), "A {{sign}}")],
            0,
            y,
            unit="percentunit",
            minmax=(0, 1),
            description="Share of the sign's trained tokens whose gate weight w is below the saturation "
            "threshold (0.5 by default), over the interval. Rising A<0 saturation is an early sign of "
            "instability.",
        )
    )
    panels.append(
        panel(
            "Mean gate weight by advantage sign",
            [(avg("softgate_batch_gate_weight_mean", "sign"), "A {{sign}}")],
            12,
            y,
            unit="short",  # (a weight, not a share; an audit)
            minmax=(0, None),  # GPPO and CISPO go above 1
            description="Mean gate weight w per sign: SAPO 4p(1-p), hard clips 1 unclipped / 0 clipped "
            "(Clip-Cov's drawn tokens 0; KL-Cov and DRO 1 everywhere). "
            f"{PER_BATCH} GPPO's clipped A<0 tokens and CISPO's tokens of either sign below 1-eps_low "
            "(eps_low below 1) carry bound / r, above 1: GPPO's show in clip_low. " + CISPO_CLIP,
        )
    )
    y += 8
    panels.append(
        panel(
            "Clip fractions",
            [
                (
                    share("softgate_clipped_tokens_total", "sign"),
                    "clip {{sign}} (pos=clip_high, neg=clip_low)",
                ),
                (
                    share("softgate_dual_clipped_tokens_total", "objective", 'sign="neg"', "sign"),
                    "dual clip {{objective}}",
                ),
            ],
            0,
            y,
            unit="percentunit",
            minmax=(0, None),
            description="Shares of trained tokens over the interval: clip_high = A>0 tokens with r > "
            "1+eps_high, clip_low = A<0 tokens with r < 1-eps_low (GMPO: exp(eps_high), exp(-eps_low); DPPO: "
            "the tokens its divergence bound drops; Clip-Cov: its randomly drawn tokens too; KL-Cov: its "
            "penalised tokens), of the objectives with a clip (SAPO, sapo_seq, REINFORCE and DRO have none and are left "
            "out); dual clip = A<0 tokens with r > c, of the runs "
            "with a dual clip. " + CISPO_CLIP,
        )
    )
    panels.append(
        panel(
            "Gradient retained by the trust region",
            [(avg("softgate_batch_grad_retained", "objective"), "{{objective}}")],
            12,
            y,
            unit="percentunit",
            minmax=(0, None),  # GPPO, CISPO, KL-Cov and DRO go above 1
            description="sum|c| / sum|c without trust region|: 1 = nothing suppressed. Comparable across "
            f"SAPO, GRPO, GSPO, GMPO, DPPO and Clip-Cov. {PER_BATCH} GPPO's clipped A<0 tokens and CISPO's tokens "
            "of either sign below 1-eps_low (eps_low below 1) keep their gradient scaled by bound / r > 1, so "
            "theirs can exceed 1: GPPO's clipping shows in clip_low. KL-Cov scales no gradient but adds its "
            "penalty's on the tokens it penalises, so its value can pass 1, or fall below it where the "
            "penalty pulls against -r A; DRO's quadratic penalty likewise, and its value falls toward 0 as "
            "logp - old nears A / coef, where its penalty cancels the policy gradient. " + CISPO_CLIP,
        )
    )
    y += 8
    panels.append(
        panel(
            "Approx KL (old || new)",
            [
                (signed_avg("softgate_batch_approx_kl", "objective"), "mean {{objective}}"),
                (f"max by (objective) (softgate_batch_approx_kl_last{{{R}}})", "last batch {{objective}}"),
            ],
            0,
            y,
            description=f"Masked mean of (old - logp) per batch. {PER_BATCH}",
        )
    )
    panels.append(
        panel(
            "Token ratio range (last batch)",
            [
                (f"min by (objective) (softgate_batch_ratio_min{{{R}}})", "min {{objective}}"),
                (f"avg by (objective) (softgate_batch_ratio_mean{{{R}}})", "mean {{objective}}"),
                (f"max by (objective) (softgate_batch_ratio_max{{{R}}})", "max {{objective}}"),
                (
                    f"sum by (objective) (rate(softgate_clamped_tokens_total{{{R}}}[$__rate_interval]))",
                    "clamped tokens/s {{objective}}",
                ),
            ],
            12,
            y,
            description="Smallest, mean and largest token ratio of the last batch (left axis), and the rate "
            "of tokens whose log-ratio hit the clamp (right axis).",
            overrides=[right_axis("^clamped tokens/s .*", "short", "clamped tokens/s")],
        )
    )
    y += 8
    panels.append(
        heatmap(
            "Token ratio distribution, A > 0",
            "softgate_token_ratio",
            "pos",
            0,
            y,
            "Per-token ratio r of positive-advantage tokens, bucketed on the device.",
        )
    )
    panels.append(
        heatmap(
            "Token ratio distribution, A < 0",
            "softgate_token_ratio",
            "neg",
            12,
            y,
            "Per-token ratio r of negative-advantage tokens, bucketed on the device.",
        )
    )
    y += 8
    panels.append(
        heatmap(
            "Gate weight distribution, A > 0",
            "softgate_token_gate_weight",
            "pos",
            0,
            y,
            "Per-token gate weight w of positive-advantage tokens.",
        )
    )
    panels.append(
        heatmap(
            "Gate weight distribution, A < 0",
            "softgate_token_gate_weight",
            "neg",
            12,
            y,
            "Per-token gate weight w of negative-advantage tokens.",
        )
    )
    y += 8
    panels.append(row("Off-policy corrections", y))
    y += 1
    panels.append(
        panel(
            "Sampler vs trainer KL",
            [
                (avg("softgate_batch_rollout_k3_kl", "objective"), "k3 {{objective}}"),
                (signed_avg("softgate_batch_rollout_kl", "objective"), "k1 {{objective}}"),
            ],
            0,
            y,
            description="Batches sent with rollout_logp (with or without a correction): KL(sampler || trainer) "
            "over their trained tokens, the k3 estimate (>= 0, low variance) and k1, the mean of rollout - "
            "old_logp (may be negative): verl's rollout_corr/k3_kl and kl. A KL that climbs means the "
            "sampler (vLLM, SGLang) and the trainer disagree more and more on the same tokens' probabilities, "
            f"which precedes many collapses. {PER_BATCH}",
        )
    )
    panels.append(
        panel(
            "Train/inference mismatch",
            [
                (avg("softgate_batch_mismatch_weight_mean", "objective"), "mean weight {{objective}}"),
                (avg("softgate_batch_mismatch_norm_factor", "objective"), "batch norm factor {{objective}}"),
                (
                    share("softgate_mismatch_clipped_tokens_total", "objective", ignoring="sign"),
                    "corrected {{objective}}",
                ),
            ],
            12,
            y,
            minmax=(0, None),
            description="Runs with a mismatch correction only. Left: mean weight v = exp(old - rollout) as "
            f"applied, 1 where sampler and trainer agree ({PER_BATCH}). Right: share of trained tokens whose "
            "v was truncated or masked (seq_mask: the tokens of its dropped sequences). A climbing share means "
            "the sampler and the trainer compute different probabilities for the same tokens. Batch norm "
            "factor (runs with batch_normalize, verl's rollout_is_batch_norm_factor): the mean weight of the "
            "batch as sent that the weights were divided by.",
            overrides=[right_axis("^corrected .*", "percentunit", "corrected tokens")],
        )
    )
    y += 8
    rejected = f"sum by (objective) (rate(softgate_rollout_rejected_tokens_total{{{R}}}[$__rate_interval]))"
    panels.append(
        panel(
            "Off-policy masked and rejected tokens",
            [
                (
                    share("softgate_off_policy_masked_tokens_total", "objective", ignoring="sign"),
                    "masked {{objective}}",
                ),
                (
                    f"{rejected} / ({rejected} + sum by (objective) (rate(softgate_loss_tokens_total{{{R}}}"
                    "[$__rate_interval]) and ignoring (sign) softgate_rollout_rejected_tokens_total) > 0)",
                    "rejected {{objective}}",
                ),
                (
                    f"sum by (run) (rate(softgate_rollout_rejected_sequences_total{{{R}}}[$__rate_interval])) / "
                    f'(sum by (run) (rate(softgate_processed_sequences_total{{{R},rpc=~"ComputeLoss|StreamLoss"}}'
                    "[$__rate_interval])) > 0)",
                    "rejected sequences {{run}}",
                ),
            ],
            0,
            y,
            unit="percentunit",
            minmax=(0, 1),
            description="Shares over the interval. Masked (runs with off_policy_mask_threshold): trained tokens "
            "whose policy term off-policy sequence masking dropped (A<0 in a sequence whose mean sampler - "
            "current log-prob is above the threshold). Rejected (runs with rejection criteria, verl's "
            "rollout_rs): tokens of the masks as sent that rollout rejection took out. Rejected sequences, per run: "
            "the share of its loss calls' sequences of which rejection took a trained token (verl's veto takes whole "
            "sequences; its rollout_is_veto_fraction when the veto is the only criterion).",
        )
    )
    panels.append(
        panel(
            "KL to the reference",
            [
                (signed_avg("softgate_batch_kl_mean", "objective"), "{{objective}}"),
                (signed_avg("softgate_batch_reward_kl", "objective"), "{{objective}} in the reward"),
                (
                    share("softgate_kl_clamped_tokens_total", "objective", ignoring="sign"),
                    "clamped {{objective}}",
                ),
            ],
            12,
            y,
            description="Runs with a KL term: mean over trained tokens of the KL estimator (before beta) "
            "of the reference policy. Runs with a KL in the reward (reward_kl): the mean over sequences of "
            f"each one's mean KL, verl's reward_kl_penalty. {PER_BATCH} Right: share of trained tokens "
            "whose KL term was clamped (k3's ref - logp past log_ratio_clamp, or the estimate past "
            "kl.value_clamp, verl's 10). Past the value bound only the straight-through estimators still pull "
            "them back to the reference, past log_ratio_clamp only a weighted k3, so a climbing "
            "share means the policy is leaving the reference where the KL term cannot hold it.",
            overrides=[right_axis("^clamped .*", "percentunit", "clamped tokens")],
        )
    )
    y += 8
    panels.append(row("Rewards and advantages", y))
    y += 1
    unscored = (
        f'sum by (run) (rate(softgate_reward_sequences_total{{{R},status="unscored"}}[$__rate_interval]))'
    )
    panels.append(
        panel(
            "Degenerate groups and unscored sequences",
            [
                (avg("softgate_batch_degenerate_group_fraction", "run"), "mean {{run}}"),
                (f"max by (run) (softgate_degenerate_group_fraction{{{R}}})", "last batch {{run}}"),
                (
                    f"{unscored} / (sum by (run) (rate(softgate_reward_sequences_total{{{R}}}[$__rate_interval])) > 0)",
                    "unscored {{run}}",
                ),
            ],
            0,
            y,
            unit="percentunit",
            minmax=(0, 1),
            description="Share of groups whose rewards are all equal: the part of the batch that teaches "
            f"nothing ({PER_BATCH}). Unscored: share of the sequences over the interval whose rewards were "
            "all NaN (skip_nan_components: a reward function returned None), advantage 0: a verifier or "
            "sandbox down shows here.",
        )
    )
    panels.append(
        panel(
            "Rewards and advantages (last batch)",
            [
                (f"avg by (run) (softgate_reward_mean{{{R}}})", "reward mean {{run}}"),
                (f"avg by (run) (softgate_reward_std{{{R}}})", "reward std {{run}}"),
                (f"avg by (run) (softgate_advantage_mean{{{R}}})", "advantage mean {{run}}"),
                (f"avg by (run) (softgate_advantage_std{{{R}}})", "advantage std {{run}}"),
            ],
            12,
            y,
            description="The last call's: rewards per sequence; advantages per sequence after "
            "ComputeAdvantages, per trained token after ComputeLoss.",
        )
    )
    y += 8
    panels.append(
        panel(
            "Gradient variance proxy",
            [
                (avg("softgate_batch_variance_proxy_total_power", "objective"), "total power {{objective}}"),
                (avg("softgate_batch_variance_proxy_a_squared", "objective"), "A^2 {{objective}}"),
                (avg("softgate_batch_variance_proxy_w", "objective"), "W {{objective}}"),
            ],
            0,
            y,
            w=24,
            minmax=(0, None),
            description="Runs that send sum_pi_squared (verl's variance_proxy/*). Total power: mean over sequences "
            "of A^2 W (times the squared mean mismatch weight), the expected squared norm of one sequence's "
            "gradient through the logits; A^2 and W (W on the right axis), its parts: a sequence's squared mean advantage "
            "and its summed score energy 1 - 2 pi + sum pi^2. A total power that jumps warns of a noisy, unstable "
            "update; a W that falls toward 0, of a policy grown confident (entropy collapse). With the step's "
            f"gradient norm, (total power - |g|^2) / (B - 1) is verl's pure-noise proxy. {PER_BATCH}",
            overrides=[right_axis("^W .*", "short", "W")],
        )
    )
    y += 8
    panels.append(row("Service", y))
    y += 1
    panels.append(
        panel(
            "Throughput",
            [
                (
                    f"sum by (rpc) (rate(softgate_processed_tokens_total{{{R}}}[$__rate_interval]))",
                    "tokens/s {{rpc}}",
                ),
                (
                    f"sum by (sign) (rate(softgate_loss_tokens_total{{{R}}}[$__rate_interval]))",
                    "loss tokens/s A {{sign}}",
                ),
                (
                    f"sum by (rpc) (rate(softgate_processed_sequences_total{{{R}}}[$__rate_interval]))",
                    "sequences/s {{rpc}}",
                ),
            ],
            0,
            y,
            unit="short",
            description="Tokens and sequences of successful RPCs per second.",
        )
    )
    panels.append(
        panel(
            "Latency percentiles",
            [
                *(
                    (
                        f"histogram_quantile({q}, sum by (le) (rate({LATENCY}_bucket[$__rate_interval])))",
                        f"p{int(q * 100)} all RPCs",
                    )
                    for q in (0.5, 0.9)
                ),
                (
                    # per RPC, those with calls in the window (an idle one's quantile is NaN)
                    f"histogram_quantile(0.99, sum by (le, rpc) (rate({LATENCY}_bucket[$__rate_interval]))"
                    f" and on (rpc) sum by (rpc) (rate({LATENCY}_count[$__rate_interval])) > 0)",
                    "p99 {{rpc}}",
                ),
            ],
            12,
            y,
            unit="s",
            description="Time from receiving an RPC to sending its response; calls refused at admission "
            "(busy, shutting down) are not timed. p99 per RPC: StreamLoss includes the client's upload.",
        )
    )
    y += 8
    panels.append(
        panel(
            "Errors and rejected inputs",
            [
                ('sum by (code) (rate(softgate_requests_total{code!="OK"}[$__rate_interval]))', "{{code}}"),
                (
                    "sum by (reason) (rate(softgate_rejected_inputs_total[$__rate_interval]))",
                    "rejected: {{reason}}",
                ),
                (
                    "sum by (hook) (rate(softgate_telemetry_errors_total[$__rate_interval]))",
                    "telemetry errors: {{hook}}",
                ),
            ],
            0,
            y,
            unit="reqps",
            description="RPCs that did not end OK, by code; inputs refused, by reason; engine results the "
            "telemetry failed to record, by hook (their trust-region metrics are missing; see the log).",
        )
    )
    panels.append(
        panel(
            "In flight",
            [
                ("sum(softgate_in_flight_requests)", "requests in flight"),
                ("sum(softgate_in_flight_tokens)", "tokens in flight"),
            ],
            12,
            y,
            description="RPCs being processed (left axis) and their tokens (right axis).",
            overrides=[right_axis("^tokens in flight$", "short", "tokens")],
        )
    )
    y += 8
    panels.append(
        panel(
            "Requests by RPC and code",
            [("sum by (rpc, code) (rate(softgate_requests_total[$__rate_interval]))", "{{rpc}} {{code}}")],
            0,
            y,
            unit="reqps",
        )
    )
    panels.append(
        panel(
            "Request and response bytes",
            [
                ("sum(rate(softgate_request_bytes_total[$__rate_interval]))", "bytes in/s"),
                ("sum(rate(softgate_response_bytes_total[$__rate_interval]))", "bytes out/s"),
            ],
            12,
            y,
            unit="Bps",
            description="Serialized request and response bytes per second.",
        )
    )
    y += 8
    panels.append(
        panel(
            "Engine configurations",
            [("sum by (state) (softgate_engine_configurations)", "{{state}}")],
            0,
            y,
            description="Compiled kernels by state. failed or over_limit above 0: those configurations run "
            "eager (the same numbers, slower); see the server log, or raise max_compiled_kernels.",
        )
    )
    panels.append(
        panel(
            "Device",
            [("softgate_device_info", "{{device}} {{name}} torch {{torch_version}} softgate {{version}}")],
            12,
            y,
            kind="table",
        )
    )
    y += 8
    panels.append(
        panel(
            "Run labels",
            [
                ("sum by (instance) (softgate_runs_tracked)", "tracked {{instance}}"),
                (
                    "sum by (instance) (increase(softgate_run_evictions_total[$__rate_interval]))",
                    "dropped {{instance}}",
                ),
                (
                    "sum by (instance) (increase(softgate_run_returns_total[$__rate_interval]))",
                    "came back {{instance}}",
                ),
            ],
            0,
            y,
            w=24,
            description="Runs whose series each server exports (at most max_runs), runs it dropped for a new "
            "one, and dropped runs that came back, in each interval. Dropped runs that come back restart "
            "their series from 0: their panels above read nothing, and more runs train than max_runs keeps "
            "(alert SoftgateRunLabelsThrashing). Drops alone are runs that ended making room.",
        )
    )

    return {
        "__inputs": [],
        "annotations": {"list": []},
        "description": "softgate: trust-region health (SAPO gate, clip fractions, grad retained, KL) and service metrics.",
        "editable": True,
        "graphTooltip": 1,
        "panels": panels,
        "refresh": "10s",
        "schemaVersion": 39,
        "tags": ["softgate", "rl"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "run",
                    "label": "Run",
                    "type": "query",
                    "datasource": DS,
                    "definition": RUN_VALUES,
                    "query": {"query": RUN_VALUES, "refId": "run"},
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "utc",
        "title": "softgate",
        "uid": "softgate",
        "version": 1,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python3 {Path(__file__).name}", file=sys.stderr)
            sys.exit(1)
    else:
        OUT.write_text(text)
        print(f"wrote {OUT}")
