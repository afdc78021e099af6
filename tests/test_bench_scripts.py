"""The benchmark scripts' own logic, at their smallest: arguments they refuse or accept, and
the processes they start, stopped when they are stopped (bench/device_check.sh's steps too).
Nothing here times anything."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import softgate_client
from conftest import REPO, bench_module

BENCH = REPO / "bench"


def run_bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not: nothing may reap it in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """The live child processes of `pid` that run a program of their own (past the exec), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            execed = (stat.parent / "cmdline").read_bytes() != Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if fields[1] == str(pid) and fields[0] != "Z" and execed:
            out.append(int(stat.parent.name))
    return out


# ---------------------------------------------------------------- stopped benches stop their servers


@pytest.mark.parametrize(
    ("script", "args", "servers"),
    [
        ("e2e_bench.py", ["--compile", "false", "--allocators", "glibc", "--no-install", "--quick"], 2),
        ("latency_ladder.py", ["--rungs", "replay", "--rounds", "1"], 2),
        ("memory_bench.py", ["--tokens", "4096", "--compile", "false"], 1),
        ("load_bench.py", ["--clients", "1", "--seconds", "60", "--mix", "small"], 1),
    ],
)
def test_a_bench_stopped_with_sigterm_stops_the_servers_it_started(
    script: str, args: list[str], servers: int, tmp_path: Path
) -> None:
    """SIGTERM (a `timeout`, a CI job's end) ended the bench alone: its servers and worker ran
    on, re-parented to PID 1 (an audit). Now it exits through its `finally` blocks."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    bench = subprocess.Popen(
        [sys.executable, str(BENCH / script), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(started) < servers and time.monotonic() < deadline and bench.poll() is None:
            started = children(bench.pid)
            time.sleep(0.05)
        assert len(started) >= servers, f"{script} started {started}"
        time.sleep(0.3)  # (for Popen to return: a signal inside it would leak even a finally's process)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) == 128 + signal.SIGTERM
        assert [pid for pid in started if alive(pid)] == [], f"{script} left its servers running"
    finally:
        for pid in started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if bench.poll() is None:
            bench.kill()
            bench.wait()


def test_ctrl_c_while_the_servers_start_stops_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """start_servers stopped its servers on an Exception, not on Ctrl-C (an audit)."""
    e2e = bench_module("e2e_bench")
    stopped: list[subprocess.Popen[bytes]] = []
    real_stop = e2e.stop

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    def stop(procs: list[subprocess.Popen[bytes]]) -> None:
        stopped.extend(procs)
        real_stop(procs)

    monkeypatch.setattr(e2e, "wait_port", interrupted)
    monkeypatch.setattr(e2e, "stop", stop)
    before = set(children(os.getpid()))
    try:
        with pytest.raises(KeyboardInterrupt):
            e2e.start_servers(None, 1 << 20, "false")
        assert len(stopped) == 2 and all(p.returncode is not None for p in stopped)
    finally:  # (what a failure left running)
        for pid in set(children(os.getpid())) - before:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# ---------------------------------------------------------------- bench/device_check.sh


def _step(tmp_path: Path, deadline: int, command: str) -> int:
    """Runs device_check.sh's `step` on `command`; returns the pid of the grandchild it left,
    one that ignores SIGTERM (as a process busy compiling outlives it)."""
    script = (
        f"source {BENCH / 'device_check.sh'}; OUTDIR={tmp_path}; DEADLINE={deadline}; "
        f"step dummy bash -c '(trap \"\" TERM; exec sleep 300) & echo $! >{tmp_path}/gc.pid; {command}'"
    )
    subprocess.run(["bash", "-c", script], check=True, capture_output=True, timeout=deadline + 60)
    return int((tmp_path / "gc.pid").read_text())


def _step_leaves_no_process(tmp_path: Path, deadline: int, command: str, rc: int) -> None:
    """`_step`'s grandchild is gone once the step has ended with `rc`."""
    grandchild = _step(tmp_path, deadline, command)
    try:
        assert not alive(grandchild)
        assert f"== dummy: rc={rc}" in (tmp_path / "summary.log").read_text()
    finally:
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("setsid") is None, reason="no setsid (util-linux)")
def test_a_device_check_step_leaves_no_process_behind(tmp_path: Path) -> None:
    """A step's grandchild (a `softgate serve` still compiling) ran on into the next steps (an
    audit): each step runs in its own session, emptied when the step ends."""
    _step_leaves_no_process(tmp_path, 300, "exit 3", 3)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setsid") is None, reason="no setsid (util-linux)")
def test_a_device_check_step_cut_by_its_deadline_leaves_no_process_behind(tmp_path: Path) -> None:
    """The same for a step cut by `timeout` (about 21 s: a step gets at least 20)."""
    _step_leaves_no_process(tmp_path, 21, "sleep 300", 124)


