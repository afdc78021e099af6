"""The benchmarks' stand-in servers (bench/e2e_bench.py `serve_variant`: the latency ladder's
rungs and e2e's "server path alone" rows) answer a real client with what the engine computes
(and the replay server the ladder's bare "raw" call too).
A rung that errors stops the ladder before it measures anything, and nothing else calls them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, bench_module
from softgate.engine import Engine, LossConfig
from softgate.grpc.response_buffer import gradient_response
from softgate.observability.telemetry import DEFAULT_CPU_SAMPLE_TOKENS
from softgate_client import SoftgateClient, client

# every variant that runs the eager engine ("notelemetry" compiles it: the same path as serve),
# and how often two calls reach each function it answers again (`first_answer`) by name: one
# the servicer stopped calling (a rename) made a row silently equal to the row above it
VARIANTS = {
    "replay": {"loss": 1},
    "admission": {"loss": 1, "_loss": 2},
    "decode": {"loss": 2, "encode_loss_response": 2},
    "cached": {"loss": 2},
    "cached-notelemetry": {"loss": 2},
}
LIMIT = 64 << 20
# serve_variant, printing at its end the calls that reached each `first_answer`
COUNTED = """
import json, sys
import e2e_bench as E
calls = {}
first_answer = E.first_answer
def counted(fn, size):
    answer, name = first_answer(fn, size), fn.__name__
    calls[name] = 0
    def call(*args, **kw):
        calls[name] += 1
        return answer(*args, **kw)
    return call
E.first_answer = counted
E.serve_variant(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
print(json.dumps(calls))
"""


def test_every_cached_bench_server_answers_what_the_engine_computes() -> None:
    _answer_what_the_engine_computes(VARIANTS, rtol=0)


@pytest.mark.slow
def test_the_notelemetry_bench_server_answers_what_the_engine_computes() -> None:
    """The compiled engine (~20-60 s of compiling on 2 cores), to the last bits or near them."""
    _answer_what_the_engine_computes({"notelemetry": {}}, rtol=1e-5)


def _answer_what_the_engine_computes(variants: dict[str, dict[str, int]], rtol: float) -> None:
    """Two SAPO calls of 4096 tokens to each of `variants` (their counts of `first_answer`
    calls), each answered as the eager engine computes it (within `rtol`)."""
    e2e = bench_module("e2e_bench")
    b = e2e.make_batch(4096)
    want = Engine(device="cpu", compile=False).loss(e2e.engine_batch(4096), LossConfig())
    want_grad = want.grad.numpy()
    atol = rtol * float(np.abs(want_grad).max())
    procs: dict[str, tuple[int, subprocess.Popen[str]]] = {}
    try:
        for variant in variants:  # all at once: each spends seconds importing torch
            port = e2e.free_port()
            cmd = [sys.executable, "-c", COUNTED, str(port), str(LIMIT), variant]
            env = {**os.environ, "PYTHONPATH": str(REPO / "bench")}
            procs[variant] = port, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        for variant, (port, proc) in procs.items():
            e2e.wait_serving(port, proc, timeout=120)
            with SoftgateClient(f"127.0.0.1:{port}", timeout=600, max_message_bytes=LIMIT) as sg:
                for call in ("computed", "answered again"):
                    r = e2e.sapo_loss(sg, b)
                    assert r.loss == pytest.approx(want.loss, rel=rtol, abs=0), (variant, call)
                    np.testing.assert_allclose(r.grad, want_grad, rtol, atol, err_msg=f"{variant}, {call}")
            if variant == "replay":  # the ladder's "raw" row: the client's bytes, sent bare
                resp, outs = client._parse_loss_response(
                    bench_module("latency_ladder").raw_call(port, LIMIT, b)()
                )
                assert resp.loss == want.loss
                np.testing.assert_array_equal(outs["gradient"], want.grad.numpy())
    finally:
        for _, proc in procs.values():
            proc.terminate()
        calls = {}
        for variant, (_, proc) in procs.items():
            try:
                calls[variant] = proc.communicate(timeout=20)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    for variant, (_, proc) in procs.items():
        assert proc.returncode == 0, variant
        assert json.loads(calls[variant]) == variants[variant], variant


def test_the_cached_engine_writes_no_gradient_the_real_one_would_not() -> None:
    """From 2^18 tokens the server hands the engine the gradient's place in the response
    (`grad_out`). The cached engine answered with the first call's gradient, which the response
    then copied in (4 MB at 1M tokens, 64 at 16M): "the server path alone" rows counted a copy
    the real server never makes (an audit). Now a later call's result points at its `grad_out`."""
    e2e = bench_module("e2e_bench")
    n = 1 << 18
    batch, config = e2e.engine_batch(n), LossConfig()
    engine = Engine(device="cpu", compile=False)
    loss = e2e.cached_loss(engine.loss)
    want = engine.loss(batch, config).grad
    for call in ("computed", "answered again"):
        out = gradient_response(batch, ("gradient",), torch.device("cpu"))
        assert out is not None
        r = loss(batch, config, sample_tokens=DEFAULT_CPU_SAMPLE_TOKENS, grad_out=out.grad)
        assert r.grad.data_ptr() == out.grad.data_ptr(), call  # (else encode copies it in)
        if call == "computed":  # (later ones are left unwritten, as the engine's work is)
            torch.testing.assert_close(out.grad, want, rtol=0, atol=0)
        out.encode(r)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
