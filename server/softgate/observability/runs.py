"""Run-labelled state with bounded cardinality.

Trainers tag requests with a run name (gRPC metadata `softgate-run`). Every run-labelled
series lives here rather than in prometheus_client's own metric objects, so that a run can
be dropped: when more than `max_runs` runs have been seen, the least recently active one is
removed with everything it had accumulated, and its series leave the exposition. (Its
history is not added to another series: Prometheus would read that as a real increase, and
every rate summed over runs would spike by it.) A run that comes back starts afresh.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from softgate.engine.variance_proxy import NAMES as PROXY_NAMES

DEFAULT_RUN = "default"
# A per-batch value past this (a saturated statistic: float64's largest) counts as this, so that
# a summary's or histogram's _sum stays finite: one +Inf and its rate() reads NaN for good
OBSERVED_LIMIT = 1e300
MAX_RUN_NAME = 64
_BAD = re.compile(r"[^A-Za-z0-9_.:/-]")


def sanitize_run(run: str | None) -> str:
    """A run label value: printable, at most 64 characters, `default` when empty."""
    if not run:
        return DEFAULT_RUN
    run = _BAD.sub("_", str(run).strip())[:MAX_RUN_NAME]
    return run or DEFAULT_RUN


@dataclass
class HistState:
    """Non-cumulative bucket counts (the last one is +Inf) and the sum of observations."""

    counts: np.ndarray
    total: float = 0.0


@dataclass
class BatchRecord:
    """One loss batch's (or ComputeAdvantages call's) summary, for the /v1/runs windows."""

    t: float
    objective: str
    tokens: int
    seqs: int
    values: dict[str, float]
    groups: int = 0  # distinct group ids (0 when the caller gave advantages)


@dataclass
class RunState:
    counters: dict[tuple[str, tuple[str, ...]], float] = field(default_factory=dict)
    hists: dict[tuple[str, tuple[str, ...]], HistState] = field(default_factory=dict)
    gauges: dict[tuple[str, tuple[str, ...]], float] = field(default_factory=dict)
    batches: deque[BatchRecord] = field(default_factory=lambda: deque(maxlen=RunRegistry.WINDOW_BATCHES))
    advantage_calls: deque[BatchRecord] = field(
        default_factory=lambda: deque(maxlen=RunRegistry.WINDOW_BATCHES)
    )
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)

    # ------------------------------------------------------------ updates
    def inc(self, name: str, labels: tuple[str, ...], value: float) -> None:
        # a 0 is recorded too: the series exists from the run's first batch, so that the first
        # clipped (saturated, clamped) token is an increase that rate() and increase() see
        if math.isfinite(value):
            key = (name, labels)
            self.counters[key] = self.counters.get(key, 0.0) + float(value)

    def observe(self, name: str, labels: tuple[str, ...], value: float, edges: np.ndarray) -> None:
        if value is None or not math.isfinite(value):
            return
        value = min(max(value, -OBSERVED_LIMIT), OBSERVED_LIMIT)
        key = (name, labels)
        h = self.hists.get(key)
        if h is None:
            h = self.hists[key] = HistState(np.zeros(len(edges) + 1, dtype=np.float64))
        # le semantics: the first edge >= value (bisect: a tenth of np.searchsorted's call cost)
        h.counts[bisect.bisect_left(edges, value)] += 1.0
        h.total += float(value)

    def add_hist(
        self, name: str, labels: tuple[str, ...], counts: np.ndarray, total: float, nbuckets: int
    ) -> None:
        key = (name, labels)
        h = self.hists.get(key)
        if h is None:
            h = self.hists[key] = HistState(np.zeros(nbuckets, dtype=np.float64))
        h.counts += counts
        h.total += total

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        if value is not None and math.isfinite(value):
            self.gauges[(name, labels)] = float(value)


class RunRegistry:
    """The `max_runs` most recently active runs, each with its own state.

    `state(run)` marks the run as the most recent; a new run beyond the bound drops the least
    recently active one (`evictions` counts them), and a dropped run that comes back is counted
    in `returns` (its series restart from 0: the sign that more runs train than max_runs; the
    last EVICTED_NAMES names dropped are remembered). Not thread-safe: the caller holds a lock.
    """

    WINDOW_BATCHES = 1000
    EVICTED_NAMES = 1024

    def __init__(self, max_runs: int = 32) -> None:
        self.max_runs = max(1, int(max_runs))
        self._runs: OrderedDict[str, RunState] = OrderedDict()
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self.evictions = 0
        self.returns = 0

    def state(self, run: str | None, now: float | None = None) -> tuple[str, RunState]:
        name = sanitize_run(run)
        now = time.time() if now is None else now
        st = self._runs.get(name)
        if st is None:
            st = self._runs[name] = RunState(first_seen=now, last_seen=now)
            if name in self._evicted:
                del self._evicted[name]
                self.returns += 1
            while len(self._runs) > self.max_runs:
                gone, _ = self._runs.popitem(last=False)
                self.evictions += 1
                self._evicted[gone] = None
                while len(self._evicted) > self.EVICTED_NAMES:
                    self._evicted.popitem(last=False)
        else:
            self._runs.move_to_end(name)
        st.last_seen = now
        return name, st

    def get(self, run: str) -> RunState | None:
        return self._runs.get(run)

    def items(self) -> list[tuple[str, RunState]]:
        return list(self._runs.items())

    def names(self) -> list[str]:
        return list(self._runs)


# ---------------------------------------------------------------- windows for /v1/runs

WINDOW_KEYS = (
    "gate_saturation_pos",
    "gate_saturation_neg",
    "gate_mean_pos",
    "gate_mean_neg",
    "clip_low",
    "clip_high",
    "dual_clip",
    "grad_retained",
    "approx_kl",
    "degenerate_group_fraction",
    "reward_mean",
    "advantage_mean",
    "kl_mean",
    "kl_clamped_frac",
    "reward_kl_mean",
    "mismatch_weight_mean",
    "mismatch_clipped_frac",
    "mismatch_norm_factor",
    "off_policy_masked_frac",
    "rejected_frac",
    "unscored_frac",
    "rollout_kl",
    "rollout_k3_kl",
    *PROXY_NAMES,
)


# statistics that are means over a batch's sequences, weighted by them
SEQUENCE_MEANS = ("reward_kl_mean", "unscored_frac", *PROXY_NAMES)

# a statistic over some of a batch's tokens (a sign's, those with a policy gradient, the
# trained ones) is weighted by them, and a batch without any is left out (its 0 / 1 stands
# for "none"); rewards and the degenerate share are weighted by sequences and groups
# (`weight`), the others by the batch's trained tokens (at least 1)
_TRAINED = ("tokens_pos", "tokens_neg", "tokens_zero")
TOKEN_WEIGHTS: dict[str, tuple[str, ...]] = {
    "gate_saturation_pos": ("tokens_pos",),
    "gate_mean_pos": ("tokens_pos",),
    "clip_high": ("tokens_pos",),
    "gate_saturation_neg": ("tokens_neg",),
    "gate_mean_neg": ("tokens_neg",),
    "clip_low": ("tokens_neg",),
    "dual_clip": ("tokens_neg",),
    "grad_retained": ("tokens_pos", "tokens_neg"),
    "approx_kl": _TRAINED,
    "ratio_mean": _TRAINED,
    "ratio_min": _TRAINED,
    "ratio_max": _TRAINED,
    "kl_mean": _TRAINED,
    "kl_clamped_frac": _TRAINED,
    "mismatch_weight_mean": _TRAINED,
    "mismatch_clipped_frac": _TRAINED,
    "mismatch_norm_factor": _TRAINED,
    "off_policy_masked_frac": _TRAINED,
    "rejected_frac": (*_TRAINED, "tokens_rejected"),  # a share of the tokens sent
    "rollout_kl": ("rollout_tokens",),  # over the tokens as sent
    "rollout_k3_kl": ("rollout_tokens",),
}


def weight(b: BatchRecord, key: str) -> float:
    """A loss batch's weight in a window's mean of statistic `key`: how many of what the
    statistic is over it has (sequences, groups, the tokens of TOKEN_WEIGHTS, trained tokens)."""
    if key == "reward_mean":  # (over the sequences with a reward: skip_nan_components)
        return b.values.get("seqs_scored", b.seqs)
    if key in SEQUENCE_MEANS:
        return b.seqs
    if key == "degenerate_group_fraction":
        return b.groups
    over = TOKEN_WEIGHTS.get(key)
    return sum(b.values.get(k, 0.0) for k in over) if over else max(b.tokens, 1)


def has_tokens(key: str, tokens: dict[str, float]) -> bool:
    """Whether a batch of these token counts (`tokens_pos`, ...) has the tokens statistic
    `key` is over (TOKEN_WEIGHTS; a statistic over all of a batch always has)."""
    over = TOKEN_WEIGHTS.get(key)
    return not over or sum(tokens.get(k, 0.0) for k in over) > 0


def summarize(batches: list[BatchRecord]) -> dict[str, Any]:
    """Mean of each per-batch statistic (weighted by what it is over: `weight`), the ratio
    range, KL max."""
    out: dict[str, Any] = {"batches": len(batches)}
    if not batches:
        return out
    out["tokens"] = int(sum(b.tokens for b in batches))
    out["sequences"] = int(sum(b.seqs for b in batches))
    out["from"] = min(b.t for b in batches)
    out["to"] = max(b.t for b in batches)
    objectives = sorted({b.objective for b in batches})
    out["objectives"] = objectives
    for key in WINDOW_KEYS:
        vals = [(b.values[key], weight(b, key)) for b in batches if _finite(b.values.get(key))]
        if (mean := _weighted_mean(vals)) is not None:
            out[key] = mean
    trained = [b for b in batches if has_tokens("approx_kl", b.values)]  # a masked batch's 0 / 1: "none"
    kls = [b.values["approx_kl"] for b in trained if _finite(b.values.get("approx_kl"))]
    if kls:
        out["approx_kl_max"] = max(kls)
    rmin = [b.values["ratio_min"] for b in trained if _finite(b.values.get("ratio_min"))]
    rmax = [b.values["ratio_max"] for b in trained if _finite(b.values.get("ratio_max"))]
    if rmin and rmax:
        out["ratio_range"] = [min(rmin), max(rmax)]
    return out


ADVANTAGE_KEYS = (
    "degenerate_group_fraction",
    "reward_mean",
    "reward_std",
    "advantage_mean",
    "advantage_std",
    "unscored_frac",
)


def summarize_advantages(calls: list[BatchRecord]) -> dict[str, Any]:
    """ComputeAdvantages calls: how many, their sequences, each statistic's mean weighted by
    the call's sequences (the degenerate share by its groups)."""
    out: dict[str, Any] = {"calls": len(calls), "sequences": int(sum(c.seqs for c in calls))}
    for key in ADVANTAGE_KEYS:
        vals = [(c.values[key], _advantage_weight(c, key)) for c in calls if _finite(c.values.get(key))]
        if (mean := _weighted_mean(vals)) is not None:
            out[key] = mean
    return out


