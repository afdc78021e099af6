"""CompiledKernel: when and how `kernel.token_terms` runs through torch.compile.

Modes (`compile_mode`):
- "off": always eager.
- "sync": compile on first use of each configuration, in the calling thread (CUDA's default),
  unless that thread never waits for a compile (`never_compile_here`: a server's event loop,
  which runs small calls inline) or another compile holds the lock (so that one server pool
  thread at most compiles): there it runs eager and queues the compile as "background" does.
- "background" (CPU's default): the first call of a configuration runs eager and queues a
  compile of that configuration on one background thread; once it is ready, later calls with
  that configuration run the compiled kernel. A compile failure is logged once and leaves that
  configuration eager.

A configuration (`kernel_key`) is what the compiled code is specialised on: objective kind,
sequence ratio, advantage level, KL estimator, mismatch level / mode, the objective's parameter
names (e.g. dual clip on / off), the inputs present with their dtypes and ranks (e.g. no
mask, a 0-d weight), whether ratio and gate are sampled, whether bucket codes are written.
Numbers travel as 0-d tensors and sizes are dynamic, so neither recompiles.

Each configuration is compiled ahead of time, on a synthetic batch of that configuration
(`compile_kernel`), and called without dynamo's per-call guard check (~50-70 us of a 4k-token
call's ~290 on the CPU): `kernel_key` and `fits` check what those guards did, namely the
configuration and sizes of at least 2 tokens, 2 sequences and 2 sampled tokens
(torch.compile specialises sizes 0 and 1; a batch of one sequence gets an empty second one,
`two_sequences`); smaller batches run eager. On the CPU, with torch
2.13 or newer (aoti.MIN_TORCH), a configuration that is not sampled goes through AOTInductor
(`aoti_compile`: torch.export, then C++ for the wrapper around the fused loop as well; a
4k-token call 87 -> 57 us, ~14 s to compile on 2 cores against ~7), built in a child process
(aoti.py) so that the GIL stays with the calls served meanwhile; everything else through
dynamo (`aot_compile`: fullgraph).
Dynamo's compiler is not thread-safe: compiles in this process and compiled calls hold one
lock; a compiled call that would wait for a running compile (background, or another
configuration's before use) runs eager instead. A child's build holds no lock.

At exit (atexit, once the background thread has started) queued compiles are dropped and a
compile running in this process is stopped (`_drain_at_exit`): a thread still compiling in
torch when the interpreter finalises aborts the process (exit status 134). A child made by
os.fork() starts each kernel afresh (`_after_fork_in_child`): new locks (its copy of one another
thread held would never be released), nothing queued or compiling, the compiled kernels kept.

At most `max_configurations` configurations are compiled (DEFAULT_MAX_CONFIGURATIONS); later
new ones run eager, with the same numbers. Each costs ~20 s of a core to build and ~2 MB of
inductor cache on disk, and the key space runs to thousands (objective x advantage level x KL
x mismatch x dtypes x ...): unbounded, a client sending many would keep a core compiling for
hours and could fill a pod's size-limited /tmp.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from softgate.engine import aoti
from softgate.engine.chunked import chunked_token_terms
from softgate.engine.errors import is_out_of_memory
from softgate.engine.kernel import EXPANDED, Terms, token_keys, token_terms
from softgate.engine.segments import host_shortcuts

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "sync", "background")
# at exit, how long to wait for the background thread's compile in this process to stop (it is
# interrupted: it stops within a second, unless it waits for inductor's C++ build) or for a
# call holding the compile lock: a thread still in a torch op when the interpreter finalises
# aborts the process (std::terminate, exit status 134 / -6 instead of 0). `softgate serve`
# waits as long for its compiles on shutdown, then exits at once (os._exit).
COMPILE_EXIT_WAIT_S = 5.0
# configurations compiled at most; a server sees a few (its warm-up compiles 14, one per
# objective, with compile=true)
DEFAULT_MAX_CONFIGURATIONS = 64
# the first torch whose ahead-of-time compile of this kernel is generic in sizes: 2.9 has
# no `disable_guard_check`, 2.10's kernel is specialised to the example's sizes (it raises on
# any other), 2.8 and older (pyproject's floor is 2.4) have no `torch.compile(...).aot_compile`.
# An older torch runs eager by default (compile_mode). Measured: 2.11 (a GPU host), 2.13, 2.14.1.
MIN_TORCH = "2.11"
_TRUE = ("1", "true", "yes", "on", "sync")
_FALSE = ("0", "false", "no", "off")

# tokens per sequence of the synthetic warm-up batch (5 sequences, 67 tokens): sizes >= 2,
# not round and unequal, so the compiled code is generic in N and B
_WARM_LENGTHS = (13, 14, 13, 14, 13)
# ... and on a GPU, ~1M tokens (the same 5 sequences, each x 15,651). Inductor sizes a CUDA
# kernel's reductions by the example's sizes: compiled on 67 tokens, the kernel's ~20 sums
# ran unsplit at any N, 25x slower than eager at 16M tokens (H200: 130 ms against 5.1; 1.7 ms
# compiled on this example, 0.96 at 64k). The CPU loop is sized at run time (dynamic_threads).
_GPU_WARM_SCALE = 15_651
# aot_compile attempts: a trace that has to specialise a float scalar raises
# TensorifyScalarRestartAnalysis (SAPO with KL k3 in float64 does, once), which dynamo's
# per-call compile catches to trace again; aot_compile leaves that to its caller
_ANALYSES = 4
# inductor's options for every compile. dynamic_threads: the CPU kernel's loop is an OpenMP
# parallel region sized by the caller's thread count at run time. Without it inductor decides
# serial vs parallel when compiling, from the example batch's size and the compiling thread's
# count: a background compile (warmed on the 67-token batch below) or a first call from a
# one-thread caller produced a serial kernel, kept for every later call and cached on disk
# for other processes (16M tokens, SAPO: 225 ms with 1.2 cores busy, against 157 ms).
# max_horizontal_fusion_size: how many reductions one CPU loop may carry (default 16).
# SAPO's kernel has 17 (grad sums, counts, the ratio's sum / min / max); at 16 the ratio's three
# went to a second pass over the tokens that re-read the whole ratio, written to memory for it
# (16M tokens, SAPO, 2 cores: 49 -> 47 ms with 32).
COMPILE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {
    "cpp.dynamic_threads": True,
    "cpp.max_horizontal_fusion_size": 32,
}
# AOTInductor's: the same, plus allow_stack_allocation: the kernel's statically sized buffers
# (its ~28 reductions' 0-d results) live on the C++ stack instead of each being a tensor allocated
# through torch's allocator on every call (4k tokens, SAPO: the kernel 59 -> 47 us; the same bits)
AOTI_OPTIONS: dict[str, Any] = {**COMPILE_OPTIONS, "aot_inductor.allow_stack_allocation": True}


_thread = threading.local()


def never_compile_here() -> None:
    """Mark the calling thread (a server's event loop) as one that never waits for a compile,
    nor for another thread's compiled call: there, a "sync" configuration not compiled yet runs
    eager and compiles in the background, and a compiled one whose lock is taken runs eager."""
    _thread.no_compile = True


def compile_mode(compile: bool | str | None, device: torch.device) -> str:
    """'off', 'sync' or 'background' from Engine's `compile` argument; None reads
    SOFTGATE_ENGINE_COMPILE (1 / 0 / background / auto), auto = sync on CUDA, background on CPU."""
    if compile is True:
        return "sync"
    if compile is False:
        return "off"
    raw = compile if compile is not None else os.environ.get("SOFTGATE_ENGINE_COMPILE", "")
    s = raw.strip().lower()
    if s in _TRUE:
        return "sync"
    if s in _FALSE:
        return "off"
    if s == "background":
        return "background"
    if s not in ("", "auto", "none"):
        raise ValueError(f"compile must be one of {COMPILE_MODES}, a bool or 'auto'; got {raw!r}")
    if not compiles_ahead_of_time():
        log.warning(
            "torch %s cannot compile the kernel ahead of time (needs %s or newer); the engine runs eager",
            torch.__version__,
            MIN_TORCH,
        )
        return "off"
    return "sync" if device.type == "cuda" else "background"


def compiles_ahead_of_time() -> bool:
    """Whether this torch compiles the kernel ahead of time, generic in sizes (MIN_TORCH)."""
    return TorchVersion(torch.__version__) >= MIN_TORCH


def kernel_key(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The configuration a compiled token_terms is specialised on, from its arguments."""
    t, prm, kind, seq_ratio, adv_per_token, kl, mismatch, count_dtype, *rest = args
    stride = rest[0] if rest else 1  # token_terms' defaults
    codes = rest[1] if len(rest) > 1 else False
    return (
        kind,
        seq_ratio,
        adv_per_token,
        kl,
        mismatch,
        tuple((k, v.dtype, v.dim()) for k, v in sorted(t.items())),  # (w is [B] or 0-d)
        tuple((k, v.dtype) for k, v in sorted(prm.items())),
        count_dtype,
        t["logp"].device,
        stride > 1,  # sampled ratio and gate, no clip mask
        bool(codes),  # bucket codes
    )


def warmup_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """token_terms arguments of the same configuration for a synthetic batch: 67 tokens on the
    CPU, ~1M on a GPU (see _GPU_WARM_SCALE)."""
    t, prm, *rest = args
    adv_per_token = rest[2]
    dev = t["logp"].device
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor(_WARM_LENGTHS) * (1 if dev.type == "cpu" else _GPU_WARM_SCALE)
    n, b = int(lengths.sum()), lengths.numel()
    logp = -torch.rand(n, generator=g, dtype=torch.float64) - 0.5

    def per_token(k: str) -> Tensor:
        if k in ("m", "ms"):  # (ms: the mask as sent, with rejection)
            return torch.rand(n, generator=g) < 0.9
        if k == "sel":  # (a covariance selection)
            return torch.rand(n, generator=g) < 0.05
        if k == "ids":
            return torch.repeat_interleave(torch.arange(b, dtype=torch.int32), lengths)
        if k == "logp":
            return logp
        if k.endswith(EXPANDED):  # a per-sequence value expanded to its tokens
            return per_seq(k.removesuffix(EXPANDED)).repeat_interleave(lengths)
        return logp + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)

    def per_seq(k: str) -> Tensor:
        if k == "ylen":
            return lengths - 1
        if k == "sclamped":
            return torch.rand(b, generator=g) < 0.2
        if k in ("w", "wkl"):  # [B], or 0-d: one weight for all (kernel_key tells them apart)
            w = torch.rand(b, generator=g, dtype=torch.float64) / n
            return w if k not in t or t[k].dim() else w[0]
        if k == "sratio":
            return torch.exp(0.01 * torch.randn(b, generator=g, dtype=torch.float64))
        return torch.randn(b, generator=g, dtype=torch.float64) * (0.01 if k == "lvseq" else 1.0)

    out: dict[str, Tensor] = {}
    tokens = token_keys(t, adv_per_token)
    for k, v in t.items():
        x = per_token(k) if k in tokens else per_seq(k)
        out[k] = x.to(device=dev, dtype=v.dtype)
    if len(rest) > 6 and rest[6] > 1:  # a sampled kernel: a stride that samples the small batch
        rest[6] = 3
    return (out, {k: v.clone() for k, v in prm.items()}, *rest)


