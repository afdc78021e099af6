"""The benchmark scripts' own logic, at their smallest: arguments they refuse or accept, and
the processes they start, stopped when they are stopped (bench/device_check.sh's steps too).
Nothing here times anything."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


def test_cuda_compile_example_has_help() -> None:
    out = run_bench(str(BENCH / "cuda_compile_example.py"), "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compiled, 67 tokens" in out.stdout


def test_compile_cost_removes_its_fresh_cache_at_exit() -> None:
    """--fresh-cache left its softgate-inductor-* directory in the temp dir (an audit)."""
    code = "import compile_cost, os; d = compile_cost.fresh_cache_dir(); assert os.path.isdir(d); print(d)"
    out = run_bench("-c", code, env={**os.environ, "PYTHONPATH": str(BENCH)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert not Path(out.stdout.strip()).exists()
