"""Whether a compiled CUDA kernel's speed depends on the example batch it was compiled on: the
SAPO loss (gradient, loss and metrics) at 64k, 1M and 16M tokens already on the GPU, eager,
then compiled on the engine's ~1M-token GPU example, then on the CPU's 67 tokens. Each
compiled variant in a fresh inductor cache: the cache does not key on the example's sizes.

    python bench/cuda_compile_example.py           # ~1 min on an H200 host (two ~15 s compiles)

Each variant runs in a child process (`cuda_compile_example.py VARIANT`, with its own
TORCHINDUCTOR_CACHE_DIR, a temporary directory removed after it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_bench import engine_batch
from softgate.engine import Engine, LossConfig, compiled

SIZES = [1 << 16, 1 << 20, 1 << 24]
VARIANTS = {"eager": None, "compiled, GPU example": compiled._GPU_WARM_SCALE, "compiled, 67 tokens": 1}


def run(name: str) -> None:
    """Time one variant in this process."""
    scale = VARIANTS[name]
    if scale is not None:
        compiled._GPU_WARM_SCALE = scale
    dev = torch.device("cuda")
    eng = Engine(device=dev, compile=scale is not None, host_max_tokens=0)
    cfg = LossConfig()
    for n in SIZES:
        b = Engine._to_device(engine_batch(n), dev)
        t0 = time.perf_counter()
        for _ in range(3):  # (the first compiles)
            eng.loss(b, cfg)
        torch.cuda.synchronize()
        first, ts = time.perf_counter() - t0, []
        for _ in range(15):
            t = time.perf_counter()
            float(eng.loss(b, cfg).loss)
            ts.append(time.perf_counter() - t)
        print(
            f"{name:22s} {n:>11,} tokens: median {statistics.median(ts) * 1e3:7.2f} ms, "
            f"min {min(ts) * 1e3:7.2f} (warm-up {first:5.1f} s, compiled calls {eng.kernel.compiled_calls})",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", nargs="?", choices=list(VARIANTS), help="time this variant alone, here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device: torch.cuda.is_available() is False")
    if args.variant:
        run(args.variant)
        return
    for name in VARIANTS:  # (the caches were left in the temp dir: an audit)
        with tempfile.TemporaryDirectory(prefix="softgate-inductor-", ignore_cleanup_errors=True) as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            subprocess.run([sys.executable, __file__, name], env=env, check=True)


if __name__ == "__main__":
    main()