def aot_compile(example: tuple[Any, ...]) -> Callable[..., Terms]:
    """token_terms compiled for `example`'s configuration, generic in sizes, called without
    dynamo's guard check (see the module docstring). Raises when the torch in use cannot."""
    from torch._dynamo import config as dynamo_config

    # some releases have the API behind a flag that is off by default (2.11's; 2.13's is on)
    with (
        dynamo_config.patch(enable_aot_compile=True)
        if hasattr(dynamo_config, "enable_aot_compile")
        else contextlib.nullcontext()
    ):
        fn: Any = torch.compile(token_terms, dynamic=True, fullgraph=True, options=COMPILE_OPTIONS)
        if not hasattr(fn, "aot_compile"):
            raise RuntimeError(f"torch {torch.__version__} has no torch.compile(...).aot_compile")
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis  # (not in older releases)

        for attempt in range(_ANALYSES):
            try:
                with torch.no_grad():  # as compute_loss calls it
                    compiled = fn.aot_compile((example, {}))
                break
            except TensorifyScalarRestartAnalysis:  # dynamo's own compile restarts here; so do we
                if attempt == _ANALYSES - 1:
                    raise
    compiled.disable_guard_check()
    return compiled  # type: ignore[no-any-return]


def aoti_compile(example: tuple[Any, ...]) -> Callable[..., Terms]:
    """token_terms compiled by AOTInductor for `example`'s configuration (CPU, not sampled):
    torch.export, then the wrapper that allocates the outputs and calls the fused loop is C++
    too (4k tokens, SAPO: 87 -> 57 us a call). Built in a child process (aoti.py), so the GIL
    stays with the requests served meanwhile. Generic in N and B (>= 2); the sampled kernel's
    stride is a Python int export would bake in, so sampled configurations use `aot_compile`."""
    return aoti.build(example, AOTI_OPTIONS)


