"""PrometheusTelemetry: the Telemetry hooks exported as Prometheus metrics.

Each instance owns a private `CollectorRegistry` (never the process-global one), so
several servers or tests in one process do not share series. Service metrics use
prometheus_client's own types; everything labelled by run lives in a `RunRegistry`
(bounded cardinality: the least recently active run is dropped) and is exported by
`SoftgateCollector`.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

from softgate import __version__
from softgate.engine.objectives import OBJECTIVE_KIND
from softgate.engine.validation import REASON_CODES
from softgate.engine.variance_proxy import NAMES as PROXY_NAMES
from softgate.observability.collector import BATCH_SUMMARIES, SIGNED, SoftgateCollector
from softgate.observability.distributions import GATE_EDGES, RATIO_EDGES, SIGNS, Bucketer
from softgate.observability.runs import (
    BatchRecord,
    RunRegistry,
    has_tokens,
    last,
    sanitize_run,
    window,
    windows,
)
from softgate.telemetry import Telemetry
from softgate.threads import one_thread

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
MAX_REASONS = 64
# Series exported at 0 from start-up, so that the first event after a start is an increase
# (`increase()` / `rate()` cannot see a series that appears at 1): every RPC of the service,
# the status codes a server answers, every reason code of the engine and of the transport.
RPCS = tuple(pb.DESCRIPTOR.services_by_name["LossService"].methods_by_name)
CODES = (
    "OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL", "UNAVAILABLE",
)  # fmt: skip
# reason codes softgate.grpc gives besides the engine's (a test reads them from its source)
TRANSPORT_REASONS = (
    "bad_protobuf", "bad_length", "shape_mismatch", "bad_bool", "too_large", "inconsistent", "unexpected",
)  # fmt: skip
REASONS = tuple(dict.fromkeys((*REASON_CODES, *TRANSPORT_REASONS)))
DEFER_MAX_TOKENS = 1 << 16  # larger results: at most MAX_BIG_PENDING queued (PrometheusTelemetry._later)
MAX_BIG_PENDING = 1
# queued recordings that are recorded without waiting for a kick: a safety net above the
# servicer's own bound (servicer.KICK_BACKLOG calls, two recordings each)
MAX_QUEUED = 128
DEFAULT_CPU_SAMPLE_TOKENS = 1 << 15  # bucketize costs ~20 ns a token on CPU: ~3 ms per batch
log = logging.getLogger("softgate.observability")
_REASON_BAD = re.compile(r"[^a-z0-9_]+")


def _numel(x: Any) -> int:
    try:
        return int(x.numel())
    except Exception:
        return 0


def _reason_label(reason: str) -> str:
    r = _REASON_BAD.sub("_", str(reason).strip().lower()).strip("_")[:48]
    return r or "unknown"


# engine metric names (softgate.engine.metrics.METRIC_NAMES) -> the names used here
ALIASES = {
    "adv_mean": "advantage_mean",
    "adv_std": "advantage_std",
    "degenerate_group_frac": "degenerate_group_fraction",
}
_NO_GROUPS_KEYS = ("degenerate_group_fraction", "reward_mean", "reward_std")


def _normalize(metrics: dict[str, Any] | None) -> dict[str, Any]:
    m = dict(metrics or {})
    for src, dst in ALIASES.items():
        if src in m and dst not in m:
            m[dst] = m[src]
    # without groups (the caller gave advantages) rewards and degenerate share are undefined
    if "num_groups" in m and not m["num_groups"]:
        for k in _NO_GROUPS_KEYS:
            m.pop(k, None)
    return m


def _count_rewarded(st: Any, sequences: float, unscored: float) -> None:
    """softgate_reward_sequences_total: a batch's sequences, those without a reward apart."""
    st.inc("softgate_reward_sequences_total", ("scored",), max(sequences - unscored, 0.0))
    st.inc("softgate_reward_sequences_total", ("unscored",), unscored)