def _advantage_weight(c: BatchRecord, key: str) -> float:
    """A ComputeAdvantages call's weight in a window's mean of `key`: its groups for the
    degenerate share, its sequences with a reward for the reward statistics, else its sequences."""
    if key == "degenerate_group_fraction":
        return c.groups
    if key in ("reward_mean", "reward_std"):
        return c.values.get("seqs_scored", max(c.seqs, 1))
    return max(c.seqs, 1)


def _weighted_mean(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Mean of (value, weight) pairs over those of positive weight; None when there are none,
    or when the mean is not finite (its key is then left out, as a non-finite value is)."""
    kept = [(v, n) for v, n in pairs if n > 0]
    if not kept:
        return None
    total = sum(n for _, n in kept)
    mean = sum(v * n for v, n in kept) / total
    if not math.isfinite(mean):  # huge finite values: v * n overflowed (advantages of 1e300 x
        # their token counts read null in the JSON, an audit); normalised weights do not, though
        # a mean of values near the float64 maximum can still round past it
        mean = sum(v * (n / total) for v, n in kept)
    return mean if math.isfinite(mean) else None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# the windows of /v1/runs/{run}: name -> its records (oldest first) of a run's, at time `now`
WINDOWS: dict[str, Callable[[list[BatchRecord], float], list[BatchRecord]]] = {
    "last_10_batches": lambda r, now: r[-10:],
    "last_100_batches": lambda r, now: r[-100:],
    "last_5m": lambda r, now: [b for b in r if b.t >= now - 300],
    "last_1h": lambda r, now: [b for b in r if b.t >= now - 3600],
}


def last(records: deque[BatchRecord], n: int) -> list[BatchRecord]:
    """The newest `n` records, oldest first (without copying the others)."""
    return list(islice(reversed(records), n))[::-1]


def window(
    name: str, batches: list[BatchRecord], advantage_calls: list[BatchRecord], now: float
) -> dict[str, Any]:
    """One of WINDOWS over the loss batches; it also summarises, under `advantages`, the run's
    ComputeAdvantages calls in the same window (when it had any: a trainer that computes
    advantages first, then the loss from them, has its group statistics there)."""
    pick = WINDOWS[name]
    out = summarize(pick(batches, now))
    if calls := pick(advantage_calls, now):
        out["advantages"] = summarize_advantages(calls)
    return out


def windows(
    batches: list[BatchRecord], advantage_calls: list[BatchRecord], now: float | None = None
) -> dict[str, Any]:
    """Every one of WINDOWS (a run's records, oldest first: RunState.batches, .advantage_calls)."""
    now = time.time() if now is None else now
    return {name: window(name, batches, advantage_calls, now) for name in WINDOWS}
