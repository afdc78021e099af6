"""PrometheusTelemetry: device-side bucketing, run-label eviction, exposition conventions."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from conftest import loss_result
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from softgate.engine import (
    AdvantageConfig,
    Batch,
    Cispo,
    Dro,
    Engine,
    Grpo,
    Gspo,
    KLConfig,
    KlCov,
    LossConfig,
    LossResult,
    MismatchConfig,
    Reinforce,
    RejectionCriterion,
    RewardKLConfig,
    Sapo,
    SapoSeq,
)
from softgate.engine.buckets import bucket_codes, bucket_edges
from softgate.observability import (
    GATE_EDGES,
    RATIO_EDGES,
    SIGNS,
    Bucketer,
    PrometheusTelemetry,
    RunRegistry,
    exported_names,
    sanitize_run,
)
from softgate.observability.distributions import _counts_numpy, _counts_torch
from softgate.observability.runs import BatchRecord, RunState, summarize, summarize_advantages, windows
from softgate.observability.telemetry import (
    CODES,
    MAX_QUEUED,
    MAX_REASONS,
    REASONS,
    RPCS,
    TRANSPORT_REASONS,
)


class S:
    def __init__(self, max_runs: int = 32, sample: int | None = 1 << 19) -> None:
        self.max_runs = max_runs
        self.metrics_cpu_sample_tokens = sample


def _samples(tel: PrometheusTelemetry) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for fam in text_string_to_metric_families(tel.exposition().decode()):
        for s in fam.samples:
            out.append((s.name, dict(s.labels), float(s.value)))
    return out


def _value(tel: PrometheusTelemetry, name: str, **labels: str) -> float | None:
    """The first exported sample `name` whose labels include `labels`; None if there is none."""
    for n, lab, v in _samples(tel):
        if n == name and all(lab.get(k) == x for k, x in labels.items()):
            return v
    return None


def _engine_result(
    n_seqs: int = 32,
    length: int = 64,
    seed: int = 0,
    config: LossConfig | None = None,
    corrections: bool = False,
    sum_pi_squared: bool = False,
):
    """A loss result of random data; `corrections`: the batch has reference and sampler
    log-probs too (for a KL term, a mismatch correction and off-policy masking);
    `sum_pi_squared`: and each token's sum of squared probabilities (the variance proxy)."""
    g = torch.Generator().manual_seed(seed)
    n = n_seqs * length
    logp = -torch.rand(n, generator=g) * 3
    old = (logp + torch.randn(n, generator=g) * 0.3).clamp(max=0.0)
    rewards = torch.rand(n_seqs, generator=g)
    rewards[:4] = 1.0  # one degenerate group of 4
    batch = Batch(
        logp=logp,
        old_logp=old,
        offsets=Batch.offsets_from_lengths(torch.full((n_seqs,), length)),
        mask=torch.rand(n, generator=g) > 0.2,
        rewards=rewards,
        group_ids=torch.arange(n_seqs) // 4,
    )
    if corrections:  # a sampler half the sequences of which are far off (mean q - logp ~ 0.5)
        far = (torch.arange(n) // length % 2 == 0).to(logp.dtype) * 0.5
        batch = dataclasses.replace(
            batch,
            ref_logp=(logp + torch.randn(n, generator=g) * 0.2).clamp(max=0.0),
            rollout_logp=(old + far + torch.randn(n, generator=g) * 0.3).clamp(max=0.0),
        )
    if sum_pi_squared:
        p = old.exp()
        batch = dataclasses.replace(batch, sum_pi_squared=p * p + (1 - p) ** 2 * torch.rand(n, generator=g))
    config = config or LossConfig(objective=Sapo())
    return config, Engine(device="cpu", compile=False).loss(batch, config)


# ---------------------------------------------------------------- bucketing


def _reference(values: np.ndarray, adv: np.ndarray, mask: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    out = np.zeros((3, len(edges) + 1))
    idx = np.searchsorted(np.asarray(edges), values, side="left")  # le semantics
    for si, sel in enumerate((adv > 0, adv < 0, adv == 0)):
        np.add.at(out[si], idx[sel & mask], 1)
    return out


@pytest.mark.parametrize("codes", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bucketing_matches_a_reference_exactly(dtype: torch.dtype, codes: str) -> None:
    # eager: the codes telemetry computes itself; compiled: those the engine's kernel writes
    g = torch.Generator().manual_seed(1)
    n = 20_000
    ratio = torch.exp(torch.randn(n, generator=g, dtype=dtype) * 0.2)
    ratio[:50] = torch.tensor(RATIO_EDGES[:25] * 2, dtype=dtype)  # values exactly on edges
    ratio[50] = 1e6  # +Inf bucket
    gate = torch.rand(n, generator=g, dtype=dtype)
    gate[:21] = torch.tensor(GATE_EDGES, dtype=dtype)
    adv = torch.randn(n, generator=g, dtype=dtype)
    adv[100:200] = 0.0
    mask = torch.rand(n, generator=g) > 0.3
    given = None
    if codes == "compiled":
        fn = torch.compile(bucket_codes, dynamic=True, fullgraph=True)
        rc, gc, sums = fn(
            ratio, gate, mask & (adv > 0), mask & (adv < 0), mask, bucket_edges(dtype, ratio.device)
        )
        given = (rc, gc, sums.tolist())
    b = Bucketer(cpu_sample_tokens=None)(ratio, gate, adv, mask, codes=given)
    assert b.stride == 1
    r_edges = tuple(float(torch.tensor(e, dtype=dtype)) for e in RATIO_EDGES)
    g_edges = tuple(float(torch.tensor(e, dtype=dtype)) for e in GATE_EDGES)
    np.testing.assert_array_equal(
        b.ratio_counts, _reference(ratio.numpy(), adv.numpy(), mask.numpy(), r_edges)
    )
    np.testing.assert_array_equal(b.gate_counts, _reference(gate.numpy(), adv.numpy(), mask.numpy(), g_edges))
    for si, sel in enumerate((adv > 0, adv < 0, adv == 0)):
        assert b.ratio_sums[si] == pytest.approx(float(ratio[sel & mask].double().sum()), rel=1e-5)
        assert b.gate_sums[si] == pytest.approx(float(gate[sel & mask].double().sum()), rel=1e-5)
    assert b.ratio_counts.sum() == int(mask.sum())
    # the torch counting that every other device runs counts the same codes alike
    m = mask
    rc, gc, _ = bucket_codes(ratio, gate, m & (adv > 0), m & (adv < 0), m, bucket_edges(dtype, ratio.device))
    for got, want in zip(_counts_torch(rc, gc), _counts_numpy(rc.numpy(), gc.numpy()), strict=True):
        np.testing.assert_array_equal(got, want)


def test_large_cpu_batches_are_sampled_and_scaled() -> None:
    """A sampled CPU batch scales its counts and its ratio and gate weight sums by the stride."""
    n = 100_000
    ratio = torch.full((n,), 1.0)
    adv = torch.ones(n)
    adv[n // 2 :] = -1
    b = Bucketer(cpu_sample_tokens=10_000)(ratio, torch.full((n,), 0.5), adv, torch.ones(n, dtype=torch.bool))
    assert b.stride == 10
    assert b.ratio_counts.sum() == n
    assert b.ratio_counts[0].sum() == n // 2 and b.ratio_counts[1].sum() == n // 2
    assert b.ratio_sums[0] == pytest.approx(n / 2)
    assert b.gate_sums[0] == pytest.approx(n / 4) and b.gate_sums[1] == pytest.approx(n / 4)


def test_a_result_the_engine_sampled_gives_the_same_histograms() -> None:
    # the server asks the engine for a strided sample of ratio and gate weight when a request
    # wants neither (Engine.loss sample_tokens): the histograms must equal those of the
    # bucketer sampling the whole tensors itself
    config = LossConfig(objective=Sapo())
    n = 32 * 64
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(n, generator=g) * 3
    batch = Batch(
        logp=logp,
        old_logp=(logp + torch.randn(n, generator=g) * 0.3).clamp(max=0.0),
        offsets=Batch.offsets_from_lengths(torch.full((32,), 64)),
        mask=torch.rand(n, generator=g) > 0.2,
        advantages=torch.randn(n, generator=g),
    )
    eng = Engine(device="cpu", compile=False)
    whole, sampled = eng.loss(batch, config), eng.loss(batch, config, sample_tokens=300)
    assert (
        sampled.sample_stride == 7 and sampled.ratio.numel() == -(-n // 7) and sampled.clip_mask.numel() == 0
    )
    exported = []
    for res in (whole, sampled):
        tel = PrometheusTelemetry(S(sample=300))
        tel.observe_loss("r", config, res)
        exported.append([x for x in _samples(tel) if x[0].startswith("softgate_token_")])
    assert exported[0] == exported[1] and len(exported[0]) > 20


# ---------------------------------------------------------------- run labels


def test_run_registry_keeps_the_most_recent_runs() -> None:
    reg = RunRegistry(max_runs=2)
    for name in ["a", "b", "a", "c"]:  # b is the least recently active when c arrives
        reg.state(name)
    assert reg.names() == ["a", "c"]
    assert reg.evictions == 1 and reg.get("b") is None


def test_a_dropped_run_that_comes_back_is_counted() -> None:
    """An audit: three runs training on max_runs 2 evicted one at every call, each run's
    counters held one batch and its ratio rules read +-Inf; nothing told why. A return counts."""
    reg = RunRegistry(max_runs=2)
    for name in ["a", "b", "c", "d"]:  # a and b dropped: runs that ended, no return
        reg.state(name)
    assert (reg.evictions, reg.returns) == (2, 0)
    for name in ["a", "c", "d"]:  # a back (c dropped), c back (d dropped), d back (a dropped)
        reg.state(name)
    assert (reg.evictions, reg.returns) == (5, 3) and reg.names() == ["c", "d"]
    reg.EVICTED_NAMES = 1  # (the names remembered are bounded: here only the last dropped)
    reg.state("e")  # drops c
    reg.state("f")  # drops d, which pushes c out of the names remembered
    reg.state("c")
    assert (reg.evictions, reg.returns) == (8, 3)


def test_a_run_registry_keeps_at_least_one_run() -> None:
    """max_runs below 1 is 1: the run just seen keeps its own state."""
    reg = RunRegistry(max_runs=0)
    name, st = reg.state("a")
    assert reg.max_runs == 1 and reg.get(name) is st


def test_other_is_a_run_name_like_any_other() -> None:
    """Nothing is folded into `other` any more: a run may be named so, and it takes a slot."""
    reg = RunRegistry(max_runs=2)
    reg.state("a", now=1.0)
    reg.state("other", now=2.0)
    reg.state("b", now=3.0)  # evicts a, the least recently active
    assert reg.names() == ["other", "b"] and reg.evictions == 1
    reg.state("c", now=4.0)  # evicts other like any run
    assert reg.names() == ["b", "c"] and reg.evictions == 2


def test_max_runs_defaults_to_32() -> None:
    """Without settings the run label keeps 32 runs (the documented default)."""
    assert PrometheusTelemetry(None).max_runs == 32


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (None, "default"),
        ("", "default"),
        ("exp-1/seed:3", "exp-1/seed:3"),
        ('a"b\nc', "a_b_c"),
        ("x" * 100, "x" * 64),
    ],
)
def test_run_names_are_sanitized(raw: str | None, clean: str) -> None:
    assert sanitize_run(raw) == clean


def test_old_runs_are_dropped_and_counted() -> None:
    """Past max_runs the least recently active run is dropped: its series leave the exposition,
    /v1/runs forgets it, softgate_run_evictions_total counts it, and no run `other` appears."""
    tel = PrometheusTelemetry(S(max_runs=3))
    config, res = _engine_result()
    n_runs, per_run = 10, 2
    for i in range(n_runs):
        for _ in range(per_run):
            run = f"run-{i}"
            tel.request_started("Loss", run, 2048)
            tel.observe_loss(run, config, res)
            tel.request_finished("Loss", run, "OK", 0.01, 10, 20, 2048, 32)
    samples = _samples(tel)
    runs = {lab["run"] for name, lab, _ in samples if "run" in lab}
    assert runs == {"run-7", "run-8", "run-9"}
    batches = {lab["run"]: v for name, lab, v in samples if name == "softgate_loss_batches_total"}
    assert batches == {"run-7": 2, "run-8": 2, "run-9": 2}
    processed = sum(v for name, _, v in samples if name == "softgate_processed_tokens_total")
    assert processed == 3 * per_run * 2048
    assert [v for name, _, v in samples if name == "softgate_runs_tracked"] == [3]
    assert [v for name, _, v in samples if name == "softgate_run_evictions_total"] == [7]
    assert [v for name, _, v in samples if name == "softgate_run_returns_total"] == [0]
    assert tel.run_summary("run-0") is None and tel.run_summary("other") is None
    assert [r["run"] for r in tel.runs_overview()] == ["run-9", "run-8", "run-7"]
    assert "folded_runs" not in tel.run_summary("run-9")


def test_an_empty_call_takes_no_run_slot_and_moves_no_window() -> None:
    """Found by an audit: an empty ComputeLoss (no sequence) or ComputeAdvantages (no reward),
    both answered OK, took a run's slot, so a new run's empty call evicted a run's whole history,
    and an old run's diluted its advantage windows (an empty record weighed 1, value 0)."""
    from softgate.engine import AdvantageConfig

    tel = PrometheusTelemetry(S(max_runs=2))
    eng = Engine(device="cpu", compile=False)
    config, res = _engine_result()
    rewards = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    for run in ("a", "b"):
        tel.observe_loss(run, config, res)
        tel.observe_advantages(
            run,
            AdvantageConfig(),
            eng.advantages(rewards, torch.zeros(4, dtype=torch.long), AdvantageConfig()),
        )
    before = tel.run_summary("b")
    empty = Batch(logp=torch.zeros(0), offsets=torch.zeros(1, dtype=torch.long), advantages=torch.zeros(0))
    for run in ("new", "b"):
        tel.observe_loss(run, config, eng.loss(empty, config))
        none = torch.zeros(0, dtype=torch.float64)
        tel.observe_advantages(
            run, AdvantageConfig(), eng.advantages(none, torch.zeros(0, dtype=torch.long), AdvantageConfig())
        )
    assert [r["run"] for r in tel.runs_overview()] == ["b", "a"]
    assert tel.run_summary("b") == before
    assert tel.run_summary("new") is None and tel.runs.evictions == 0


def test_an_eviction_adds_nothing_to_the_series_that_remain() -> None:
    """Found by an audit: the evicted run's lifetime totals were added to run="other" in one
    scrape, so sum(rate(...)) over all runs spiked by its whole history. Now every series of
    the scrape after an eviction is either the new run's or unchanged, and the evicted run's
    are gone; a run that comes back starts afresh."""
    tel = PrometheusTelemetry(S(max_runs=2))
    config, res = _engine_result()
    for run, n in (("big", 5), ("a", 1)):
        for _ in range(n):
            tel.observe_loss(run, config, res)
            tel.request_finished("ComputeLoss", run, "OK", 0.01, 10, 20, 2048, 32)

    def run_series() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(n, tuple(sorted(lab.items()))): v for n, lab, v in _samples(tel) if "run" in lab}

    before = run_series()
    tel.observe_loss("b", config, res)  # evicts big
    tel.request_finished("ComputeLoss", "b", "OK", 0.01, 10, 20, 2048, 32)
    after = run_series()
    assert not [k for k in after if ("run", "big") in k[1]]
    assert {dict(k[1])["run"] for k in after} == {"a", "b"}
    for key, v in after.items():
        if dict(key[1])["run"] == "a":
            assert before[key] == v, key  # untouched: no history added to it
    tokens = sum(v for (n, _), v in after.items() if n == "softgate_processed_tokens_total")
    assert tokens == 2 * 2048  # a's and b's own, not big's
    tel.observe_loss("big", config, res)  # back: starts afresh
    assert _value(tel, "softgate_loss_batches_total", run="big") == 1
    assert tel.runs.evictions == 2  # (a left for it)


def test_a_call_without_work_takes_no_runs_slot() -> None:
    """Found by an audit: a ListAlgorithms call (the client's own limit ask, under `default`)
    registered its run, so three trainers' runs on a max_runs=3 server lost one to `other`."""
    tel = PrometheusTelemetry(S(max_runs=3))
    config, res = _engine_result()
    for run in ("a", "b", "c"):
        tel.observe_loss(run, config, res)
        tel.request_finished("ComputeLoss", run, "OK", 0.01, 10, 20, 2048, 32)
    tel.request_finished("ListAlgorithms", "default", "OK", 0.001, 0, 900, 0, 0)
    tel.kick()
    assert sorted(r["run"] for r in tel.runs_overview()) == ["a", "b", "c"]
    samples = _samples(tel)
    assert [v for name, _, v in samples if name == "softgate_run_evictions_total"] == [0]
    assert not [lab for name, lab, _ in samples if lab.get("rpc") == "ListAlgorithms" and "run" in lab]


def test_run_windows_summarise_compute_advantages_calls() -> None:
    """Found by an audit: a trainer that asks ComputeAdvantages first, then the loss from its
    advantages, saw no degenerate-group share or reward mean in /v1/runs, while Grafana (the
    same run's histogram and gauges) had them. Each window now summarises those calls too."""
    from softgate.engine import AdvantageConfig

    tel = PrometheusTelemetry(S())
    e = Engine(device="cpu", compile=False)
    config, res = _engine_result()
    results = []
    for i, size in enumerate((8, 24)):  # one group of 4 degenerate in the first call only
        rewards = torch.rand(size, generator=torch.Generator().manual_seed(i))
        if i == 0:
            rewards[:4] = 1.0
        results.append(e.advantages(rewards, torch.arange(size) // 4, AdvantageConfig()))
        tel.observe_advantages("r", AdvantageConfig(), results[-1])
        tel.observe_loss("r", LossConfig(), res)
    tel.kick()
    summary = tel.run_summary("r")
    assert summary["totals"]["advantage_calls"] == 2
    w = summary["windows"]["last_10_batches"]
    assert w["batches"] == 2  # the loss batches
    a = w["advantages"]
    assert a["calls"] == 2 and a["sequences"] == 32
    m = [r.metrics for r in results]
    assert a["degenerate_group_fraction"] == pytest.approx((8 * m[0]["degenerate_group_frac"]) / 32)
    assert m[0]["degenerate_group_frac"] == 0.5 and m[1]["degenerate_group_frac"] == 0
    assert a["reward_mean"] == pytest.approx((8 * m[0]["reward_mean"] + 24 * m[1]["reward_mean"]) / 32)
    assert a["advantage_std"] == pytest.approx((8 * m[0]["adv_std"] + 24 * m[1]["adv_std"]) / 32)
    hist = {n: v for n, lab, v in _samples(tel) if n.startswith("softgate_batch_degenerate_group_fraction_")}
    assert hist["softgate_batch_degenerate_group_fraction_count"] == 2 + 2  # (the loss batches' too)
    # a run that never asked for advantages has no such summary
    tel.observe_loss("s", config, res)
    tel.kick()
    assert "advantages" not in tel.run_summary("s")["windows"]["last_10_batches"]
    assert tel.run_summary("s")["totals"]["advantage_calls"] == 0


def test_run_windows_weigh_a_signs_statistic_by_that_signs_tokens() -> None:
    """Found by an audit: a batch without A>0 tokens added its stand-in gate saturation 0 and
    gate mean 1 to the A>0 window, weighted by all its tokens, so the API read a run as
    healthier than Grafana did. Each sign's statistic is now weighed by that sign's tokens."""
    tel = PrometheusTelemetry(S(sample=None))
    e = Engine(device="cpu", compile=False)
    g = torch.Generator().manual_seed(5)
    results = []
    for sign, n in ((1.0, 48), (-1.0, 16)):  # a batch of A>0 tokens only, then one of A<0 only
        logp = -torch.rand(n, generator=g) - 0.1
        old = (logp + torch.randn(n, generator=g)).clamp(max=0.0)  # ratios far from 1
        batch = Batch(logp=logp, old_logp=old, offsets=torch.tensor([0, n]), advantages=torch.tensor([sign]))
        results.append(e.loss(batch, LossConfig()))
        tel.observe_loss("r", LossConfig(), results[-1])
    tel.kick()
    pos, neg = (r.metrics for r in results)
    w = tel.run_summary("r")["windows"]["last_10_batches"]
    # a trainer's own run name finds its run, as the label was made of it (found by the audit)
    tel.observe_loss("x" * 70 + " #1", LossConfig(), results[0])
    assert tel.run_summary("x" * 70 + " #1") == tel.run_summary("x" * 64)
    for key, want in (
        ("gate_saturation_pos", pos["gate_saturation_pos"]),
        ("gate_mean_pos", pos["gate_mean_pos"]),
        ("gate_saturation_neg", neg["gate_saturation_neg"]),
        ("gate_mean_neg", neg["gate_mean_neg"]),
    ):
        assert w[key] == pytest.approx(want), key
    assert pos["gate_saturation_pos"] > 0 and pos["gate_mean_pos"] < 1 and neg["gate_mean_neg"] < 1
    # likewise the dual clip's per-batch histogram (a share of A<0 tokens): one batch had them
    tel.observe_loss("g", LossConfig(objective=Grpo(dual_clip=3.0)), results[0])  # A>0 only
    tel.kick()
    counts = [
        v
        for n, lab, v in _samples(tel)
        if n == "softgate_batch_dual_clip_fraction_count" and lab["run"] == "g"
    ]
    assert counts in ([], [0.0])


# ---------------------------------------------------------------- exposition


def test_exposition_follows_the_conventions() -> None:
    tel = PrometheusTelemetry(S())
    config, res = _engine_result()
    tel.observe_loss("r", config, res)
    gconfig, gres = _engine_result(config=LossConfig(objective=Grpo(dual_clip=3.0)), seed=2)
    tel.observe_loss("r", gconfig, gres)
    tel.request_started("Loss", "r", 10)
    tel.request_finished("Loss", "r", "OK", 0.2, 100, 200, 10, 1)
    tel.rejected("Loss", ["non_finite", "bad_shape"])
    fams = list(text_string_to_metric_families(tel.exposition().decode()))
    names = {f.name for f in fams}
    for f in fams:
        assert f.name.startswith("softgate_"), f.name
        assert f.documentation, f.name
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples)
    for f in fams:
        if f.type != "histogram":
            continue
        by_series: dict[tuple, list[tuple[float, float]]] = {}
        counts: dict[tuple, float] = {}
        for s in f.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                le = math.inf if s.labels["le"] == "+Inf" else float(s.labels["le"])
                by_series.setdefault(key, []).append((le, s.value))
            elif s.name.endswith("_count"):
                counts[key] = s.value
        for key, buckets in by_series.items():
            buckets.sort()
            vals = [v for _, v in buckets]
            assert vals == sorted(vals), (f.name, key)  # cumulative
            assert buckets[-1][0] == math.inf and buckets[-1][1] == counts.get(key), (f.name, key, counts)
    for n in [
        "softgate_token_ratio",
        "softgate_token_gate_weight",
        "softgate_batch_gate_saturation",
        "softgate_batch_clip_fraction",
        "softgate_batch_grad_retained",
        "softgate_batch_approx_kl_positive",
        "softgate_batch_approx_kl_negative",
        "softgate_batch_degenerate_group_fraction",
        "softgate_request_duration_seconds",
        "softgate_device_info",
    ]:
        assert n in names, n
    samples = _samples(tel)
    signs = {lab["sign"] for name, lab, _ in samples if name == "softgate_token_ratio_count"}
    assert signs == {"pos", "neg"}  # A = 0 tokens carry no gradient: no distribution of theirs
    zero = _value(tel, "softgate_loss_tokens_total", run="r", objective="grpo", sign="zero")
    assert zero is not None and zero > 0  # (the degenerate group has A = 0: counted there)
    objectives = {lab["objective"] for name, lab, _ in samples if name == "softgate_loss_batches_total"}
    assert objectives == {"sapo", "grpo"}
    deg = [v for name, lab, v in samples if name == "softgate_degenerate_group_fraction"]
    assert deg == [pytest.approx(gres.metrics["degenerate_group_frac"])]
    # every sample name is one the dashboard checker knows about
    known = exported_names()
    service = {
        "softgate_requests",
        "softgate_request_duration_seconds",
        "softgate_request_bytes",
        "softgate_response_bytes",
        "softgate_in_flight_requests",
        "softgate_in_flight_tokens",
        "softgate_rejected_inputs",
        "softgate_busy_refusals",
        "softgate_device_info",
        "softgate_engine_configurations",
        "softgate_telemetry_errors",
    }
    for name, _, _ in samples:
        assert name in known or any(name.startswith(p) for p in service), name


def test_token_histograms_match_the_result_tensors() -> None:
    tel = PrometheusTelemetry(S(sample=None))
    config, res = _engine_result()
    tel.observe_loss("r", config, res)
    samples = _samples(tel)
    m = res.mask
    for sign, sel in (("pos", res.advantages > 0), ("neg", res.advantages < 0)):
        count = [
            v
            for name, lab, v in samples
            if name == "softgate_token_ratio_count" and lab["sign"] == sign and lab["run"] == "r"
        ]
        assert count == [float((m & sel).sum())]
        s = [
            v for name, lab, v in samples if name == "softgate_token_gate_weight_sum" and lab["sign"] == sign
        ]
        assert s[0] == pytest.approx(float(res.gate_weight[m & sel].sum()), rel=1e-5)
    ones = [
        v
        for name, lab, v in samples
        if name == "softgate_token_ratio_bucket" and lab["le"] == "1.0" and lab["sign"] == "pos"
    ]
    assert ones == [float((m & (res.advantages > 0) & (res.ratio <= 1.0)).sum())]


def test_sign_without_tokens_is_not_observed() -> None:
    tel = PrometheusTelemetry(S())
    n = 100
    res = LossResult(
        loss=0.0,
        policy_loss=0.0,
        kl_loss=0.0,
        grad=torch.zeros(n),
        advantages=torch.ones(n),
        ratio=torch.ones(n),
        gate_weight=torch.ones(n),
        clip_mask=torch.zeros(n, dtype=torch.bool),
        mask=torch.ones(n, dtype=torch.bool),
        metrics={"num_tokens": 100.0, "tokens_pos": 100.0, "tokens_neg": 0.0, "gate_saturation_neg": 0.0,
                 "gate_saturation_pos": 0.0, "num_groups": 0.0, "reward_mean": 0.0},
    )  # fmt: skip
    tel.observe_loss("r", LossConfig(), res)
    samples = _samples(tel)
    sat = {lab["sign"] for name, lab, _ in samples if name == "softgate_batch_gate_saturation_count"}
    assert sat == {"pos"}
    # the per-token histograms too get a series only for a sign with tokens in the batch
    for hist in ("softgate_token_ratio_count", "softgate_token_gate_weight_count"):
        assert {lab["sign"] for name, lab, _ in samples if name == hist} == {"pos"}, hist
    # no groups: no reward gauge (the engine's 0 means "undefined" there)
    assert not [1 for name, _, _ in samples if name == "softgate_reward_mean"]


def test_a_batch_without_a_policy_gradient_leaves_grad_retained_unobserved() -> None:
    """A batch of zero advantages has no gradient to retain (the engine's grad_retained 1 means
    "none"), and a fully masked one no KL: neither enters those histograms, so one batch of
    everything clipped next to one of zero advantages reads 0 retained, not 0.5 (which the
    SoftgateGradRetainedCollapse alert, < 0.5, did not see; an audit)."""
    tel = PrometheusTelemetry(S())
    E = Engine(device="cpu", compile=False)
    n = 8
    logp = torch.full((n,), -1.0)
    clipped = Batch(logp=logp, old_logp=logp - 1.0, offsets=torch.tensor([0, n]), advantages=torch.ones(1))
    zero = dataclasses.replace(clipped, advantages=torch.zeros(1))
    masked = dataclasses.replace(clipped, mask=torch.zeros(n, dtype=torch.bool))
    config = LossConfig(objective=Grpo())
    for b in (clipped, zero, masked):
        tel.observe_loss("r", config, E.loss(b, config))
    assert _value(tel, "softgate_batch_grad_retained_count") == 1
    assert _value(tel, "softgate_batch_grad_retained_sum") == 0.0
    assert _value(tel, "softgate_batch_approx_kl_positive_count") == 2  # (the zero-advantage batch has a KL)


def test_last_batch_gauges_keep_the_last_batch_that_had_their_tokens() -> None:
    """The `_last` gauges follow the histograms: after a batch of zero advantages,
    grad_retained_last still reads the last batch with a gradient (not the engine's 1 for
    "none"), and after a fully masked batch the ratio, KL and advantage gauges keep the last
    trained one's (the engine's 0 mean and std of no token are not a batch's values)."""
    tel = PrometheusTelemetry(S())
    E = Engine(device="cpu", compile=False)
    n = 8
    logp = torch.full((n,), -1.0)
    adv = torch.tensor([1.0, 3.0])
    clipped = Batch(logp=logp, old_logp=logp - 1.0, offsets=torch.tensor([0, n // 2, n]), advantages=adv)
    config = LossConfig(objective=Grpo())
    tel.observe_loss("r", config, E.loss(clipped, config))
    before = {
        k: _value(tel, k, run="r")
        for k in (
            "softgate_batch_grad_retained_last",
            "softgate_batch_approx_kl_last",
            "softgate_batch_ratio_mean",
            "softgate_batch_ratio_min",
            "softgate_batch_ratio_max",
            "softgate_advantage_mean",
            "softgate_advantage_std",
        )
    }
    assert before["softgate_batch_grad_retained_last"] == 0.0
    assert (before["softgate_advantage_mean"], before["softgate_advantage_std"]) == (2.0, 1.0)
    assert before["softgate_batch_ratio_max"] == pytest.approx(math.e)
    tel.observe_loss(
        "r", config, E.loss(dataclasses.replace(clipped, mask=torch.zeros(n, dtype=torch.bool)), config)
    )
    assert {k: _value(tel, k, run="r") for k in before} == before
    tel.observe_loss("r", config, E.loss(dataclasses.replace(clipped, advantages=torch.zeros(2)), config))
    assert _value(tel, "softgate_batch_grad_retained_last", run="r") == 0.0


def test_non_finite_engine_metrics_are_left_out_not_failed() -> None:
    """A NaN or inf metric is skipped (no gauge, no counter step); the batch is still recorded
    and the hook does not fail."""
    tel = PrometheusTelemetry(S())
    cfg = LossConfig(objective=Grpo())  # (an objective with a clip: SAPO records none)
    tel.observe_loss("r", cfg, loss_result(clip_high=math.nan, approx_kl=math.inf))
    errors = [v for n, _, v in _samples(tel) if n == "softgate_telemetry_errors_total" and v]
    assert errors == []
    assert _value(tel, "softgate_loss_batches_total", run="r") == 1
    assert _value(tel, "softgate_batch_approx_kl_last", run="r") is None
    assert _value(tel, "softgate_clipped_tokens_total", run="r", sign="pos") is None
    assert _value(tel, "softgate_clipped_tokens_total", run="r", sign="neg") is not None


def test_the_zero_sign_token_count_is_never_negative() -> None:
    """Without tokens_zero, the zero sign's tokens are num_tokens - pos - neg, at least 0."""
    res = loss_result()
    m = res.metrics
    del m["tokens_zero"]
    m["num_tokens"] = m["tokens_pos"] + m["tokens_neg"] - 5
    tel = PrometheusTelemetry(S())
    tel.observe_loss("r", LossConfig(), res)
    assert _value(tel, "softgate_loss_tokens_total", run="r", sign="zero") == 0


def test_loss_token_totals_are_keyed_by_sign() -> None:
    """run_summary totals.loss_tokens maps each sign to its tokens."""
    res = loss_result()
    tel = PrometheusTelemetry(S())
    tel.observe_loss("r", LossConfig(), res)
    summary = tel.run_summary("r")
    assert summary is not None
    assert summary["totals"]["loss_tokens"] == {
        "neg": int(res.metrics["tokens_neg"]),
        "pos": int(res.metrics["tokens_pos"]),
        "zero": 0,
    }


def test_per_batch_histograms_and_the_kl_summary_carry_each_batchs_values() -> None:
    """gate_mean_pos / gate_mean_neg land under their own sign; approx_kl is a summary whose
    _count and _sum are the batches' count and sum."""
    tel = PrometheusTelemetry(S())
    tel.observe_loss("r", LossConfig(), loss_result(approx_kl=0.25))
    tel.observe_loss("r", LossConfig(), loss_result(seed=1, approx_kl=0.5))
    name = "softgate_batch_gate_weight_mean_sum"
    assert _value(tel, name, run="r", sign="pos") == pytest.approx(1.8)
    assert _value(tel, name, run="r", sign="neg") == pytest.approx(1.6)
    assert _value(tel, "softgate_batch_approx_kl_positive_count", run="r") == 2
    assert _value(tel, "softgate_batch_approx_kl_positive_sum", run="r") == pytest.approx(0.75)
    # a negative approx KL goes to its negative part: each part's _sum only grows, so rate() reads
    # it (a review: a _sum that went down read as a counter reset, a mean of 0.0005 as 6.0)
    tel.observe_loss("r", LossConfig(), loss_result(seed=2, approx_kl=-0.125))
    assert _value(tel, "softgate_batch_approx_kl_positive_sum", run="r") == pytest.approx(0.75)
    assert _value(tel, "softgate_batch_approx_kl_negative_sum", run="r") == pytest.approx(0.125)
    assert _value(tel, "softgate_batch_approx_kl_negative_count", run="r") == 3


BATCH_STATS = (
    "softgate_batch_clip_fraction",
    "softgate_batch_dual_clip_fraction",
    "softgate_batch_gate_saturation",
    "softgate_batch_gate_weight_mean",
    "softgate_batch_grad_retained",
    "softgate_batch_degenerate_group_fraction",
    "softgate_batch_approx_kl_positive",
    "softgate_batch_approx_kl_negative",
)


def test_per_batch_statistics_are_exported_without_buckets() -> None:
    """Found by an audit: the per-batch statistics' buckets were never queried (every panel and
    rule divides _sum by _count), piled into one bucket, and were 44% of a run's series. Each is
    a count and a sum now."""
    tel = PrometheusTelemetry(S())
    config, res = _engine_result(config=LossConfig(objective=Grpo(dual_clip=3.0)))
    tel.observe_loss("r", config, res)
    fams = {f.name: f for f in text_string_to_metric_families(tel.exposition().decode())}
    for name in BATCH_STATS:
        assert fams[name].type == "summary", name
        got = {s.name for s in fams[name].samples}
        assert got == {name + "_count", name + "_sum"}, (name, got)
    assert _value(tel, "softgate_batch_grad_retained_count", run="r") == 1
    assert _value(tel, "softgate_batch_grad_retained_sum", run="r") == pytest.approx(
        res.metrics["grad_retained"]
    )


CORRECTIONS = LossConfig(
    objective=Grpo(),
    kl=KLConfig("k3", beta=0.1, value_clamp=0.01),  # (x ~ 0.2: about half the tokens clamp)
    mismatch=MismatchConfig(mode="mask", lo=0.7, hi=1.3, batch_normalize=True),
    off_policy_mask_threshold=0.2,
    rejection=(RejectionCriterion(1.5),),
    reward_kl=RewardKLConfig(beta=0.05, estimator="k3", level="sequence"),
)
CORRECTION_SERIES = {
    "softgate_rollout_rejected_tokens_total": ("rejected_tokens", "value"),
    "softgate_rollout_rejected_sequences_total": ("rejected_seqs", "value"),
    "softgate_kl_clamped_tokens_total": ("kl_clamped_frac", "count"),
    "softgate_mismatch_clipped_tokens_total": ("mismatch_clipped_frac", "count"),
    "softgate_off_policy_masked_tokens_total": ("off_policy_masked_frac", "count"),
    "softgate_batch_kl_mean_positive_sum": ("kl_mean", "value"),  # (k3's, >= 0)
    "softgate_batch_reward_kl_positive_sum": ("reward_kl_mean", "value"),
    "softgate_batch_mismatch_weight_mean_sum": ("mismatch_weight_mean", "value"),
    "softgate_batch_mismatch_norm_factor_sum": ("mismatch_norm_factor", "value"),
    "softgate_batch_rollout_kl_positive_sum": ("rollout_kl", "value"),
    "softgate_batch_rollout_k3_kl_sum": ("rollout_k3_kl", "value"),
}


def test_off_policy_corrections_are_exported_for_the_batches_that_have_them() -> None:
    """A KL term, a mismatch correction and off-policy masking each export what they did (the
    tokens they changed as counters, their mean weight and KL as per-batch summaries) and show
    in the run's windows; a batch without them exports none of those series, so its neutral
    0 / 1 never dilutes the others'."""
    tel = PrometheusTelemetry(S())
    config, res = _engine_result(config=CORRECTIONS, corrections=True)
    m, n_tok = res.metrics, res.metrics["num_tokens"]
    assert 0 < m["mismatch_clipped_frac"] < 1 and 0 < m["off_policy_masked_frac"] < 1 and m["kl_mean"] > 0
    assert m["reward_kl_mean"] > 0 and 0 < m["kl_clamped_tokens"] < n_tok
    m = {**m, "kl_clamped_frac": m["kl_clamped_tokens"] / n_tok}
    assert m["mismatch_weight_mean"] != 1.0 and m["mismatch_norm_factor"] not in (0.0, 1.0)
    tel.observe_loss("r", config, res)
    for name, (key, kind) in CORRECTION_SERIES.items():
        want = round(m[key] * n_tok) if kind == "count" else m[key]
        assert _value(tel, name, run="r", objective="grpo") == pytest.approx(want), name
    assert _value(tel, "softgate_batch_kl_mean_positive_count", run="r", objective="grpo") == 1
    summary = tel.run_summary("r")
    assert summary is not None
    window = summary["windows"]["last_10_batches"]
    for key in (
        "kl_mean",
        "kl_clamped_frac",
        "reward_kl_mean",
        "mismatch_weight_mean",
        "mismatch_clipped_frac",
        "mismatch_norm_factor",
        "off_policy_masked_frac",
    ):
        assert window[key] == pytest.approx(m[key]), key
    assert window["rollout_kl"] == pytest.approx(m["rollout_kl"]) and m["rollout_k3_kl"] > 0
    assert window["rollout_k3_kl"] == pytest.approx(m["rollout_k3_kl"])
    assert m["rejected_tokens"] > 0 and 0 < m["rejected_seqs"] <= m["rejected_tokens"]
    assert window["rejected_frac"] == pytest.approx(m["rejected_tokens"] / (n_tok + m["rejected_tokens"]))

    # a window's rejected share is over the tokens sent: a batch rejecting everything counts
    # fully, not as a batch of no trained tokens (a review: two 100-token batches rejecting 90
    # and 10 read 0.18)
    from softgate.observability.runs import BatchRecord, summarize

    def rec(trained: float, rejected: float) -> BatchRecord:
        values = {"tokens_pos": trained, "tokens_neg": 0.0, "tokens_zero": 0.0, "tokens_rejected": rejected,
                  "rejected_frac": rejected / (trained + rejected)}  # fmt: skip
        return BatchRecord(t=0.0, objective="grpo", tokens=int(trained), seqs=1, groups=0, values=values)

    assert summarize([rec(10, 90), rec(90, 10)])["rejected_frac"] == pytest.approx(0.5)
    assert summarize([rec(0, 100)])["rejected_frac"] == 1.0

    # without them (and without rollout_logp): no series, no window keys, whatever the engine's
    # neutral values
    plain = PrometheusTelemetry(S())
    config, res = _engine_result(config=LossConfig(objective=Grpo()))
    plain.observe_loss("p", config, res)
    names = {n for n, lab, _ in _samples(plain) if lab.get("run") == "p"}
    assert not names & {*CORRECTION_SERIES, "softgate_batch_kl_mean_positive_count"}
    summary = plain.run_summary("p")
    assert summary is not None
    window_keys = {
        "kl_mean",
        "reward_kl_mean",
        "mismatch_weight_mean",
        "mismatch_norm_factor",
        "off_policy_masked_frac",
    }
    window_keys |= {"rejected_frac", "rollout_kl"}
    assert not window_keys & set(summary["windows"]["last_10_batches"])
    # rollout_logp alone: the sampler's KL, nothing else
    config, res = _engine_result(config=LossConfig(objective=Grpo()), corrections=True)
    plain.observe_loss("q", config, res)
    names = {n for n, lab, _ in _samples(plain) if lab.get("run") == "q"}
    assert {n for n in CORRECTION_SERIES if n in names} == {
        "softgate_batch_rollout_kl_positive_sum",
        "softgate_batch_rollout_k3_kl_sum",
    }


VARIANCE_PROXY = ("variance_proxy_total_power", "variance_proxy_a_squared", "variance_proxy_w")


def test_the_variance_proxy_is_exported_for_the_batches_with_sum_pi_squared() -> None:
    """verl's gradient-variance proxy: a per-batch summary each and a run window, for the
    batches that sent sum_pi_squared; the others export none (their neutral 0 would dilute)."""
    tel = PrometheusTelemetry(S())
    cfg = LossConfig(objective=Grpo(), mismatch=MismatchConfig(mode="truncate", cap=1.2))
    config, res = _engine_result(config=cfg, corrections=True, sum_pi_squared=True)
    m = res.metrics
    assert all(m[k] > 0 for k in VARIANCE_PROXY) and m["variance_proxy_tokens"] == m["num_tokens"]
    tel.observe_loss("r", config, res)
    tel.observe_loss("r", *_engine_result(config=cfg, corrections=True))  # (without: none exported)
    for k in VARIANCE_PROXY:
        assert _value(tel, f"softgate_batch_{k}_sum", run="r", objective="grpo") == pytest.approx(m[k]), k
        assert _value(tel, f"softgate_batch_{k}_count", run="r", objective="grpo") == 1, k
    summary = tel.run_summary("r")
    assert summary is not None
    window = summary["windows"]["last_10_batches"]
    assert {k: window[k] for k in VARIANCE_PROXY} == pytest.approx({k: m[k] for k in VARIANCE_PROXY})
    # a W that rounding took below 0 counts 0: a summary's _sum must not go down
    low = dataclasses.replace(res, metrics={**m, "variance_proxy_w": -1e-4})
    tel.observe_loss("r", config, low)
    assert _value(tel, "softgate_batch_variance_proxy_w_sum", run="r", objective="grpo") == pytest.approx(
        m["variance_proxy_w"]
    )
    assert _value(tel, "softgate_batch_variance_proxy_w_count", run="r", objective="grpo") == 2
    # saturated batches (float64's largest) count 1e300 each: the _sum stays finite (an audit:
    # +Inf for good, and every rate() of it NaN)
    top = dataclasses.replace(res, metrics={**m, "variance_proxy_w": sys.float_info.max})
    for _ in range(3):
        tel.observe_loss("r", config, top)
    w_sum = _value(tel, "softgate_batch_variance_proxy_w_sum", run="r", objective="grpo")
    assert w_sum == pytest.approx(3e300, rel=1e-9)
    # a window's mean is over sequences: a batch of twice the sequences weighs twice
    config, big = _engine_result(n_seqs=64, seed=1, config=cfg, corrections=True, sum_pi_squared=True)
    two = PrometheusTelemetry(S())
    two.observe_loss("s", config, res)
    two.observe_loss("s", config, big)
    summary = two.run_summary("s")
    assert summary is not None
    want = (m["variance_proxy_total_power"] + 2 * big.metrics["variance_proxy_total_power"]) / 3
    assert summary["windows"]["last_10_batches"]["variance_proxy_total_power"] == pytest.approx(want)


def test_a_kl_that_may_be_negative_comes_as_its_two_parts() -> None:
    """k1's mean KL, of a KL term or in the reward, may be negative: exported as _positive and
    _negative parts, sums that only grow (a summary's _sum that went down read as a counter
    reset to rate(), as approx KL's once did), each batch counted once in _positive_count."""
    tel = PrometheusTelemetry(S())
    cfg = LossConfig(
        objective=Grpo(), kl=KLConfig("k1", beta=0.1), reward_kl=RewardKLConfig(beta=0.1, level="sequence")
    )
    config, res = _engine_result(config=cfg, corrections=True)
    res = dataclasses.replace(res, metrics={**res.metrics, "kl_mean": -0.25, "reward_kl_mean": 0.5})
    tel.observe_loss("r", config, res)
    got = {
        f"{base}_{part}_{stat}": _value(tel, f"{base}_{part}_{stat}", run="r", objective="grpo")
        for base in ("softgate_batch_kl_mean", "softgate_batch_reward_kl")
        for part in ("positive", "negative")
        for stat in ("sum", "count")
    }
    assert got == {
        "softgate_batch_kl_mean_positive_sum": 0.0,
        "softgate_batch_kl_mean_positive_count": 1,
        "softgate_batch_kl_mean_negative_sum": 0.25,
        "softgate_batch_kl_mean_negative_count": 1,
        "softgate_batch_reward_kl_positive_sum": 0.5,
        "softgate_batch_reward_kl_positive_count": 1,
        "softgate_batch_reward_kl_negative_sum": 0.0,
        "softgate_batch_reward_kl_negative_count": 1,
    }


def test_unscored_sequences_are_counted_apart() -> None:
    """softgate_reward_sequences_total: the sequences whose advantages came from rewards,
    status="unscored" those with none that applied (skip_nan_components), from ComputeAdvantages
    and ComputeLoss alike; a batch with the caller's advantages is not counted."""
    from reference_loss import random_batch
    from softgate.engine import AdvantageConfig

    eng = Engine(device="cpu", compile=False)
    tel = PrometheusTelemetry(S())
    rewards = torch.rand(8, 2, dtype=torch.float64)
    rewards[[1, 6]] = math.nan  # no component applies
    rewards[3, 0] = math.nan  # one does
    skip = AdvantageConfig("gdpo", skip_nan_components=True)
    adv = eng.advantages(rewards, torch.arange(8) // 4, skip)
    assert adv.metrics["unscored_seqs"] == 2.0
    tel.observe_advantages("r", skip, adv)
    tel.flush()
    assert _value(tel, "softgate_reward_sequences_total", run="r", status="unscored") == 2.0
    assert _value(tel, "softgate_reward_sequences_total", run="r", status="scored") == 6.0
    config, res = _engine_result(n_seqs=8, length=4, config=LossConfig(advantages=skip))
    tel.observe_loss("r", config, res)
    tel.flush()
    assert _value(tel, "softgate_reward_sequences_total", run="r", status="scored") == 14.0
    # a loss batch with an unscored sequence
    b = random_batch(3, num_seqs=6, max_len=5)
    assert b.rewards is not None
    b.rewards[4] = math.nan
    cfg = LossConfig(advantages=AdvantageConfig(skip_nan_components=True))
    res = eng.loss(b, cfg)
    assert res.metrics["unscored_seqs"] == 1.0
    tel.observe_loss("r", cfg, res)
    tel.flush()
    assert _value(tel, "softgate_reward_sequences_total", run="r", status="unscored") == 3.0
    assert _value(tel, "softgate_reward_sequences_total", run="r", status="scored") == 19.0
    # the caller's advantages (rewards only reported beside them): not counted
    sent = eng.loss(dataclasses.replace(b, advantages=torch.ones(6)), cfg)
    assert sent.metrics["unscored_seqs"] == 1.0
    tel.observe_loss("r", cfg, sent)
    tel.flush()
    assert _value(tel, "softgate_reward_sequences_total", run="r", status="unscored") == 3.0
    assert _value(tel, "softgate_reward_sequences_total", run="r", status="scored") == 19.0
    # /v1/runs: the share, weighted by sequences (8 with none, 6 with one; the third batch's
    # advantages were the caller's), and of the ComputeAdvantages call
    summary = tel.run_summary("r")
    assert summary is not None
    window = summary["windows"]["last_10_batches"]
    assert window["unscored_frac"] == pytest.approx(1 / 14)
    assert window["advantages"]["unscored_frac"] == 0.25


def test_reward_statistics_read_the_scored_sequences_only() -> None:
    """A batch whose rewards are all NaN (skip_nan_components) has no reward mean: the
    engine's 0 is not recorded (a sandbox down showed as a reward crash), and reward_mean
    weighs each batch by its scored sequences; the unscored share by all of them (the
    advantages' too, by sequences, not groups)."""
    from reference_loss import random_batch
    from softgate.engine import AdvantageConfig

    eng = Engine(device="cpu", compile=False)
    tel = PrometheusTelemetry(S())
    cfg = LossConfig(advantages=AdvantageConfig(skip_nan_components=True))
    for unscored in (0, 8, 7):
        b = random_batch(11, num_seqs=8, max_len=4)
        assert b.rewards is not None
        b.rewards[:] = 1.0
        b.rewards[:unscored] = math.nan
        tel.observe_loss("r", cfg, eng.loss(b, cfg))
        tel.flush()
        assert _value(tel, "softgate_reward_mean", run="r") == 1.0
    window = tel.run_summary("r")["windows"]["last_10_batches"]  # type: ignore[index]
    assert window["reward_mean"] == 1.0 and window["unscored_frac"] == pytest.approx(15 / 24)
    skip = AdvantageConfig(skip_nan_components=True)
    first = torch.tensor([2.0, math.nan, 1.0, 0.0, 2.0, 2.0, math.nan, 0.0], dtype=torch.float64)
    tel.observe_advantages("r", skip, eng.advantages(first, torch.arange(8) // 4, skip))
    second = torch.full((4,), 4.0, dtype=torch.float64)
    tel.observe_advantages("r", skip, eng.advantages(second, torch.arange(4), skip))
    advantages = tel.run_summary("r")["windows"]["last_10_batches"]["advantages"]  # type: ignore[index]
    assert advantages["unscored_frac"] == pytest.approx(2 / 12)
    assert advantages["reward_mean"] == pytest.approx((7.0 + 16.0) / 10)


def test_the_series_of_a_run_are_as_documented() -> None:
    """docs/observability.md ("Run label") says how many series one (run, objective) exports
    and how many more the run itself: a batch with every sign, clip and gauge, and a
    ComputeAdvantages call, export exactly those."""
    import re
    from pathlib import Path

    from softgate.engine import AdvantageConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    m = re.search(r"(\d+) series per \(run, objective\) and (\d+) per run", doc)
    assert m, "docs/observability.md no longer states the series per run"
    per_objective, per_run = int(m.group(1)), int(m.group(2))
    tel = PrometheusTelemetry(S())
    config, res = _engine_result(config=LossConfig(objective=Grpo(dual_clip=3.0)))
    tel.observe_loss("r", config, res)
    tel.request_finished("ComputeLoss", "r", "OK", 0.01, 10, 20, 2048, 32)
    adv = Engine(device="cpu", compile=False).advantages(
        torch.rand(8), torch.arange(8) // 4, AdvantageConfig()
    )
    tel.observe_advantages("r", AdvantageConfig(), adv)
    tel.request_finished("ComputeAdvantages", "r", "OK", 0.01, 10, 20, 0, 8)
    samples = [(n, lab) for n, lab, _ in _samples(tel) if lab.get("run") == "r"]
    assert len([1 for _, lab in samples if "objective" in lab]) == per_objective
    assert len([1 for _, lab in samples if "objective" not in lab]) == per_run

    m = re.search(
        r"A batch with rollout_logp adds (\d+) series, a KL term (\d+), a KL in the reward (\d+), "
        r"a mismatch correction (\d+), "
        r"off-policy sequence masking (\d+), rollout rejection (\d+)",
        re.sub(r"\s+", " ", doc),
    )
    assert m, "docs/observability.md no longer states the series of the corrections"
    rollout, *extras = map(int, m.groups())
    for extra, part in zip(
        [0, *(rollout + e for e in extras)],  # (the batch below has rollout_logp)
        (
            {},
            dict(kl=KLConfig()),
            dict(reward_kl=RewardKLConfig(beta=0.1)),
            dict(mismatch=MismatchConfig()),
            dict(off_policy_mask_threshold=0.1),
            dict(rejection=(RejectionCriterion(1.5),)),
        ),
        strict=True,
    ):
        tel = PrometheusTelemetry(S())
        config, res = _engine_result(
            config=LossConfig(objective=Grpo(dual_clip=3.0), **part), corrections=True
        )
        tel.observe_loss("r", config, res)
        got = [1 for _, lab, _ in _samples(tel) if lab.get("run") == "r" and "objective" in lab]
        assert len(got) == per_objective + (rollout if not part else extra), part
    proxy = re.search(r"`sum_pi_squared` \(the variance proxy\) (\d+)", re.sub(r"\s+", " ", doc))
    assert proxy, "docs/observability.md no longer states the variance proxy's series"
    tel = PrometheusTelemetry(S())
    config, res = _engine_result(config=LossConfig(objective=Grpo(dual_clip=3.0)), sum_pi_squared=True)
    tel.observe_loss("r", config, res)
    got = [1 for _, lab, _ in _samples(tel) if lab.get("run") == "r" and "objective" in lab]
    assert len(got) == per_objective + int(proxy.group(1))
    normalized = re.search(r"`batch_normalize` (\d+) more", re.sub(r"\s+", " ", doc))
    assert normalized, "docs/observability.md no longer states batch_normalize's series"
    tel = PrometheusTelemetry(S())
    cfg = LossConfig(objective=Grpo(dual_clip=3.0), mismatch=MismatchConfig(batch_normalize=True))
    config, res = _engine_result(config=cfg, corrections=True)
    tel.observe_loss("r", config, res)
    got = [1 for _, lab, _ in _samples(tel) if lab.get("run") == "r" and "objective" in lab]
    assert len(got) == per_objective + rollout + extras[2] + int(
        normalized.group(1)
    )  # (extras[2]: a mismatch)


def test_engine_configurations_are_read_at_scrape_time() -> None:
    """Every state is exported at 0 from start-up; once watched, each scrape reads the
    engine's counts (CompiledKernel.states) once, as they are then: one snapshot, so a
    configuration moving from compiling to compiled is never counted twice or missed."""
    tel = PrometheusTelemetry(S())
    reads = []

    def scraped() -> dict[str, float]:
        return {lab["state"]: v for n, lab, v in _samples(tel) if n == "softgate_engine_configurations"}

    assert scraped() == {"compiled": 0, "compiling": 0, "failed": 0, "over_limit": 0}
    counts = {"compiled": 2, "compiling": 1, "failed": 0, "over_limit": 0}

    def states() -> dict[str, int]:
        reads.append(1)
        return dict(counts)

    tel.watch_engine(states)
    assert scraped() == counts
    assert len(reads) == 1
    counts.update(compiling=0, compiled=3, over_limit=5)
    assert scraped() == counts
    assert len(reads) == 2


def test_in_flight_tokens_drop_by_the_finished_calls_own() -> None:
    """Found by an audit: a finished call took off the tokens of its run's oldest call in
    flight (a 100-token call ending before a 1M-token one left 100 in flight, not 1M)."""
    tel = PrometheusTelemetry(S())

    def tokens() -> float:
        return next(v for n, _, v in _samples(tel) if n == "softgate_in_flight_tokens")

    tel.request_started("ComputeLoss", "a", 1_000_000)
    tel.request_started("ComputeLoss", "a", 100)
    tel.request_finished("ComputeLoss", "a", "OK", 0.1, 1, 1, 100, 1)
    assert tokens() == 1_000_000
    tel.request_finished("ComputeLoss", "a", "OK", 0.1, 1, 1, 1_000_000, 1)
    assert tokens() == 0


def test_a_call_refused_before_it_started_leaves_the_in_flight_gauges_alone() -> None:
    """Found by an audit: a call refused at admission (RESOURCE_EXHAUSTED at the limit: when
    the gauges matter most) took the in-flight place of a running call of its run and rpc, so
    the gauges read one call and its tokens short while that call ran."""
    tel = PrometheusTelemetry(S())

    def gauges() -> tuple[float, float]:
        vals = {
            n: v
            for n, lab, v in _samples(tel)
            if n.startswith("softgate_in_flight") and lab.get("rpc") in (None, "ComputeLoss")
        }
        return vals["softgate_in_flight_requests"], vals["softgate_in_flight_tokens"]

    tel.request_started("ComputeLoss", "a", 4096)
    tel.request_finished("ComputeLoss", "a", "RESOURCE_EXHAUSTED", 0.0, 0, 0, 0, 0, False)
    assert gauges() == (1, 4096)
    tel.request_finished("ComputeLoss", "a", "OK", 0.1, 1, 1, 4096, 1)
    assert gauges() == (0, 0)


def test_in_flight_gauges_return_to_zero() -> None:
    tel = PrometheusTelemetry(S())
    tel.request_started("Loss", "a", 100)
    tel.request_started("Loss", "a", 50)
    tel.request_started("Advantages", "b", 7)
    vals = {(n, lab.get("rpc")): v for n, lab, v in _samples(tel) if n.startswith("softgate_in_flight")}
    assert vals[("softgate_in_flight_requests", "Loss")] == 2
    assert vals[("softgate_in_flight_tokens", None)] == 157
    tel.request_finished("Loss", "a", "OK", 0.1, 1, 1, 100, 1)
    tel.request_finished("Loss", "a", "INVALID_ARGUMENT", 0.1, 1, 1, 0, 0)  # tokens differ: still balanced
    tel.request_finished("Advantages", "b", "OK", 0.1, 1, 1, 7, 1)
    tel.request_finished("Loss", "zzz", "OK", 0.1, 1, 1, 7, 1)  # never started: ignored by the gauges
    vals = {(n, lab.get("rpc")): v for n, lab, v in _samples(tel) if n.startswith("softgate_in_flight")}
    assert all(v == 0 for v in vals.values()), vals
    codes: dict[str, float] = {}
    for n, lab, v in _samples(tel):
        if n == "softgate_requests_total" and v:
            codes[lab["code"]] = codes.get(lab["code"], 0) + v
    assert codes == {"OK": 3, "INVALID_ARGUMENT": 1}


def test_in_flight_bookkeeping_is_clamped_and_emptied() -> None:
    """A negative token count starts at 0 in flight; finished calls leave no per-run entry behind
    (one per run name ever seen would grow without bound)."""
    tel = PrometheusTelemetry(S())
    tel.request_started("ComputeLoss", "a", -5)
    assert _value(tel, "softgate_in_flight_tokens") == 0
    tel.request_finished("ComputeLoss", "a", "OK", 0.01, 1, 1, 0, 0)
    for i in range(5):
        tel.request_started("ComputeLoss", f"run-{i}", 10)
        tel.request_finished("ComputeLoss", f"run-{i}", "OK", 0.01, 1, 1, 10, 1)
    assert not tel._in_flight


def test_request_and_response_bytes_count_under_their_own_metric() -> None:
    """softgate_request_bytes counts what came in, softgate_response_bytes what went out."""
    tel = PrometheusTelemetry(S())
    tel.request_started("ComputeLoss", "a", 10)
    tel.request_finished("ComputeLoss", "a", "OK", 0.01, 1000, 20, 10, 1)
    assert _value(tel, "softgate_request_bytes_total", rpc="ComputeLoss") == 1000
    assert _value(tel, "softgate_response_bytes_total", rpc="ComputeLoss") == 20


def test_processed_sequences_count_sequences_not_tokens() -> None:
    """softgate_processed_sequences_total adds the call's sequences, the tokens counter its tokens."""
    tel = PrometheusTelemetry(S())
    tel.request_started("ComputeLoss", "r", 100)
    tel.request_finished("ComputeLoss", "r", "OK", 0.01, 1, 1, 100, 3)
    assert _value(tel, "softgate_processed_sequences_total", run="r", rpc="ComputeLoss") == 3
    assert _value(tel, "softgate_processed_tokens_total", run="r", rpc="ComputeLoss") == 100


def test_a_zero_second_call_is_observed_in_the_latency_histogram() -> None:
    """A call timed at 0 s (a coarse clock) still counts in the latency histogram."""
    tel = PrometheusTelemetry(S())
    tel.request_finished("ListAlgorithms", "", "OK", 0.0, 0, 0, 0, 0, False)
    assert _value(tel, "softgate_request_duration_seconds_count", rpc="ListAlgorithms") == 1


def test_an_untimed_call_is_counted_but_not_observed() -> None:
    """request_finished with seconds None (a call refused at admission) counts the call and
    leaves the latency histogram alone."""
    tel = PrometheusTelemetry(S())
    tel.request_finished("ComputeLoss", "r", "RESOURCE_EXHAUSTED", None, 0, 0, 0, 0, False)
    assert _value(tel, "softgate_requests_total", rpc="ComputeLoss", code="RESOURCE_EXHAUSTED") == 1
    assert _value(tel, "softgate_request_duration_seconds_count", rpc="ComputeLoss") == 0


def test_calls_refused_at_admission_are_not_timed() -> None:
    """Found by an audit: busy and shutting-down refusals were observed as 0 s latencies, so the
    latency percentiles fell toward 0 exactly when the server was saturated. They are counted
    (requests_total, busy_refusals_total), not timed."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from conftest import StandInContext
    from softgate.grpc.servicer import LossServicer

    tel = PrometheusTelemetry(S())

    async def go(s: LossServicer) -> None:
        s.in_flight = s.max_concurrent_rpcs  # busy
        with pytest.raises(StandInContext.Aborted):
            await s._admit("ComputeLoss", StandInContext())
        s.closing = True  # shutting down
        with pytest.raises(StandInContext.Aborted):
            await s._admit("ComputeLoss", StandInContext())

    with ThreadPoolExecutor(1) as pool:
        asyncio.run(go(LossServicer(Engine(device="cpu", compile=False), pool, tel, max_concurrent_rpcs=1)))
    assert _value(tel, "softgate_requests_total", rpc="ComputeLoss", code="RESOURCE_EXHAUSTED") == 1
    assert _value(tel, "softgate_requests_total", rpc="ComputeLoss", code="UNAVAILABLE") == 1
    assert _value(tel, "softgate_busy_refusals_total", rpc="ComputeLoss") == 1
    assert _value(tel, "softgate_request_duration_seconds_count", rpc="ComputeLoss") == 0


def test_rejected_reasons_are_sanitized_and_bounded() -> None:
    tel = PrometheusTelemetry(S())
    tel.rejected("Loss", ["non_finite", "Half Precision!", ""])
    for i in range(MAX_REASONS + 20):
        tel.rejected("Loss", [f"reason_{i}"])
    reasons = {lab["reason"] for n, lab, _ in _samples(tel) if n == "softgate_rejected_inputs_total"}
    assert {"non_finite", "half_precision", "unknown", "other"} <= reasons
    assert len(reasons) <= MAX_REASONS + 1


def test_a_rejection_without_reasons_counts_as_unknown() -> None:
    """rejected(rpc, []) is still one rejected request, under reason="unknown"."""
    tel = PrometheusTelemetry(S())
    tel.rejected("ComputeLoss", [])
    assert _value(tel, "softgate_rejected_inputs_total", rpc="ComputeLoss", reason="unknown") == 1


def test_service_series_are_exported_at_0_from_start_up() -> None:
    """increase() and rate() miss an event whose series appears with it (at 1): every RPC's
    request codes and rejection reasons are there at 0 before the first call."""
    from softgate.engine.validation import REASON_CODES
    from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

    assert set(RPCS) == set(pb.DESCRIPTOR.services_by_name["LossService"].methods_by_name)
    assert set(REASON_CODES) | set(TRANSPORT_REASONS) == set(REASONS)
    tel = PrometheusTelemetry(S())
    samples = _samples(tel)
    rejected = {
        (lab["rpc"], lab["reason"]): v for n, lab, v in samples if n == "softgate_rejected_inputs_total"
    }
    requests = {(lab["rpc"], lab["code"]): v for n, lab, v in samples if n == "softgate_requests_total"}
    latency = {lab["rpc"]: v for n, lab, v in samples if n == "softgate_request_duration_seconds_count"}
    assert rejected == {(rpc, reason): 0.0 for rpc in RPCS for reason in REASONS}
    assert requests == {(rpc, code): 0.0 for rpc in RPCS for code in CODES}
    assert latency == dict.fromkeys(RPCS, 0.0)
    errors = {lab["hook"]: v for n, lab, v in samples if n == "softgate_telemetry_errors_total"}
    assert errors == {"observe_loss": 0.0, "observe_advantages": 0.0}
    tel.rejected("ComputeLoss", ["non_finite"])
    tel.request_finished("ComputeLoss", "r", "INVALID_ARGUMENT", 0.01, 10, 0, 0, 0)
    samples = _samples(tel)
    assert ("softgate_rejected_inputs_total", {"rpc": "ComputeLoss", "reason": "non_finite"}, 1.0) in samples
    assert ("softgate_requests_total", {"rpc": "ComputeLoss", "code": "INVALID_ARGUMENT"}, 1.0) in samples


def test_transport_reasons_are_the_ones_softgate_grpc_gives() -> None:
    """TRANSPORT_REASONS (exported at 0) are read here from softgate.grpc's reason strings
    ("<code>: <text>"), so that a new one cannot be missed."""
    import re
    from pathlib import Path

    from softgate.engine.validation import REASON_CODES

    src = Path(__file__).resolve().parents[1] / "server" / "softgate" / "grpc"
    given = set()
    for f in src.glob("*.py"):
        given |= set(re.findall(r'(?<![\w"])f?"([a-z_]+): ', f.read_text()))
    assert given - set(REASON_CODES) == set(TRANSPORT_REASONS)


def test_every_reason_code_is_documented() -> None:
    """docs/server.md lists every reason code: the engine's (REASON_CODES) and the transport's."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text()
    assert [r for r in REASONS if f"| `{r}` |" not in doc] == []


def test_a_run_s_counters_start_at_0() -> None:
    """A run's counters appear with its first batch, at 0 when nothing was clipped, so that the
    first clipped token is an increase."""
    tel = PrometheusTelemetry(S())
    config, res = _engine_result(config=LossConfig(objective=Grpo(dual_clip=3.0)))
    res.metrics.update(clip_low=0.0, clip_high=0.0, dual_clip=0.0, clamped_tokens=0.0)
    res.metrics.update(gate_saturation_pos=0.0, gate_saturation_neg=0.0)
    tel.observe_loss("r", config, res)
    counters = {
        (n, lab.get("sign", "")): v
        for n, lab, v in _samples(tel)
        if n.endswith("_total") and lab.get("run") == "r"
    }
    for name in ("clipped", "gate_saturated"):
        for sign in ("pos", "neg"):
            assert counters[(f"softgate_{name}_tokens_total", sign)] == 0.0
    assert counters[("softgate_dual_clipped_tokens_total", "")] == 0.0
    assert counters[("softgate_clamped_tokens_total", "")] == 0.0


def test_registries_are_private() -> None:
    a, b = PrometheusTelemetry(S()), PrometheusTelemetry(S())
    a.rejected("ComputeLoss", ["non_finite"])
    assert not [1 for n, _, v in _samples(b) if n == "softgate_rejected_inputs_total" and v]
    assert (
        REGISTRY.get_sample_value(
            "softgate_rejected_inputs_total", {"rpc": "ComputeLoss", "reason": "non_finite"}
        )
        is None
    )


def test_signs_constant() -> None:
    assert SIGNS == ("pos", "neg", "zero")


def test_a_broken_result_never_breaks_the_rpc(caplog: pytest.LogCaptureFixture) -> None:
    """A hook that fails on a broken result is logged and counted under its own name."""
    tel = PrometheusTelemetry(S())

    def errors() -> dict[str, float]:
        return {lab["hook"]: v for n, lab, v in _samples(tel) if n == "softgate_telemetry_errors_total"}

    tel.observe_loss("r", LossConfig(), object())  # no tensors at all
    tel.observe_advantages("r", None, None)
    assert errors() == {"observe_loss": 1, "observe_advantages": 0}
    assert "observe_loss failed" in caplog.text
    tel.observe_advantages("r", None, types.SimpleNamespace(metrics=None, advantages="not a tensor"))
    assert errors() == {"observe_loss": 1, "observe_advantages": 1}


def test_deferred_recordings_are_recorded_once_the_queue_is_full() -> None:
    """Deferred mode: with nobody kicking, MAX_QUEUED waiting recordings are recorded at once."""
    tel = PrometheusTelemetry(S(), defer=True)
    seen: list[int] = []
    for i in range(MAX_QUEUED):
        tel._later(seen.append, i)
    assert seen == list(range(MAX_QUEUED)) and not tel._queue
    tel.close()


# ---------------------------------------------------------------- per-run token counters
# (found missing by a mutation-testing audit: these series were only ever checked at 0)


def _counters(tel: PrometheusTelemetry, run: str) -> dict[tuple[str, str], float]:
    out = {}
    for fam in text_string_to_metric_families(tel.exposition().decode()):
        for s in fam.samples:
            if s.name.endswith("_total") and s.labels.get("run") == run:
                out[(s.name, s.labels.get("sign", ""))] = float(s.value)
    return out


def _ratio_batch(ratios: list[float], adv: list[float]) -> Batch:
    old = torch.full((len(ratios),), -3.0, dtype=torch.float64)
    logp = old + torch.log(torch.tensor(ratios, dtype=torch.float64))
    return Batch(
        logp=logp,
        old_logp=old,
        offsets=torch.tensor([0, len(ratios)]),
        advantages=torch.tensor(adv, dtype=torch.float64),
        advantage_level="token",
    )


def test_clipped_and_dual_clipped_token_counters_count_each_sign():
    # A > 0: 1 of 2 above 1.2 (clip_high); A < 0: 1 of 4 below 0.8 (clip_low), 2 above c = 3 (dual)
    b = _ratio_batch([1.5, 1.0, 0.5, 1.0, 4.0, 5.0], [1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    cfg = LossConfig(objective=Grpo(dual_clip=3.0))
    res = Engine(device="cpu", compile=False).loss(b, cfg)
    assert (res.metrics["clip_high"], res.metrics["clip_low"], res.metrics["dual_clip"]) == (0.5, 0.25, 0.5)
    tel = PrometheusTelemetry(S(sample=None))
    tel.observe_loss("r", cfg, res)
    c = _counters(tel, "r")
    assert c[("softgate_clipped_tokens_total", "pos")] == 1
    assert c[("softgate_clipped_tokens_total", "neg")] == 1
    assert c[("softgate_dual_clipped_tokens_total", "")] == 2


def test_gate_saturated_token_counters_count_each_sign():
    # SAPO, tau 1: gate 4p(1-p) < 0.5 needs |r - 1| > 2.63; two A>0 tokens of 3 and one A<0 of 1
    b = _ratio_batch([5.0, 6.0, 1.0, 5.0], [1.0, 1.0, 1.0, -1.0])
    cfg = LossConfig(objective=Sapo(tau_pos=1.0, tau_neg=1.0))
    res = Engine(device="cpu", compile=False).loss(b, cfg)
    assert res.metrics["gate_saturation_pos"] == 2 / 3 and res.metrics["gate_saturation_neg"] == 1.0
    tel = PrometheusTelemetry(S(sample=None))
    tel.observe_loss("r", cfg, res)
    c = _counters(tel, "r")
    assert c[("softgate_gate_saturated_tokens_total", "pos")] == 2
    assert c[("softgate_gate_saturated_tokens_total", "neg")] == 1


def test_a_failed_call_processes_no_tokens_and_takes_no_run():
    tel = PrometheusTelemetry(S(sample=None))
    tel.request_started("ComputeLoss", "r", 100)
    tel.request_finished("ComputeLoss", "r", "INVALID_ARGUMENT", 0.01, 10, 20, 100, 2)
    assert _counters(tel, "r") == {}
    assert tel.run_summary("r") is None


def test_a_reason_given_twice_in_one_request_counts_once():
    tel = PrometheusTelemetry(S(sample=None))
    tel.rejected("ComputeLoss", ["non_finite", "non_finite", "missing"])
    got = {}
    for fam in text_string_to_metric_families(tel.exposition().decode()):
        for s in fam.samples:
            if s.name == "softgate_rejected_inputs_total" and s.labels["rpc"] == "ComputeLoss" and s.value:
                got[s.labels["reason"]] = s.value
    assert got == {"non_finite": 1.0, "missing": 1.0}


def _rec(t: float, tokens: int = 10, **values: float) -> BatchRecord:
    return BatchRecord(t=t, objective="sapo", tokens=tokens, seqs=1, values=dict(values))


def test_a_value_on_a_bucket_edge_counts_in_that_bucket() -> None:
    """Prometheus `le` buckets: a value equal to an edge belongs to that edge's bucket."""
    edges = np.asarray([0.1, 0.5, 1.0])
    st = RunState()
    for v in (0.1, 0.5, 1.0, 0.3, 2.0):
        st.observe("h", (), v, edges)
    assert st.hists[("h", ())].counts.tolist() == [1.0, 2.0, 1.0, 1.0]


def test_run_state_ignores_non_finite_counter_and_gauge_values() -> None:
    """RunState.inc and .set drop NaN and inf (a counter or gauge stuck at NaN never recovers)."""
    st = RunState()
    st.inc("c", (), math.nan)
    st.inc("c", (), math.inf)
    st.set("g", (), math.nan)
    st.set("g", (), -math.inf)
    assert st.counters == {} and st.gauges == {}


def test_a_window_weighs_grad_retained_by_the_tokens_with_a_gradient() -> None:
    """grad_retained is weighted by a batch's tokens of A != 0, approx_kl by its trained tokens,
    and a batch without any is left out: a batch of zero advantages (grad_retained 1) read as
    "all retained", and hid a collapse from the window and the alert (an audit)."""

    def rec(pos: int, neg: int, zero: int, **v: float) -> BatchRecord:
        return _rec(1.0, tokens=pos + neg + zero, tokens_pos=pos, tokens_neg=neg, tokens_zero=zero, **v)

    out = summarize(
        [
            rec(60, 30, 0, grad_retained=1.0, approx_kl=0.1),
            rec(5, 5, 0, grad_retained=0.0, approx_kl=0.2),
            rec(0, 0, 50, grad_retained=1.0, approx_kl=0.0),  # zero advantages: no gradient
            rec(0, 0, 0, grad_retained=1.0, approx_kl=0.0),  # fully masked
        ]
    )
    assert out["grad_retained"] == pytest.approx(0.9)
    assert out["approx_kl"] == pytest.approx((90 * 0.1 + 10 * 0.2) / 150)
    assert out["tokens"] == 150


def test_a_window_leaves_fully_masked_batches_out_of_the_ratio_range_and_kl_max() -> None:
    """A batch without trained tokens reports ratio 1 and approx_kl 0 for "none": they are not
    values of the run's ratio range (all ratios above 1 read as [1, max]) nor its KL max."""

    def rec(n: int, **v: float) -> BatchRecord:
        return _rec(1.0, tokens=n, tokens_pos=n, tokens_neg=0, tokens_zero=0, **v)

    out = summarize(
        [
            rec(10, ratio_min=1.1, ratio_max=1.3, approx_kl=-0.05),
            rec(0, ratio_min=1.0, ratio_max=1.0, approx_kl=0.0),  # fully masked
        ]
    )
    assert out["ratio_range"] == [1.1, 1.3]
    assert out["approx_kl_max"] == -0.05


def test_a_window_sums_sequences_and_spans_its_batches() -> None:
    """A window's sequences, from/to, objectives and approx_kl_max cover every batch of it."""
    recs = [
        BatchRecord(t=1.0, objective="sapo", tokens=10, seqs=2, values={"approx_kl": 0.3, "tokens_pos": 10}),
        BatchRecord(t=2.0, objective="grpo", tokens=30, seqs=5, values={"approx_kl": 0.1, "tokens_neg": 30}),
    ]
    out = summarize(recs)
    assert out["sequences"] == 7 and out["tokens"] == 40
    assert (out["from"], out["to"]) == (1.0, 2.0)
    assert out["objectives"] == ["grpo", "sapo"]
    assert out["approx_kl_max"] == 0.3


def test_time_windows_cover_five_minutes_and_one_hour() -> None:
    """last_5m holds the batches of the last 300 s, last_1h those of the last 3600 s."""
    st = RunState()
    now = 10_000.0
    st.batches.extend([_rec(now - 3000), _rec(now - 1000), _rec(now - 299), _rec(now - 1)])
    w = windows(list(st.batches), [], now=now)
    assert w["last_5m"]["batches"] == 2
    assert w["last_1h"]["batches"] == 4
    assert w["last_10_batches"]["batches"] == 4


def test_the_ratio_range_spans_every_batch() -> None:
    """ratio_range is [smallest ratio_min, largest ratio_max] over the window's trained batches."""
    out = summarize(
        [
            _rec(1.0, ratio_min=0.5, ratio_max=1.5, tokens_pos=10),
            _rec(2.0, ratio_min=0.8, ratio_max=3.0, tokens_neg=10),
            _rec(3.0, ratio_min=0.2, ratio_max=1.1, tokens_zero=10),
        ]
    )
    assert out["ratio_range"] == [0.2, 3.0]


def test_engine_codes_of_a_sampled_batch_are_not_used() -> None:
    """the engine's codes and sums are of every token; when a CPU batch is sampled here
    they are dropped and the sample bucketed, as without them."""
    g = torch.Generator().manual_seed(0)
    n = 1000
    ratio = torch.exp(torch.randn(n, generator=g) * 0.2)
    gate = torch.rand(n, generator=g)
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) > 0.1
    rcode, gcode, sums = bucket_codes(
        ratio, gate, mask & (adv > 0), mask & (adv < 0), mask, bucket_edges(ratio.dtype, ratio.device)
    )
    b = Bucketer(cpu_sample_tokens=100)
    want = b(ratio, gate, adv, mask)
    got = b(ratio, gate, adv, mask, codes=(rcode, gcode, sums.tolist()))
    assert want.stride == got.stride == 10
    assert (got.ratio_counts == want.ratio_counts).all() and (got.gate_counts == want.gate_counts).all()
    assert (got.ratio_sums == want.ratio_sums).all()


def test_the_runs_overview_summarises_only_the_last_10_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: /v1/runs summarised all four windows of every run (up to 1000 batches
    each) and returned only last_10_batches, holding the event loop 0.4 s at 20 runs."""
    from softgate.engine import AdvantageConfig
    from softgate.observability import runs

    tel = PrometheusTelemetry(S())
    adv = Engine(device="cpu", compile=False).advantages(
        torch.rand(8), torch.arange(8) // 4, AdvantageConfig()
    )
    for run in ("a", "b"):
        for _ in range(30):
            tel.observe_loss(run, LossConfig(), loss_result(16))
            tel.observe_advantages(run, AdvantageConfig(), adv)
    seen: list[tuple[str, int]] = []
    for name in ("summarize", "summarize_advantages"):
        real = getattr(runs, name)
        monkeypatch.setattr(
            runs, name, lambda r, real=real, name=name: seen.append((name, len(r))) or real(r)
        )
    overview = tel.runs_overview()
    assert sorted(seen) == [("summarize", 10)] * 2 + [("summarize_advantages", 10)] * 2
    assert [r["last_10_batches"]["batches"] for r in overview] == [10, 10]
    assert [r["last_10_batches"]["advantages"]["calls"] for r in overview] == [10, 10]
    assert overview[0]["last_10_batches"] == tel.run_summary(overview[0]["run"])["windows"]["last_10_batches"]


def test_a_window_mean_of_huge_values_does_not_overflow() -> None:
    """Found by an audit: the weighted mean summed value x tokens, inf for advantages of 1e300
    and up, which the JSON read as null (the gauge read 5e307). A mean that is still not
    finite (values at the float64 maximum) is left out, as a non-finite value is."""
    tel = PrometheusTelemetry(S())
    for _ in range(3):
        tel.observe_loss("r", LossConfig(), loss_result(64, adv_mean=5e307, reward_mean=-1e300))
    summary = tel.run_summary("r")
    json.dumps(summary, allow_nan=False)  # no inf or NaN anywhere
    for w in summary["windows"].values():
        assert w["advantage_mean"] == pytest.approx(5e307) and w["reward_mean"] == pytest.approx(-1e300)
    calls = [
        BatchRecord(t=1.0, objective="", tokens=0, seqs=n, values={"advantage_mean": 1e307}) for n in (8, 24)
    ]
    assert summarize_advantages(calls)["advantage_mean"] == pytest.approx(1e307)
    top = [_rec(float(i), tokens=10, reward_mean=sys.float_info.max) for i in range(11)]
    assert "reward_mean" not in summarize(top)  # (eleven equal weights round past the maximum)


# ---------------------------------------------------------------- what each series holds
# (found by an audit of the trust-region statistics: /tmp/audit4/metrics.md)


def _series(tel: PrometheusTelemetry, run: str, prefix: str) -> set[tuple[str, str, str]]:
    """(name, objective, sign) of the run's samples whose name starts with `prefix`."""
    return {
        (n, lab.get("objective", ""), lab.get("sign", ""))
        for n, lab, _ in _samples(tel)
        if lab.get("run") == run and n.startswith(prefix)
    }


def test_objectives_without_a_clip_record_no_clip_fraction() -> None:
    """SAPO, REINFORCE and DRO have no clip: their clip_low = clip_high = 0 stand for "not
    applicable", and recorded as 0 they halved a GRPO run's clip fraction on the dashboard
    (summed over runs by sign). Likewise a dual-clip share is recorded only where the objective
    has a dual clip. Their gate saturation is a real 0 or more, and stays. KL-Cov has no eps
    but counts its penalised tokens as clipped: recorded (it was left out as clip-less)."""
    e = Engine(device="cpu", compile=False)
    b = _ratio_batch([0.5, 1.5, 0.5, 4.0], [1.0, 1.0, -1.0, -1.0])
    tel = PrometheusTelemetry(S(sample=None))
    configs = {
        "sapo": LossConfig(objective=Sapo()),
        "sapo_seq": LossConfig(objective=SapoSeq()),
        "reinforce": LossConfig(objective=Reinforce()),
        "grpo": LossConfig(objective=Grpo()),
        "dual": LossConfig(objective=Grpo(dual_clip=3.0)),
        "gspo_dual": LossConfig(objective=Gspo(dual_clip=1.1)),
        "cispo": LossConfig(objective=Cispo()),
        "kl_cov": LossConfig(objective=KlCov(fraction=0.5)),
        "dro": LossConfig(objective=Dro()),
    }
    # (sapo_seq, gspo: one advantage per sequence)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    b_seq = dataclasses.replace(
        b, offsets=torch.tensor([0, 2, 4]), advantages=adv, advantage_level="sequence"
    )
    for run, cfg in configs.items():
        tel.observe_loss(run, cfg, e.loss(b_seq if run in ("sapo_seq", "gspo_dual") else b, cfg))
    clip = ("softgate_clipped_tokens_total", "softgate_batch_clip_fraction_count")
    dual = ("softgate_dual_clipped_tokens_total", "softgate_batch_dual_clip_fraction_count")
    for run in configs:
        got = {n for n, _, _ in _series(tel, run, "softgate_")}
        assert "softgate_gate_saturated_tokens_total" in got and "softgate_batch_gate_saturation_count" in got
        assert all((n in got) == (run not in ("sapo", "sapo_seq", "reinforce", "dro")) for n in clip), (
            run,
            got,
        )
        assert all((n in got) == (run in ("dual", "gspo_dual")) for n in dual), (run, got)
    assert _value(tel, "softgate_dual_clipped_tokens_total", run="dual") == 1
    # gspo's second sequence (A < 0): s = sqrt(0.5 * 4) = 1.41 > 1.1, both its tokens dual-clipped
    assert _value(tel, "softgate_dual_clipped_tokens_total", run="gspo_dual") == 2
    assert _value(tel, "softgate_clipped_tokens_total", run="grpo", sign="pos") == 1
    kl_cov = [_value(tel, "softgate_clipped_tokens_total", run="kl_cov", sign=s) for s in ("pos", "neg")]
    assert sum(kl_cov) == 2  # (two of the four tokens penalised)


def _help(tel: PrometheusTelemetry, name: str) -> str:
    fams = {f.name: f for f in text_string_to_metric_families(tel.exposition().decode())}
    return fams[name].documentation


def test_the_help_texts_say_what_cispo_s_clip_counters_leave_out() -> None:
    """CISPO clips its IS weight on both sides whatever A's sign: its A>0 tokens below
    1-eps_low and A<0 tokens above 1+eps_high are in neither clip_low nor clip_high (only in
    ComputeLoss's clip_fraction), and its gate weight goes above 1 for either sign. The help
    texts said its clipping "shows in clip_low" and that only A<0 tokens went above 1."""
    cfg = LossConfig(objective=Cispo(eps_low=0.2, eps_high=0.28))
    b = _ratio_batch([0.5] * 4 + [2.0] * 4, [1.0] * 4 + [-1.0] * 4)  # every token's weight clipped
    res = Engine(device="cpu", compile=False).loss(b, cfg)
    assert res.metrics["clip_fraction"] == 1.0 and res.metrics["gate_mean_pos"] > 1
    tel = PrometheusTelemetry(S(sample=None))
    tel.observe_loss("c", cfg, res)
    assert _value(tel, "softgate_clipped_tokens_total", run="c", sign="pos") == 0
    assert _value(tel, "softgate_clipped_tokens_total", run="c", sign="neg") == 0
    for name in ("softgate_clipped_tokens", "softgate_batch_clip_fraction"):
        doc = _help(tel, name)
        assert "CISPO" in doc and "clip_fraction" in doc, (name, doc)
    for name in (
        "softgate_batch_gate_weight_mean",
        "softgate_batch_grad_retained",
        "softgate_token_gate_weight",
    ):
        doc = _help(tel, name)
        assert "either sign" in doc, (name, doc)


def test_a_window_weighs_rewards_by_sequences_and_the_degenerate_share_by_groups() -> None:
    """reward_mean is a mean over sequences and degenerate_group_fraction a share of groups:
    weighted by trained tokens, a batch of long responses outweighed one of short ones (0.257
    for a mean reward of 0.625 over the 8 sequences, an audit)."""
    e = Engine(device="cpu", compile=False)
    cfg = LossConfig(objective=Grpo())

    def batch(length: int, rewards: list[float]) -> Batch:
        n = 4 * length
        return Batch(
            logp=torch.full((n,), -1.0, dtype=torch.float64),
            offsets=Batch.offsets_from_lengths(torch.full((4,), length)),
            rewards=torch.tensor(rewards, dtype=torch.float64),
            group_ids=torch.tensor([0, 0, 1, 1]),
        )

    tel = PrometheusTelemetry(S(sample=None))
    results = [e.loss(batch(1, [1.0] * 4), cfg), e.loss(batch(100, [0.0, 0.0, 0.0, 1.0]), cfg)]
    for res in results:
        tel.observe_loss("r", cfg, res)
    assert [r.metrics["degenerate_group_frac"] for r in results] == [1.0, 0.5]
    w = tel.run_summary("r")["windows"]["last_10_batches"]
    assert w["reward_mean"] == pytest.approx((4 * 1.0 + 1.0) / 8)
    assert w["degenerate_group_fraction"] == pytest.approx((2 + 1) / 4)
    # ComputeAdvantages calls: the degenerate share by groups too (3 groups, then 1)
    adv = [e.advantages(torch.tensor(r), torch.tensor(g), AdvantageConfig()) for r, g in (
        ([1.0, 1.0, 0.0, 1.0, 2.0, 2.0], [0, 0, 1, 1, 2, 2]),
        ([0.0, 1.0], [0, 0]),
    )]  # fmt: skip
    for res in adv:
        tel.observe_advantages("r", AdvantageConfig(), res)
    a = tel.run_summary("r")["windows"]["last_10_batches"]["advantages"]
    assert a["degenerate_group_fraction"] == pytest.approx(2 / 4)  # (by sequences: 4 / 8)
    assert a["reward_mean"] == pytest.approx(8 / 8)


def test_the_advantage_gauges_say_what_they_hold_after_each_call() -> None:
    """softgate_advantage_mean / _std hold the last call's: a mean over sequences after
    ComputeAdvantages, over trained tokens after ComputeLoss. The help said "over masked tokens"
    for both (an audit)."""
    e = Engine(device="cpu", compile=False)
    rewards, groups = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0, 0, 1, 1])
    acfg = AdvantageConfig(estimator="dr_grpo")
    tel = PrometheusTelemetry(S(sample=None))
    tel.observe_advantages("g", acfg, e.advantages(rewards, groups, acfg))
    assert _value(tel, "softgate_advantage_mean", run="g") == 0.0  # (-0.5 + 0.5 + 0 + 0) / 4 sequences
    b = Batch(
        logp=torch.full((13,), -1.0, dtype=torch.float64),
        offsets=Batch.offsets_from_lengths(torch.tensor([10, 1, 1, 1])),
        rewards=rewards,
        group_ids=groups,
    )
    cfg = LossConfig(objective=Grpo(), advantages=acfg)
    tel.observe_loss("g", cfg, e.loss(b, cfg))
    assert _value(tel, "softgate_advantage_mean", run="g") == pytest.approx((-0.5 * 10 + 0.5) / 13)
    for name in ("softgate_advantage_mean", "softgate_advantage_std"):
        doc = _help(tel, name)
        assert (
            "per sequence after ComputeAdvantages" in doc and "per trained token after ComputeLoss" in doc
        ), doc
