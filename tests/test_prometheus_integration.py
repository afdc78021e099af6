"""A real Prometheus scrapes `softgate serve`'s admin /metrics (with the bearer token) while
a trainer sends loss traffic over gRPC; then every query of the Grafana dashboard is
evaluated through Prometheus's HTTP API and must return data, and every metric the
dashboard names must be one softgate exports.

Runs in the default suite (about 20-40 s). Prometheus comes from Debian's package
(scripts/tools/prometheus.sh); everything listens on 127.0.0.1 only and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from conftest import free_port, free_ports, missing_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "softgate-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "softgate-rules.yaml"
BASE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RUN = "itest-run"
ADV_RUN = "itest-advantages-only"  # a run that only calls ComputeAdvantages
TOKEN = "integration-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEADLINE_S = 60.0


def _prometheus() -> str:
    exe = shutil.which("prometheus")
    if exe is None:
        missing_tool("prometheus not installed (bash scripts/tools/prometheus.sh)")
    return exe


class Traffic:
    """A trainer: sends loss batches to the running server over gRPC (tagged with the run
    name) until stopped, cycling SAPO, GRPO with dual clip and every off-policy correction (a
    KL term, a KL in the reward, a mismatch mask, off-policy sequence masking, rollout rejection), and GSPO,
    each with sum_pi_squared (the variance proxy); every 7th batch
    carries a NaN, which the server refuses (INVALID_ARGUMENT, reason non_finite). Beside
    it, a second run (ADV_RUN) only asks for advantages."""

    def __init__(self, grpc_target: str) -> None:
        self.target = grpc_target
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="loss-traffic", daemon=True)
        self.batches = 0
        self.rejected = 0
        self.error: BaseException | None = None

    def _loop(self) -> None:
        from softgate_client import InvalidArgumentError, MismatchConfig, SoftgateClient

        rng = np.random.default_rng(0)
        corrections = {
            "kl_beta": 0.05,
            "kl_value_clamp": 0.003,  # (ref ~ logp +- 0.1: some tokens' k3 past it, on the KL panel)
            "mismatch": MismatchConfig(mode="mask", batch_normalize=True),
            "off_policy_mask_threshold": 0.0,
            "rollout_rs": "token_k1",
            "rollout_rs_threshold": "0.3_3.0",  # (wider than the mask: both act)
            "reward_kl_beta": 0.05,  # (and a KL in the reward, verl's, per sequence)
            "reward_kl_level": "sequence",
        }
        options = [
            {"objective": "sapo"},
            {"objective": "grpo", "dual_clip": 3.0, **corrections},
            {"objective": "gspo"},
        ]
        n_seqs, length = 16, 64
        n = n_seqs * length
        i = 0
        try:
            with SoftgateClient(self.target, run=RUN, timeout=30, retries=3) as sg:
                while not self.stop_event.is_set():
                    logp = -rng.random(n, dtype=np.float32) * 2
                    old = np.minimum(logp + rng.normal(0, 0.25, n).astype(np.float32), 0.0)
                    old[:3] = logp[:3] - 25.0  # log-ratio beyond the clamp: counted in clamped_tokens
                    rewards = rng.random(n_seqs).astype(np.float32)
                    rewards[:4] = 1.0  # one degenerate group
                    # the reference and the sampler: a little and a lot off (some mismatch weights masked)
                    ref = np.minimum(logp + rng.normal(0, 0.1, n).astype(np.float32), 0.0)
                    rollout = np.minimum(old + rng.normal(0, 0.5, n).astype(np.float32), 0.0)
                    p = np.exp(old)  # each token's sum of squared probabilities (the variance proxy)
                    spp = p * p + (1 - p) ** 2 * rng.random(n, dtype=np.float32)
                    if i % 7 == 6:
                        logp[5] = np.nan
                    try:
                        sg.loss(
                            logp,
                            old,
                            lengths=np.full(n_seqs, length),
                            rewards=rewards,
                            group_ids=np.arange(n_seqs) // 4,
                            ref_logp=ref,
                            rollout_logp=rollout,
                            sum_pi_squared=spp,
                            **options[i % len(options)],
                        )
                        self.batches += 1
                    except InvalidArgumentError:
                        self.rejected += 1
                    # a reward function that returned None for one sequence (unscored)
                    scored = np.where(np.arange(n_seqs) == 5, np.float32(np.nan), rewards)
                    sg.advantages(scored, np.arange(n_seqs) // 4, run=ADV_RUN, skip_nan_components=True)
                    i += 1
                    self.stop_event.wait(0.05)
        except BaseException as e:  # surfaced by the test
            self.error = e

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(30)


class Softgate:
    """`softgate serve` in a subprocess on loopback ports, with an admin token."""

    def __init__(self, tmp: Path) -> None:
        self.grpc_port, self.admin_port = free_ports(2)  # distinct (conftest.free_ports)
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.logfile = tmp / "softgate.log"
        self.log = self.logfile.open("wb")
        env = dict(os.environ, SOFTGATE_ADMIN_TOKEN=TOKEN)
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "softgate.cli", "serve",
                "--grpc-host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--admin-host", "127.0.0.1", "--admin-port", str(self.admin_port),
                "--device", "cpu", "--grace-seconds", "2", "--log-level", "WARNING",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("softgate serve exited:\n" + self.logfile.read_text()[-3000:])
            try:
                if httpx.get(self.admin_url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("softgate serve not ready:\n" + self.logfile.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class Prometheus:
    def __init__(self, exe: str, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = yaml.safe_load(BASE_CONFIG.read_text())
        cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
        cfg["rule_files"] = [str(RULES)]
        cfg["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
        cfg["scrape_configs"][0]["authorization"] = {"type": "Bearer", "credentials": TOKEN}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        self.logfile = tmp / "prometheus.log"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited:\n" + self.logfile.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus not ready:\n" + self.logfile.read_text()[-3000:])

    def query(self, expr: str) -> dict[str, Any]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=5)
        body: dict[str, Any] = r.json()
        return body

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for v in dash["templating"]["list"]:
        q = v.get("query")
        if isinstance(q, dict):
            out.append((f"variable {v['name']}", q["query"]))
    return out


def concrete(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "15s")
        .replace("$__interval", "5s")
        .replace("$__range", "5m")
        .replace("${run}", RUN)
        .replace("$run", RUN)
    )


LABEL_VALUES = re.compile(r"^label_values\((\w+),\s*(\w+)\)$")


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[tuple[Prometheus, Softgate, Traffic]]:
    exe = _prometheus()
    server = Softgate(tmp_path)
    prom: Prometheus | None = None
    try:
        server.wait_ready(30)
        prom = Prometheus(exe, tmp_path, f"127.0.0.1:{server.admin_port}")
        with Traffic(f"127.0.0.1:{server.grpc_port}") as traffic:
            yield prom, server, traffic
    finally:
        if prom is not None:
            prom.stop()
        server.stop()


def test_dashboard_queries_return_data_from_a_real_prometheus(stack) -> None:
    prom, server, traffic = stack
    start = time.monotonic()
    prom.wait_ready(20)
    queries = dashboard_queries()
    assert len(queries) >= 20
    pending = dict.fromkeys(queries, "not tried")
    while pending and time.monotonic() - start < DEADLINE_S:
        assert traffic.error is None, traffic.error
        for title, expr in list(pending):
            m = LABEL_VALUES.match(expr)
            if m:
                r = httpx.get(
                    f"{prom.url}/api/v1/label/{m.group(2)}/values", params={"match[]": m.group(1)}, timeout=5
                ).json()
                # (every run with a successful call: an advantages-only one too, an audit)
                if r.get("status") == "success" and {RUN, ADV_RUN} <= set(r["data"]):
                    del pending[(title, expr)]
                else:
                    pending[(title, expr)] = f"label values: {r}"
                continue
            body = prom.query(concrete(expr))
            if body.get("status") != "success":
                pending[(title, expr)] = f"error: {body.get('error')}"
                continue
            result = body["data"]["result"]
            if result and all(_finite(s) for s in result):
                del pending[(title, expr)]
            else:
                pending[(title, expr)] = f"no data yet: {result[:2]}"
        if pending:
            time.sleep(1.0)
    assert not pending, "dashboard queries without data:\n" + "\n".join(
        f"  [{t}] {e}\n      -> {why}" for (t, e), why in pending.items()
    )
    assert traffic.batches > 0 and traffic.rejected > 0

    # every metric the dashboard names is exported by softgate
    assert httpx.get(server.admin_url + "/metrics", timeout=5).status_code == 401
    exposition = httpx.get(server.admin_url + "/metrics", headers=AUTH, timeout=5).text
    exported = {
        line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line.startswith("softgate_")
    }
    named = {n for _, e in queries for n in re.findall(r"\bsoftgate_[a-z0-9_]+", e)}
    assert named, "no softgate metric in the dashboard?"
    missing = named - exported
    assert not missing, f"dashboard names metrics softgate does not export: {sorted(missing)}"

    # the per-run windows of the admin API saw the same traffic
    detail = httpx.get(f"{server.admin_url}/v1/runs/{RUN}", headers=AUTH, timeout=5).json()
    last = detail["windows"]["last_100_batches"]
    assert last["batches"] > 0 and set(last["objectives"]) == {"sapo", "grpo", "gspo"}
    assert 0.0 <= last["grad_retained"] <= 1.0 and "gate_saturation_neg" in last
    assert 0.0 < last["mismatch_clipped_frac"] < 1.0 and 0.0 < last["off_policy_masked_frac"] < 1.0
    assert (
        last["kl_mean"] > 0.0
        and 0.0 < last["mismatch_weight_mean"] < 2.0
        and 0.0 < last["rejected_frac"] < 1.0
    )

    # the recording and alerting rules evaluate without errors on real data
    rules = httpx.get(prom.url + "/api/v1/rules", timeout=5).json()
    groups = rules["data"]["groups"]
    assert {g["name"] for g in groups} == {"softgate-recording", "softgate-training", "softgate-service"}
    bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r.get("health") == "err"]
    assert not bad, bad
    # the target is up
    up = prom.query('up{job="softgate"}')["data"]["result"]
    assert up and up[0]["value"][1] == "1"


def _finite(sample: dict[str, Any]) -> bool:
    try:
        v = float(sample["value"][1])
    except (KeyError, ValueError, TypeError):
        return False
    return v == v and abs(v) != float("inf")