def test_device_check_sh_parses() -> None:
    subprocess.run(["bash", "-n", str(BENCH / "device_check.sh")], check=True)


# ---------------------------------------------------------------- arguments


def test_engine_only_takes_the_device_as_optional() -> None:
    """bench/RESULTS.md quotes `--engine-only 16777216:5:true`, which a later `:DEVICE` field
    broke (an audit)."""
    out = run_bench(str(BENCH / "e2e_bench.py"), "--engine-only", "4096:1:false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split("RESULT ")[1]) > 0
    bad = run_bench(str(BENCH / "e2e_bench.py"), "--engine-only", "4096")
    assert bad.returncode == 2 and "expected TOKENS:REPS:COMPILE[:DEVICE]" in bad.stderr


def test_latency_ladder_refuses_an_unknown_rung() -> None:
    """A misspelt rung measured the echo alone and exited 0 (an audit)."""
    out = run_bench(str(BENCH / "latency_ladder.py"), "--rungs", "serv")
    assert out.returncode == 2
    assert "unknown 'serv'" in out.stderr and "raw, replay, admission" in out.stderr


def test_load_bench_refuses_kinds_no_request_of_the_mix_has(capsys: pytest.CaptureFixture[str]) -> None:
    """`--mix small --kinds stream` started a server, then failed a bare assert (an audit)."""
    load_bench = bench_module("load_bench")
    for argv in (["--mix", "small", "--kinds", "stream"], ["--kinds", "unary,bidi"]):
        with pytest.raises(SystemExit) as e:
            load_bench.main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "the small requests are unary only" in err and "subset of unary,stream" in err


def test_load_bench_removes_its_log_after_a_clean_run(tmp_path: Path) -> None:
    """Every run wrote $TMPDIR/softgate-load-bench.log and left it there (an audit)."""
    out = run_bench(
        str(BENCH / "load_bench.py"),
        *("--clients", "1", "--seconds", "0.5", "--mix", "small"),
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "softgate-load-bench-" in out.stderr  # (the path, while it runs)
    assert list(tmp_path.glob("softgate-load-bench*")) == []


def test_engine_bench_quick_keeps_an_explicit_repeats() -> None:
    """--quick replaced --repeats with 2 without a word (an audit)."""
    args = ("--quick", "--sizes", "2048", "--no-compile", "--no-memory", "--allocator", "system")
    out = run_bench(str(BENCH / "engine_bench.py"), *args, "--repeats", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "repeats=1 " in out.stdout


def test_latency_profile_during_compiles_of_an_eager_engine() -> None:
    """An eager engine queues no compile: the comparison crashed on an empty list (an audit)."""
    out = run_bench(
        str(BENCH / "latency_profile.py"),
        *("--device", "cpu", "--reps", "3", "--top", "0", "--idle-ms", "0", "--during-compiles", "1"),
        env={**os.environ, "SOFTGATE_ENGINE_COMPILE": "0"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no compile was queued" in out.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_every_bench_script_has_help(script: str) -> None:
    """The commands bench/RESULTS.md, README.md and device_check.sh record start with parsing."""
    out = run_bench(str(BENCH / script), "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:") and "--help" in out.stdout


def test_metrics_bench_measures_a_small_batch() -> None:
    """The bench behind the metrics target (< 5% of the loss time), at 4096 tokens."""
    args = ("--tokens", "4096", "--seq-len", "256", "--repeats", "1", "--device", "cpu", "--no-compile")
    out = run_bench(str(BENCH / "metrics_bench.py"), *args, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["tokens"] == 4096
    assert all(got[f"overhead_{m}"] > 0 for m in ("default", "exact", "served")), got


def test_latency_ladder_measures_its_rows() -> None:
    """The ladder's measuring loop and its table, one round of 2 calls a row."""
    out = run_bench(
        str(BENCH / "latency_ladder.py"), "--rungs", "raw,replay", "--rounds", "1", "--block", "2"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [
        ln.split("|")[1].strip() for ln in out.stdout.splitlines() if ln.startswith("| ") and "ms" not in ln
    ]
    assert rows == ["echo", "raw", "replay"], out.stdout


def test_compile_cost_removes_its_fresh_cache_at_exit() -> None:
    """--fresh-cache left its softgate-inductor-* directory in the temp dir (an audit)."""
    code = "import compile_cost, os; d = compile_cost.fresh_cache_dir(); assert os.path.isdir(d); print(d)"
    out = run_bench("-c", code, env={**os.environ, "PYTHONPATH": str(BENCH)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert not Path(out.stdout.strip()).exists()


# ---------------------------------------------------------------- e2e_bench's worker and summary


def _worker_args(n: int, k: int) -> SimpleNamespace:
    """e2e_bench's worker arguments: `k` timed calls a side of `n` tokens, unary, checked."""
    return SimpleNamespace(
        sizes=str(n),
        reps=f"{n}:{k}",
        stream_threshold=0,
        max_message_bytes=512 << 20,
        stream_mode="auto",
        sg_port=0,
        echo_port=0,
        chunk_bytes=0,
        no_check=False,
    )


def test_e2e_worker_balances_the_pair_order_and_settles_before_every_large_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From 1M tokens up, each pair's order was random and no pause came between calls: a call
    after softgate's ran against its after-call work, and the echo followed softgate 3 times in
    4, softgate itself 1 in 4 (an audit: it biased the ratio toward softgate)."""
    e2e = bench_module("e2e_bench")
    n, k = 1 << 20, 40
    events: list[str] = []
    grad = np.zeros(n, np.float32)

    class Softgate:
        def __init__(self, *_: object, **__: object) -> None:
            pass

        def loss(self, *_: object, **__: object) -> SimpleNamespace:
            events.append("S")
            return SimpleNamespace(grad=grad, loss=0.0, streamed=False, chunks=1)

        def close(self) -> None:
            pass

    class Echo(Softgate):
        def call(self, b: dict[str, np.ndarray]) -> np.ndarray:
            events.append("E")
            return b["logp"]

    monkeypatch.setattr(softgate_client, "SoftgateClient", Softgate)
    monkeypatch.setattr(e2e, "EchoClient", Echo)
    monkeypatch.setattr(e2e, "_reference", lambda _: SimpleNamespace(loss=0.0, grad=grad))
    clock = SimpleNamespace(perf_counter=time.perf_counter, sleep=lambda _: events.append("pause"))
    monkeypatch.setattr(e2e, "time", clock)
    e2e.worker(_worker_args(n, k))
    assert '"tokens": 1048576' in capsys.readouterr().out
    timed = events[events.index("pause") :]  # (the untimed calls come first)
    calls = [e for e in timed if e != "pause"]
    assert calls.count("S") == calls.count("E") == k
    assert all(a == "pause" for a, b in itertools.pairwise(timed) if b != "pause"), timed
    # each arm first in half the pairs, and after each arm equally often
    firsts = calls[::2]
    assert abs(firsts.count("S") - firsts.count("E")) <= 1, calls
    after = Counter(itertools.pairwise(calls))
    assert abs(after["S", "S"] - after["E", "S"]) <= 1 and abs(after["S", "E"] - after["E", "E"]) <= 1, after


def _rows(name: str, sizes: list[int], chunk: int, mode: str) -> list[dict[str, object]]:
    """Rows shaped as e2e_bench's worker returns them (figures made up)."""
    return [
        {
            "tokens": n,
            "reps": 1,
            "streamed": mode == "stream",
            "chunks": 1,
            "softgate_median_s": 1e-3 + n * 1e-8,
            "echo_median_s": 1e-3,
            "softgate_min_s": 1e-3,
            "echo_min_s": 1e-3,
            "throughput_ratio": 0.8,
            "latency_diff_ms": 0.5,
            "softgate_mtok_s": 1.0,
            "echo_mtok_s": 1.0,
            "allocator": name,
            "chunk_bytes": chunk,
        }
        for n in sizes
    ]


def test_e2e_summarises_an_allocator_subset_without_glibc(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--allocators jemalloc` measured everything, then crashed on KeyError 'glibc' before its
    summary and --json (an audit). The measuring is stubbed here: the orchestration runs."""
    e2e = bench_module("e2e_bench")
    found = {"glibc": None, "jemalloc": "/lib/je.so", "tcmalloc": "/lib/tc.so"}
    preloads: list[str | None] = []

    def run_config(
        name: str, preload: str | None, chunk: int, sizes: list[int], *_: object, **kw: str
    ) -> object:
        preloads.append(preload)
        return _rows(name, sizes, chunk, kw.get("mode", "auto"))

    def engine_subprocess(n: int, reps: int, preload: str | None, *_: object) -> float:
        preloads.append(preload)
        return 0.01

    monkeypatch.setattr(e2e, "exit_on_sigterm", lambda: None)  # (not this process's handler)
    monkeypatch.setattr(e2e, "ensure_allocators", lambda install: dict(found))
    monkeypatch.setattr(e2e, "run_config", run_config)
    monkeypatch.setattr(e2e, "engine_subprocess", engine_subprocess)
    out = tmp_path / "out.json"
    argv = ["e2e_bench.py", "--allocators", "jemalloc", "--quick", "--server-path", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    e2e.main()
    assert set(preloads) == {"/lib/je.so"}
    assert "16M tokens, jemalloc" in capsys.readouterr().out
    assert json.loads(out.read_text())["server_path_rows"]


def test_e2e_refuses_an_unknown_allocator(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--allocators tcmaloc` measured glibc and exited 0 (an audit)."""
    e2e = bench_module("e2e_bench")
    monkeypatch.setattr(e2e, "ensure_allocators", lambda install: pytest.fail("measured"))
    monkeypatch.setattr(sys, "argv", ["e2e_bench.py", "--allocators", "glibc,tcmaloc"])
    with pytest.raises(SystemExit) as e:
        e2e.main()
    assert e.value.code == 2
    assert "--allocators: unknown 'tcmaloc'" in capsys.readouterr().err


# ---------------------------------------------------------------- load_bench


def test_load_bench_passes_on_the_callers_engine_compile_and_allocator(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Its docstring says SOFTGATE_ENGINE_COMPILE=0 unless the environment sets it; the
    caller's was dropped with every other SOFTGATE_* variable, SOFTGATE_ALLOCATOR too (an audit)."""
    load_bench = bench_module("load_bench")
    envs: list[dict[str, str]] = []

    class Started(Exception):
        pass

    def popen(cmd: list[str], env: dict[str, str], **_: object) -> None:
        envs.append(env)
        raise Started

    monkeypatch.setattr(load_bench.subprocess, "Popen", popen)
    monkeypatch.setenv("SOFTGATE_GRPC_PORT", "1")  # the bench's own settings win
    for compile, allocator in (("1", "system"), (None, None)):
        for name, value in (("SOFTGATE_ENGINE_COMPILE", compile), ("SOFTGATE_ALLOCATOR", allocator)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        with pytest.raises(Started):
            load_bench.start_server({}, tmp_path / "log")
    assert [(e["SOFTGATE_ENGINE_COMPILE"], e.get("SOFTGATE_ALLOCATOR")) for e in envs] == [
        ("1", "system"),
        ("0", None),
    ]
    assert all(e["SOFTGATE_GRPC_PORT"] != "1" for e in envs)


def test_load_bench_latency_leaves_out_the_reply_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call's latency was taken after the client had parsed and checked its reply (an audit)."""
    load_bench = bench_module("load_bench")
    from grpc_health.v1 import health_pb2

    class Channel:
        """Answers at once: a health check with SERVING, a loss call with bytes."""

        def unary_unary(self, method: str, *_: object, **__: object) -> object:
            if "Health" in method:
                return lambda *_, **__: health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.SERVING
                )
            return lambda *_, **__: b"reply"

        unary_stream = stream_stream = unary_unary

        def close(self) -> None:
            pass

    def slow_check(w: object, reply: bytes) -> None:
        time.sleep(0.2)

    monkeypatch.setattr(load_bench, "check_unary", slow_check)
    w = load_bench.Workload("small-unary-sapo", "unary", b"request", 8, 1, 0.0, np.zeros(8, np.float32))
    rep = load_bench.run_load("unused", [w], clients=1, seconds=0.5, channel_factory=Channel)
    assert rep.requests >= 1 and not rep.wrong
    assert max(rep.latencies) < 0.2, rep.latencies


@pytest.mark.parametrize("wrong", ["softgate", "echo"])
def test_e2e_worker_refuses_a_wrong_answer(monkeypatch: pytest.MonkeyPatch, wrong: str) -> None:
    """The worker checked only the last answers' shapes and a finite loss: a server answering a
    fast wrong gradient (or an echo answering other bytes) was timed as a fast right one (an
    audit). Its last answers are now compared with the eager engine's and the request's."""
    e2e = bench_module("e2e_bench")
    n = 4096
    b = e2e.make_batch(n)
    want = e2e._reference(n)

    class Softgate:
        def __init__(self, *_: object, **__: object) -> None:
            pass

        def loss(self, *_: object, **__: object) -> SimpleNamespace:
            grad = want.grad + (1.0 if wrong == "softgate" else 0.0)
            return SimpleNamespace(grad=grad, loss=want.loss, streamed=False, chunks=1)

        def close(self) -> None:
            pass

    class Echo(Softgate):
        def call(self, _: object) -> np.ndarray:
            return b["logp"] + (1.0 if wrong == "echo" else 0.0)

    monkeypatch.setattr(softgate_client, "SoftgateClient", Softgate)
    monkeypatch.setattr(e2e, "EchoClient", Echo)
    monkeypatch.setattr(e2e, "time", SimpleNamespace(perf_counter=time.perf_counter, sleep=lambda _: None))
    with pytest.raises(AssertionError):
        e2e.worker(_worker_args(n, 2))
