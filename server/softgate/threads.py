"""Per-thread torch intra-op parallelism.

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

import ctypes
import threading
from typing import Any

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
