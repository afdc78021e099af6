"""The CPU quota a container gives softgate serve caps torch's intra-op threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import softgate.threads as threads
import torch
from softgate.threads import _openmp, cpu_quota, one_thread, threads_for


def _tree(tmp_path: Path, cgroup: str, files: dict[str, str]) -> tuple[str, str]:
    """A fake cgroup mount under tmp_path and a /proc/self/cgroup naming this process's groups."""
    for rel, text in files.items():
        p = tmp_path / "fs" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (tmp_path / "fs").mkdir(exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(cgroup)
    return str(tmp_path / "fs"), str(proc)


@pytest.mark.parametrize(
    ("cgroup", "files", "want"),
    [
        # v2, a container with its own cgroup namespace: the group is the mount's root
        ("0::/\n", {"cpu.max": "400000 100000\n"}, 4.0),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
        ("0::/\n", {"cpu.max": "200000\n"}, 2.0),  # no period: the default 100000 us
        # v2, a systemd service: the tightest of the group and its parents
        (
            "0::/system.slice/softgate.service\n",
            {
                "system.slice/softgate.service/cpu.max": "800000 100000",
                "system.slice/cpu.max": "200000 100000",
            },
            2.0,
        ),
        # v2 without a namespace: the group's path is not under the mount, its root is the group
        ("0::/kubepods/pod1/abc\n", {"cpu.max": "300000 100000"}, 3.0),
        # v1: the cpu controller's own mount (as on this dev machine), or the combined one
        (
            "2:cpuacct:/\n1:cpu:/\n",
            {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"},
            2.0,
        ),
        (
            "3:cpu,cpuacct:/docker/x\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            0.5,
        ),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        # nothing readable
        ("0::/\n", {}, None),
        ("1:memory:/\n", {"memory/cpu.cfs_quota_us": "100000"}, None),
    ],
)
def test_cpu_quota_reads_cgroup_v1_and_v2(
    tmp_path: Path, cgroup: str, files: dict[str, str], want: float | None
):
    root, proc = _tree(tmp_path, cgroup, files)
    assert cpu_quota(root, proc) == want


def test_cpu_quota_without_cgroups_is_none(tmp_path: Path) -> None:
    assert cpu_quota(str(tmp_path), str(tmp_path / "missing")) is None


def test_threads_for_a_quota() -> None:
    assert threads_for(4.0, 64, {}) == 4
    assert threads_for(1.5, 64, {}) == 2  # a fraction of a CPU still gets a thread
    assert threads_for(0.2, 64, {}) == 1
    assert threads_for(8.0, 4, {}) is None  # the quota is above what torch would use anyway
    assert threads_for(4.0, 4, {}) is None  # or equal to it
    assert threads_for(None, 64, {}) is None
    assert threads_for(4.0, 64, {"OMP_NUM_THREADS": "16"}) is None  # the operator chose


def test_one_thread_restores_the_threads_count() -> None:
    """`with one_thread():` is one intra-op thread inside and the previous count after."""
    if _openmp() is None:
        pytest.skip("no OpenMP runtime mapped")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_single_threaded_here_needs_no_runtime_when_already_single(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread already at one intra-op thread is single-threaded without an OpenMP runtime."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(threads, "_openmp", lambda: None)
    assert threads.single_threaded_here() is True


def test_serve_fits_torch_threads_to_the_quota() -> None:
    """In a fresh interpreter (set_num_threads is process-wide): a quota of 1 CPU leaves torch
    one intra-op thread and logs why; without a quota, or with OMP_NUM_THREADS, nothing changes."""
    code = (
        "import torch, softgate.serve as s\n"
        "from softgate.logging import configure\n"
        "configure('json', 'INFO')\n"
        "s.cpu_quota = lambda: QUOTA\n"
        "before = torch.get_num_threads()\n"
        "s.fit_threads_to_cpu_quota()\n"
        "print(before, torch.get_num_threads())\n"
    )
    plain = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for quota, env, fitted in (
        ("1.0", plain, True),
        ("None", plain, False),
        ("1.0", {**plain, "OMP_NUM_THREADS": "2"}, False),
    ):
        out = subprocess.run(
            [sys.executable, "-c", code.replace("QUOTA", quota)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        before, after = map(int, out.stdout.split()[-2:])
        if fitted and before > 1:
            assert after == 1 and '"event": "threads_fitted"' in out.stderr + out.stdout
        else:
            assert after == before and "threads_fitted" not in out.stderr + out.stdout
