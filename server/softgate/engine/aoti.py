"""AOTInductor builds of `kernel.token_terms`, made in a child process.

torch.export and inductor's lowering are Python that holds the GIL for most of the 14-20 s a
CPU configuration takes to build on 2 cores: built in the server's own process, they made
every request served meanwhile 2-3x slower. `build` runs `package` in a child process
(`python -m softgate.engine.aoti`, niced, its example passed with torch.save) and loads the
package it wrote: the server's process only waits on a pipe. The child loads and runs the
package on the example first (`check`), so a build that would crash or compute wrong numbers
fails there, not in the server. The child exits when its parent does (it checks every
second), so a server that exits leaves no compile behind, and removes the build's job
directory first, which a server that exits mid-build cannot (`softgate serve` stopped by
SIGTERM during a background compile exits at once, with os._exit; SIGKILL; OOM).

Loading a package extracts it into a fresh `aotinductor_*` directory under the temp dir, which
torch removes only when the loader is destroyed; a process rarely destroys its kernels before
it exits, so every server start left ~2 MB a configuration behind, for good (in Kubernetes, in
the pod's size-limited /tmp, across container restarts). `load` removes the directory once the
kernel's library is mapped: the mapping outlives its file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from softgate.engine.kernel import Terms, token_keys, token_terms

# the first torch whose AOTInductor builds of this kernel were tested (CI's). On a GPU host's
# torch 2.11 the CPU engine died (SIGSEGV) while it waited for its background build
# (bench/latency_profile.py; the cause was not isolated), while dynamo's compile of the same
# configuration matched eager there: an older torch compiles with dynamo.
MIN_TORCH = "2.13"
# a build's limit: ~20 s cold on 2 cores; past this the child is killed and the build fails
BUILD_TIMEOUT_S = 900.0
# the child's niceness: a build gives way to the requests the server is serving
CHILD_NICE = 10


def supported() -> bool:
    """Whether this process's torch builds kernels with AOTInductor (MIN_TORCH or newer)."""
    return TorchVersion(torch.__version__) >= MIN_TORCH  # as versions: "2.9" < "2.13"


def check(kernel: Callable[..., Terms], example: tuple[Any, ...]) -> None:
    """Raise unless `kernel` gives token_terms' outputs on `example`, to float rounding. The
    child runs it on the package it built, so a torch whose AOTInductor crashes or miscompiles
    fails the build (and the server compiles with dynamo) instead of taking the server down."""
    with torch.no_grad():
        got, want = kernel(*example), token_terms(*example)
    if len(got) != len(want):
        raise RuntimeError(f"the AOTInductor kernel returned {len(got)} outputs, token_terms {len(want)}")
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if (
            g.shape != w.shape
            or g.dtype != w.dtype
            or not torch.allclose(g, w, rtol=1e-5, atol=1e-7, equal_nan=True)
        ):
            raise RuntimeError(f"the AOTInductor kernel's output {i} differs from token_terms'")


def _keys(example: tuple[Any, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The per-token and the per-sequence ([B]) entries of `example`'s tensor dict."""
    t, adv_per_token = example[0], example[4]
    tokens = token_keys(t, adv_per_token)
    return tokens, tuple(k for k in t if k not in tokens and t[k].dim())


def package(example: tuple[Any, ...], path: str, options: dict[str, Any]) -> None:
    """Export token_terms for `example`'s configuration, generic in N and B (>= 2), and
    AOTInductor-compile it into the package file `path` with inductor `options`."""
    import warnings

    from torch.export import Dim, export

    t, prm, *rest = example
    tokens, seqs = _keys(example)
    n_dim, b_dim = Dim("N", min=2), Dim("B", min=2)
    shapes = {k: {0: n_dim} if k in tokens else ({0: b_dim} if k in seqs else None) for k in t}

    class Kernel(torch.nn.Module):
        def forward(self, t: dict[str, Tensor], prm: dict[str, Tensor]) -> Terms:
            return token_terms(t, prm, *rest)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, not ours to act on
        program = export(Kernel(), (t, prm), dynamic_shapes=(shapes, {k: None for k in prm}), strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=options)


def load(path: str, example: tuple[Any, ...]) -> Callable[..., Terms]:
    """The kernel in package `path` (built by `package` for `example`'s configuration) as a
    callable with token_terms' signature that refuses inputs of inconsistent lengths."""
    t, prm = example[:2]
    tokens, seqs = _keys(example)
    extracted = _extracted_dirs()
    run = torch._inductor.aoti_load_package(path).loader.run
    for d in _extracted_dirs() - extracted:  # this load's: mapped, so no longer needed on disk
        shutil.rmtree(d, ignore_errors=True)
    tkeys, pkeys = tuple(t), tuple(prm)

    def call(t: dict[str, Tensor], prm: dict[str, Tensor], *_: Any) -> Terms:
        # the checks inductor's Python wrapper makes and AOTInductor's C++ one does not: the
        # compiled loop reads N elements of every per-token input, B of every per-sequence one
        n, b = t["logp"].numel(), t["ylen"].numel()
        if any(t[k].numel() != n for k in tokens) or any(t[k].numel() != b for k in seqs):
            raise ValueError("token_terms inputs of inconsistent lengths")
        return tuple(run([t[k] for k in tkeys] + [prm[k] for k in pkeys]))  # type: ignore[return-value]

    return call


def _extracted_dirs() -> set[str]:
    """The `aotinductor_*` directories of the AOTInductor libraries this process has mapped
    (from /proc/self/maps; none where there is no /proc)."""
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split(maxsplit=5)[5] for line in f if "/aotinductor_" in line]
    except (OSError, IndexError):
        return set()
    out = set()
    for path in paths:
        head, _, rest = path.rstrip("\n").removesuffix(" (deleted)").partition("/aotinductor_")
        out.add(f"{head}/aotinductor_{rest.split('/', 1)[0]}")
    return out


def build(example: tuple[Any, ...], options: dict[str, Any]) -> Callable[..., Terms]:
    """`package` run in a child process, then `load`ed here. Raises RuntimeError with the
    child's last output when it fails or runs past BUILD_TIMEOUT_S."""
    with tempfile.TemporaryDirectory(prefix="softgate-aoti-") as tmp:
        job, path = os.path.join(tmp, "example.pt"), os.path.join(tmp, "kernel.pt2")
        torch.save((example, options), job)
        cmd = [sys.executable, "-m", __name__, job, path, str(os.getpid())]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"the AOTInductor build ran past {BUILD_TIMEOUT_S:g} s") from exc
        if done.returncode != 0 or not os.path.exists(path):
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"the AOTInductor build exited {done.returncode}: " + " | ".join(tail))
        return load(path, example)


def exit_with_parent(parent: int, leftover: str | None = None) -> None:
    """Exit this process (status 3) once process `parent` is no longer its parent: checked
    every second by a daemon thread, at once when it already is not. The directory `leftover`
    is removed first: the parent's job directory, which a parent gone mid-build cannot remove."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)
        os._exit(3)

    threading.Thread(target=watch, name="softgate-parent-watch", daemon=True).start()


def main(argv: list[str]) -> None:
    """The child: `python -m softgate.engine.aoti EXAMPLE PACKAGE PARENT_PID`."""
    job, path, parent = argv
    os.nice(CHILD_NICE)
    exit_with_parent(int(parent), os.path.dirname(job))
    example, options = torch.load(job)
    package(example, path, options)
    check(load(path, example), example)


if __name__ == "__main__":
    main(sys.argv[1:])
