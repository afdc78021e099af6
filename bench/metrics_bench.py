#!/usr/bin/env python3
"""Overhead of PrometheusTelemetry.observe_loss relative to the engine's loss time.

    python3 bench/metrics_bench.py                      # 16M tokens, the engine's default device
    python3 bench/metrics_bench.py --tokens 1048576 --device cpu --repeats 3

For one batch of `--tokens` tokens (sequences of `--seq-len`), times Engine.loss and then
observe_loss on its LossResult (median of `--repeats`), for the default telemetry (on
CPU, batches above 32K tokens (DEFAULT_CPU_SAMPLE_TOKENS) are bucketed through a strided sample) and for exact
bucketing of every token; and `served`: Engine.loss as the server calls it for a request
that wants the gradient only (the engine returns telemetry's sample of the ratio and gate
weight, with their bucket codes) and observe_loss on that. The target is observe_loss < 5%
of the loss time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from softgate.engine import Batch, Engine, LossConfig, LossResult, Sapo
from softgate.observability import PrometheusTelemetry
from softgate.observability.telemetry import DEFAULT_CPU_SAMPLE_TOKENS


class _Settings:
    def __init__(self, max_runs: int, sample: int | None) -> None:
        self.max_runs = max_runs
        self.metrics_cpu_sample_tokens = sample


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(n_tokens: int, seq_len: int, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_seqs = max(n_tokens // seq_len, 1)
    n = n_seqs * seq_len
    logp = -torch.rand(n, generator=g) * 4
    old = (logp + torch.randn(n, generator=g) * 0.1).clamp(max=0.0)
    rewards = (torch.rand(n_seqs, generator=g) > 0.5).to(torch.float32)
    return Batch(
        logp=logp.to(device),
        old_logp=old.to(device),
        offsets=Batch.offsets_from_lengths(torch.full((n_seqs,), seq_len)).to(device),
        mask=(torch.rand(n, generator=g) > 0.1).to(device),
        rewards=rewards.to(device),
        group_ids=(torch.arange(n_seqs) // 16).to(device),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the engine's)")
    ap.add_argument("--no-compile", action="store_true", help="Engine(compile=False)")
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    args = ap.parse_args()

    engine = Engine(device=args.device, compile=not args.no_compile)
    device = engine.device
    batch = make_batch(args.tokens, args.seq_len, device)
    config = LossConfig(objective=Sapo())
    with contextlib.suppress(NotImplementedError):
        engine.warmup()

    def loss(sample_tokens: int | None) -> tuple[LossResult, float]:
        times, result = [], None
        for _ in range(args.repeats + 1):  # the first is a warm-up
            _sync(device)
            t0 = time.perf_counter()
            result = engine.loss(batch, config, sample_tokens=sample_tokens)
            _sync(device)
            times.append(time.perf_counter() - t0)
        assert result is not None
        return result, statistics.median(times[1:])

    # every per-token output (an in-process caller); as the server calls it for a request
    # that wants the gradient only (telemetry's sample of ratio and gate, with bucket codes)
    (result, loss_s), (served, served_s) = loss(None), loss(DEFAULT_CPU_SAMPLE_TOKENS)
    modes = {
        "default": (PrometheusTelemetry(_Settings(32, DEFAULT_CPU_SAMPLE_TOKENS)), result, loss_s),
        "exact": (PrometheusTelemetry(_Settings(32, None)), result, loss_s),
        "served": (PrometheusTelemetry(_Settings(32, DEFAULT_CPU_SAMPLE_TOKENS)), served, served_s),
    }
    obs: dict[str, list[float]] = {}
    for name, (tel, res, _) in modes.items():
        times = []
        for i in range(args.repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            tel.observe_loss(f"bench-{i % 3}", config, res)
            _sync(device)
            times.append(time.perf_counter() - t0)
        obs[name] = times[1:]
        tel.exposition()  # the scrape side works on what was observed

    out: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "tokens": int(batch.num_tokens),
        "trained_tokens": int(result.metrics.get("num_tokens", 0)),
        "loss_s": loss_s,
        "loss_served_s": served_s,
    }
    for name, times in obs.items():
        t = statistics.median(times)
        out[f"observe_{name}_s"] = t
        out[f"overhead_{name}"] = t / modes[name][2]
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"device {out['device']} ({out['device_name']}), {out['torch_threads']} threads, {out['tokens']:,} tokens"
    )
    print(f"engine loss           {loss_s * 1e3:9.1f} ms  (median of {args.repeats}; every output)")
    print(f"engine loss served    {served_s * 1e3:9.1f} ms  (a gradient-only request's call)")
    for name in obs:
        t = out[f"observe_{name}_s"]
        ratio = out[f"overhead_{name}"]
        ok = "meets" if ratio < 0.05 else "MISSES"
        print(f"observe_loss {name:8s} {t * 1e3:9.1f} ms  ratio {ratio * 100:6.2f}%  ({ok} the 5% target)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