def _f(metrics: dict[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class PrometheusTelemetry(Telemetry):
    """Exports requests, rejections and the trust-region statistics of every loss.

    `settings` may be any object; read are `max_runs` (default 32), `device` and, optionally,
    `metrics_cpu_sample_tokens`. `cpu_sample_tokens` (default: that attribute, else 32768;
    None: exact) bounds the tokens bucketed per batch on a CPU device (see
    `distributions.Bucketer`); on CUDA every token is bucketed.
    """

    def __init__(
        self,
        settings: Any = None,
        registry: CollectorRegistry | None = None,
        cpu_sample_tokens: int | str | None = "settings",
        *,
        defer: bool = False,
    ) -> None:
        self.settings = settings
        # deferred mode: the per-run statistics of a result (bucketing its tokens, the run
        # registry) are recorded in call order after the RPC's response has gone out (`kick`);
        # every read (exposition, runs) records what is still queued first
        self.defer = defer
        self._queue: deque[tuple[Any, tuple[Any, ...], bool]] = deque()
        self._queue_lock = threading.Lock()
        self._record_lock = threading.RLock()  # one recorder at a time, in queue order
        self._big_pending = 0
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.max_runs = int(getattr(settings, "max_runs", None) or 32)
        if cpu_sample_tokens == "settings":
            sample = getattr(settings, "metrics_cpu_sample_tokens", DEFAULT_CPU_SAMPLE_TOKENS)
        else:
            sample = cpu_sample_tokens
        self.bucketer = Bucketer(cpu_sample_tokens=sample)
        self.sample_tokens = sample
        self.lock = threading.Lock()
        self.runs = RunRegistry(self.max_runs)
        self._reasons: set[str] = set()
        self._in_flight: dict[tuple[str, str], deque[int]] = defaultdict(deque)
        r = self.registry
        self.requests = Counter(
            "softgate_requests", "RPCs handled, by method and gRPC status code.", ["rpc", "code"], registry=r
        )
        self.latency = Histogram(
            "softgate_request_duration_seconds",
            "Time from receiving an RPC to sending its response (calls refused at admission, busy "
            "or shutting down, are counted in softgate_requests_total but not observed here).",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter(
            "softgate_request_bytes", "Serialized request bytes received.", ["rpc"], registry=r
        )
        self.bytes_out = Counter(
            "softgate_response_bytes", "Serialized response bytes sent.", ["rpc"], registry=r
        )
        self.in_flight = Gauge(
            "softgate_in_flight_requests", "RPCs being processed now.", ["rpc"], registry=r
        )
        self.in_flight_tokens = Gauge(
            "softgate_in_flight_tokens", "Tokens of the RPCs being processed now.", registry=r
        )
        self.rejected_inputs = Counter(
            "softgate_rejected_inputs",
            "Requests refused for invalid input, by rpc and reason code (one request may count under several reasons).",
            ["rpc", "reason"],
            registry=r,
        )
        self.busy_refusals = Counter(
            "softgate_busy_refusals",
            "Requests turned away RESOURCE_EXHAUSTED at max_concurrent_rpcs, by rpc (back-pressure "
            "clients retry; also counted in softgate_requests_total, as is a device out of memory).",
            ["rpc"],
            registry=r,
        )
        self.device_info = Info("softgate_device", "The device the engine computes on.", registry=r)
        # softgate_engine_configurations, exported by the collector from one read a scrape
        self.engine_states: Callable[[], dict[str, int]] = dict
        # softgate_admitted_rpcs and softgate_tls_cert_not_after_seconds, read a scrape
        self.admitted: Callable[[], int] | None = None
        self.tls_not_after: Callable[[], float | None] = lambda: None
        self.telemetry_errors = Counter(
            "softgate_telemetry_errors",
            "Engine results the telemetry failed to record (the RPC itself is unaffected).",
            ["hook"],
            registry=r,
        )
        self._rpc_children: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._request_children: dict[tuple[str, str], Any] = {}
        self.set_device(getattr(settings, "device", None))
        for rpc in RPCS:
            self._rpc(rpc)
            for code in CODES:
                self._request_children[(rpc, code)] = self.requests.labels(rpc, code)
            for reason in REASONS:
                self.rejected_inputs.labels(rpc, reason)
            self.busy_refusals.labels(rpc)
        for hook in ("observe_loss", "observe_advantages"):
            self.telemetry_errors.labels(hook)
        self._reasons.update(REASONS)
        self.collector = SoftgateCollector(self)
        r.register(self.collector)

    # ------------------------------------------------------------ service
    def watch_engine(self, states: Callable[[], dict[str, int]]) -> None:
        """Export the engine's configurations by state, read once per scrape (CompiledKernel.states)."""
        self.engine_states = states

    def watch_server(self, admitted: Callable[[], int], tls_not_after: Callable[[], float | None]) -> None:
        """Export the calls holding a slot and the served certificate's expiry, read a scrape."""
        self.admitted, self.tls_not_after = admitted, tls_not_after

    def set_device(self, device: Any = None) -> None:
        import torch

        dev = str(device) if device and str(device) != "auto" else ""
        if not dev:
            dev = "cuda:0" if torch.cuda.is_available() else "cpu"
        name = "cpu"
        if dev.startswith("cuda") and torch.cuda.is_available():
            try:
                idx = int(dev.split(":", 1)[1]) if ":" in dev else 0
                name = torch.cuda.get_device_name(idx)
            except Exception:
                name = "cuda"
        self.device_info.info(
            {"device": dev, "name": name, "torch_version": torch.__version__, "version": __version__}
        )

    def _rpc(self, rpc: str) -> tuple[Any, Any, Any, Any]:
        """The per-rpc children (in flight, latency, bytes in, bytes out), looked up once."""
        c = self._rpc_children.get(rpc)
        if c is None:
            c = (
                self.in_flight.labels(rpc),
                self.latency.labels(rpc),
                self.bytes_in.labels(rpc),
                self.bytes_out.labels(rpc),
            )
            self._rpc_children[rpc] = c
        return c

    def request_started(self, rpc: str, run: str, tokens: int) -> None:
        tokens = max(int(tokens or 0), 0)
        self._rpc(rpc)[0].inc()
        self.in_flight_tokens.inc(tokens)
        with self.lock:
            self._in_flight[(rpc, run or "")].append(tokens)

    # ------------------------------------------------------------ deferred recording
    def _later(self, fn: Any, *args: Any, tokens: int = 0) -> None:
        """Run `fn(*args)` now, or (deferred mode) queue it until `kick` (the RPC has ended)
        records what is queued, in call order.

        A queued result holds its per-token tensors: at most MAX_BIG_PENDING results of more
        than DEFER_MAX_TOKENS tokens wait at once; past that the calling thread records what is
        queued and then this one."""
        if not self.defer:
            fn(*args)
            return
        big = tokens > DEFER_MAX_TOKENS
        with self._queue_lock:
            overflow = big and self._big_pending >= MAX_BIG_PENDING
            if not overflow:
                self._queue.append((fn, args, big))
                self._big_pending += big
            full = len(self._queue) >= MAX_QUEUED
        if overflow:
            with self._record_lock:
                self._record_queued()  # keep the order: what is queued goes first
                fn(*args)
        elif full:  # nobody kicked for a while (e.g. no RPC ends): record now
            self.kick()

    def kick(self) -> None:
        """Record what is queued, in the calling thread. The servicer calls it on the event loop
        once an RPC has ended (after a small one, once it is idle: servicer.KICK_IDLE_S): after
        its response has gone out, and with no second thread
        holding the GIL while the next request arrives. A recording thread cost a 4k-token
        caller 0.3-0.8 ms per call that way, for ~0.2 ms of work (bench/RESULTS.md)."""
        with self._record_lock:
            self._record_queued()

    def _record_queued(self) -> None:
        """Run the queued recordings in order; call with _record_lock held."""
        while True:
            with self._queue_lock:
                if not self._queue:
                    return
                items = list(self._queue)  # (fn, args, big)
                self._queue.clear()
            for fn, args, big in items:
                try:
                    fn(*args)
                except Exception:  # a recording must never fail whoever kicked it
                    log.exception("deferred telemetry recording failed")
                finally:
                    if big:
                        with self._queue_lock:
                            self._big_pending -= 1

    def flush(self, timeout: float = 10.0) -> bool:
        """Record everything deferred now; False if another thread's recording did not finish
        within `timeout`."""
        if not self._record_lock.acquire(timeout=timeout):
            return False
        try:
            self._record_queued()
        finally:
            self._record_lock.release()
        return True

    def close(self) -> None:
        self.flush()

    def request_finished(
        self,
        rpc: str,
        run: str,
        code: str,
        seconds: float | None,
        bytes_in: int,
        bytes_out: int,
        tokens: int,
        sequences: int,
        started: bool = True,
    ) -> None:
        own = max(int(tokens or 0), 0)
        with self.lock:
            q = self._in_flight.get((rpc, run or "")) if started else None
            # (a call that never started took no place: the one of a concurrent call of its
            # run and rpc, taken instead, dropped the in-flight gauges while it ran)
            started_tokens = None
            if q:  # the call's own start (its token count), else the oldest of its run and rpc
                try:
                    q.remove(own)
                    started_tokens = own
                except ValueError:
                    started_tokens = q.popleft()
            if q is not None and not q:
                del self._in_flight[(rpc, run or "")]
        if code == "OK" and (tokens or sequences):  # (a call without work, ListAlgorithms say,
            # names no run: it must not take a run's slot, nor evict one)
            self._later(self._processed, rpc, run, tokens, sequences)
        in_flight, latency, b_in, b_out = self._rpc(rpc)
        if started_tokens is not None:
            in_flight.dec()
            self.in_flight_tokens.dec(started_tokens)
        key = (rpc, code or "UNKNOWN")
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(*key)
        counter.inc()
        if seconds is not None and math.isfinite(seconds) and seconds >= 0:
            latency.observe(seconds)
        if bytes_in:
            b_in.inc(max(int(bytes_in), 0))
        if bytes_out:
            b_out.inc(max(int(bytes_out), 0))

    def _processed(self, rpc: str, run: str, tokens: int, sequences: int) -> None:
        with self.lock:
            _, st = self.runs.state(run)
            st.inc("softgate_processed_tokens_total", (rpc,), tokens)
            st.inc("softgate_processed_sequences_total", (rpc,), sequences)

    def busy(self, rpc: str) -> None:
        self.busy_refusals.labels(rpc).inc()

    def rejected(self, rpc: str, reasons: list[str]) -> None:
        labels = {_reason_label(x) for x in (reasons or ["unknown"])}
        for reason in sorted(labels):
            with self.lock:
                if reason not in self._reasons:
                    if len(self._reasons) >= MAX_REASONS:
                        reason = "other"
                    self._reasons.add(reason)
            self.rejected_inputs.labels(rpc, reason).inc()

    # ------------------------------------------------------------ engine results
    def observe_loss(self, run: str, config: Any, result: Any) -> None:
        """Record one LossResult (deferred mode: later, see `_later`); never raises (a failure
        is logged and counted)."""
        n = _numel(getattr(result, "grad", None))
        self._later(self._safe, "observe_loss", self._observe_loss, run, config, result, tokens=n)

    def observe_advantages(self, run: str, config: Any, result: Any) -> None:
        """Record one AdvantageResult; never raises."""
        self._later(self._safe, "observe_advantages", self._observe_advantages, run, config, result)

    def _safe(self, hook: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self._failed(hook)

    def _failed(self, hook: str) -> None:
        self.telemetry_errors.labels(hook).inc()
        log.exception("telemetry hook %s failed", hook)

    def _observe_loss(self, run: str, config: Any, result: Any) -> None:
        objective = str(getattr(getattr(config, "objective", None), "name", "unknown"))
        with one_thread():  # a sample of at most cpu_sample_tokens: no OpenMP team to wait for
            k = int(getattr(result, "sample_stride", 1))  # > 1: the engine sampled ratio and gate
            adv, mask = (
                (result.advantages, result.mask) if k == 1 else (result.advantages[::k], result.mask[::k])
            )
            codes = (result.ratio_bucket, result.gate_bucket, result.bucket_sums)
            b = self.bucketer(result.ratio, result.gate_weight, adv, mask, stride=k, codes=codes)
        m = _normalize(getattr(result, "metrics", None))
        now = time.time()
        # token counts per sign: exact from the engine's metrics when present
        r_tok, g_tok = b.ratio_counts.sum(axis=1).tolist(), b.gate_counts.sum(axis=1).tolist()
        tok = dict(zip(SIGNS, r_tok, strict=True))
        n_tok = _f(m, "num_tokens")
        if _f(m, "tokens_pos") is not None and _f(m, "tokens_neg") is not None:
            tok["pos"], tok["neg"] = float(m["tokens_pos"]), float(m["tokens_neg"])
            if _f(m, "tokens_zero") is not None:
                tok["zero"] = float(m["tokens_zero"])
            elif n_tok is not None:
                tok["zero"] = max(n_tok - tok["pos"] - tok["neg"], 0.0)
        if n_tok is None:
            n_tok = sum(tok.values())
        n_seq = _f(m, "num_seqs") or 0.0
        if not n_seq and not n_tok:  # an empty batch: no work, no run's slot taken (nor evicted)
            return
        values = {
            "clip_high": _f(m, "clip_high"),
            "clip_low": _f(m, "clip_low"),
            "dual_clip": _f(m, "dual_clip"),
            "gate_saturation_pos": _f(m, "gate_saturation_pos"),
            "gate_saturation_neg": _f(m, "gate_saturation_neg"),
            "gate_mean_pos": _f(m, "gate_mean_pos"),
            "gate_mean_neg": _f(m, "gate_mean_neg"),
            "grad_retained": _f(m, "grad_retained"),
            "approx_kl": _f(m, "approx_kl"),
            "ratio_mean": _f(m, "ratio_mean"),
            "ratio_min": _f(m, "ratio_min"),
            "ratio_max": _f(m, "ratio_max"),
            "degenerate_group_fraction": _f(m, "degenerate_group_fraction"),
            "reward_mean": _f(m, "reward_mean"),
            "reward_std": _f(m, "reward_std"),
            "advantage_mean": _f(m, "advantage_mean"),
            "advantage_std": _f(m, "advantage_std"),
            "kl_mean": _f(m, "kl_mean"),
            "kl_clamped_frac": (_f(m, "kl_clamped_tokens") or 0.0) / n_tok if n_tok else 0.0,
            "reward_kl_mean": _f(m, "reward_kl_mean"),
            "mismatch_weight_mean": _f(m, "mismatch_weight_mean"),
            "mismatch_clipped_frac": _f(m, "mismatch_clipped_frac"),
            "mismatch_norm_factor": _f(m, "mismatch_norm_factor"),
            "off_policy_masked_frac": _f(m, "off_policy_masked_frac"),
            "rejected_frac": None,  # (below: of the tokens the batch had before rollout rejection)
            "unscored_frac": None,  # (below: of the sequences, when the advantages came from rewards)
            "rollout_kl": _f(m, "rollout_kl"),
            "rollout_k3_kl": _f(m, "rollout_k3_kl"),
            "variance_proxy_total_power": _f(m, "variance_proxy_total_power"),
            "variance_proxy_a_squared": _f(m, "variance_proxy_a_squared"),
            # (>= 0 but for rounding: a summary's _sum must not go down)
            "variance_proxy_w": max(_f(m, "variance_proxy_w") or 0.0, 0.0),
        }
        # the engine's 0 for a clip the objective does not have means "not applicable": left
        # out, or it dilutes the other objectives' fractions wherever they are summed or averaged
        obj = getattr(config, "objective", None)
        # no clip for sapo, sapo_seq, reinforce and dro (kl_cov's: its penalised tokens)
        if OBJECTIVE_KIND.get(getattr(obj, "name", None) or "") in ("sapo", "reinforce", "dro"):
            values["clip_high"] = values["clip_low"] = None
        if getattr(obj, "dual_clip", None) is None:  # only grpo and gspo have one, when configured
            values["dual_clip"] = None
        # the corrections a batch was not configured with: their neutral 0 / 1 read "not applicable"
        if getattr(config, "kl", None) is None:
            values["kl_mean"] = values["kl_clamped_frac"] = None
        if getattr(config, "reward_kl", None) is None:
            values["reward_kl_mean"] = None
        if getattr(config, "mismatch", None) is None:
            values["mismatch_weight_mean"] = values["mismatch_clipped_frac"] = None
        if not getattr(getattr(config, "mismatch", None), "batch_normalize", False):
            values["mismatch_norm_factor"] = None
        if getattr(config, "off_policy_mask_threshold", None) is None:
            values["off_policy_masked_frac"] = None
        if not _f(m, "variance_proxy_tokens"):  # (no sum_pi_squared, or no trained token)
            for proxy in PROXY_NAMES:
                values[proxy] = None
        if not n_tok:  # no trained token: the engine's 0 mean and std stand for "none"
            values["advantage_mean"] = values["advantage_std"] = None
        rollout_tokens = _f(m, "rollout_tokens") or 0.0
        if not rollout_tokens:  # (no rollout_logp, or no trained token: the sampler's KL is none)
            values["rollout_kl"] = values["rollout_k3_kl"] = None
        rejected = _f(m, "rejected_tokens") if getattr(config, "rejection", ()) else None
        if rejected is not None:
            values["rejected_frac"] = rejected / (n_tok + rejected) if n_tok + rejected > 0 else 0.0
        unscored = _f(m, "unscored_seqs") or 0.0
        from_rewards = bool(_f(m, "num_groups"))  # (a caller's own advantages are not counted)
        if from_rewards and n_seq > 0:
            values["unscored_frac"] = unscored / n_seq
            if unscored >= n_seq:  # no reward at all: the engine's 0 stands for "none", not a 0 reward
                values["reward_mean"] = values["reward_std"] = None
        with self.lock:
            _, st = self.runs.state(run, now)
            o = (objective,)
            st.inc("softgate_loss_batches_total", o, 1)
            for s in SIGNS:
                st.inc("softgate_loss_tokens_total", (objective, s), tok[s])
            for s, frac in (("pos", values["clip_high"]), ("neg", values["clip_low"])):
                if frac is not None:
                    st.inc("softgate_clipped_tokens_total", (objective, s), round(frac * tok[s]))
            if values["dual_clip"] is not None:
                st.inc("softgate_dual_clipped_tokens_total", o, round(values["dual_clip"] * tok["neg"]))
            for s in ("pos", "neg"):
                sat = values[f"gate_saturation_{s}"]
                if sat is not None:
                    st.inc("softgate_gate_saturated_tokens_total", (objective, s), round(sat * tok[s]))
            for key, counter in (
                ("kl_clamped_frac", "softgate_kl_clamped_tokens_total"),
                ("mismatch_clipped_frac", "softgate_mismatch_clipped_tokens_total"),
                ("off_policy_masked_frac", "softgate_off_policy_masked_tokens_total"),
            ):
                if (frac := values[key]) is not None:
                    st.inc(counter, o, round(frac * n_tok))
            if rejected is not None:
                st.inc("softgate_rollout_rejected_tokens_total", o, rejected)
                st.inc("softgate_rollout_rejected_sequences_total", o, _f(m, "rejected_seqs") or 0.0)
            if from_rewards:
                _count_rewarded(st, n_seq, unscored)
            clamped = _f(m, "clamped_tokens")
            if clamped is not None:
                st.inc("softgate_clamped_tokens_total", o, clamped)
            # per-batch summaries and last-batch gauges, of batches with the tokens a statistic
            # is over (runs.TOKEN_WEIGHTS): a sign's fraction when that sign has tokens,
            # grad_retained when a token carries a policy gradient (A != 0), approx_kl and the
            # ratio's when one is trained (their 1 / 0 stands for "none": read as "all
            # retained", batches of zero advantages hid a collapse)
            counts = {f"tokens_{s}": n for s, n in tok.items()}
            counts["rollout_tokens"] = rollout_tokens
            for name, key, sign in BATCH_SUMMARIES:
                v = values.get(key)
                if v is None or not has_tokens(key, counts):
                    continue
                labels: tuple[str, ...] = (objective, sign) if sign else (objective,)
                if name == "softgate_batch_degenerate_group_fraction":
                    labels = ()
                if key in SIGNED:  # its two parts, sums that only grow (collector.SIGNED)
                    for part, x in (("_positive", max(v, 0.0)), ("_negative", max(-v, 0.0))):
                        st.observe(name + part, labels, x, self.collector.edges[name + part])
                else:
                    st.observe(name, labels, v, self.collector.edges[name])
            for key in ("ratio_mean", "ratio_min", "ratio_max", "approx_kl", "grad_retained"):
                gv = values[key]
                if gv is not None and has_tokens(key, counts):
                    st.set(f"softgate_batch_{key}", o, gv)
            self._set_reward_gauges(st, values)
            for i, s in enumerate(SIGNS):
                if s == "zero":  # A = 0 tokens carry no gradient: their ratio and gate are not read
                    continue
                if r_tok[i] > 0:
                    st.add_hist(
                        "softgate_token_ratio", (objective, s), b.ratio_counts[i], float(b.ratio_sums[i]),
                        len(RATIO_EDGES) + 1,
                    )  # fmt: skip
                if g_tok[i] > 0:
                    st.add_hist(
                        "softgate_token_gate_weight", (objective, s), b.gate_counts[i], float(b.gate_sums[i]),
                        len(GATE_EDGES) + 1,
                    )  # fmt: skip
            st.batches.append(
                BatchRecord(
                    t=now,
                    objective=objective,
                    tokens=int(n_tok),
                    seqs=int(n_seq),
                    groups=int(_f(m, "num_groups") or 0),
                    values={
                        **{k: v for k, v in values.items() if v is not None},
                        "tokens_pos": tok["pos"],
                        "tokens_neg": tok["neg"],
                        "tokens_zero": tok["zero"],
                        # (rejected_frac's weight: the tokens sent, those rejected included)
                        **({"tokens_rejected": rejected} if rejected is not None else {}),
                        **({"seqs_scored": n_seq - unscored} if unscored else {}),  # (reward_mean's weight)
                        **({"rollout_tokens": rollout_tokens} if rollout_tokens else {}),
                    },
                )
            )

    def _observe_advantages(self, run: str, config: Any, result: Any) -> None:
        m = _normalize(getattr(result, "metrics", None))
        values = {
            k: _f(m, k)
            for k in (
                "degenerate_group_fraction",
                "reward_mean",
                "reward_std",
                "advantage_mean",
                "advantage_std",
            )
        }
        now = time.time()
        adv = getattr(result, "advantages", None)
        seqs = 0 if adv is None else int(adv.numel())
        if not seqs:  # an empty call: no work, no run's slot taken (nor evicted), no gauge set to 0
            return
        unscored = _f(m, "unscored_seqs") or 0.0
        values["unscored_frac"] = unscored / seqs
        if unscored >= seqs:  # (no reward at all: as in _observe_loss)
            values["reward_mean"] = values["reward_std"] = None
        if unscored:
            values["seqs_scored"] = seqs - unscored  # (the reward statistics' weight)
        with self.lock:
            _, st = self.runs.state(run, now)
            st.inc("softgate_advantage_batches_total", (), 1)
            _count_rewarded(st, seqs, unscored)
            kept = {k: v for k, v in values.items() if v is not None}
            groups = int(_f(m, "num_groups") or 0)
            st.advantage_calls.append(
                BatchRecord(t=now, objective="", tokens=0, seqs=seqs, groups=groups, values=kept)
            )
            if values["degenerate_group_fraction"] is not None:
                st.observe(
                    "softgate_batch_degenerate_group_fraction",
                    (),
                    values["degenerate_group_fraction"],
                    self.collector.edges["softgate_batch_degenerate_group_fraction"],
                )
            self._set_reward_gauges(st, values)

    @staticmethod
    def _set_reward_gauges(st: Any, values: dict[str, float | None]) -> None:
        for key in (
            "reward_mean",
            "reward_std",
            "advantage_mean",
            "advantage_std",
            "degenerate_group_fraction",
        ):
            v = values.get(key)
            if v is not None:
                st.set(f"softgate_{key}", (), v)

    # ------------------------------------------------------------ reading back
    def exposition(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)

    def run_summary(self, run: str) -> dict[str, Any] | None:
        """One run's totals and windows, `run` as a trainer names it (sanitised as its label is)."""
        self.flush()
        run = sanitize_run(run)
        # copy under the lock, summarise after: the event loop takes it for every RPC and
        # recording, and summarising 1000 batches over four windows takes milliseconds
        with self.lock:
            st = self.runs.get(run)
            if st is None:
                return None
            out: dict[str, Any] = {
                "run": run,
                "first_seen": st.first_seen,
                "last_seen": st.last_seen,
                "batches_recorded": len(st.batches),
                "totals": _totals(st),
            }
            batches, advantage_calls = list(st.batches), list(st.advantage_calls)
        return {**out, "windows": windows(batches, advantage_calls)}

    def runs_overview(self) -> list[dict[str, Any]]:
        """Every run, most recent first, with its last 10 batches summarised: only those (all
        four windows of 20 runs held the event loop 0.4 s for nothing, an audit)."""
        self.flush()
        with self.lock:  # copy under the lock, summarise after (see run_summary)
            rows = [
                (
                    {"run": name, "first_seen": st.first_seen, "last_seen": st.last_seen},
                    last(st.batches, 10),
                    last(st.advantage_calls, 10),
                    _totals(st),
                )
                for name, st in sorted(self.runs.items(), key=lambda x: -x[1].last_seen)
            ]
        now = time.time()
        return [
            {**row, "last_10_batches": window("last_10_batches", batches, calls, now), "totals": totals}
            for row, batches, calls, totals in rows
        ]


def _totals(st: Any) -> dict[str, Any]:
    tokens: dict[str, float] = {}
    batches = advantage_calls = 0.0
    for (name, labels), v in st.counters.items():
        if name == "softgate_loss_tokens_total":
            tokens[labels[1]] = tokens.get(labels[1], 0.0) + v
        elif name == "softgate_loss_batches_total":
            batches += v
        elif name == "softgate_advantage_batches_total":
            advantage_calls += v
    return {
        "loss_batches": int(batches),
        "loss_tokens": {k: int(v) for k, v in sorted(tokens.items())},
        "advantage_calls": int(advantage_calls),
    }


__all__ = ["PrometheusTelemetry", "sanitize_run"]
