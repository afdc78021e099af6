"""Load: many concurrent clients (unary and streamed, small and large batches) against a real
`softgate serve` on loopback for a bounded time.

Asserted: every reply equals what the in-process engine computes for the same request (zero
wrong results); no status code but OK below the concurrency limit, and only OK or
RESOURCE_EXHAUSTED past it; the health check answers SERVING throughout; the server's RSS is
flat after warm-up. The harness is bench/load_bench.py's `run_load` (the benchmark runs the
same loop). `-m slow` runs a 90 s version (30 s, then 60 s).
"""

from __future__ import annotations

from typing import Any

import pytest

MiB = 1 << 20


@pytest.fixture(scope="module")
def workloads(load_bench: Any) -> list[Any]:
    # large: 32 x ~256 tokens (~8K tokens) so that a 2-core CI machine turns over many of them
    return list(load_bench.build_workloads(1, small=6, large=3, streamed=3, large_seqs=32, large_len=256))


def assert_rss_flat(rss: list[tuple[float, int]], warmup_frac: float = 0.3) -> None:
    """RSS after warm-up stays within 15% + 48 MiB of the level reached at the end of warm-up
    (allocator noise on large batches is tens of MiB; a per-request leak is not bounded)."""
    assert len(rss) >= 10, f"too few RSS samples: {len(rss)}"
    t_end = rss[-1][0]
    warm = [b for t, b in rss if t <= warmup_frac * t_end]
    late = [b for t, b in rss if t > warmup_frac * t_end]
    assert warm and late
    base = max(warm)
    bound = base * 1.15 + 48 * MiB
    peak = max(late)
    assert peak <= bound, (
        f"server RSS grew after warm-up: {base / MiB:.0f} MiB -> {peak / MiB:.0f} MiB (bound {bound / MiB:.0f} MiB); "
        f"samples {[round(b / MiB) for _, b in rss]}"
    )


def _check(rep: Any, *, allowed: set[str]) -> None:
    assert not rep.wrong, f"{len(rep.wrong)} wrong replies, e.g. {rep.wrong[:3]}"
    assert not rep.errors, f"unexpected status codes: {rep.errors[:5]} ({dict(rep.codes)})"
    assert set(rep.codes) <= allowed, dict(rep.codes)
    assert rep.requests > 0
    assert set(rep.health) == {"SERVING"}, f"health during load: {dict(rep.health)}"


def _run(lb: Any, serve_process: Any, workloads: list[Any], seconds_a: float, seconds_b: float) -> None:
    limit = 8
    srv = serve_process(max_concurrent_rpcs=limit, engine_workers=2)
    # phase A: as many clients as the limit allows (unary + streamed, small + large): all OK
    rep_a = lb.run_load(srv.target, workloads, clients=limit - 2, seconds=seconds_a, server_pid=srv.pid)
    _check(rep_a, allowed={"OK"})
    assert {w.kind for w in workloads} == {"unary", "stream"}
    # phase B: three times the limit: the excess is refused at once with RESOURCE_EXHAUSTED,
    # everything admitted is still right
    rep_b = lb.run_load(
        srv.target,
        workloads,
        clients=3 * limit,
        seconds=seconds_b,
        server_pid=srv.pid,
        allowed=frozenset({"OK", "RESOURCE_EXHAUSTED"}),
    )
    _check(rep_b, allowed={"OK", "RESOURCE_EXHAUSTED"})
    assert rep_b.codes["RESOURCE_EXHAUSTED"] > 0, "24 clients against a limit of 8 never hit the limit"
    # memory: phase A's samples then phase B's, on one time axis
    t_a = rep_a.rss[-1][0] if rep_a.rss else 0.0
    assert_rss_flat(rep_a.rss + [(t + t_a, b) for t, b in rep_b.rss])
    # the server is still healthy and answers correctly afterwards
    rep_c = lb.run_load(srv.target, workloads, clients=2, seconds=1.0)
    _check(rep_c, allowed={"OK"})


def test_load_mixed_clients(load_bench: Any, serve_process: Any, workloads: list[Any]) -> None:
    _run(load_bench, serve_process, workloads, 6.0, 8.0)


@pytest.mark.slow
def test_load_mixed_clients_long(load_bench: Any, serve_process: Any, workloads: list[Any]) -> None:
    _run(load_bench, serve_process, workloads, 30.0, 60.0)
