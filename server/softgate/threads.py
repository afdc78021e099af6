"""torch intra-op parallelism: per thread, and the process's cap from a CPU quota (`cpu_quota`).

`torch.set_num_threads` is process-wide: it also changes the thread count every thread
created later starts with. The threads that run small work (small requests inline on the
event loop, telemetry bucketing after a call) want ONE intra-op thread: an OpenMP
parallel region costs a wake-up of every team thread, and on a busy host (2 cores shared
with other processes) each region waits for a descheduled thread: a 4k-token loss measured
24 ms with 2 threads against 0.6 ms with 1 under such load. With ATen's OpenMP backend the
team size is the calling thread's OpenMP `nthreads` ICV, which `omp_set_num_threads` sets
for that thread alone; `single_threaded_here` does that, after ATen's lazy per-thread
initialisation (which would otherwise reset it), and leaves every other thread as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_lib: Any = None
_lib_lock = threading.Lock()
_OMP_NAMES = ("libgomp", "libiomp5", "libomp")


def _openmp() -> Any:
    """The OpenMP runtime torch runs on (the one mapped into this process), or None."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = False
            try:
                with open("/proc/self/maps") as f:
                    parts = (line.split(None, 5) for line in f)
                    paths = {p[5].strip() for p in parts if len(p) == 6}
            except OSError:
                paths = set()
            for path in sorted(paths):
                base = path.rsplit("/", 1)[-1]
                if path.startswith("/") and base.startswith(_OMP_NAMES) and ".so" in base:
                    try:
                        lib = ctypes.CDLL(path)
                        lib.omp_set_num_threads.argtypes = [ctypes.c_int]
                        _lib = lib
                        break
                    except (OSError, AttributeError):
                        continue
        return _lib or None


def single_threaded_here() -> bool:
    """Make torch ops called from THIS thread use one intra-op thread; True if it took effect."""
    import torch

    torch.get_num_threads()  # ATen's lazy per-thread init first: it would overwrite ours
    if torch.get_num_threads() == 1:
        return True
    lib = _openmp()
    if lib is None:
        return False
    lib.omp_set_num_threads(1)
    return bool(torch.get_num_threads() == 1)


class one_thread:
    """`with one_thread():` torch ops of this thread use one intra-op thread inside the block;
    the thread's previous count is restored after (no-op where the runtime is not found)."""

    def __enter__(self) -> one_thread:
        import torch

        self._before = torch.get_num_threads()  # also ATen's lazy per-thread init
        self._lib = _openmp() if self._before != 1 else None
        if self._lib is not None:
            self._lib.omp_set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lib is not None:
            self._lib.omp_set_num_threads(self._before)


def cpu_quota(root: str = "/sys/fs/cgroup", cgroup_file: str = "/proc/self/cgroup") -> float | None:
    """The CPUs this process's cgroup may use (CFS quota / period, the tightest from its own
    group up to the mount's root), or None when unlimited or unreadable. cgroup v2 (`cpu.max`)
    and v1 (`cpu.cfs_quota_us`, `cpu.cfs_period_us`). `docker run --cpus 4` sets one; OpenMP
    does not read it and starts a thread per host core, which the quota then throttles."""
    try:
        with open(cgroup_file) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    found: list[float] = []
    for parts in lines:
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one tree
            mounts = [root, os.path.join(root, "unified")]
            read = _v2_quota
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's tree
            mounts = [os.path.join(root, name) for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            read = _v1_quota
        else:
            continue
        for mount in mounts:
            for group in _ancestors(mount, path):
                q = read(group)
                if q is not None:
                    found.append(q)
    return min(found) if found else None


def _ancestors(mount: str, path: str) -> list[str]:
    """`mount`/`path` and its parents up to `mount` (inside a container's cgroup namespace the
    path may not exist there: then the mount itself)."""
    parts = [p for p in path.split("/") if p]
    return [os.path.join(mount, *parts[:k]) for k in range(len(parts), -1, -1)]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _v2_quota(group: str) -> float | None:
    raw = _read(os.path.join(group, "cpu.max"))  # "QUOTA PERIOD" or "max PERIOD"
    if not raw:
        return None
    quota, _, period = raw.partition(" ")
    return _ratio(quota, period or "100000")


def _v1_quota(group: str) -> float | None:
    quota, period = (
        _read(os.path.join(group, "cpu.cfs_quota_us")),
        _read(os.path.join(group, "cpu.cfs_period_us")),
    )
    return _ratio(quota, period) if quota and period else None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return q / p if q > 0 and p > 0 else None


def threads_for(quota: float | None, current: int, env: Mapping[str, str]) -> int | None:
    """The intra-op thread count to set for a CPU quota: ceil(quota) when that is below
    `current` and the environment does not choose (OMP_NUM_THREADS), else None (leave it)."""
    if quota is None or "OMP_NUM_THREADS" in env:
        return None
    n = max(1, math.ceil(quota))
    return n if n < current else None


def on_daemon_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """`fn()` on a daemon thread, its result (or exception) in a future of the running loop.
    Not the loop's executor (asyncio.to_thread): asyncio.run's exit waits for that executor's
    threads, so work that never ends (a compile, a wedged device) would hold the process."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():  # (cancelled: nobody waits any more)
            return
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)

    def work() -> None:
        result, error = None, None
        try:
            result = fn()
        except BaseException as e:  # (re-raised in the loop, as asyncio.to_thread would)
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=name, daemon=True).start()
    return done
