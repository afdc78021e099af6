"""The custom collector that exports every run-labelled series from the RunRegistry.

Counters, per-batch summaries, last-batch gauges and the per-token distributions
(cumulative `HistogramMetricFamily` buckets built from the device-side counts) are all
produced at scrape time from plain numpy arrays: nothing is stored per token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from softgate.observability.distributions import GATE_EDGES, RATIO_EDGES

if TYPE_CHECKING:
    from softgate.observability.telemetry import PrometheusTelemetry

# CompiledKernel.states' keys: each exported at 0 from start-up
ENGINE_STATES = ("compiled", "compiling", "failed", "over_limit")

RO = ("run", "objective")
ROS = ("run", "objective", "sign")

# name -> (help, label names); the `_total` suffix is added by the exposition format.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "softgate_processed_tokens_total": ("Tokens of successful RPCs, by rpc.", ("run", "rpc")),
    "softgate_processed_sequences_total": ("Sequences of successful RPCs, by rpc.", ("run", "rpc")),
    "softgate_loss_batches_total": ("Loss batches computed.", RO),
    "softgate_loss_tokens_total": (
        "Masked (trained-on) tokens of loss batches by advantage sign (pos, neg, zero).",
        ROS,
    ),
    "softgate_clipped_tokens_total": (
        "Tokens past their sign's clip bound: sign=pos A>0 with r>1+eps_high, sign=neg A<0 with "
        "r<1-eps_low (GMPO: exp(eps_high), exp(-eps_low); DPPO: its divergence bound; Clip-Cov: its drawn "
        "tokens too; KL-Cov: its penalised tokens; not SAPO, REINFORCE or DRO). CISPO's A>0 tokens below "
        "1-eps_low and A<0 tokens above 1+eps_high are in neither (ComputeLoss's clip_fraction has them).",
        ROS,
    ),
    "softgate_dual_clipped_tokens_total": (
        "A<0 tokens caught by the dual clip (r > c); GRPO or GSPO with a dual clip only.",
        RO,
    ),
    "softgate_gate_saturated_tokens_total": (
        "Tokens whose gate weight w is below the saturation threshold (0.5 by default).",
        ROS,
    ),
    "softgate_clamped_tokens_total": ("Tokens whose log-ratio hit the clamp bound.", RO),
    "softgate_kl_clamped_tokens_total": (
        "Trained tokens whose KL term was clamped: k3's ref - logp above log_ratio_clamp, or |k| (weighted: "
        "|w k|) above kl.value_clamp (verl's low_var_kl: 10). Past the value bound only the straight-through "
        "estimators keep a KL gradient, past log_ratio_clamp only a weighted k3. Batches with a KL term only.",
        RO,
    ),
    "softgate_mismatch_clipped_tokens_total": (
        "Trained tokens whose train/inference mismatch weight v = exp(old - rollout) was clamped to "
        "[floor, cap] or zeroed outside [lo, hi] (seq_mask: the tokens of the sequences it dropped); "
        "batches with a mismatch correction only.",
        RO,
    ),
    "softgate_off_policy_masked_tokens_total": (
        "Trained tokens whose policy term off-policy sequence masking dropped (A<0, their sequence's mean "
        "of sampler - current log-prob above off_policy_mask_threshold); batches with the threshold only.",
        RO,
    ),
    "softgate_rollout_rejected_tokens_total": (
        "Tokens rollout rejection (LossConfig.rejection, verl's rollout_rs) took out of the loss mask: "
        "not in softgate_loss_tokens_total; batches with rejection criteria only.",
        RO,
    ),
    "softgate_rollout_rejected_sequences_total": (
        "Sequences of which rollout rejection took out at least one trained token (a whole-sequence "
        "criterion: all of them); batches with rejection criteria only.",
        RO,
    ),
    "softgate_advantage_batches_total": ("ComputeAdvantages batches.", ("run",)),
    "softgate_reward_sequences_total": (
        "Sequences whose advantages the server computed from rewards (ComputeAdvantages, and ComputeLoss "
        "without caller advantages), by status: unscored when no reward applied to it "
        "(skip_nan_components: a NaN reward, or every component NaN; its advantage is 0), else scored.",
        ("run", "status"),
    ),
}

# statistics that may be negative: exported as NAME_positive and NAME_negative (SUMMARIES)
# (k1's KL, of a KL term or in the reward, may be negative too)
SIGNED = ("approx_kl", "rollout_kl", "kl_mean", "reward_kl_mean")

# (metric name, key in the batch values, sign or None)
BATCH_SUMMARIES: tuple[tuple[str, str, str | None], ...] = (
    ("softgate_batch_clip_fraction", "clip_high", "pos"),
    ("softgate_batch_clip_fraction", "clip_low", "neg"),
    ("softgate_batch_dual_clip_fraction", "dual_clip", None),
    ("softgate_batch_gate_saturation", "gate_saturation_pos", "pos"),
    ("softgate_batch_gate_saturation", "gate_saturation_neg", "neg"),
    ("softgate_batch_gate_weight_mean", "gate_mean_pos", "pos"),
    ("softgate_batch_gate_weight_mean", "gate_mean_neg", "neg"),
    ("softgate_batch_grad_retained", "grad_retained", None),
    ("softgate_batch_approx_kl", "approx_kl", None),
    ("softgate_batch_degenerate_group_fraction", "degenerate_group_fraction", None),
    ("softgate_batch_kl_mean", "kl_mean", None),
    ("softgate_batch_reward_kl", "reward_kl_mean", None),
    ("softgate_batch_mismatch_weight_mean", "mismatch_weight_mean", None),
    ("softgate_batch_mismatch_norm_factor", "mismatch_norm_factor", None),
    ("softgate_batch_rollout_kl", "rollout_kl", None),
    ("softgate_batch_rollout_k3_kl", "rollout_k3_kl", None),
    ("softgate_batch_variance_proxy_total_power", "variance_proxy_total_power", None),
    ("softgate_batch_variance_proxy_a_squared", "variance_proxy_a_squared", None),
    ("softgate_batch_variance_proxy_w", "variance_proxy_w", None),
)

# The per-token distributions, bucketed on the device (sign pos and neg only: A = 0 tokens
# carry no gradient).
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "softgate_token_ratio": (
        "Per-token importance ratio r (the sequence ratio for gspo, gspo_token, sapo_seq, cispo_seq) "
        "of masked tokens, by advantage sign (pos, neg).",
        ROS,
        RATIO_EDGES,
    ),
    "softgate_token_gate_weight": (
        "Per-token gate weight w (SAPO 4p(1-p); 1 unclipped / 0 clipped for hard clips; CISPO, GPPO: "
        "bound / r when clipped, above 1 for GPPO's A<0 tokens and CISPO's of either sign below "
        "1-eps_low), by advantage sign (pos, neg).",
        ROS,
        GATE_EDGES,
    ),
}

# Per-batch statistics: a count and a sum each, no buckets. Every query is a mean,
# rate(_sum) / rate(_count): their buckets, 153 of the 351 series of a (run, objective), were
# never read (an audit). And approx KL may be negative, which a histogram's _sum cannot be.
SUMMARIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "softgate_batch_clip_fraction": (
        "Per batch: share of the sign's tokens clipped, sign=pos clip_high (A>0, r>1+eps_high), sign=neg "
        "clip_low (A<0, r<1-eps_low; GMPO's bounds exp(eps_high), exp(-eps_low); DPPO: its divergence "
        "bound; Clip-Cov: its drawn tokens too; KL-Cov: its penalised tokens); not SAPO, REINFORCE or DRO. "
        "CISPO's A>0 tokens below 1-eps_low "
        "and A<0 tokens above 1+eps_high are in neither (ComputeLoss's clip_fraction has them).",
        ROS,
    ),
    "softgate_batch_dual_clip_fraction": (
        "Per batch: share of A<0 tokens caught by the dual clip; GRPO or GSPO with a dual clip only.",
        RO,
    ),
    "softgate_batch_gate_saturation": (
        "Per batch: share of the sign's tokens whose gate weight is below the saturation threshold.",
        ROS,
    ),
    "softgate_batch_gate_weight_mean": (
        "Per batch: mean gate weight w of the sign's tokens (above 1 for GPPO's clipped A<0 tokens and "
        "CISPO's tokens of either sign below 1-eps_low).",
        ROS,
    ),
    "softgate_batch_grad_retained": (
        "Per batch: sum|grad| / sum|grad without trust region| (above 1 where GPPO keeps a clipped A<0 "
        "token's gradient at bound / r, or CISPO raises the weight of a token of either sign below 1-eps_low; "
        "KL-Cov's and DRO's, whose penalty adds to the gradient, can pass 1; DRO's falls toward 0 as logp - old "
        "approaches A / coef, its penalty's fixed point).",
        RO,
    ),
    "softgate_batch_degenerate_group_fraction": (
        "Per batch: share of groups with zero reward variance (advantage 0).",
        ("run",),
    ),
    # a signed statistic as its positive and negative parts, each observed for every batch: a
    # summary's _sum that goes down reads as a counter reset to rate() (a review: a 5-minute mean
    # of 0.0005 read 6.0)
    "softgate_batch_approx_kl_positive": (
        "Per batch: max(approx KL, 0), approx KL the masked mean of (old - logp); the mean approx KL is "
        "(rate(_positive_sum) - rate(softgate_batch_approx_kl_negative_sum)) / rate(_positive_count).",
        RO,
    ),
    "softgate_batch_approx_kl_negative": ("Per batch: max(-approx KL, 0) (see _positive).", RO),
    "softgate_batch_kl_mean_positive": (
        "Per batch: max(m, 0), m the mean over trained tokens of the KL penalty's estimator (before beta) of "
        "the reference policy (k1's may be negative); the mean is (rate(_positive_sum) - "
        "rate(softgate_batch_kl_mean_negative_sum)) / rate(_positive_count); batches with a KL term only.",
        RO,
    ),
    "softgate_batch_kl_mean_negative": ("Per batch: max(-m, 0) (see _positive).", RO),
    "softgate_batch_reward_kl_positive": (
        "Per batch: max(m, 0), m the mean over sequences of each one's mean, over its tokens as sent, of the "
        "estimator (before beta) of the KL penalty in the reward (verl's actor/reward_kl_penalty; k1's may be "
        "negative); the mean as for softgate_batch_kl_mean; batches with reward_kl only.",
        RO,
    ),
    "softgate_batch_reward_kl_negative": ("Per batch: max(-m, 0) (see _positive).", RO),
    "softgate_batch_rollout_kl_positive": (
        "Per batch: max(k1, 0), k1 the mean of rollout_logp - old_logp (logp on-policy) over the trained "
        "tokens as sent, KL(sampler || trainer) (verl's rollout_corr/kl); the mean is (rate(_positive_sum) - "
        "rate(softgate_batch_rollout_kl_negative_sum)) / rate(_positive_count); batches with rollout_logp only.",
        RO,
    ),
    "softgate_batch_rollout_kl_negative": ("Per batch: max(-k1, 0) (see _positive).", RO),
    "softgate_batch_rollout_k3_kl": (
        "Per batch: the k3 estimate of KL(sampler || trainer), mean of exp(d) - 1 - d, d = old_logp - "
        "rollout_logp, over the trained tokens as sent (verl's k3_kl); batches with rollout_logp only.",
        RO,
    ),
    "softgate_batch_mismatch_weight_mean": (
        "Per batch: mean over trained tokens of the train/inference mismatch weight v = exp(old - rollout) "
        "as applied (after its clamp or mask); batches with a mismatch correction only.",
        RO,
    ),
    "softgate_batch_mismatch_norm_factor": (
        "Per batch: the mean of the mismatch weights over the batch as sent (seq_mask: the tokens rejection left) that batch_normalize divided "
        "them by (verl's rollout_is_batch_norm_factor; softgate_batch_mismatch_weight_mean is before it); "
        "batches with mismatch.batch_normalize only.",
        RO,
    ),
    # verl's gradient-variance proxy (engine/variance_proxy.py), batches with sum_pi_squared only
    "softgate_batch_variance_proxy_total_power": (
        "Per batch: mean over sequences of rho^2 A^2 max(W, 0), A a sequence's mean advantage, W the sum over its "
        "trained tokens of the score energy 1 - 2 pi + sum_pi_squared, rho its mean mismatch weight: the "
        "per-sequence gradient's expected squared norm (verl's variance_proxy/proxy2_total_power); batches with "
        "sum_pi_squared only.",
        RO,
    ),
    "softgate_batch_variance_proxy_a_squared": (
        "Per batch: mean over sequences of the squared mean advantage (verl's variance_proxy/expected_a_squared); "
        "batches with sum_pi_squared only.",
        RO,
    ),
    "softgate_batch_variance_proxy_w": (
        "Per batch: mean over sequences of W, times each token's squared mismatch weight (verl's "
        "variance_proxy/expected_w; falls as the policy grows confident); a batch whose mean rounds below 0 "
        "counts 0; batches with sum_pi_squared only.",
        RO,
    ),
}

GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "softgate_batch_ratio_mean": ("Last batch: mean token ratio.", RO),
    "softgate_batch_ratio_min": ("Last batch: smallest token ratio.", RO),
    "softgate_batch_ratio_max": ("Last batch: largest token ratio.", RO),
    "softgate_batch_approx_kl": ("Last batch: approx KL, masked mean of (old - logp).", RO),
    "softgate_batch_grad_retained": ("Last batch: share of policy-gradient mass let through.", RO),
    "softgate_reward_mean": ("Last batch: mean reward.", ("run",)),
    "softgate_reward_std": ("Last batch: reward standard deviation.", ("run",)),
    "softgate_advantage_mean": (
        "Last call: mean advantage, per sequence after ComputeAdvantages, per trained token after ComputeLoss.",
        ("run",),
    ),
    "softgate_advantage_std": (
        "Last call: advantage standard deviation, per sequence after ComputeAdvantages, per trained token "
        "after ComputeLoss.",
        ("run",),
    ),
    "softgate_degenerate_group_fraction": ("Last batch: share of zero-variance groups.", ("run",)),
}
# The last-batch gauges of approx_kl and grad_retained share their names with summaries:
# a gauge gets the suffix `_last`.
GAUGE_EXPORT_NAME = {
    "softgate_batch_approx_kl": "softgate_batch_approx_kl_last",
    "softgate_batch_grad_retained": "softgate_batch_grad_retained_last",
}


def exported_names() -> set[str]:
    """Every sample name the collector can export (with _bucket/_sum/_count/_total)."""
    out: set[str] = set()
    out.update(COUNTERS)
    for n in HISTOGRAMS:
        out |= {n + "_bucket", n + "_sum", n + "_count"}
    for n in SUMMARIES:
        out |= {n + "_sum", n + "_count"}
    for n in GAUGES:
        out.add(GAUGE_EXPORT_NAME.get(n, n))
    out.add("softgate_runs_tracked")
    out.add("softgate_run_evictions_total")
    out.add("softgate_run_returns_total")
    out.add("softgate_engine_configurations")
    out.update(
        ("softgate_admitted_rpcs", "softgate_max_concurrent_rpcs", "softgate_tls_cert_not_after_seconds")
    )
    return out


class SoftgateCollector(Collector):
    def __init__(self, telemetry: PrometheusTelemetry) -> None:
        self.t = telemetry
        self.edges: dict[str, np.ndarray] = {
            n: np.asarray(e, dtype=np.float64) for n, (_, _, e) in HISTOGRAMS.items()
        }
        for n in SUMMARIES:  # no buckets: one count and the sum
            self.edges[n] = np.zeros(0, dtype=np.float64)
        self._le = {n: [floatToGoString(x) for x in e] + ["+Inf"] for n, (_, _, e) in HISTOGRAMS.items()}

    def describe(self) -> Iterator[Any]:
        # Names only (the registry checks for duplicates); no samples.
        yield from self._families({})
        yield self._engine_configurations({})

    def collect(self) -> Iterator[Any]:
        with self.t.lock:
            items = [(name, _snapshot(st)) for name, st in self.t.runs.items()]
            evictions, returns = self.t.runs.evictions, self.t.runs.returns
        yield from self._families(dict(items))
        g = GaugeMetricFamily(
            "softgate_runs_tracked", "Run label values currently exported (at most max_runs)."
        )
        g.add_metric([], float(len(items)))
        yield g
        c = CounterMetricFamily(
            "softgate_run_evictions",
            "Runs dropped (their series removed) to bound label cardinality at max_runs.",
        )
        c.add_metric([], float(evictions))
        yield c
        c = CounterMetricFamily(
            "softgate_run_returns",
            "Runs dropped at max_runs that came back, their series restarted from 0 (more runs train than max_runs).",
        )
        c.add_metric([], float(returns))
        yield c
        yield self._engine_configurations(self.t.engine_states())
        yield from self._server_state()

    def _server_state(self) -> Iterator[GaugeMetricFamily]:
        """The slots taken of max_concurrent_rpcs (a call holds one from admission on, before it
        has sent anything: the in-flight gauges count only work started) and the certificate's
        expiry; each only once the gRPC server reports it."""
        limit = getattr(self.t.settings, "max_concurrent_rpcs", None)
        if self.t.admitted is not None:
            g = GaugeMetricFamily(
                "softgate_admitted_rpcs",
                "Calls holding a max_concurrent_rpcs slot now, from admission on (whether or not "
                "they have sent their request yet).",
            )
            g.add_metric([], float(self.t.admitted()))
            yield g
            if limit:
                g = GaugeMetricFamily("softgate_max_concurrent_rpcs", "The max_concurrent_rpcs setting.")
                g.add_metric([], float(limit))
                yield g
        not_after = self.t.tls_not_after()
        if not_after is not None:
            g = GaugeMetricFamily(
                "softgate_tls_cert_not_after_seconds",
                "When the served TLS certificate expires (its notAfter), Unix seconds; follows rotations.",
            )
            g.add_metric([], not_after)
            yield g

    @staticmethod
    def _engine_configurations(counts: dict[str, int]) -> GaugeMetricFamily:
        g = GaugeMetricFamily(
            "softgate_engine_configurations",
            "Engine configurations seen, by state: compiled, compiling, failed (eager after a compile "
            "error), over_limit (eager past max_compiled_kernels).",
            labels=["state"],
        )
        for state in ENGINE_STATES:
            g.add_metric([state], float(counts.get(state, 0)))
        return g

    def _families(self, runs: dict[str, Any]) -> Iterator[Any]:
        for name, (doc, labels) in COUNTERS.items():
            cfam = CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels))
            for run, (counters, _, _) in runs.items():
                for (n, lv), v in counters.items():
                    if n == name:
                        cfam.add_metric([run, *lv], v)
            yield cfam
        for name, (doc, labels, _) in HISTOGRAMS.items():
            hfam = HistogramMetricFamily(name, doc, labels=list(labels))
            les = self._le[name]
            for run, (_, hists, _) in runs.items():
                for (n, lv), (counts, total) in hists.items():
                    if n == name:
                        cum = np.cumsum(counts)
                        hfam.add_metric(
                            [run, *lv],
                            buckets=[(le, float(c)) for le, c in zip(les, cum, strict=True)],
                            sum_value=total,
                        )
            yield hfam
        for name, (doc, labels) in SUMMARIES.items():
            sfam = SummaryMetricFamily(name, doc, labels=list(labels))
            for run, (_, hists, _) in runs.items():
                for (n, lv), (counts, total) in hists.items():
                    if n == name:
                        sfam.add_metric([run, *lv], count_value=int(counts.sum()), sum_value=total)
            yield sfam
        for name, (doc, labels) in GAUGES.items():
            fam = GaugeMetricFamily(GAUGE_EXPORT_NAME.get(name, name), doc, labels=list(labels))
            for run, (_, _, gauges) in runs.items():
                for (n, lv), v in gauges.items():
                    if n == name:
                        fam.add_metric([run, *lv], v)
            yield fam


def _snapshot(st: Any) -> tuple[dict[Any, float], dict[Any, tuple[np.ndarray, float]], dict[Any, float]]:
    return (
        dict(st.counters),
        {k: (h.counts.copy(), h.total) for k, h in st.hists.items()},
        dict(st.gauges),
    )
