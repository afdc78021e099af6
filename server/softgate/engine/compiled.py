"""CompiledKernel: when and how `kernel.token_terms` runs through torch.compile.

Modes (`compile_mode`):
- "off": always eager.
- "sync": compile on first use of each configuration, in the calling thread (CUDA's default).
- "background" (CPU's default): the first call of a configuration runs eager and queues a
  compile of that configuration on one background thread, warmed on a small synthetic batch
  of the same configuration; once it is ready, later calls with that configuration run the
  compiled kernel. A compile failure is logged once and leaves that configuration eager.

A configuration (`kernel_key`) is what the compiled code is specialised on: objective kind,
sequence ratio, advantage level, KL estimator, mismatch level / mode, the objective's parameter
names (e.g. dual clip on / off), the dtypes, whether ratio and gate are sampled. Numbers
travel as 0-d tensors and sizes are dynamic, so neither recompiles. Batches with fewer than 2
tokens or sequences run eager (torch.compile specialises sizes 0 and 1). Dynamo's compiler
is not thread-safe: compiles and compiled calls hold one lock; a call that would wait for a
running background compile runs eager instead, and a ready configuration that still misses
dynamo's guards runs eager (counted in `guard_misses`, logged once) instead of recompiling
inside a request.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from softgate.engine.kernel import Terms, token_terms

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "sync", "background")
_TRUE = ("1", "true", "yes", "on", "sync")
_FALSE = ("0", "false", "no", "off")

# tokens per sequence of the synthetic warm-up batch (5 sequences, 67 tokens): sizes >= 2 and
# not round, so the compiled code is generic in N and B
_WARM_LENGTHS = (13, 14, 13, 14, 13)
# inductor's options for every compile. dynamic_threads: the CPU kernel's loop is an OpenMP
# parallel region sized by the caller's thread count at run time. Without it inductor decides
# serial vs parallel when compiling, from the example batch's size and the compiling thread's
# count: a background compile (warmed on the 67-token batch below) or a first call from a
# one-thread caller produced a serial kernel, kept for every later call and cached on disk
# for other processes (16M tokens, SAPO: 225 ms with 1.2 cores busy, against 157 ms).
COMPILE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"cpp.dynamic_threads": True}
# per-token entries of token_terms' tensor dict; the others are per sequence ([B])
_PER_TOKEN = ("logp", "old", "m", "ids", "ref", "rollout")


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
    return "sync" if device.type == "cuda" else "background"


def kernel_key(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The configuration a compiled token_terms is specialised on, from its arguments."""
    t, prm, kind, seq_ratio, adv_per_token, kl, mismatch, count_dtype, *stride = args
    return (
        kind,
        seq_ratio,
        adv_per_token,
        kl,
        mismatch,
        tuple((k, v.dtype) for k, v in sorted(t.items())),
        tuple((k, v.dtype) for k, v in sorted(prm.items())),
        count_dtype,
        t["logp"].device,
        bool(stride) and stride[0] > 1,  # sampled ratio and gate, no clip mask
    )


def warmup_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """token_terms arguments of the same configuration for a small synthetic batch."""
    t, prm, *rest = args
    adv_per_token = rest[2]
    dev = t["logp"].device
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor(_WARM_LENGTHS)
    n, b = int(lengths.sum()), lengths.numel()
    logp = -torch.rand(n, generator=g, dtype=torch.float64) - 0.5

    def per_token(k: str) -> Tensor:
        if k == "m":
            return torch.rand(n, generator=g) < 0.9
        if k == "ids":
            return torch.repeat_interleave(torch.arange(b, dtype=torch.int32), lengths)
        if k == "logp":
            return logp
        return logp + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)

    def per_seq(k: str) -> Tensor:
        if k == "ylen":
            return lengths - 1
        if k == "sclamped":
            return torch.rand(b, generator=g) < 0.2
        if k == "w":
            return torch.rand(b, generator=g, dtype=torch.float64) / n
        if k == "sratio":
            return torch.exp(0.01 * torch.randn(b, generator=g, dtype=torch.float64))
        return torch.randn(b, generator=g, dtype=torch.float64) * (0.01 if k == "lvseq" else 1.0)

    out: dict[str, Tensor] = {}
    for k, v in t.items():
        x = per_token(k) if k in _PER_TOKEN or (k == "adv" and adv_per_token) else per_seq(k)
        out[k] = x.to(device=dev, dtype=v.dtype)
    if len(rest) > 6 and rest[6] > 1:  # a sampled kernel: a stride that samples the small batch
        rest[6] = 3
    return (out, {k: v.clone() for k, v in prm.items()}, *rest)


