"""The benchmarks' stand-in servers (bench/e2e_bench.py `serve_variant`: the latency ladder's
rungs and e2e's "server path alone" rows) answer a real client with what the engine computes
(and the replay server the ladder's bare "raw" call too).
A rung that errors stops the ladder before it measures anything, and nothing else calls them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, bench_module
from softgate.engine import Engine, LossConfig
from softgate_client import SoftgateClient, client

# every variant that runs the eager engine ("notelemetry" compiles it: the same path as serve)
VARIANTS = ("replay", "admission", "decode", "cached", "cached-notelemetry")
LIMIT = 64 << 20


def test_every_cached_bench_server_answers_what_the_engine_computes() -> None:
    e2e = bench_module("e2e_bench")
    b = e2e.make_batch(4096)
    want = Engine(device="cpu", compile=False).loss(e2e.engine_batch(4096), LossConfig())
    procs: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    try:
        for variant in VARIANTS:  # all at once: each spends seconds importing torch
            port = e2e.free_port()
            cmd = [
                sys.executable,
                str(REPO / "bench" / "e2e_bench.py"),
                "--serve-variant",
                f"{port}:{LIMIT}:{variant}:cpu",
            ]
            procs[variant] = port, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        for variant, (port, proc) in procs.items():
            e2e.wait_serving(port, proc, timeout=120)
            with SoftgateClient(f"127.0.0.1:{port}", timeout=60, max_message_bytes=LIMIT) as sg:
                for call in ("computed", "answered again"):
                    r = e2e.sapo_loss(sg, b)
                    assert r.loss == want.loss, (variant, call)
                    np.testing.assert_array_equal(r.grad, want.grad.numpy(), err_msg=f"{variant}, {call}")
            if variant == "replay":  # the ladder's "raw" row: the client's bytes, sent bare
                resp, outs = client._parse_loss_response(
                    bench_module("latency_ladder").raw_call(port, LIMIT, b)()
                )
                assert resp.loss == want.loss
                np.testing.assert_array_equal(outs["gradient"], want.grad.numpy())
    finally:
        for _, proc in procs.values():
            proc.terminate()
        for _, proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    for variant, (_, proc) in procs.items():
        assert proc.returncode == 0, variant


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
