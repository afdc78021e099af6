"""Where a small request's time goes inside the engine: the end-to-end bench's batch (SAPO,
three float32 inputs) computed as the server computes it (the default engine, the gradient
copied back to the host), timed, then one call under torch.profiler.

    python bench/latency_profile.py                   # 4096 tokens, CUDA when present
    python bench/latency_profile.py --device cpu --tokens 4096,65536
    python bench/latency_profile.py --device cuda --host-max-tokens 0 --top 0 --tokens 4096,65536
                                                      # every size on the GPU, no profiler table

Prints the median per call and the profiler's operators by their own host time, with the
CUDA runtime calls that block (synchronisations, copies) counted apart. Also the median of
calls that each follow `--idle-ms` of sleep (the thread idle, as a server between requests)
and of busy Python: on the 2-core VM a 4k call took about twice its back-to-back time after
a sleep, which is most of why the engine costs more inside `softgate serve` than here.

`--during-compiles K` (a background-compiling engine, the CPU's default) then makes K other
configurations' first calls, which queue their compiles, and times the size's calls (each
after the idle gap) until those compiles finish, against the same calls idle just before:
what the server's background compiles cost the requests it serves meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from e2e_bench import engine_batch  # noqa: E402
from softgate.engine import Batch, Cispo, Engine, Gppo, Grpo, LossConfig, Reinforce  # noqa: E402
from softgate.engine.transfer import to_host  # noqa: E402
from softgate.grpc.servicer import DEFAULT_INLINE_MAX_TOKENS  # noqa: E402
from softgate.threads import one_thread  # noqa: E402


def timed(call: Callable[[], None], reps: int, before: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each of `reps` calls, each after `before()` (untimed) when given."""
    ts = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    return ts


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--top", type=int, default=25, help="profiler rows (0: no profile)")
    ap.add_argument(
        "--host-max-tokens",
        type=int,
        default=None,
        help="a CUDA engine's host_max_tokens (default: the engine's; 0: every size on the GPU)",
    )
    ap.add_argument(
        "--idle-ms", type=float, default=1.0, help="the gap before each call of the idle rows (0: none)"
    )
    ap.add_argument(
        "--during-compiles",
        type=int,
        default=0,
        metavar="K",
        help="also time calls while K other configurations compile in the background (at most 4)",
    )
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    host = {} if args.host_max_tokens is None else {"host_max_tokens": args.host_max_tokens}
    eng = Engine(device=dev, **host)
    cfg = LossConfig()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    print(f"device={dev} torch={torch.__version__} compile={eng.compile_mode}")
    for n in (int(s) for s in args.tokens.split(",")):
        batch = engine_batch(n)
        # the server runs a small CPU call on one intra-op thread (servicer._inline), so does this
        small = eng.device_for(batch).type == "cpu" and n <= DEFAULT_INLINE_MAX_TOKENS
        with one_thread() if small else contextlib.nullcontext():
            profile_size(eng, cfg, batch, args, acts)


def profile_size(
    eng: Engine, cfg: LossConfig, batch: Batch, args: argparse.Namespace, acts: list[Any]
) -> None:
    n = batch.logp.numel()

    def call(batch: Batch = batch) -> None:
        to_host([eng.loss(batch, cfg).grad])

    for _ in range(20):  # compiles on the first call (sync mode), then warm
        call()
    eng.wait_compiled(600)
    ts = timed(call, args.reps)
    where = eng.device_for(batch)
    print(
        f"\n{n} tokens on {where}: median {statistics.median(ts) * 1e6:.0f} us, min {min(ts) * 1e6:.0f} us per call"
    )
    if args.idle_ms > 0:
        gap = args.idle_ms / 1e3
        asleep = statistics.median(timed(call, args.reps, functools.partial(time.sleep, gap))) * 1e6
        busy = statistics.median(timed(call, args.reps, functools.partial(_spin, gap))) * 1e6
        print(
            f"after {args.idle_ms:g} ms asleep: median {asleep:.0f} us; after {args.idle_ms:g} ms busy: {busy:.0f} us"
        )
    if args.during_compiles > 0:
        during_compiles(eng, call, args)
    if args.top <= 0:
        return
    with profile(activities=acts) as prof:
        for _ in range(10):
            call()
    ka = prof.key_averages()
    blocking = [e for e in ka if "Synchronize" in e.key or "Memcpy" in e.key or "memcpy" in e.key]
    launches = sum(e.count for e in ka if "LaunchKernel" in e.key or "cuLaunch" in e.key) / 10
    print(
        f"per call: {launches:.0f} kernel launches; blocking calls: "
        + (
            ", ".join(f"{e.key} x{e.count / 10:g} ({e.self_cpu_time_total / 10:.0f} us)" for e in blocking)
            or "-"
        )
    )
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.top))


def during_compiles(eng: Engine, call: Callable[[], None], args: argparse.Namespace) -> None:
    """Median of `call` (each after the idle gap) idle, then while `--during-compiles` other
    configurations compile in the engine's background thread, in one run."""
    gap = functools.partial(time.sleep, max(args.idle_ms, 0.0) / 1e3)
    idle = timed(call, args.reps, gap)
    batch = engine_batch(4096)
    for objective in (Grpo(), Cispo(), Gppo(), Reinforce())[: args.during_compiles]:
        eng.loss(batch, LossConfig(objective=objective))  # eager; queues this configuration's compile
    t0, busy = time.perf_counter(), []
    while not eng.wait_compiled(0):
        busy += timed(call, 10, gap)
    wall = time.perf_counter() - t0
    if not busy:  # an eager engine (torch < 2.11, compile off) queues none (an audit: it crashed)
        print(
            f"no compile was queued (engine compile mode {eng.compile_mode}): nothing to time during compiles"
        )
        return
    ms = [statistics.median(ts) * 1e6 for ts in (idle, busy)]
    p90 = [statistics.quantiles(ts, n=10)[-1] * 1e6 for ts in (idle, busy)]
    print(
        f"idle: median {ms[0]:.0f} us (p90 {p90[0]:.0f}); during {args.during_compiles} background "
        f"compiles ({wall:.1f} s, {len(busy)} calls): median {ms[1]:.0f} us (p90 {p90[1]:.0f}), "
        f"x{ms[1] / ms[0]:.2f}"
    )


if __name__ == "__main__":
    main()
