"""The memory allocator of `softgate serve`: tcmalloc by default, through LD_PRELOAD.

Large batches spend most of their time in page faults of fresh allocations under glibc's
malloc: every tensor over its mmap threshold is mmap'd, faulted in page by page and unmapped
again on every call. tcmalloc (or jemalloc) keeps those pages and reuses them; end to end at
16M tokens that is 2-2.7x faster (bench/RESULTS.md "End-to-end"). An allocator can only be
chosen before the process allocates anything, so `softgate serve` re-executes itself once,
with LD_PRELOAD set, before it imports torch or grpc (`maybe_reexec`, called by the CLI).

Choices (setting `allocator`, `SOFTGATE_ALLOCATOR`, `--allocator`):

- `auto` (default): tcmalloc when its library is installed, else jemalloc, else glibc's;
- `tcmalloc`, `jemalloc`: that one (a warning and glibc's malloc when it is not installed);
- `system`: glibc's malloc (an allocator preloaded by the environment, e.g. the container
  images' LD_PRELOAD, is removed from LD_PRELOAD for the re-executed process);
- a path to a malloc shared library: that library.

An allocator already in the process (the container images preload tcmalloc) is kept as is
under `auto`. The re-exec happens at most once (`SOFTGATE_ALLOCATOR_REEXEC` marks it).

With tcmalloc the re-exec also sets `TCMALLOC_RELEASE_RATE=0` unless the environment has a
value (the images set it too): by default tcmalloc hands freed pages back to the OS a little
at a time, and a 16M-token call then faulted in up to 130,000 pages again (~500 MB, +100-250
ms on that call). At 0 the process keeps its peak memory, which a deployment's memory limit
must allow for anyway (docs/server.md, "Memory allocator").
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CHOICES = ("auto", "system", "tcmalloc", "jemalloc")
REEXEC_MARK = "SOFTGATE_ALLOCATOR_REEXEC"
# library file names per allocator, most preferred first (Debian/Ubuntu, Fedora, Alpine, macOS-free)
LIBRARIES: dict[str, tuple[str, ...]] = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
LIBRARY_DIRS: tuple[str, ...] = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/lib",
)
# tcmalloc reports every allocation above this many bytes on stderr (default 1 GiB), which
# would break one-line-per-event logs; a 512 MiB message plus its copies can pass it
_TCMALLOC_REPORT_VAR = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"
_TCMALLOC_REPORT_BYTES = str(1 << 40)
TCMALLOC_RELEASE_VAR = "TCMALLOC_RELEASE_RATE"


@dataclass(frozen=True)
class Decision:
    """What `plan` decided: `env` is the environment to re-execute with (None: no re-exec)."""

    requested: str
    loaded: str  # the allocator in this process now: tcmalloc, jemalloc, glibc, or a path given
    target: str  # the allocator the process should run with
    library: str | None  # its library, for tcmalloc / jemalloc / a path
    env: dict[str, str] | None
    warning: str | None = None
    reexecuted: bool = False  # this process is the re-executed one


def kind_of(path: str) -> str:
    """tcmalloc / jemalloc / other for a library path (symlinks resolved)."""
    name = os.path.basename(os.path.realpath(path)).lower()
    for kind in LIBRARIES:
        if kind in name:
            return kind
    return "other"


def find_library(kind: str, dirs: Sequence[str] = LIBRARY_DIRS) -> str | None:
    for d in dirs:
        for name in LIBRARIES[kind]:
            p = Path(d) / name
            if p.exists():
                return str(p)
    return None


def _mapped_files(maps_path: str) -> list[str]:
    """The files mapped into this process (absolute paths, as /proc/PID/maps lists them)."""
    try:
        with open(maps_path) as f:
            parts = [line.split(None, 5) for line in f]
    except OSError:
        return []
    return [p[5].strip() for p in parts if len(p) == 6 and p[5].startswith("/")]


def mapped_allocators(maps_path: str = "/proc/self/maps") -> dict[str, str]:
    """{kind: library path} of the tcmalloc / jemalloc libraries mapped into this process."""
    out: dict[str, str] = {}
    for path in _mapped_files(maps_path):
        kind = kind_of(path)
        if kind != "other":
            out.setdefault(kind, path)
    return out


def is_mapped(path: str, maps_path: str = "/proc/self/maps") -> bool:
    """Whether the library file `path` (symlinks resolved) is mapped into this process: a malloc
    given by path whose name is neither tcmalloc's nor jemalloc's (mimalloc, say)."""
    real = os.path.realpath(path)
    return any(os.path.realpath(p) == real for p in set(_mapped_files(maps_path)))


def loaded_allocator(maps_path: str = "/proc/self/maps") -> str:
    """The malloc this process runs with: tcmalloc, jemalloc, or glibc."""
    mapped = mapped_allocators(maps_path)
    for kind in LIBRARIES:
        if kind in mapped:
            return kind
    return "glibc"


def _preload_entries(env: Mapping[str, str]) -> list[str]:
    return [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]


def plan(
    requested: str,
    env: Mapping[str, str] | None = None,
    *,
    loaded: str | None = None,
    dirs: Sequence[str] = LIBRARY_DIRS,
) -> Decision:
    """Decide whether (and with which environment) to re-execute for the `requested` allocator."""
    env = dict(os.environ if env is None else env)
    req = (requested or "auto").strip()
    key = req.lower()
    loaded = loaded if loaded is not None else loaded_allocator()
    again = env.get(REEXEC_MARK) == "1"

    if key == "system" or key == "glibc":
        if loaded == "glibc":
            return Decision(req, loaded, "glibc", None, None)
        kept = [p for p in _preload_entries(env) if kind_of(p) == "other" and "malloc" not in p.lower()]
        if again:
            return Decision(req, loaded, "glibc", None, None, f"{loaded} is still loaded after the re-exec")
        new = dict(env, **{REEXEC_MARK: "1"})
        if kept:
            new["LD_PRELOAD"] = " ".join(kept)
        else:
            new.pop("LD_PRELOAD", None)
        return Decision(req, loaded, "glibc", None, new)

    if key == "auto":
        if loaded != "glibc":
            return Decision(req, loaded, loaded, mapped_allocators().get(loaded), None)
        lib = None
        target = "glibc"
        for kind in LIBRARIES:
            lib = find_library(kind, dirs)
            if lib is not None:
                target = kind
                break
        if lib is None:
            return Decision(req, loaded, "glibc", None, None)
    elif key in LIBRARIES:
        target = key
        if loaded == target:
            return Decision(req, loaded, target, mapped_allocators().get(target), None)
        lib = find_library(target, dirs)
        if lib is None:
            hint = "libtcmalloc-minimal4" if target == "tcmalloc" else "libjemalloc2"
            return Decision(
                req, loaded, loaded, None, None, f"{target} is not installed (Debian package {hint})"
            )
    else:  # a path
        lib = req
        target = kind_of(lib) if kind_of(lib) != "other" else lib
        if not os.path.isfile(lib):  # a directory was preloaded, and ignored (an audit)
            why = "is not a file" if os.path.exists(lib) else "does not exist"
            return Decision(req, loaded, loaded, None, None, f"allocator: library {lib} {why}")
        if loaded == target:
            return Decision(req, loaded, target, lib, None)
        # a malloc of no known name, running (and no known one before it): loaded is the path
        if target == lib and loaded == "glibc" and is_mapped(lib):
            return Decision(req, lib, lib, lib, None)
    if again:
        return Decision(req, loaded, loaded, lib, None, f"{lib} did not load (LD_PRELOAD ignored it)")
    others = [p for p in _preload_entries(env) if kind_of(p) == "other" and "malloc" not in p.lower()]
    new = dict(env, **{REEXEC_MARK: "1"})
    new["LD_PRELOAD"] = " ".join([lib, *others])
    if target == "tcmalloc":
        new.setdefault(_TCMALLOC_REPORT_VAR, _TCMALLOC_REPORT_BYTES)
        new.setdefault(TCMALLOC_RELEASE_VAR, "0")  # keep freed pages (module docstring)
    return Decision(req, loaded, target, lib, new)


def maybe_reexec(requested: str) -> Decision:
    """Re-execute this very command line with the requested allocator preloaded, if needed.

    Returns (without re-executing) when the process already runs with it, when it cannot be
    loaded, or when this process is the re-executed one; the Decision says what happened."""
    d = plan(requested)
    again = os.environ.pop(REEXEC_MARK, None) == "1"  # not inherited by our own children
    if d.env is None:
        return dataclasses.replace(d, reexecuted=again)
    argv = list(getattr(sys, "orig_argv", []) or [])
    if not argv or not sys.executable:
        return Decision(d.requested, d.loaded, d.loaded, None, None, "cannot re-execute: no command line")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], d.env)
    except OSError as e:  # pragma: no cover - exec of our own interpreter failing
        return Decision(d.requested, d.loaded, d.loaded, None, None, f"re-exec failed: {e}")
    raise AssertionError("unreachable")  # pragma: no cover