def compile_kernel(
    example: tuple[Any, ...], dynamo_lock: AbstractContextManager[Any] | None = None
) -> Callable[..., Terms]:
    """`aoti_compile` for a CPU configuration that is not sampled, on a torch AOTInductor was
    tested with (falling back to `aot_compile` if AOTInductor fails), else `aot_compile`.
    `dynamo_lock` is held around the compiles that run in this process (dynamo's), not around
    a child's AOTInductor build."""
    stride = example[8] if len(example) > 8 else 1
    if host_shortcuts(example[0]["logp"].device) and stride == 1 and aoti.supported():
        try:
            return aoti_compile(example)
        except Exception as exc:  # e.g. a torch whose export cannot trace it: dynamo's compile
            log.warning("AOTInductor compile failed (%s); compiling with dynamo", exc)
    with dynamo_lock or contextlib.nullcontext():
        return aot_compile(example)


def fits(args: tuple[Any, ...]) -> bool:
    """Whether a compiled kernel serves these token_terms arguments: at least 2 tokens, 1
    sequence (one is served as two: `two_sequences`) and, when sampled, 2 sampled tokens (the
    shape guards dynamo would check)."""
    n, b = args[0]["logp"].numel(), args[0]["ylen"].numel()
    stride = args[8] if len(args) > 8 else 1
    return n >= 2 and b >= 1 and (stride == 1 or -(-n // stride) >= 2)


def two_sequences(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A one-sequence batch's token_terms arguments with an empty second sequence: every [B]
    input gets a 0 (ylen 0), which no token reads (no token has its id) and which every
    sequence term weighs by its length 0 or leaves out (`kernel.sequence_terms`). A compiled
    kernel serves B >= 2 (export specialises sizes 0 and 1); a long sequence alone (a trainer's
    micro-batch of one) ran eager at 4-7x the compiled time. The outputs are the same, but
    for one more trailing zero after the values, which compute_loss drops with the others."""
    t, *rest = args
    if t["ylen"].numel() != 1:
        return args
    tokens = token_keys(t, rest[3])  # (rest[3]: adv_per_token)
    padded = {k: v if k in tokens or v.dim() == 0 else torch.cat([v, v.new_zeros(1)]) for k, v in t.items()}
    return (padded, *rest)


def _contiguous(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`args` with every tensor of token_terms' dict contiguous (the compiled code's layout)."""
    t = args[0]
    if all(v.is_contiguous() for v in t.values()):
        return args
    return ({k: v.contiguous() for k, v in t.items()}, *args[1:])


class _Exiting(BaseException):
    """Raised in the background thread's compile at exit (`CompiledKernel._drain_at_exit`): a
    BaseException, so that no `except Exception` of torch's compiler carries on compiling."""


def _park() -> None:
    """Block this thread for good. At exit the background thread waits here rather than end:
    ending frees its tensors, and a tensor freed while the interpreter finalises aborts it."""
    threading.Event().wait()


# every CompiledKernel alive, for `_after_fork_in_child`
_KERNELS: weakref.WeakSet[CompiledKernel] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A child made by os.fork() has only the forking thread: a lock another thread held
    stays held in its copy, released by no one (its first compiled call spun for good, its exit
    hook waited COMPILE_EXIT_WAIT_S), and no background thread. Each kernel starts afresh."""
    for kern in list(_KERNELS):
        kern._forked()


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_after_fork_in_child)


class CompiledKernel:
    """Callable with token_terms' signature that runs it compiled or eager per `mode`."""

    def __init__(
        self, mode: str, host_mode: str | None = None, max_configurations: int = DEFAULT_MAX_CONFIGURATIONS
    ) -> None:
        """`host_mode`: the mode of configurations on the CPU, when it differs from `mode` (a
        CUDA engine that computes small batches on the host). `max_configurations`: how many
        configurations are compiled at most (0: no limit); later ones run eager."""
        for m in (mode, host_mode or mode):
            if m not in COMPILE_MODES:
                raise ValueError(f"compile mode {m!r}; known: {COMPILE_MODES}")
        if max_configurations < 0:
            raise ValueError(f"max_configurations {max_configurations} must be >= 0 (0: no limit)")
        self.mode = mode
        self.max_configurations = max_configurations
        self._over: set[tuple[Any, ...]] = set()  # configurations left eager for the limit
        self.host_mode = host_mode or mode
        self._enabled = mode != "off" or self.host_mode != "off"
        # (example, the lock to hold around a compile in this process) -> compiled kernel
        self._compile: Callable[
            [tuple[Any, ...], AbstractContextManager[Any] | None], Callable[..., Terms]
        ] = compile_kernel
        self._fns: dict[tuple[Any, ...], Callable[..., Terms]] = {}  # configuration -> compiled
        self._lock = threading.Lock()  # dynamo: one compile or compiled call at a time
        self._state = threading.Lock()  # guards the sets below
        self._ready: set[tuple[Any, ...]] = set()
        self._queued: set[tuple[Any, ...]] = set()
        self._failed: set[tuple[Any, ...]] = set()
        self.compiled_calls = 0  # calls that ran a compiled kernel
        self._jobs: queue.Queue[tuple[tuple[Any, ...], tuple[Any, ...]]] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._exiting = False  # the interpreter exits: compile nothing more (_drain_at_exit)
        self._building = False  # the background thread compiles in this process (dynamo's)
        self._compiling = threading.Event()
        self._idle = threading.Condition(self._state)
        self._hooked = False  # the exit hook is registered (a forked child inherits it)
        _KERNELS.add(self)

    def __call__(self, *args: Any, schedule: bool = True) -> Terms:
        """token_terms(*args), compiled when this configuration's kernel is available;
        `schedule=False` never queues a background compile."""
        if not self._enabled or not fits(args):
            return chunked_token_terms(*args)
        mode = self.host_mode if args[0]["logp"].device.type == "cpu" else self.mode
        if mode == "off":
            return chunked_token_terms(*args)
        args = two_sequences(args)
        key = kernel_key(args)
        if mode == "sync":
            return self._sync(key, args)
        if key in self._ready and self._acquire():
            try:
                out = self._fns[key](*_contiguous(args))
                self.compiled_calls += 1
                return out
            except Exception as exc:
                if is_out_of_memory(exc):  # the batch's size, not the kernel: the caller's error
                    raise
                self._fail(key, exc)
            finally:
                self._lock.release()
        elif schedule:
            self._schedule(key, args)
        return chunked_token_terms(*args)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no compile is queued or running (a background one, or a sync one a pool
        thread runs); False on timeout, and at once once the interpreter exits (none will end)."""
        with self._idle:
            self._idle.wait_for(lambda: not self._queued or self._exiting, timeout)
            return not self._queued and not self._exiting

    @property
    def enabled(self) -> bool:
        """False when the mode is off or a sync compile failed (everything runs eager)."""
        return self._enabled

    @property
    def ready(self) -> int:
        """Number of configurations whose compiled kernel is in use."""
        return len(self._ready)

    def states(self) -> dict[str, int]:
        """Configurations seen, by state: compiled, compiling (queued or building), failed (left
        eager by a compile error), over_limit (left eager by `max_configurations`)."""
        with self._state:
            return {
                "compiled": len(self._ready),
                "compiling": len(self._queued - self._ready),
                "failed": len(self._failed),
                "over_limit": len(self._over),
            }

    # ---------------------------------------------------------------- internals

    def _sync(self, key: tuple[Any, ...], args: tuple[Any, ...]) -> Terms:
        # a configuration runs eager while another one compiles (a CUDA engine's host
        # configurations in the background, or another's before use) rather than wait for it; a
        # new one then compiles in the background: one caller's thread at most compiles
        claimed = False
        if key in self._ready:
            if not self._acquire():
                return chunked_token_terms(*args)
        elif key in self._over:  # left eager for the limit: nothing to wait for
            return chunked_token_terms(*args)
        elif key in self._failed:  # (in the background): compiled again here, a second failure
            return chunked_token_terms(*args)  # switched every compiled kernel off (a review)
        elif getattr(_thread, "no_compile", False) and key not in self._fns:
            self._schedule(key, args)
            return chunked_token_terms(*args)
        else:
            # claimed in _queued before the lock is taken: a compile of `key` queued meanwhile
            # from the loop (or a second pool thread) finds it there and runs eager, so the key
            # is never compiled twice; `wait()` waits for this compile too
            with self._state:
                elsewhere = key in self._queued
                full = not elsewhere and key not in self._fns and self._full()
                claimed = not elsewhere and not full
                if claimed:
                    self._queued.add(key)
            if elsewhere:  # compiling in another thread: not twice
                return chunked_token_terms(*args)
            if full:
                self._left_eager(key)
                return chunked_token_terms(*args)
            # another compile holds the lock (or, on the event loop, anything does): run eager
            # rather than hold a server's pool thread for it (a minute a compile on a loaded box;
            # two such calls stalled every other call), and compile in the background
            if not self._acquire():
                if key in self._fns:  # built, not ready (its first call ran out of memory): not twice
                    self._unqueue(key)
                else:
                    self._enqueue(key, args)
                return chunked_token_terms(*args)
        try:
            fn = self._fns.get(key)
            if fn is None:  # compiled on first use, for the synthetic batch of this configuration
                with self._marked_compiling():  # (the lock is held already)
                    fn = self._fns[key] = self._compile(warmup_args(args), None)
            if fn is not None:
                out = fn(*_contiguous(args))
                self.compiled_calls += 1
                if key not in self._ready:
                    with self._state:
                        self._ready.add(key)
                return out
        except Exception as exc:  # a compiler failure must not take the service down
            if is_out_of_memory(exc):  # (nor does a batch too large for the device switch it off)
                raise
            log.warning("compiled engine kernel failed (%s); falling back to eager", exc)
            self._enabled = False
        finally:
            self._lock.release()
            if claimed:
                self._unqueue(key)
        return chunked_token_terms(*args)

    def _forked(self) -> None:
        """In a forked child: new locks, nothing queued or compiling (the parent's compiles
        run in threads the child does not have); the compiled kernels stay in use."""
        self._lock = threading.Lock()
        self._state = threading.Lock()
        self._idle = threading.Condition(self._state)
        self._compiling = threading.Event()
        self._jobs = queue.Queue()
        self._queued = set()
        self._worker = None
        self._building = False

    def _unqueue(self, key: tuple[Any, ...]) -> None:
        with self._idle:
            self._queued.discard(key)
            self._idle.notify_all()

    @contextlib.contextmanager
    def _marked_compiling(self) -> Iterator[None]:
        """A compile in this process runs: other configurations' compiled calls run eager
        rather than wait for the lock it holds."""
        self._compiling.set()
        try:
            yield
        finally:
            self._compiling.clear()

    @contextlib.contextmanager
    def _compile_lock(self) -> Iterator[None]:
        """The lock, held for the background thread's compile in this process: compiled calls
        run eager meanwhile. Once the interpreter exits, no compile starts: the thread parks."""
        self._lock.acquire()
        with self._state:
            exiting = self._exiting
            self._building = not exiting
        if exiting:
            self._lock.release()
            _park()
        try:
            with self._marked_compiling():
                yield
        finally:
            # the lock first: an exit's async exception landing here must not leak it
            try:
                self._lock.release()
            finally:
                with self._state:
                    self._building = False

    def _acquire(self) -> bool:
        """Take the compile lock unless a compile holds it, or (on the event loop) anything
        does: then run eager. (The loop waited for a pool thread's compiled call, up to a 16M
        kernel's 50-225 ms, with health checks stalled behind it.)"""
        if self._lock.acquire(blocking=False):
            return True
        if getattr(_thread, "no_compile", False):
            return False
        while not self._compiling.is_set():  # another compiled call: it is short, wait
            if self._lock.acquire(timeout=0.05):
                return True
        return False

    def _fail(self, key: tuple[Any, ...], exc: BaseException) -> None:
        with self._state:
            self._ready.discard(key)
            first = key not in self._failed
            self._failed.add(key)
        if first:
            log.warning(
                "compiled engine kernel failed for %s (%s); this configuration stays eager", key[:5], exc
            )

    def _full(self) -> bool:
        """Whether `max_configurations` configurations are compiled, compiling or failed (hold `_state`)."""
        known = len(self._ready | self._queued | self._failed)  # (a finishing compile is in two)
        return bool(self.max_configurations) and known >= self.max_configurations

    def _left_eager(self, key: tuple[Any, ...]) -> None:
        """Configuration `key` stays eager for the limit (the first such one is logged)."""
        with self._state:
            first = not self._over
            self._over.add(key)
        if first:
            log.warning(
                "%d engine configurations compiled or compiling, the limit (max_compiled_kernels): "
                "%s and every further new configuration run eager",
                self.max_configurations,
                key[:5],
            )

    def _schedule(self, key: tuple[Any, ...], args: tuple[Any, ...]) -> None:
        with self._state:
            if (
                self._exiting
                or key in self._queued
                or key in self._failed
                or key in self._ready
                or key in self._over
            ):
                return
            full = self._full()
            if not full:
                self._queued.add(key)
        if full:
            self._left_eager(key)
            return
        self._enqueue(key, args)

    def _enqueue(self, key: tuple[Any, ...], args: tuple[Any, ...]) -> None:
        """Hand configuration `key`, claimed in `_queued`, to the background thread."""
        with self._state:
            if self._exiting:  # nothing more compiles; a claim made after the exit hook
                self._queued.discard(key)  # cleared the rest is dropped too (a review)
                return
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="softgate-compile", daemon=True)
                self._worker.start()
                if not self._hooked:
                    atexit.register(self._drain_at_exit)
                    self._hooked = True
        try:
            self._jobs.put((key, warmup_args(args)))
        except BaseException:  # (the warm-up batch out of device memory, say): not queued after all
            self._unqueue(key)
            raise

    def _drain_at_exit(self) -> None:
        """atexit: compile nothing more, and stop the background thread's compile running in
        this process (`_Exiting`), waiting up to COMPILE_EXIT_WAIT_S for the thread to end; wait
        as long for a compiled call or warm-up run that holds the lock. A child's AOTInductor
        build is not waited for: its child exits with this process."""
        with self._idle:  # (`_state`): waiters return, and what is queued never compiles
            self._exiting = True
            building = self._building
            self._queued.clear()
            self._idle.notify_all()
        with contextlib.suppress(queue.Empty):
            while True:
                self._jobs.get_nowait()
        worker = self._worker
        if building and worker is not None and worker.ident is not None:
            # (a thread compiling in torch when the interpreter finalises aborts the process)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(worker.ident), ctypes.py_object(_Exiting)
            )
            worker.join(COMPILE_EXIT_WAIT_S)
            if worker.is_alive():
                log.warning("an engine kernel was still compiling at exit; the process may abort")
        elif self._lock.acquire(timeout=COMPILE_EXIT_WAIT_S):
            self._lock.release()

    def _work(self) -> None:
        with contextlib.suppress(_Exiting):  # (ends the thread at exit; its compile is useless)
            while True:
                key, args = self._jobs.get()
                if self._exiting:
                    self._unqueue(key)
                    _park()
                self._build(key, args)

    def _build(self, key: tuple[Any, ...], args: tuple[Any, ...]) -> None:
        """Compile configuration `key` on its warm-up batch `args` (the background thread)."""
        try:
            with torch.no_grad():
                fn = self._compile(args, self._compile_lock())  # args: the warm-up batch
                with self._lock:
                    exiting = self._exiting
                    if not exiting:
                        fn(*args)  # one run before real calls use it
                if exiting:
                    self._unqueue(key)
                    # an exit's async exception raised after the compile ended would be
                    # pending here, never delivered while parked: cancel it
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)
                    _park()
            self._fns[key] = fn
            with self._state:
                self._ready.add(key)
            log.info("compiled engine kernel ready for %s", key[:5])
        except Exception as exc:
            if is_out_of_memory(exc):  # (a device full for the moment: a later call asks again)
                log.warning("compiling the engine kernel for %s ran out of memory (%s)", key[:5], exc)
            else:
                self._fail(key, exc)
        finally:
            self._unqueue(key)
