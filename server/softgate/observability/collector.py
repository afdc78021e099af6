"""The custom collector that exports every run-labelled series from the RunRegistry.

Counters, per-batch histograms, last-batch gauges and the per-token distributions
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
FRACTION_EDGES = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

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
        "Tokens whose gradient the hard clip removed: sign=pos r>1+eps_high, sign=neg r<1-eps_low.",
        ROS,
    ),
    "softgate_dual_clipped_tokens_total": ("A<0 tokens caught by the dual clip (r > c).", RO),
    "softgate_gate_saturated_tokens_total": (
        "Tokens whose gate weight w is below the saturation threshold (0.5 by default).",
        ROS,
    ),
    "softgate_clamped_tokens_total": ("Tokens whose log-ratio hit the clamp bound.", RO),
    "softgate_advantage_batches_total": ("ComputeAdvantages batches.", ("run",)),
}

# (metric name, key in the batch values, sign or None)
BATCH_HISTOGRAMS: tuple[tuple[str, str, str | None], ...] = (
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
)

HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "softgate_batch_clip_fraction": (
        "Per batch: share of tokens clipped, sign=pos clip_high (A>0, r>1+eps_high), sign=neg clip_low (A<0, r<1-eps_low).",
        ROS,
        FRACTION_EDGES,
    ),
    "softgate_batch_dual_clip_fraction": (
        "Per batch: share of A<0 tokens caught by the dual clip.",
        RO,
        FRACTION_EDGES,
    ),
    "softgate_batch_gate_saturation": (
        "Per batch: share of the sign's tokens whose gate weight is below the saturation threshold.",
        ROS,
        FRACTION_EDGES,
    ),
    "softgate_batch_gate_weight_mean": (
        "Per batch: mean gate weight w of the sign's tokens.",
        ROS,
        FRACTION_EDGES,
    ),
    "softgate_batch_grad_retained": (
        "Per batch: sum|grad| / sum|grad without trust region|, the share of policy-gradient mass let through.",
        RO,
        FRACTION_EDGES,
    ),
    "softgate_batch_degenerate_group_fraction": (
        "Per batch: share of groups with zero reward variance (advantage 0).",
        ("run",),
        FRACTION_EDGES,
    ),
    "softgate_token_ratio": (
        "Per-token importance ratio r (sequence ratio for gspo) of masked tokens, by advantage sign.",
        ROS,
        RATIO_EDGES,
    ),
    "softgate_token_gate_weight": (
        "Per-token gate weight w (SAPO 4p(1-p); 1 unclipped / 0 clipped for hard clips; CISPO, GPPO: "
        "bound / r when clipped, above 1 for A<0), by advantage sign.",
        ROS,
        GATE_EDGES,
    ),
}

# Per-batch statistics that can be negative: a histogram with a negative sum would lose its
# _sum and _count in the exposition, so these are summaries (count and sum, no quantiles).
SUMMARIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "softgate_batch_approx_kl": (
        "Per batch: approx KL, masked mean of (old - logp); mean = rate(_sum) / rate(_count).",
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
    "softgate_advantage_mean": ("Last batch: mean advantage over masked tokens.", ("run",)),
    "softgate_advantage_std": ("Last batch: advantage standard deviation.", ("run",)),
    "softgate_degenerate_group_fraction": ("Last batch: share of zero-variance groups.", ("run",)),
}
# The last-batch gauges of approx_kl and grad_retained share their names with histograms:
# a gauge gets the suffix `_last`.
GAUGE_EXPORT_NAME = {
    "softgate_batch_approx_kl": "softgate_batch_approx_kl_last",
    "softgate_batch_grad_retained": "softgate_batch_grad_retained_last",
}


def exported_names() -> set[str]:
    """Every sample name the collector can export (with _bucket/_sum/_count/_total)."""
    out: set[str] = set()
    for n in COUNTERS:
        out.add(n)
        out.add(n.removesuffix("_total") + "_created")
    for n in HISTOGRAMS:
        out |= {n + "_bucket", n + "_sum", n + "_count"}
    for n in SUMMARIES:
        out |= {n + "_sum", n + "_count"}
    for n in GAUGES:
        out.add(GAUGE_EXPORT_NAME.get(n, n))
    out.add("softgate_runs_tracked")
    out.add("softgate_run_evictions_total")
    out.add("softgate_engine_configurations")
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
            evictions = self.t.runs.evictions
        yield from self._families(dict(items))
        g = GaugeMetricFamily(
            "softgate_runs_tracked", "Run label values currently exported (at most max_runs + 1)."
        )
        g.add_metric([], float(len(items)))
        yield g
        c = CounterMetricFamily(
            "softgate_run_evictions", 'Runs folded into run="other" to bound label cardinality.'
        )
        c.add_metric([], float(evictions))
        yield c
        yield self._engine_configurations(self.t.engine_states())

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
        {k: v for k, (v, _) in st.gauges.items()},
    )
