"""Engine throughput: softgate's closed-form engine vs a plain eager-torch autograd implementation
of the same loss (advantages, ratios, objective, seq_mean_token_mean aggregation, backward, the
same metrics), in one process, on the same batch.

    python bench/engine_bench.py            # 1M and 16M tokens, SAPO and GRPO (a few minutes on 2 cores)
    python bench/engine_bench.py --quick    # 1M tokens only
    python bench/engine_bench.py --device cuda

Columns: autograd (the baseline), eager (Engine(compile=False)), compiled (compile=True),
default (Engine() as `softgate serve` builds it: on CPU the background compile, measured in
its steady state after the compile finished; on CUDA the same as compiled) and served (the
default engine called as `softgate serve` calls it for a request that asks for the gradient
alone: ratio, gate weight and clip mask only for the telemetry's 32K-token sample).

Timing runs under the allocator the service ships with: the script re-executes itself with
LD_PRELOAD=libtcmalloc_minimal when the library exists and is not preloaded yet
(`--allocator system` keeps glibc malloc). Reports tokens/s (median of --repeats timed rounds
after one untimed call; the implementations run round-robin within each round so that load
from other processes hits them alike) and the engine/autograd ratio.

Peak extra memory per token is measured apart, in one subprocess per implementation under
glibc malloc with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=65536, so that every large
tensor is returned to the OS when freed and the peak of one call is not hidden by memory
cached from the previous one): the peak-RSS counter is reset before the call
(`echo 5 > /proc/self/clear_refs`) and (VmHWM - VmRSS before the call) / N is reported; on
CUDA torch.cuda.max_memory_allocated() minus the memory allocated before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from softgate.engine import AggregationConfig, Batch, Engine, Grpo, LossConfig, Sapo
from softgate.observability.telemetry import DEFAULT_CPU_SAMPLE_TOKENS

SEQ_LEN = 512  # mean response length
GROUP = 8  # samples per prompt


def make_batch(n: int, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    b = max(1, n // SEQ_LEN)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN * 3 // 2, (b,), generator=g)
    lengths[-1] = 0
    lengths[-1] = max(0, n - int(lengths.sum()))
    if int(lengths.sum()) != n:  # random lengths overshot: fall back to equal lengths
        lengths = torch.full((b,), n // b)
        lengths[-1] += n - int(lengths.sum())
    logp = -torch.rand(n, generator=g) * 4 - 1e-3
    old = (logp + 0.15 * torch.randn(n, generator=g)).clamp(max=0)
    return Batch(
        logp=logp.to(device),
        offsets=Batch.offsets_from_lengths(lengths).to(device),
        old_logp=old.to(device),
        mask=(torch.rand(n, generator=g) < 0.9).to(device),
        rewards=torch.randint(0, 2, (b,), generator=g).float().to(device),
        group_ids=(torch.randperm(b, generator=g) // GROUP).to(device),
    )


# ---------------------------------------------------------------- the autograd baseline


def autograd_loss(batch: Batch, objective: str) -> tuple[float, torch.Tensor, dict[str, float]]:
    """What a trainer writes without softgate: forward in eager torch, loss.backward()."""
    off = batch.offsets
    lengths = off[1:] - off[:-1]
    b = lengths.numel()
    ids = torch.repeat_interleave(torch.arange(b, device=off.device), lengths)
    m = batch.mask.float()
    # GRPO advantages (group std)
    uniq, inv = torch.unique(batch.group_ids, return_inverse=True)
    r = batch.rewards.double()
    cnt = torch.zeros(len(uniq), dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros_like(cnt).index_add_(0, inv, r) / cnt
    dev = r - mean[inv]
    var = torch.zeros_like(cnt).index_add_(0, inv, dev * dev) / (cnt - 1).clamp(min=1)
    adv_seq = torch.where(cnt[inv] > 1, dev / (var.sqrt()[inv] + 1e-6), torch.zeros_like(dev)).float()
    a = adv_seq[ids]
    lp = batch.logp.detach().clone().requires_grad_(True)
    d = (lp - batch.old_logp).clamp(-20, 20)
    ratio = torch.exp(d)
    if objective == "sapo":
        tau = torch.where(a > 0, 1.0, 1.05)
        p = torch.sigmoid(tau * (ratio - 1))
        per_tok = -(4 / tau) * p * a
    else:
        per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    ylen = torch.zeros(b, device=m.device).index_add_(0, ids, m)
    seq = torch.zeros(b, device=m.device).index_add(0, ids, per_tok * m)
    nonempty = ylen > 0
    loss = (seq[nonempty] / ylen[nonempty]).sum() / nonempty.sum().clamp(min=1)
    loss.backward()
    grad = lp.grad
    with torch.no_grad():
        mb = batch.mask
        pos, neg = mb & (a > 0), mb & (a < 0)
        npos, nneg, n = pos.sum(), neg.sum(), mb.sum()
        metrics = {
            "ratio_mean": ratio[mb].mean(),
            "ratio_min": ratio[mb].min(),
            "ratio_max": ratio[mb].max(),
            "approx_kl": -(d * m).sum() / n,
            "clip_low": (neg & (ratio < 0.8)).sum() / nneg,
            "clip_high": (pos & (ratio > 1.2)).sum() / npos,
            "adv_mean": a[mb].mean(),
            "adv_std": a[mb].std(),
        }
        if objective == "sapo":
            w = 4 * p * (1 - p)
            metrics["gate_mean_pos"] = w[pos].mean()
            metrics["gate_mean_neg"] = w[neg].mean()
            metrics["gate_saturation_pos"] = (pos & (w < 0.5)).sum() / npos
            metrics["gate_saturation_neg"] = (neg & (w < 0.5)).sum() / nneg
            grad_free = -a * ratio * m
            metrics["grad_retained"] = (w * grad_free).abs().sum() / grad_free.abs().sum()
    return float(loss.detach()), grad, {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------- measurement


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _run_once(fn, device: torch.device) -> tuple[float, int]:
    """(seconds, peak extra bytes) of one call of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        base = _status("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else _status("VmHWM") - base
    del out
    return dt, peak


def measure(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, tuple[float, int]]:
    """Median seconds and max peak extra bytes per implementation; the implementations run
    round-robin (one call each per round) so that load from other processes hits them alike."""
    for fn in fns.values():
        fn()  # untimed: warm caches (and compile)
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            runs[k].append(_run_once(fn, device))
    return {k: (statistics.median(t for t, _ in v), max(p for _, p in v)) for k, v in runs.items()}


TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")
IMPLS = ("autograd", "eager", "compiled", "default", "served")
BACKGROUND = ("default", "served")  # engines built as `softgate serve` builds its engine


def _reexec_with_tcmalloc() -> None:
    """Run this script again with tcmalloc preloaded (what the service ships with), once."""
    if not sys.platform.startswith("linux") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = next((p for p in TCMALLOC if os.path.exists(p)), None)
    if lib is None:
        print("(tcmalloc not found: timing under glibc malloc)")
        return
    pre = os.environ.get("LD_PRELOAD", "")
    env = dict(os.environ, LD_PRELOAD=f"{lib}:{pre}" if pre else lib)
    env.setdefault("TCMALLOC_RELEASE_RATE", "0")  # as `softgate serve` sets it (softgate.allocator)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _engine(impl: str, device: torch.device) -> Engine:
    if impl == "eager":
        return Engine(device=device, compile=False)
    if impl == "compiled":
        return Engine(device=device, compile=True)
    return Engine(device=device)  # the served default (SOFTGATE_ENGINE_COMPILE applies)


def _config(objective: str) -> LossConfig:
    obj = Sapo() if objective == "sapo" else Grpo()
    return LossConfig(objective=obj, aggregation=AggregationConfig(mode="seq_mean_token_mean"))


def _fn(impl: str, objective: str, batch: Batch, engine: Engine | None) -> Callable[[], object]:
    if impl == "autograd":
        return lambda: autograd_loss(batch, objective)
    assert engine is not None
    cfg = _config(objective)
    if impl == "served":
        return lambda: engine.loss(batch, cfg, sample_tokens=DEFAULT_CPU_SAMPLE_TOKENS)
    return lambda: engine.loss(batch, cfg)


def _probe(impl: str, objective: str, n: int, device: torch.device) -> None:
    """Subprocess entry: print the peak extra bytes of one call of `impl` as JSON."""
    batch = make_batch(n, device)
    eng = None if impl == "autograd" else _engine(impl, device)
    fn = _fn(impl, objective, batch, eng)
    fn()  # untimed: compiles (and for the default engine queues the background compile)
    if eng is not None:
        eng.wait_compiled()
    fn()
    print(json.dumps({"peak": _run_once(fn, device)[1]}))


def peak_bytes(impl: str, objective: str, n: int, device: torch.device) -> int | None:
    """Peak extra bytes of one call, from a subprocess under glibc with a fixed mmap threshold."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--probe", impl, objective, str(n), "--device", str(device)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return int(json.loads(line)["peak"])
    print(f"(memory probe {impl} {objective} {n} failed: {out.stderr.strip()[-300:]})")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M tokens only, 2 repeats (unless given)")
    ap.add_argument("--sizes", default=None, help="comma-separated token counts (default 1e6,16e6)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; 2 with --quick)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--allocator", choices=("tcmalloc", "system"), default="tcmalloc")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled and default engines")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--probe", nargs=3, metavar=("IMPL", "OBJECTIVE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: expected at least 1 timed round")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.probe:
        _probe(args.probe[0], args.probe[1], int(args.probe[2]), device)
        return
    if args.allocator == "tcmalloc" and device.type == "cpu":
        _reexec_with_tcmalloc()
    sizes = [int(float(s)) for s in (args.sizes or ("1e6" if args.quick else "1e6,16e6")).split(",")]
    repeats = args.repeats or (2 if args.quick else 3)  # (--quick overrode --repeats: an audit)
    impls = [i for i in IMPLS if not (args.no_compile and i in ("compiled", *BACKGROUND))]
    engines = {i: _engine(i, device) for i in impls if i != "autograd"}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpus={os.cpu_count()} repeats={repeats} (median), float32, seq_mean_token_mean, with metrics; "
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or '-'}; load average {load:.1f}"
        + (f"; default engine: compile {engines['default'].compile_mode}" if "default" in engines else "")
    )
    header = f"{'tokens':>10} {'objective':>9} {'impl':>9} {'Mtok/s':>8} {'ms':>9} {'x autograd':>10} {'B/token':>8}"
    print(header)
    for n in sizes:
        batch = make_batch(n, device)
        for name in ("sapo", "grpo"):
            fns: dict[str, Callable[[], object]] = {}
            # the default engines first: their background compile is the real one (the compiled
            # engine then reuses dynamo's cache for the same configuration)
            for impl in sorted(impls, key=lambda i: i not in BACKGROUND):
                eng = engines.get(impl)
                fns[impl] = _fn(impl, name, batch, eng)
                if impl in ("compiled", *BACKGROUND):
                    assert eng is not None
                    t0 = time.perf_counter()
                    fns[impl]()  # compiled: compiles; default: eager, queues the background compile
                    t1 = time.perf_counter()
                    done = eng.wait_compiled(900)
                    t2 = time.perf_counter()
                    what = "first call (compiles)" if impl == "compiled" else "first call (eager)"
                    print(
                        f"{'':>10} {name:>9} ({impl}: {what} {t1 - t0:.1f} s"
                        + (
                            f", background compile ready {t2 - t0:.1f} s after it"
                            if impl in BACKGROUND
                            else ""
                        )
                        + ("" if done else ", compile still running")
                        + ")"
                    )
            fns = {k: fns[k] for k in impls}
            res_t = measure(fns, device, repeats)
            t_ag = res_t["autograd"][0]
            for label, (t, _) in res_t.items():
                mem = None if args.no_memory else peak_bytes(label, name, n, device)
                mem_s = f"{mem / n:>8.1f}" if mem is not None else f"{'-':>8}"
                print(
                    f"{n:>10} {name:>9} {label:>9} {n / t / 1e6:>8.1f} {t * 1e3:>9.1f} {t_ag / t:>10.2f} {mem_s}"
                )
            # same numbers: engine vs autograd baseline
            res = engines["eager"].loss(batch, _config(name))
            loss_ag, grad_ag, _ = autograd_loss(batch, name)
            diff = (res.grad - grad_ag).abs() / grad_ag.abs().max()
            print(
                f"{'':>10} {name:>9} check vs autograd: |loss diff| {abs(res.loss - loss_ag):.2e}, "
                f"max rel grad diff {float(diff.max()):.2e}, tokens off by > 1e-4: {int((diff > 1e-4).sum())} "
                "(float32 ties of max() at a clip bound split the baseline's gradient)"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
