"""What a `softgate serve` process holds in memory: resident set idle, and at its peak while
`--workers` calls of `--tokens` tokens compute and the rest of `--admitted` wait. The
Kubernetes overlays' memory limits are sized by these figures (deploy/k8s/overlays/*,
tests/test_deploy.py: idle + BUILD_CHILD_BYTES + PER_TOKEN x tokens x workers +
REQUEST_BYTES_PER_TOKEN (25) x tokens x waiting); the formula here leaves out the build child
and counts a waiting call at its batch's own bytes (12 or 16 a token), so it is the stricter
one: a peak within it (ratio <= 1 below) is within the overlays' figure too.

    python bench/memory_bench.py                          # CPU, 16 Mi tokens, 8 admitted (~3 min)
    python bench/memory_bench.py --device cuda            # bench/device_check.sh memory
    python bench/memory_bench.py --compile true          # the compiled engine's steady state
    python bench/memory_bench.py --full                   # every input, KL and mismatch on
    python bench/memory_bench.py --full --otb             # and sum_pi_squared, optimal token baseline

The server runs as deployed (`--compile auto`: on the CPU a configuration's first calls run
eager while it compiles in the background; tcmalloc when installed, which keeps its peak);
`--compile true` measures the compiled engine (the first call compiles). The batch is
the end-to-end bench's (SAPO, three float32 inputs = 12 bytes a token, the gradient out), or
with `--full` four log-prob tensors (16 bytes a token), rewards, KL and mismatch. The
peak is the kernel's high-water mark (VmHWM), reset before each phase (/proc/PID/clear_refs).
Prints each phase's peak over idle in bytes per token, and the measured peak over the
formula with `--per-token` (default: the overlays' figure for the device, OVERLAY_MEMORY below;
a ratio above 1: the formula is short).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import e2e_bench as E  # noqa: E402

# What a replica holds, the figures the Kubernetes overlays are sized with (tests/test_deploy.py
# checks each overlay's limit against them): idle bytes, and bytes a token of each call
# computing, at its peak and kept by tcmalloc. CPU: measured here at 16 Mi tokens, 50-77 a
# token, eager or compiled, every input with KL and mismatch; 108-115 with sum_pi_squared and
# the optimal token baseline too (`--full --otb`), the most (bench/RESULTS.md, "Server
# memory"), with margin. GPU: assumed until measured (`bench/device_check.sh OUT
# memory`): the compiled figure, the kernel's temporaries on the device in place of the
# page-locked copies, and a CUDA context's few GB.
OVERLAY_MEMORY = {"cpu": (0.45e9, 120), "gpu": (3e9, 80)}
# a waiting call holds its request: at most 6 float32 tensors (logp, old, ref, rollout,
# sum_pi_squared, per-token advantages) and the mask, 25 bytes a token
REQUEST_BYTES_PER_TOKEN = 25
# a background AOTInductor build runs in a child process (engine/aoti.py) that holds this much
# while it builds (peak RSS of one build: 588 MB; bench/RESULTS.md, "Engine", twenty-eighth session)
BUILD_CHILD_BYTES = 0.6e9


def status_bytes(pid: int, key: str) -> int:
    """A `/proc/PID/status` size (VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for pid {pid}")


def reset_peak(pid: int) -> None:
    """VmHWM := VmRSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=16 << 20)
    ap.add_argument("--workers", type=int, default=2, help="the server's engine_workers")
    ap.add_argument("--admitted", type=int, default=8, help="the server's max_concurrent_rpcs")
    ap.add_argument("--compile", default="auto", choices=("auto", "true", "false"))
    ap.add_argument(
        "--full",
        action="store_true",
        help="every input (ref and rollout log-probs, rewards), KL and mismatch on",
    )
    ap.add_argument(
        "--otb",
        action="store_true",
        help="--full, and sum_pi_squared too with the optimal token baseline (the estimator that reads it)",
    )
    ap.add_argument("--per-token", type=float, help="the formula's bytes per computing token")
    args = ap.parse_args()
    E.exit_on_sigterm()
    args.full = args.full or args.otb
    if args.per_token is None:  # the overlays' figure
        args.per_token = float(OVERLAY_MEMORY["cpu" if args.device == "cpu" else "gpu"][1])
    import numpy as np
    from softgate_client import SoftgateClient
    from softgate_client.config import MismatchConfig

    n, limit = args.tokens, 512 * E.MiB
    port = E.free_port()
    cmd = [
        sys.executable, "-m", "softgate.cli", "serve", "--grpc-host", "127.0.0.1",
        "--grpc-port", str(port), "--admin-port", "-1", "--device", args.device,
        "--compile", args.compile, "--engine-workers", str(args.workers),
        "--max-concurrent-rpcs", str(args.admitted), "--max-message-bytes", str(limit),
        "--log-level", "WARNING",
    ]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(proc := subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        E.wait_serving(port, proc)
        # a client (and a connection: no shared subchannel) per call at once: on one connection
        # the requests arrived one after another and the queue seldom filled (an audit)
        clients = [
            SoftgateClient(
                f"127.0.0.1:{port}",
                max_message_bytes=limit,
                timeout=900,
                retries=1,
                channel_options={"grpc.use_local_subchannel_pool": 1},
            )
            for _ in range(max(args.admitted, 1))
        ]
        b = E.make_batch(n)
        small = E.make_batch(4096)

        def call(batch: dict[str, Any] = b, client: Any = clients[0]) -> None:
            kw: dict[str, Any] = {"lengths": batch["lengths"], "objective": "sapo", "stream": False}
            seqs = len(batch["lengths"])
            if args.full:
                kw.update(
                    ref_logp=batch["old_logp"] - 0.01, rollout_logp=batch["old_logp"] * 1.01,
                    rewards=np.arange(seqs) % 3, group_ids=np.arange(seqs) // 8, kl_beta=0.01,
                    mismatch=MismatchConfig(),
                )  # fmt: skip
                if args.otb:  # p^2 + a share of (1 - p)^2: within [p^2, 1]
                    p = np.exp(batch["old_logp"].astype(np.float64))
                    spi2 = (p * p + 0.5 * (1 - p) ** 2).astype(np.float32)
                    kw.update(sum_pi_squared=spi2, estimator="optimal_token_baseline")
            else:
                kw["advantages"] = batch["advantages"]
            client.loss(batch["logp"], batch["old_logp"], **kw)

        for _ in range(3):
            call(small)
        time.sleep(1.0)
        idle = status_bytes(proc.pid, "VmRSS")
        rows = []
        # bytes a token of the request: float32 tensors (+ the mask)
        request = (20 if args.otb else 16) if args.full else 12

        def phase(name: str, calls: int) -> None:
            reset_peak(proc.pid)
            t0 = time.perf_counter()
            threads = [threading.Thread(target=call, kwargs={"client": c}) for c in clients[:calls]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            peak = status_bytes(proc.pid, "VmHWM")
            waiting = max(calls - args.workers, 0)
            formula = idle + args.per_token * n * min(calls, args.workers) + request * n * waiting
            rows.append((name, calls, time.perf_counter() - t0, peak, (peak - idle) / n, peak / formula))

        phase("first call", 1)
        phase("second call", 1)
        phase(f"{args.admitted} calls at once", args.admitted)
        for c in clients:
            c.close()
    finally:
        E.stop(procs)
    print(
        f"device={args.device} tokens={n:,} workers={args.workers} admitted={args.admitted} "
        f"compile={args.compile} inputs={'full' if args.full else 'e2e'}{' otb' if args.otb else ''}"
    )
    print(
        f"idle RSS {idle / 1e9:.2f} GB; formula: idle + {args.per_token:g} B x tokens x computing "
        f"+ {request} B x tokens x waiting\n"
    )
    print("| phase | calls | s | peak RSS GB | (peak - idle) / tokens, B | peak / formula |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, calls, s, peak, per_tok, ratio in rows:
        print(f"| {name} | {calls} | {s:.1f} | {peak / 1e9:.2f} | {per_tok:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
