"""promtool on softgate's alert rules, their unit tests and a real /metrics exposition.

promtool comes from Debian's `prometheus` package (scripts/tools/prometheus.sh, run by
`make tools` before the suite). Outside CI the tests skip when it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import torch
import yaml
from conftest import missing_tool
from prometheus_client.parser import text_string_to_metric_families
from softgate.admin import create_app
from softgate.admin.server import ThreadedAdminServer
from softgate.engine import Batch, Engine, Grpo, Gspo, LossConfig, MismatchConfig, RejectionCriterion, Sapo
from softgate.observability import PrometheusTelemetry, exported_names

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "softgate-rules.yaml"
RULE_TESTS = PROM / "softgate-rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "softgate-dashboard.json"


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        missing_tool("promtool not installed (bash scripts/tools/prometheus.sh)")
    return exe


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=60, cwd=PROM, check=False)


def test_rules_are_valid() -> None:
    p = run(promtool(), "check", "rules", str(RULES))
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()


def test_rule_unit_tests_pass() -> None:
    p = run(promtool(), "test", "rules", str(RULE_TESTS))
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()


def test_every_alert_is_tripped_by_a_unit_test() -> None:
    alerts = {
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    fired = set()
    for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for a in t.get("alert_rule_test", []):
            if a.get("exp_alerts"):
                fired.add(a["alertname"])
    assert alerts == fired
    assert len(alerts) >= 7
    # a target gone from service discovery, failed telemetry recordings (found by an audit)
    assert {"SoftgateAbsent", "SoftgateTelemetryErrors"} <= alerts


def _series(text: str) -> tuple[str, dict[str, str]]:
    """'name{a="b"}' -> (name, labels)."""
    sample = next(iter(text_string_to_metric_families(text + " 0\n"))).samples[0]
    return sample.name, dict(sample.labels)


def test_rule_unit_tests_feed_the_series_the_server_exports() -> None:
    """A rule test is only as good as its input: an alert on `increase()` missed the first
    event when its series appeared at 1. So the input series are the server's: every service
    series is one a server exports at 0 from start-up (real rpc names and codes, `le` as written
    there), every run-labelled one a name the collector exports, and each starts at 0."""
    tel = PrometheusTelemetry(None)
    tel.watch_server(lambda: 0, lambda: 1.0)  # (as serve does: the server's gauges, TLS on)
    fresh = {(s.name, frozenset(s.labels.items())) for fam in tel.registry.collect() for s in fam.samples}
    known = exported_names()
    seen = 0
    for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for given in t["input_series"]:
            name, labels = _series(given["series"])
            if not name.startswith("softgate_"):
                continue
            seen += 1
            labels.pop("job", None)  # target labels: Prometheus adds them at scrape
            labels.pop("instance", None)
            if "run" in labels:
                assert name in known, given["series"]
            else:
                assert (name, frozenset(labels.items())) in fresh, given["series"]
            if not name.endswith(("_total", "_count", "_sum", "_bucket")) or "re-created" in t["name"]:
                continue  # a gauge: any value (the counters are what must start at 0; a re-created run's hold its batch)
            first = next(v for v in given["values"].split() if not v.startswith("_"))
            # (a histogram's _sum falls with negative observations: approx KL may be negative)
            step = r"[-+x]" if name.endswith("_sum") else r"[+x]"
            assert re.match(rf"0({step}|$)", first), f"{given['series']} starts at {first}, not 0"
    assert seen >= 20


def test_prometheus_config_is_valid() -> None:
    p = run(promtool(), "check", "config", str(PROM / "prometheus.yml"))
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()


def _traffic(tel: PrometheusTelemetry) -> None:
    engine = Engine(device="cpu", compile=False)
    g = torch.Generator().manual_seed(0)
    n_seqs, length = 16, 32
    n = n_seqs * length
    for config in (
        LossConfig(objective=Sapo()),
        LossConfig(objective=Grpo(dual_clip=3.0)),
        LossConfig(objective=Gspo()),
    ):
        logp = -torch.rand(n, generator=g) * 2
        old = (logp + torch.randn(n, generator=g) * 0.2).clamp(max=0.0)
        rewards = torch.rand(n_seqs, generator=g)
        rewards[:4] = 0.0
        batch = Batch(
            logp=logp,
            old_logp=old,
            offsets=Batch.offsets_from_lengths(torch.full((n_seqs,), length)),
            rewards=rewards,
            group_ids=torch.arange(n_seqs) // 4,
        )
        tel.request_started("ComputeLoss", "exp-1", n)
        tel.observe_loss("exp-1", config, engine.loss(batch, config))
        tel.request_finished("ComputeLoss", "exp-1", "OK", 0.05, 4 * n, 4 * n, n, n_seqs)
    tel.rejected("ComputeLoss", ["non_finite"])
    tel.request_finished("ComputeLoss", "exp-1", "INVALID_ARGUMENT", 0.001, 100, 50, 0, 0)


def test_promtool_check_metrics_on_a_real_exposition() -> None:
    exe = promtool()
    tel = PrometheusTelemetry(None)
    _traffic(tel)
    app = create_app(None, tel, lambda: True)
    with ThreadedAdminServer(app) as srv:
        body = httpx.get(srv.url + "/metrics", timeout=10).content
    assert b"softgate_token_ratio_bucket" in body
    p = run(exe, "check", "metrics", stdin=body)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    assert p.stdout.strip() == b"" and p.stderr.strip() == b"", p.stdout.decode() + p.stderr.decode()


def test_dashboard_json_is_generated_from_its_script() -> None:
    p = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "grafana" / "generate_dashboard.py"), "--check"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr.decode()


def _panels() -> dict[str, dict]:
    return {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"}


def _axis(panel: dict, legend: str) -> tuple[str, str]:
    """(unit, placement) of the series of `legend`: an override's that matches it, else the panel's."""
    unit, placement = panel["fieldConfig"]["defaults"]["unit"], "auto"
    for o in panel["fieldConfig"]["overrides"]:
        if o["matcher"]["id"] == "byRegexp" and re.search(o["matcher"]["options"], legend):
            props = {x["id"]: x["value"] for x in o["properties"]}
            unit, placement = props.get("unit", unit), props.get("custom.axisPlacement", placement)
    return unit, placement


def test_dashboard_axes_fit_their_values() -> None:
    """Found by an audit: GPPO and CISPO put mean gate weight and grad_retained above 1, off a
    0-1 axis; requests in flight, tokens in flight and bytes/s shared one axis, as did token
    ratios and clamped tokens/s; p99 latency mixed every RPC."""
    panels = _panels()
    for title in ("Mean gate weight by advantage sign", "Gradient retained by the trust region"):
        defaults = panels[title]["fieldConfig"]["defaults"]
        assert defaults.get("min") == 0 and "max" not in defaults, title
        assert all(w in panels[title]["description"] for w in ("GPPO", "CISPO", "clip_low")), title
    for panel in panels.values():
        legends = [t["legendFormat"] for t in panel["targets"]]
        for legend in legends:  # bytes only on a bytes axis, and nothing else there
            assert ("bytes" in legend) == (_axis(panel, legend)[0] == "Bps"), (panel["title"], legend)
    ratio = panels["Token ratio range (last batch)"]
    assert _axis(ratio, "clamped tokens/s {{objective}}")[1] == "right"
    assert _axis(ratio, "min {{objective}}")[1] != "right"
    flight = panels["In flight"]
    assert (
        _axis(flight, "tokens in flight")[1] == "right" and _axis(flight, "requests in flight")[1] != "right"
    )
    p99 = [t for t in panels["Latency percentiles"]["targets"] if "0.99" in t["expr"]]
    assert len(p99) == 1 and "rpc" in p99[0]["expr"] and "{{rpc}}" in p99[0]["legendFormat"]


def test_dashboard_shows_telemetry_errors() -> None:
    """Found by an audit: a failing telemetry hook silenced every trust-region metric, and no
    panel (nor alert) read softgate_telemetry_errors_total."""
    exprs = [t["expr"] for t in _panels()["Errors and rejected inputs"]["targets"]]
    assert any("softgate_telemetry_errors_total" in e for e in exprs), exprs


def test_panels_of_per_batch_means_say_so() -> None:
    """Found by an audit: a panel averaging per-batch values (rate(_sum) / rate(_count)) reads
    as a share of tokens unless it says otherwise; with micro-batches of uneven size the two
    differ (0.5 against 0.002)."""
    for title, panel in _panels().items():
        if any(re.search(r"_sum\{", t["expr"]) for t in panel["targets"]):
            assert "mean of per-batch values" in panel["description"].lower(), title


def _target(title: str, legend_start: str) -> str:
    """The expression of a dashboard target, with every run selected ("All") and a 5m interval."""
    exprs = [t["expr"] for t in _panels()[title]["targets"] if t["legendFormat"].startswith(legend_start)]
    assert len(exprs) == 1, (title, legend_start, exprs)
    return exprs[0].replace("$run", ".*").replace("$__rate_interval", "5m")


def _batch(ratios: list[float], adv: list[float], v: list[float] | None = None) -> Batch:
    """One sequence of per-token advantages `adv` and ratios `ratios`; `v`: mismatch weights
    exp(old - rollout) (no rollout log-probs without)."""
    old = torch.full((len(ratios),), -3.0, dtype=torch.float64)
    logp = old + torch.tensor(ratios, dtype=torch.float64).log()
    a = torch.tensor(adv, dtype=torch.float64)
    rollout = None if v is None else old - torch.tensor(v, dtype=torch.float64).log()
    return Batch(logp=logp, old_logp=old, offsets=torch.tensor([0, len(ratios)]), advantages=a,
                 advantage_level="token", rollout_logp=rollout)  # fmt: skip


def _sample(label: str, value: float) -> dict[str, object]:
    return {"labels": "{" + label + "}", "value": value}


def _check_panels(
    tmp_path: Path,
    batches: list[tuple[str, LossConfig, Batch]],
    checks: list[tuple[str, list[dict[str, object]]]],
) -> None:
    """promtool evaluates dashboard expressions `checks` on the series a server exports after
    `batches` (run, config, batch), counted from 0 (one scrape before, one after)."""
    exe = promtool()
    engine = Engine(device="cpu", compile=False)
    tel = PrometheusTelemetry(None, cpu_sample_tokens=None)
    for run_name, cfg, b in batches:
        tel.observe_loss(run_name, cfg, engine.loss(b, cfg))
        n, seqs = b.logp.numel(), b.offsets.numel() - 1  # (the call's own counts, as the servicer's)
        tel.request_finished("ComputeLoss", run_name, "OK", 0.001, 0, 0, n, seqs, started=False)
    series = []
    for fam in text_string_to_metric_families(tel.exposition().decode()):
        for smp in fam.samples:
            if "run" in smp.labels and smp.name.endswith(("_total", "_sum", "_count")):
                labels = ", ".join(f'{k}="{v}"' for k, v in {**smp.labels, "job": "softgate"}.items())
                series.append({"series": f"{smp.name}{{{labels}}}", "values": f"0 {smp.value!r}"})
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [{"expr": e, "eval_time": "1m", "exp_samples": exp} for e, exp in checks],
            }
        ],
    }
    path = tmp_path / "dashboard.test.yaml"
    path.write_text(yaml.safe_dump(test))
    p = subprocess.run([exe, "test", "rules", str(path)], capture_output=True, timeout=60, check=False)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()


def test_dashboard_clip_and_saturation_panels_are_shares_of_tokens(tmp_path: Path) -> None:
    """Found by an audit: "Clip fractions" and "Gate saturation" averaged per-batch fractions,
    so a GRPO step split into micro-batches of 3 and 1097 tokens read clip_low 0.5 for 2 clipped
    tokens of 1000, and a SAPO run (no clip, its clip_low 0 = "not applicable") or a GRPO run
    without dual clip beside it diluted the lines further."""
    grpo, dual, sapo = (LossConfig(objective=o) for o in (Grpo(), Grpo(dual_clip=3.0), Sapo()))
    batches = [
        # GRPO, two micro-batches: 2 A<0 tokens clipped low and 1 A>0 clipped high, then 998 A<0
        # and 99 A>0 tokens none clipped
        ("g", grpo, _batch([0.5, 0.5, 1.5], [-1.0, -1.0, 1.0])),
        ("g", grpo, _batch([1.0] * 1097, [-1.0] * 998 + [1.0] * 99)),
        # GRPO with dual clip c = 3: 4 A<0 tokens caught by it, then 396 not
        ("d", dual, _batch([4.0] * 4, [-1.0] * 4)),
        ("d", dual, _batch([1.0] * 396, [-1.0] * 396)),
        # SAPO: 1000 A<0 tokens far from 1 (not saturated at tau 1.05: w = 0.93)
        ("s", sapo, _batch([0.5] * 1000, [-1.0] * 1000)),
    ]
    checks = [
        # clip_low: 2 of the 1400 A<0 tokens of the clipped objectives (not SAPO's 1000); clip_high: 1 of 100
        (_target("Clip fractions", "clip "), [_sample('sign="neg"', 2 / 1400), _sample('sign="pos"', 1 / 100)]),
        # dual clip: 4 of the 400 A<0 tokens of the run with a dual clip (not g's 1000)
        (_target("Clip fractions", "dual clip"), [_sample('objective="grpo"', 4 / 400)]),
        # saturated (gate 0 for GRPO's clipped tokens): 2 + 4 of 2400 A<0 tokens, 1 of 100 A>0 (every objective)
        (_target("Gate saturation by advantage sign", "A "), [_sample('sign="neg"', 6 / 2400), _sample('sign="pos"', 1 / 100)]),
    ]  # fmt: skip
    _check_panels(tmp_path, batches, checks)


def test_dashboard_correction_panels_are_shares_of_the_corrected_runs_tokens(tmp_path: Path) -> None:
    """The mismatch and off-policy masking panels are shares of the trained tokens of the runs
    that have the correction: a run without one (its engine 0 means "not applicable") beside
    them leaves them as they are, and micro-batches of uneven size count by their tokens."""
    masked = LossConfig(objective=Grpo(), mismatch=MismatchConfig(mode="mask", lo=0.5, hi=2.0))
    opsm = LossConfig(objective=Grpo(), off_policy_mask_threshold=0.5)
    rs = LossConfig(objective=Grpo(), rejection=(RejectionCriterion(2.0),))  # ratio window [0.5, 2]
    batches = [
        # mismatch mask: 2 of 4 tokens' weights outside [0.5, 2], then 96 inside
        ("m", masked, _batch([1.0] * 4, [1.0, -1.0, 1.0, 1.0], v=[4.0, 0.2, 1.0, 1.0])),
        ("m", masked, _batch([1.0] * 96, [1.0] * 96, v=[1.0] * 96)),
        # OPSM at 0.5: a sequence whose mean old - logp is log 4 loses its 3 A<0 tokens' policy
        # term (not its A>0 token's), then 396 tokens on-policy
        ("o", opsm, _batch([0.25] * 4, [-1.0, -1.0, -1.0, 1.0])),
        ("o", opsm, _batch([1.0] * 396, [-1.0] * 396)),
        # rollout rejection: 3 of 8 tokens out (exp(k1) = 1 / v of 4, 0.2 and 3), then 92 kept
        ("r", rs, _batch([1.0] * 8, [1.0] * 8, v=[0.25, 5.0, 1 / 3, 1.0, 1.0, 1.0, 1.0, 1.0])),
        ("r", rs, _batch([1.0] * 92, [-1.0] * 92, v=[1.0] * 92)),
        # neither: 1000 tokens
        ("g", LossConfig(objective=Grpo()), _batch([1.0] * 1000, [-1.0] * 1000)),
    ]
    checks = [
        (_target("Train/inference mismatch", "corrected"), [_sample('objective="grpo"', 2 / 100)]),
        # mean weight, each batch once: (mean(0, 0, 1, 1) + 1) / 2
        (
            _target("Train/inference mismatch", "mean weight"),
            [_sample('objective="grpo"', 0.75)],
        ),
        (_target("Off-policy masked and rejected tokens", "masked"), [_sample('objective="grpo"', 3 / 400)]),
        # rejected: 3 of the 100 tokens the rejecting run sent (97 trained)
        (
            _target("Off-policy masked and rejected tokens", "rejected {"),
            [_sample('objective="grpo"', 3 / 100)],
        ),
        # and 1 of its 2 sequences (the other runs send no criteria: no line)
        (
            _target("Off-policy masked and rejected tokens", "rejected sequences"),
            [_sample('run="r"', 1 / 2)],
        ),
    ]
    _check_panels(tmp_path, batches, checks)
