"""Engine: the device-bound entry point every adapter calls."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from softgate.engine.advantages import group_advantages
from softgate.engine.batch import Batch
from softgate.engine.compiled import DEFAULT_MAX_CONFIGURATIONS, CompiledKernel, compile_mode
from softgate.engine.config import (
    AGGREGATION_MODES,
    OBJECTIVES,
    AdvantageConfig,
    AggregationConfig,
    KLConfig,
    LossConfig,
    MismatchConfig,
)
from softgate.engine.errors import FieldViolation, InputError, is_out_of_memory
from softgate.engine.loss import TokenTerms, compute_loss
from softgate.engine.result import AdvantageResult, LossResult
from softgate.engine.transfer import to_device
from softgate.engine.validation import _INTS, check_arguments, check_devices, reward_tensor
from softgate.threads import one_thread

log = logging.getLogger(__name__)

_BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(Batch))
_HOST = torch.device("cpu")
# A CUDA engine computes a batch of at most this many tokens whose tensors are all in host
# memory (a server's always are) on the host, where it costs less than the GPU's launches and
# copies: the measurements behind it are in docs/engine.md ("Small batches on the host").
DEFAULT_HOST_MAX_TOKENS = 65536
# A CPU batch of at most this many tokens is computed on ONE intra-op thread, whoever calls:
# a compiled kernel's float64 sums are split by the calling thread's thread count, so a batch
# served (a server runs calls this small on one thread, for speed: softgate.threads) and the
# same batch in-process differed in the last bit of the loss and metrics (an audit).
ONE_THREAD_MAX_TOKENS = 32768


def engine_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device: the CPU or a CUDA device this host has, else ValueError
    naming it (a CUDA engine without CUDA ran small batches on the host, then failed with a
    bare AssertionError on the first large one; an audit)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {str(device)!r} is not a device: cpu, cuda or cuda:N ({e})") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {str(device)!r}: the engine runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r}: CUDA is not available (no CUDA in this torch, or no device)"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"device {str(device)!r}: this host has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
        )
    return dev


def _check_grad_out(batch: Batch, grad_out: Tensor) -> None:
    """ValueError unless `grad_out` is a tensor whose bytes no input of `batch` shares
    (others are refused before anything is written): the gradient written into it would
    overwrite that input (`grad_out=logp` was accepted; an audit). Byte ranges are compared,
    whatever the storages: two numpy views of one array come as two storages (a review)."""
    if not isinstance(grad_out, Tensor):
        raise ValueError(f"grad_out must be a torch.Tensor, got {type(grad_out).__name__}")
    lo = grad_out.data_ptr()
    if not lo or not grad_out.numel():  # no memory: empty, or meta (refused with its other checks)
        return
    last = sum((n - 1) * st for n, st in zip(grad_out.shape, grad_out.stride(), strict=True))
    hi = lo + (last + 1) * grad_out.element_size()
    for name in _BATCH_FIELDS:
        x = getattr(batch, name)
        if not isinstance(x, Tensor):
            continue
        start = x.data_ptr()  # (inputs are 1-D: check_arguments; the cheap test first)
        if start >= hi or not x.numel():
            continue
        if (
            lo < start + ((x.numel() - 1) * x.stride(0) + 1) * x.element_size()
            and x.device == grad_out.device
        ):
            raise ValueError(f"grad_out shares memory with batch.{name}: the gradient would overwrite it")


class Engine:
    """Computes advantages and losses on one device (CUDA when present, else CPU).

    Inputs may live on any device; they are moved to the engine's device and results stay
    there (adapters bring what they send back with `transfer.to_host`). Exception: a CUDA
    engine computes a small batch whose tensors are all in host memory on the host (at most
    `host_max_tokens` tokens, or rewards for `advantages`; 0: never), where it costs less than
    the GPU's launches and copies; its results are then on the host (`device_for` says where).

    The per-token kernel (`kernel.token_terms`) can run through torch.compile(dynamic=True):
    one fused loop instead of ~60 separate passes over the tokens, the same code as the eager
    path, equal numbers up to float rounding (several times faster than eager on CPU at 16M
    tokens, see bench/RESULTS.md). `compile`: True compiles each configuration (objective
    kind, KL / mismatch on or off, advantage level, dtype) on first use in the calling thread
    (about 2-30 s each on 2 CPU cores, docs/engine.md); False never compiles; "background"
    runs a configuration's first calls eager while one background thread compiles it, then
    switches to the compiled kernel; None (default) reads SOFTGATE_ENGINE_COMPILE (1 / 0 /
    background / auto) and otherwise means True on CUDA, "background" on CPU. Compile failures
    are logged and leave the engine eager. At most `max_compiled_kernels` configurations are
    compiled (0: no limit); later new ones run eager. Calls may run from several threads at
    once; compiles and compiled calls are serialised by a lock (see `compiled.CompiledKernel`).
    At exit a process may wait up to `compiled.COMPILE_EXIT_WAIT_S` for a compile running in it.
    `device`: "cpu" or a CUDA device this host has (else ValueError).
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        compile: bool | str | None = None,
        host_max_tokens: int = DEFAULT_HOST_MAX_TOKENS,
        max_compiled_kernels: int = DEFAULT_MAX_CONFIGURATIONS,
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = engine_device(device)
        self.compile_mode = compile_mode(compile, self.device)
        self.compile = self.compile_mode != "off"
        self.host_max_tokens = host_max_tokens if self.device.type != "cpu" else 0
        # one kernel for both devices: dynamo compiles one configuration at a time (its lock);
        # host configurations compile as the CPU's default does (background), or as asked
        host_mode = compile_mode(compile, _HOST) if self.host_max_tokens else None
        self.kernel = CompiledKernel(
            self.compile_mode, host_mode=host_mode, max_configurations=max_compiled_kernels
        )

    def device_problem(self) -> str | None:
        """None when the engine's device still computes (a small sum, synchronised), else
        why not: after a device error, whether its context is lost for good (a sticky CUDA
        fault: every later call fails) or only that call failed."""
        try:
            x = torch.arange(8.0, device=self.device)
            if float((x + 1).sum()) != 36.0:
                return "the device computed a wrong sum"
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:
            if is_out_of_memory(e):  # (full, not broken: the calls in flight hold the memory)
                return None
            return f"{type(e).__name__}: {e}"
        return None

    def device_for(self, batch: Batch, grad_out: Tensor | None = None) -> torch.device:
        """The device `loss` computes `batch` on: the host for a batch of at most
        `host_max_tokens` tokens whose tensors (and `grad_out`) are all in host memory, else
        the engine's."""
        if not self.host_max_tokens:  # (a CPU engine: nothing to choose)
            return self.device
        n = batch.logp.numel() if isinstance(batch.logp, Tensor) else 0
        return self._device_for(n, (grad_out, *(getattr(batch, name) for name in _BATCH_FIELDS)))

    def _device_for(self, n: int, tensors: Iterable[object]) -> torch.device:
        if 0 < n <= self.host_max_tokens and all(
            not isinstance(v, Tensor) or v.device.type == "cpu" for v in tensors
        ):
            return _HOST
        return self.device

    @staticmethod
    def _to_device(batch: Batch, device: torch.device) -> Batch:
        moving = {
            name: v
            for name in _BATCH_FIELDS
            if isinstance(v := getattr(batch, name), Tensor) and v.device != device
        }
        if not moving:
            return batch
        check_devices(moving)  # (a tensor already on `device` is not on the meta device)
        moved = {name: to_device(v, device) for name, v in moving.items()}
        return dataclasses.replace(batch, **moved)  # type: ignore[arg-type]

    def loss(
        self,
        batch: Batch,
        config: LossConfig,
        *,
        sample_tokens: int | None = None,
        grad_out: Tensor | None = None,
    ) -> LossResult:
        """Validate, move to the device, compute loss + exact per-token gradient + metrics.
        `sample_tokens`, `grad_out`: see `compute_loss` (a server passes the first when no
        ratio, gate weight or clip mask was asked for, the second to write the gradient
        straight into its response). InputError for a bad batch, config or `sample_tokens`;
        ValueError for a `grad_out` that is not a buffer of its own."""
        check_arguments(batch, config, sample_tokens)
        if grad_out is not None:
            _check_grad_out(batch, grad_out)
        device = self.device_for(batch, grad_out)
        return self._loss(batch, config, self.kernel, device, sample_tokens, grad_out)

    def _loss(
        self,
        batch: Batch,
        config: LossConfig,
        kernel: TokenTerms,
        device: torch.device,
        sample_tokens: int | None = None,
        grad_out: Tensor | None = None,
    ) -> LossResult:
        batch = self._to_device(batch, device)
        n = batch.logp.numel() if isinstance(batch.logp, Tensor) else 0
        if device.type == "cpu" and n <= ONE_THREAD_MAX_TOKENS:
            with one_thread():
                return compute_loss(
                    batch, config, kernel=kernel, sample_tokens=sample_tokens, grad_out=grad_out
                )
        return compute_loss(batch, config, kernel=kernel, sample_tokens=sample_tokens, grad_out=grad_out)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until no background compile is queued or running (tests, benchmarks)."""
        return self.kernel.wait(timeout)

    def advantages(
        self, rewards: Tensor, group_ids: Tensor, config: AdvantageConfig, token_counts: Tensor | None = None
    ) -> AdvantageResult:
        """Per-sequence advantages from rewards ([B], or [B, K]: K reward components, gdpo's
        input; the other estimators take their sum weighted by `config.reward_weights`) and
        group ids. reinforce_pp(_baseline) and gdpo whiten over
        trained tokens in `loss` (opo's baseline weighs by them); here each sequence weighs its
        `token_counts` entry (its trained tokens: then the advantages equal `loss`'s bit for
        bit), or 1 without them. Records no autograd graph, as `loss` does not."""
        with torch.no_grad():
            return self._advantages(rewards, group_ids, config, token_counts)

    def _advantages(
        self, rewards: Tensor, group_ids: Tensor, config: AdvantageConfig, token_counts: Tensor | None
    ) -> AdvantageResult:
        if not isinstance(config, AdvantageConfig):
            why = f"bad_type: expected a softgate.engine.AdvantageConfig, got {type(config).__name__}"
            raise InputError([FieldViolation("config", why)])
        check_devices({"rewards": rewards, "group_ids": group_ids, "token_counts": token_counts})
        v: list[FieldViolation] = []
        skip_nan = config.skip_nan_components is True
        ok = reward_tensor(v, rewards, None, config.reward_weights, components=True, skip_nan=skip_nan)
        b = rewards.shape[0] if ok else 0  # ([B] or [B, K])
        for name, x in (("group_ids", group_ids), ("token_counts", token_counts)):
            if x is None and name == "token_counts":
                continue
            if not isinstance(x, Tensor) or x.dtype not in _INTS:
                v.append(FieldViolation(name, f"bad_dtype: {name} must be a 1-D integer tensor"))
            elif x.dim() != 1:  # (as loss() names it)
                v.append(
                    FieldViolation(name, f"bad_shape: expected a 1-D tensor, got shape {tuple(x.shape)}")
                )
            elif ok and x.numel() != b:
                v.append(FieldViolation(name, f"length_mismatch: length {x.numel()}, expected {b}"))
            elif name == "token_counts" and x.numel() and bool((x < 0).any()):
                i = int(torch.nonzero(x < 0)[0, 0])
                v.append(FieldViolation(name, f"out_of_range: {int(x[i])} < 0 trained tokens", i))
        from softgate.engine.validation import validate_config

        v += validate_config(LossConfig(advantages=config))
        if not any(f.field == "advantages.gamma" for f in v) and config.gamma != 1.0:  # (a number now)
            why = "unsupported: gamma makes an advantage per token, which needs the tokens: compute it in loss()"
            v.append(FieldViolation("advantages.gamma", why))
        if config.estimator == "optimal_token_baseline":
            why = "unsupported: optimal_token_baseline makes an advantage per token from the tokens' probabilities: compute it in loss()"
            v.append(FieldViolation("advantages.estimator", why))
        if v:
            raise InputError(v)
        dev = self._device_for(b, (rewards, group_ids))
        weights = token_counts.to(dev) if token_counts is not None else None
        ga = group_advantages(rewards.to(dev), group_ids.to(dev), config, weights=weights)
        dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
        adv = ga.advantages.to(dt)
        if not bool(torch.isfinite(adv).all()):
            i = int(torch.nonzero(~torch.isfinite(adv))[0, 0])
            raise InputError(
                [
                    FieldViolation(
                        "rewards", f"overflow: advantage not finite in {str(dt).replace('torch.', '')}", i
                    )
                ]
            )
        r = ga.scored_rewards()  # (the components' weighted sum, of the sequences with a reward)
        metrics = {
            "num_groups": float(ga.num_groups),
            "degenerate_group_frac": float(ga.degenerate_group_frac),
            "adv_mean": float(ga.advantages.mean()) if adv.numel() else 0.0,
            "adv_std": float(ga.advantages.std(correction=0)) if adv.numel() else 0.0,
            "reward_mean": float(r.mean()) if r.numel() else 0.0,
            "reward_std": float(r.std(correction=0)) if r.numel() else 0.0,
            "unscored_seqs": float(ga.rewards.shape[0] - r.numel()),
        }
        return AdvantageResult(adv, metrics)

    def warmup(self, halt: threading.Event | None = None) -> None:
        """Run one small batch through every objective (and the KL, mismatch and aggregation
        paths), on the engine's device and, when it computes small batches there, the host,
        so the first request is fast. With compile=True this compiles those paths; in
        background mode it queues no compiles (real traffic chooses what gets compiled).
        Returns early once `halt` is set: it is checked before each configuration (a compile
        warm-up takes minutes, and a SIGTERM meanwhile went unanswered until it ended; an audit)."""

        def eager_only(*args: Any) -> Any:
            return self.kernel(*args, schedule=False)

        g = torch.Generator().manual_seed(0)
        lengths = torch.tensor([3, 0, 5, 2])
        n = int(lengths.sum())
        logp = -torch.rand(n, generator=g) - 0.1
        batch = Batch(
            logp=logp,
            offsets=Batch.offsets_from_lengths(lengths),
            old_logp=logp + 0.05 * torch.randn(n, generator=g),
            ref_logp=logp - 0.1,
            rollout_logp=logp + 0.01,
            rewards=torch.tensor([1.0, 0.0, 0.5, 1.0]),
            group_ids=torch.tensor([0, 0, 1, 1]),
        )
        modes = AGGREGATION_MODES
        devices = (self.device, _HOST) if self.host_max_tokens else (self.device,)
        for i, cls in enumerate(OBJECTIVES.values()):
            cfg = LossConfig(
                objective=cls(),
                # (constant with token_sum_norm only: the other modes refuse it)
                aggregation=AggregationConfig(
                    mode=modes[i % len(modes)],  # type: ignore[arg-type]
                    constant=8.0 if modes[i % len(modes)] == "token_sum_norm" else None,
                ),
                kl=KLConfig(beta=0.01),
                mismatch=MismatchConfig(),
            )
            for device in devices:
                if halt is not None and halt.is_set():
                    return
                self._loss(batch, cfg, eager_only, device)
