"""What each compiled engine configuration costs a CPU server: build time, resident memory and
disk (the inductor cache, and anything AOTInductor leaves in the temp dir). The figures behind
`max_compiled_kernels` (docs/server.md) and the Kubernetes overlays' /tmp emptyDir.

    python bench/compile_cost.py              # 6 configurations (~2 min on 2 cores)
    python bench/compile_cost.py --count 12
    python bench/compile_cost.py --count 0 --dynamo --phases   # one dynamo build, where its time goes
    python bench/compile_cost.py --device cuda --count 2 --phases

An in-process `Engine(device="cpu")` (background compiles, as `softgate serve` runs) gets a
4k-token SAPO call, then one call of each further configuration (objectives, with and without
KL and mismatch), each waited for until compiled. A configuration the inductor cache already
holds builds faster and adds no cache: `--fresh-cache` starts from an empty temp dir, as a
pod's /tmp emptyDir does (the cache and the compiler's precompiled headers both land there).
"""

from __future__ import annotations

import argparse
import atexit
import glob
import os
import shutil
import statistics
import tempfile
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def disk_mb(*patterns: str) -> float:
    """Bytes under every path the glob patterns match, in MB."""
    total = 0
    for root in (p for pattern in patterns for p in glob.glob(pattern)):
        for dirpath, _, files in os.walk(root):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total / 1e6


def fresh_cache_dir() -> str:
    """An empty directory for the inductor cache, removed when this process exits (each run
    left one behind in the temp dir: an audit)."""
    path = tempfile.mkdtemp(prefix="softgate-inductor-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=6, help="configurations compiled after the first")
    ap.add_argument("--fresh-cache", action="store_true", help="start from an empty inductor cache")
    ap.add_argument("--device", default="cpu", help="the engine's device (cpu, cuda)")
    ap.add_argument("--dynamo", action="store_true", help="CPU: dynamo's build, not AOTInductor's")
    ap.add_argument(
        "--phases",
        action="store_true",
        help="print dynamo's compile phases (not a child's AOTInductor build)",
    )
    args = ap.parse_args()
    if args.fresh_cache:
        # a fresh temp dir, as a pod's /tmp emptyDir starts: inductor's cache AND its precompiled
        # headers (~0.4-0.6 GB, written under the default cache dir whatever TORCHINDUCTOR_CACHE_DIR
        # says) land in it; pointing only the cache dir at a fresh one missed them (an audit)
        os.environ["TMPDIR"] = tempfile.tempdir = fresh_cache_dir()

    import torch
    from softgate.engine import OBJECTIVES, Batch, Engine, KLConfig, LossConfig, MismatchConfig, aoti
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    tmp = tempfile.gettempdir()
    headers = os.path.join(
        default_cache_dir(), "precompiled_headers"
    )  # (outside cache_dir() when that is set)
    disk = (cache_dir(), os.path.join(tmp, "aotinductor_*"), os.path.join(tmp, "softgate-aoti-*"))
    if not os.path.abspath(headers).startswith(os.path.abspath(cache_dir()) + os.sep):
        disk += (headers,)
    configs = [
        LossConfig(objective=cls(), kl=kl, mismatch=mm)
        for kl, mm in ((None, None), (KLConfig(beta=0.01), None), (None, MismatchConfig()))
        for cls in OBJECTIVES.values()
    ][: args.count + 1]
    n, seqs = 4096, 4
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(n, generator=g) * 3 - 0.1
    batch = Batch(
        logp=logp,
        old_logp=logp + 0.01,
        ref_logp=logp - 0.02,
        rollout_logp=logp + 0.02,
        offsets=torch.arange(0, n + 1, n // seqs),
        advantages=torch.randn(seqs, generator=g),
    )
    if args.dynamo:
        aoti.supported = lambda: False  # type: ignore[assignment]
    print(f"torch {torch.__version__}, inductor compile_threads {torch._inductor.config.compile_threads}")
    engine = Engine(device=args.device, compile="background", host_max_tokens=0)  # 4k on the device
    left_before = set(glob.glob(os.path.join(tmp, "aotinductor_*")))
    times, rss, space = [], [], []
    for i, config in enumerate(configs):
        r0, d0, t0, k0 = rss_mb(), disk_mb(*disk), time.perf_counter(), engine.kernel.ready
        engine.loss(batch, config)  # eager; queues the compile
        assert engine.wait_compiled(900), "a compile ran past 15 min"
        engine.loss(batch, config)  # the first compiled call
        took, r1, d1 = time.perf_counter() - t0, rss_mb(), disk_mb(*disk)
        name = (
            config.objective.name + (" +kl" if config.kl else "") + (" +mismatch" if config.mismatch else "")
        )
        if engine.kernel.ready == k0:
            print(f"{name:24s} an earlier configuration's kernel", flush=True)
            continue
        print(f"{name:24s} {took:5.1f} s  rss {r1 - r0:+6.2f} MB  disk {d1 - d0:+6.2f} MB", flush=True)
        if i:  # the first also pays the process's first compile (imports, inductor's set-up)
            times.append(took)
            rss.append(r1 - r0)
            space.append(d1 - d0)
    if args.phases:
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True))
    if not times:
        return
    print(
        f"\nper configuration (median of {len(times)}): build {statistics.median(times):.1f} s, "
        f"rss {statistics.median(rss):+.2f} MB, disk {statistics.median(space):+.2f} MB; "
        f"compiled now: {engine.kernel.ready}; new aotinductor_* directories in {tmp}: "
        f"{len(set(glob.glob(os.path.join(tmp, 'aotinductor_*'))) - left_before)}"
    )


if __name__ == "__main__":
    main()
