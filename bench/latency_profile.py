"""Where a small request's time goes inside the engine: the end-to-end bench's batch (SAPO,
three float32 inputs) computed as the server computes it (the default engine, the gradient
copied back to the host), timed, then one call under torch.profiler.

    python bench/latency_profile.py                   # 4096 tokens, CUDA when present
    python bench/latency_profile.py --device cpu --tokens 4096,65536

Prints the median per call and the profiler's operators by their own host time, with the
CUDA runtime calls that block (synchronisations, copies) counted apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from e2e_bench import engine_batch  # noqa: E402
from softgate.engine import Batch, Engine, LossConfig  # noqa: E402
from softgate.engine.transfer import to_host  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    eng = Engine(device=dev)
    cfg = LossConfig()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    print(f"device={dev} torch={torch.__version__} compile={eng.compile_mode}")
    for n in (int(s) for s in args.tokens.split(",")):
        batch = engine_batch(n)

        def call(batch: Batch = batch) -> None:
            to_host([eng.loss(batch, cfg).grad])

        for _ in range(20):  # compiles on the first call (sync mode), then warm
            call()
        eng.wait_compiled(600)
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t0)
        print(
            f"\n{n} tokens: median {statistics.median(ts) * 1e6:.0f} us, min {min(ts) * 1e6:.0f} us per call"
        )
        with profile(activities=acts) as prof:
            for _ in range(10):
                call()
        ka = prof.key_averages()
        blocking = [e for e in ka if "Synchronize" in e.key or "Memcpy" in e.key or "memcpy" in e.key]
        launches = sum(e.count for e in ka if "LaunchKernel" in e.key or "cuLaunch" in e.key) / 10
        print(
            f"per call: {launches:.0f} kernel launches; blocking calls: "
            + (
                ", ".join(
                    f"{e.key} x{e.count / 10:g} ({e.self_cpu_time_total / 10:.0f} us)" for e in blocking
                )
                or "-"
            )
        )
        print(ka.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