def fresh_token_terms() -> Callable[..., Terms]:
    """token_terms with its own code object: dynamo keeps one cache (of at most 8 entries,
    `recompile_limit`) per code object, so each configuration compiles its own copy; then no
    configuration is ever turned away by that limit and each call checks one set of guards."""
    code = token_terms.__code__.replace()
    return types.FunctionType(code, token_terms.__globals__, token_terms.__name__, token_terms.__defaults__)


class CompiledKernel:
    """Callable with token_terms' signature that runs it compiled or eager per `mode`."""

    def __init__(self, mode: str) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r}; known: {COMPILE_MODES}")
        self.mode = mode
        self._enabled = mode != "off"
        self._compile: Callable[[Callable[..., Terms]], Any] = lambda f: torch.compile(
            f, dynamic=True, options=COMPILE_OPTIONS
        )
        self._fns: dict[tuple[Any, ...], Any] = {}  # configuration -> its compiled token_terms
        self._lock = threading.Lock()  # dynamo: one compile or compiled call at a time
        self._state = threading.Lock()  # guards the sets below
        self._ready: set[tuple[Any, ...]] = set()
        self._queued: set[tuple[Any, ...]] = set()
        self._failed: set[tuple[Any, ...]] = set()
        self._missed: set[tuple[Any, ...]] = set()
        self.guard_misses = 0  # calls of a ready configuration that ran eager (dynamo's guards)
        self._jobs: queue.Queue[tuple[tuple[Any, ...], tuple[Any, ...]]] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._compiling = threading.Event()
        self._idle = threading.Condition(self._state)

    def __call__(self, *args: Any, schedule: bool = True) -> Terms:
        """token_terms(*args), compiled when this configuration's kernel is available;
        `schedule=False` never queues a background compile."""
        if not self._enabled or args[0]["logp"].numel() < 2 or args[0]["w"].numel() < 2:
            return token_terms(*args)
        key = kernel_key(args)
        if self.mode == "sync":
            return self._sync(key, args)
        if key in self._ready and self._acquire():
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    return self._fns[key](*args)  # type: ignore[no-any-return]
            except Exception as exc:
                if isinstance(exc, RuntimeError) and str(exc).startswith("Detected recompile"):
                    self._miss(key, exc)
                else:
                    self._fail(key, exc)
            finally:
                self._lock.release()
        elif schedule:
            self._schedule(key, args)
        return token_terms(*args)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no background compile is queued or running; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._queued, timeout)

    @property
    def enabled(self) -> bool:
        """False when the mode is off or a sync compile failed (everything runs eager)."""
        return self._enabled

    @property
    def ready(self) -> int:
        """Number of configurations whose compiled kernel is in use."""
        return len(self._ready)

    # ---------------------------------------------------------------- internals

    def _compiled(self, key: tuple[Any, ...]) -> Any:
        """The compiled token_terms of `key` (created, not yet compiled, on first use); call
        with the lock held."""
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._compile(fresh_token_terms())
        return fn

    def _sync(self, key: tuple[Any, ...], args: tuple[Any, ...]) -> Terms:
        try:
            with self._lock:
                out = self._compiled(key)(*args)
                if key not in self._ready:
                    with self._state:
                        self._ready.add(key)
                return out  # type: ignore[no-any-return]
        except Exception as exc:  # a compiler failure must not take the service down
            log.warning("compiled engine kernel failed (%s); falling back to eager", exc)
            self._enabled = False
        return token_terms(*args)

    def _acquire(self) -> bool:
        """Take the compile lock unless a background compile holds it (then run eager)."""
        if self._lock.acquire(blocking=False):
            return True
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

    def _miss(self, key: tuple[Any, ...], exc: BaseException) -> None:
        with self._state:
            self.guard_misses += 1
            first = key not in self._missed
            self._missed.add(key)
        if first:
            log.warning("compiled engine kernel does not fit this batch (%s); it runs eager", exc)

    def _schedule(self, key: tuple[Any, ...], args: tuple[Any, ...]) -> None:
        with self._state:
            if key in self._queued or key in self._failed or key in self._ready:
                return
            self._queued.add(key)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="softgate-compile", daemon=True)
                self._worker.start()
        self._jobs.put((key, warmup_args(args)))

    def _work(self) -> None:
        while True:
            key, args = self._jobs.get()
            try:
                with self._lock, torch.no_grad():  # as compute_loss calls it (a dynamo guard)
                    self._compiling.set()
                    try:
                        self._compiled(key)(*args)
                    finally:
                        self._compiling.clear()
                with self._state:
                    self._ready.add(key)
                log.info("compiled engine kernel ready for %s", key[:5])
            except Exception as exc:
                self._fail(key, exc)
            finally:
                with self._idle:
                    self._queued.discard(key)
                    self._idle.notify_all()
