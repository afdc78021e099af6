"""Host <-> CUDA copies of the end-to-end bench's payload: three float32 inputs of N tokens to
the device, one float32 gradient back, as the server's engine moves them, and the variants a
server could use instead. Needs a CUDA device.

    python bench/transfer_bench.py                     # N = 4096 and 16M, 10 timed rounds each
    python bench/transfer_bench.py --tokens 16777216 --reps 20

Variants (median ms of one round, all three inputs in and the gradient out, synchronised):
- pageable: `.to(device)` from ordinary host memory, `.cpu()` back (what the engine does now);
- pin per call: `.pin_memory()` first, then a non-blocking copy (pinning is itself a host copy);
- pinned staging: a pinned buffer kept across calls, filled with `copy_`, then non-blocking;
- one copy: the three inputs as one contiguous host tensor, one `.to(device)`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()  # the first round allocates (device memory, the host allocator's pinned blocks)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def variants(n: int, dev: torch.device) -> dict[str, Callable[[], object]]:
    xs = [torch.randn(n) for _ in range(3)]
    flat = torch.cat(xs)
    g = torch.randn(n, device=dev)
    stage_in = torch.empty(3 * n, pin_memory=True)
    stage_out = torch.empty(n, pin_memory=True)

    def pageable() -> object:
        return [x.to(dev) for x in xs], g.cpu()

    def pin_per_call() -> object:
        ins = [x.pin_memory().to(dev, non_blocking=True) for x in xs]
        out = torch.empty(n, pin_memory=True)
        out.copy_(g, non_blocking=True)
        return ins, out

    def staging() -> object:
        for i, x in enumerate(xs):
            stage_in[i * n : (i + 1) * n].copy_(x)
        ins = stage_in.to(dev, non_blocking=True)
        stage_out.copy_(g, non_blocking=True)
        return ins, stage_out

    def one_copy() -> object:
        return flat.to(dev), g.cpu()

    return {
        "pageable": pageable,
        "pin per call": pin_per_call,
        "pinned staging": staging,
        "one copy": one_copy,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="4096,16777216", help="comma-separated token counts")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}; median of {args.reps} rounds")
    print(f"{'tokens':>10} {'variant':>15} {'ms':>9} {'GB/s':>7}")
    for n in (int(s) for s in args.tokens.split(",")):
        moved = 16 * n  # 12 N bytes in, 4 N out
        for name, fn in variants(n, dev).items():
            t = timed(fn, args.reps)
            print(f"{n:>10} {name:>15} {t * 1e3:>9.3f} {moved / t / 1e9:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
