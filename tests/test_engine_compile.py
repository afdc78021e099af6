"""When the engine's per-token kernel is compiled: modes, configuration keys, the background
compile (first calls eager, then compiled, same numbers), failures staying eager."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import kernel_args, needs_compile
from softgate.engine import METRIC_NAMES, Engine, compiled
from softgate.engine.aggregate import sequence_weights
from softgate.engine.buckets import bucket_codes, bucket_edges
from softgate.engine.compiled import compile_kernel, compile_mode, fits, kernel_key, warmup_args
from softgate.engine.config import AggregationConfig
from softgate.engine.kernel import token_terms
from softgate.engine.loss import compute_loss
from softgate.engine.segments import Segments

try:
    from tests.reference_loss import (
        OBJECTIVE_NAMES,
        PER_SEQUENCE_ADVANTAGES,
        assert_same_result,
        make_config,
        random_batch,
    )
except ImportError:  # tests/ is not a package from this rootdir
    from reference_loss import (  # type: ignore[no-redef]
        OBJECTIVE_NAMES,
        PER_SEQUENCE_ADVANTAGES,
        assert_same_result,
        make_config,
        random_batch,
    )

pytestmark = needs_compile
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_compile_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compile_mode(True, CPU) == "sync"
    assert compile_mode(False, CUDA) == "off"
    assert compile_mode("background", CUDA) == "background"
    for env, cpu, cuda in (
        ("1", "sync", "sync"),
        ("true", "sync", "sync"),
        ("0", "off", "off"),
        ("no", "off", "off"),
        ("background", "background", "background"),
        ("auto", "background", "sync"),
        ("", "background", "sync"),
    ):
        monkeypatch.setenv("SOFTGATE_ENGINE_COMPILE", env)
        assert (compile_mode(None, CPU), compile_mode(None, CUDA)) == (cpu, cuda), env
    monkeypatch.delenv("SOFTGATE_ENGINE_COMPILE")
    assert compile_mode(None, CPU) == "background"
    with pytest.raises(ValueError, match="compile"):
        compile_mode("sometimes", CPU)
    assert Engine(device="cpu", compile=False).compile is False


def test_auto_runs_eager_on_a_torch_that_cannot_compile_ahead_of_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch 2.4 to 2.10 cannot (pyproject's floor is 2.4): the default runs eager from the
    start, saying why, instead of failing each configuration's compile in turn."""
    assert compiled.compiles_ahead_of_time()  # the torch CI runs
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert compiled.compiles_ahead_of_time()
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu128")
    with caplog.at_level(logging.WARNING, logger="softgate.engine.compiled"):
        assert (compile_mode(None, CPU), compile_mode("auto", CUDA)) == ("off", "off")
    assert "cannot compile the kernel ahead of time (needs 2.11 or newer)" in caplog.text
    assert compile_mode(True, CPU) == "sync"  # asked for: tried, and a failure logged (below)


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
@pytest.mark.parametrize(
    "kl,mm,adv",
    [
        (None, None, "rewards"),
        ("k3", ("token", "truncate"), "token"),
        ("k1", ("sequence", "mask"), "sequence"),
    ],
)
def test_warmup_args_have_the_same_configuration(name: str, kl: Any, mm: Any, adv: Any) -> None:
    if name in PER_SEQUENCE_ADVANTAGES and adv == "token":
        adv = "sequence"
    batch = random_batch(5, max_seqs=9, max_len=11, advantages=adv)
    args = kernel_args(batch, make_config(name, "token_mean", kl, mm, variant=1))
    warm = warmup_args(args)
    assert kernel_key(warm) == kernel_key(args)
    out = token_terms(*warm)  # a consistent batch: the eager kernel runs on it
    assert out[0].numel() == warm[0]["logp"].numel() > 1 and warm[0]["ylen"].numel() > 1
    assert all(bool(torch.isfinite(x).all()) for x in out[:4])


def test_a_gpu_configuration_compiles_on_an_example_of_about_a_million_tokens() -> None:
    # inductor sizes a CUDA kernel's reductions by its example: compiled on the CPU's 67
    # tokens, the H200 ran 16M tokens in 130 ms (eager 5.1, compiled on 1M tokens 1.7). The
    # meta device stands in for a GPU here: the example's sizes, no memory
    batch = random_batch(5, max_seqs=9, max_len=11, advantages="sequence")
    args = kernel_args(batch, make_config("sapo", "token_mean", "k3", ("token", "truncate")))
    on_meta = ({k: v.to("meta") for k, v in args[0].items()}, {k: v.to("meta") for k, v in args[1].items()})
    gpu = warmup_args((*on_meta, *args[2:]))
    assert gpu[0]["logp"].device.type == "meta" and gpu[0]["logp"].numel() >= 1 << 20
    key, cpu_key = kernel_key(gpu), kernel_key(args)
    assert key[8].type == "meta" and key[:8] + key[9:] == cpu_key[:8] + cpu_key[9:]  # but the device
    assert warmup_args(args)[0]["logp"].numel() < 100  # the CPU's: a quick compile


def test_per_sequence_terms_reach_the_cpu_kernel_expanded_to_their_tokens() -> None:
    # only what is per sequence reaches the tokens, and on the CPU expanded there (a vector
    # load in the kernel, not a gather): the values a gather by sequence id would read
    def t(agg: str, adv: str, name: str = "sapo", mm: Any = None) -> tuple[Any, dict[str, Any]]:
        b = random_batch(3, max_seqs=9, max_len=11, advantages=adv)
        return b, kernel_args(b, make_config(name, agg, None, mm))[0]

    b, plain = t("token_mean", "token")
    assert plain["w"].dim() == 0 and not any(k == "ids" or k.endswith("_tok") for k in plain)
    cases = [
        (("token_mean", "sequence"), "adv"),  # advantages per sequence
        (("seq_mean_token_mean", "token"), "w"),  # a weight per sequence
        (("token_mean", "token", "gspo_token"), "sratio"),  # the sequence ratio
        (("token_mean", "token", "sapo", ("sequence", "truncate")), "lvseq"),  # mismatch weight
    ]
    for args, name in cases:
        b, k = t(*args)
        assert "ids" not in k and k[name + "_tok"].numel() == b.logp.numel(), name
        ids = Segments(b.offsets, b.logp.numel()).ids
        if name == "w":
            per_seq = sequence_weights(
                AggregationConfig(mode="seq_mean_token_mean"), k["ylen"], k["w_tok"].dtype
            )
        elif name == "lvseq":
            continue  # (its per-sequence values are not kept)
        else:
            per_seq = k[name]
        assert torch.equal(k[name + "_tok"], per_seq[ids]), name


def test_configuration_keys_differ_by_structure_not_by_values() -> None:
    batch = random_batch(3, max_seqs=6, max_len=9)
    key = kernel_key(kernel_args(batch, make_config("grpo", "token_mean", "k3", None)))
    same = kernel_key(
        kernel_args(
            random_batch(4, max_seqs=12, max_len=40),
            make_config("grpo", "seq_mean_token_sum", "k3", None, variant=2),
        )
    )
    assert same == key
    assert kernel_key(kernel_args(batch, make_config("grpo", "token_mean", None, None))) != key
    assert kernel_key(kernel_args(batch, make_config("sapo", "token_mean", "k3", None))) != key
    dual = make_config("grpo", "token_mean", "k3", None, variant=1)  # dual clip on
    assert kernel_key(kernel_args(batch, dual)) != key


@pytest.mark.parametrize("compile", [False, True])
def test_sampled_trust_region_outputs(compile: bool) -> None:
    # Engine.loss(sample_tokens=k): ratio and gate weight for every stride-th token only, no
    # clip mask; the gradient, loss and metrics are those of the whole-output call
    batch = random_batch(7, max_seqs=40, max_len=60, advantages="token")
    cfg = make_config("sapo", "token_mean", "k3", None)
    eng = Engine(device="cpu", compile=compile)
    whole = eng.loss(batch, cfg)
    n = whole.grad.numel()
    k = -(-n // (n // 7))
    s = eng.loss(batch, cfg, sample_tokens=n // 7)
    assert s.sample_stride == k > 1 and whole.sample_stride == 1
    assert torch.equal(s.grad, whole.grad) and torch.equal(s.advantages, whole.advantages)
    # the sample is computed from the strided inputs: eager, the same numbers; compiled, a
    # separate loop (other vector code for exp / sigmoid): the same up to an ulp
    tol = {} if not compile else {"rtol": 2e-7, "atol": 1e-7}
    torch.testing.assert_close(s.ratio, whole.ratio[::k], **({"rtol": 0, "atol": 0} | tol))
    torch.testing.assert_close(s.gate_weight, whole.gate_weight[::k], **({"rtol": 0, "atol": 0} | tol))
    assert s.clip_mask.numel() == 0 and torch.equal(s.mask, whole.mask)
    assert s.loss == pytest.approx(whole.loss, rel=1e-12, abs=1e-15)
    for name in METRIC_NAMES:
        assert s.metrics[name] == pytest.approx(whole.metrics[name], rel=1e-12, abs=1e-15), name
    full = eng.loss(batch, cfg, sample_tokens=n)
    assert full.sample_stride == 1  # nothing to sample
    # ... but histogram codes to write: compiled, a configuration of its own (a served gradient-
    # only call's), whose sums round differently: the same numbers but the last bits (an audit;
    # docs/engine.md)
    torch.testing.assert_close(full.grad, whole.grad, rtol=1e-14, atol=1e-18)
    assert full.loss == pytest.approx(whole.loss, rel=1e-14, abs=1e-15)
    for name in METRIC_NAMES:
        assert full.metrics[name] == pytest.approx(whole.metrics[name], rel=1e-12, abs=1e-15), name
    # histogram codes: for a ratio of at most sample_tokens tokens only, those of its values
    assert whole.ratio_bucket.numel() == whole.gate_bucket.numel() == 0
    for res, adv in ((s, whole.advantages[::k]), (full, whole.advantages)):
        m = res.mask[:: res.sample_stride]
        want = bucket_codes(
            res.ratio,
            res.gate_weight,
            m & (adv > 0),
            m & (adv < 0),
            m,
            bucket_edges(res.ratio.dtype, res.ratio.device),
        )
        assert torch.equal(res.ratio_bucket, want[0]) and torch.equal(res.gate_bucket, want[1])
        assert res.bucket_sums == pytest.approx(want[2].tolist(), rel=1e-6)
    assert eng.kernel.compiled_calls == (3 if compile else 0)


_PARALLEL_PROBE = """
import sys, threading
from softgate.engine import Engine
from softgate.threads import single_threaded_here
from reference_loss import make_config, random_batch

eng = Engine(device="cpu", compile=sys.argv[1])

def small_call():
    single_threaded_here()  # as a small request run inline on the event loop
    eng.loss(random_batch(5, max_seqs=9, max_len=11), make_config("sapo", "token_mean", None, None))
    eng.wait_compiled(120)

t = threading.Thread(target=small_call)
t.start()
t.join()
assert eng.kernel.ready == 1
"""


# background: the compile that made a serial kernel; sync is slow (a fresh cache: ~30 s each)
@pytest.mark.parametrize("mode", [pytest.param("sync", marks=pytest.mark.slow), "background"])
def test_compiled_kernels_are_parallel_whoever_compiles_them(mode: str, tmp_path: Any) -> None:
    # inductor used to decide serial vs parallel at compile time, from the example batch's
    # size and the compiling thread's intra-op count: a background compile (a 67-token warm
    # batch) or a first call from a one-thread caller made a serial kernel for good, and
    # cached it on disk for other processes. A fresh process and cache: the generated CPU
    # code must hold a parallel region sized at run time.
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", _PARALLEL_PROBE, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # (inductor's Python modules; AOTInductor's C++ sources, *.kernel.cpp)
    files = [p for p in (tmp_path / "inductor").rglob("*") if p.suffix in (".py", ".cpp")]
    kernels = [s for s in (p.read_text(errors="replace") for p in files) if "cpp_fused" in s]
    assert kernels
    assert any("#pragma omp parallel" in s and "omp_get_max_threads" in s for s in kernels)


def test_a_cuda_engine_compiles_its_host_configurations_as_the_cpu_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CUDA engine compiles before use (sync) on its device, but the small batches it
    computes on the host follow the CPU's default: eager first, compiled in the background
    (a sync compile there would hold a trainer's small call for seconds), unless told."""
    monkeypatch.delenv("SOFTGATE_ENGINE_COMPILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (host batches only: no GPU needed)
    eng = Engine(device="cuda")
    assert (eng.kernel.mode, eng.kernel.host_mode) == ("sync", "background")
    assert (
        Engine(device="cuda", compile=False).kernel.host_mode,
        Engine(device="cuda", compile=True).kernel.host_mode,
    ) == ("off", "sync")
    compiled_in: list[str] = []

    def fake_compile(example: Any, lock: Any) -> Any:
        compiled_in.append(threading.current_thread().name)
        return token_terms

    eng.kernel._compile = fake_compile
    batch = random_batch(7, max_seqs=8, max_len=20)
    cfg = make_config("sapo", "seq_mean_token_mean", None, None)
    assert eng.loss(batch, cfg).grad.device.type == "cpu"  # eager; queues the compile
    assert eng.kernel.compiled_calls == 0
    assert eng.wait_compiled(30)
    eng.loss(batch, cfg)
    assert compiled_in == ["softgate-compile"] and eng.kernel.compiled_calls == 1


def _token_terms_args(device: str) -> tuple[Any, ...]:
    """token_terms' arguments for a small SAPO batch, as compute_loss passes them, on `device`."""
    seen: list[tuple[Any, ...]] = []
    eng = Engine(device="cpu", compile=False)
    eng.kernel = lambda *args, **_: seen.append(args) or token_terms(*args)  # type: ignore[assignment]
    eng.loss(random_batch(7, max_seqs=8, max_len=20), make_config("sapo", "seq_mean_token_mean", None, None))
    t, prm, *rest = seen[0]
    return ({k: v.to(device) for k, v in t.items()}, {k: v.to(device) for k, v in prm.items()}, *rest)


def _calls_in_a_thread(kern: Any, *calls: tuple[Any, ...]) -> list[Any]:
    """What `kern` returned for each of `calls`, made in another thread (given 10 s: a call
    that waits for a running compile returns nothing)."""
    out: list[Any] = []
    caller = threading.Thread(target=lambda: out.extend(kern(*args) for args in calls), daemon=True)
    caller.start()
    caller.join(10)
    return out


def test_a_compiled_device_call_runs_eager_while_a_host_compile_runs() -> None:
    """A CUDA engine's device configurations compile before use, its host ones in the
    background; compiles in this process (dynamo's) and compiled calls share one lock
    (dynamo's compiler is not thread-safe). A device call whose kernel is compiled must not
    wait the seconds such a host compile takes: it runs eager meanwhile. ("meta" tensors
    stand in for the GPU's: this needs none.)"""
    kern = compiled.CompiledKernel("sync", host_mode="background")
    release, host_compiling = threading.Event(), threading.Event()

    def fake_compile(example: Any, lock: Any) -> Any:
        if example[0]["logp"].device.type == "cpu":
            with lock:  # as compile_kernel holds it around a compile in this process
                host_compiling.set()
                assert release.wait(30)
        return lambda *args: "compiled"

    kern._compile = fake_compile
    device, host = _token_terms_args("meta"), _token_terms_args("cpu")
    assert kern(*device) == "compiled"  # compiled before use
    assert kern(*host) != "compiled"  # eager; its compile starts in the background
    assert host_compiling.wait(30)
    out = _calls_in_a_thread(kern, device)
    release.set()
    assert out and out[0] != "compiled", "the device call waited for the host compile"
    assert kern.wait(30)
    assert kern(*device) == "compiled" and kern(*host) == "compiled"


def test_a_compiled_call_runs_eager_while_another_configuration_compiles_before_use() -> None:
    """The other way round: while a device configuration compiles before use (tens of seconds
    for a GPU's), compiled host calls, and device ones of other configurations, run eager."""
    kern = compiled.CompiledKernel("sync", host_mode="background")
    release, device_compiling = threading.Event(), threading.Event()
    slow = {"on": False}

    def fake_compile(example: Any, lock: Any) -> Any:
        if slow["on"]:
            device_compiling.set()
            assert release.wait(30)
        return lambda *args: "compiled"

    kern._compile = fake_compile
    host, device = _token_terms_args("cpu"), _token_terms_args("meta")
    kern(*host)
    assert kern.wait(30) and kern(*host) == "compiled"
    assert kern(*device) == "compiled"
    slow["on"] = True
    other = ({**device[0], "old": device[0]["old"].float()}, *device[1:])  # another configuration (dtype)
    compiling = threading.Thread(target=kern, args=other, daemon=True)
    compiling.start()
    assert device_compiling.wait(30)
    out = _calls_in_a_thread(kern, host, device)
    release.set()
    compiling.join(30)
    assert len(out) == 2 and "compiled" not in out, "a compiled call waited for a compile"
    assert kern(*other) == kern(*host) == "compiled"


@pytest.mark.parametrize("mode", ["sync", "background"])
def test_past_max_configurations_new_configurations_run_eager(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two configurations compile under a limit of two; a third runs eager on every call
    (logged once), with the eager kernel's numbers, while the first two stay compiled.
    0 is no limit."""
    with pytest.raises(ValueError, match="max_configurations"):
        compiled.CompiledKernel(mode, max_configurations=-1)
    kern = compiled.CompiledKernel(mode, max_configurations=2)
    built: list[Any] = []

    def fake_compile(example: Any, lock: Any) -> Any:
        built.append(kernel_key(example))
        return lambda *args: "compiled"

    kern._compile = fake_compile
    base = _token_terms_args("cpu")
    t = base[0]
    no_mask = {k: v for k, v in t.items() if k != "m"}  # every token trained
    configs = [base, ({**t, "old": t["old"].float()}, *base[1:]), (no_mask, *base[1:])]
    assert len({kernel_key(c) for c in configs}) == 3
    with caplog.at_level(logging.WARNING, logger="softgate.engine.compiled"):
        for _ in range(3):
            for c in configs:
                kern(*c)
            assert kern.wait(30)
        outs = [kern(*c) for c in configs]
    assert outs[:2] == ["compiled", "compiled"] and built == [kernel_key(c) for c in configs[:2]]
    for g, w in zip(outs[2], token_terms(*configs[2]), strict=True):
        torch.testing.assert_close(g, w)
    assert sum("the limit (max_compiled_kernels)" in r.getMessage() for r in caplog.records) == 1
    assert kern.states() == {"compiled": 2, "compiling": 0, "failed": 0, "over_limit": 1}
    unlimited = compiled.CompiledKernel(mode, max_configurations=0)
    unlimited._compile = fake_compile
    for c in configs:
        unlimited(*c)
    assert unlimited.wait(30) and [unlimited(*c) for c in configs] == ["compiled"] * 3


@pytest.mark.parametrize("mode,where", [("sync", "call"), ("background", "call"), ("background", "warm-up")])
def test_out_of_memory_in_a_compiled_call_is_raised_and_switches_nothing_off(mode: str, where: str) -> None:
    """Found by an audit: a compiled call that ran out of device memory (a CUDA engine's
    default is sync) switched compiling off for the whole process and ran the batch again
    eager, which needs more memory; in the background, the configuration stayed eager for
    good. It is now raised (the server answers RESOURCE_EXHAUSTED) and the kernel keeps
    serving compiled; a background compile that ran out is asked again by a later call."""
    eng = Engine(device="cpu", compile=mode)
    batch = random_batch(7, max_seqs=8, max_len=20)
    n = batch.logp.numel()
    oom = [True]

    def compiled_once_out_of_memory(example: Any, lock: Any) -> Any:
        def fn(*args: Any) -> Any:
            real = args[0]["logp"].numel() == n
            if oom and real == (where == "call"):
                oom.pop()
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return token_terms(*args)

        return fn

    eng.kernel._compile = compiled_once_out_of_memory
    cfg = make_config("sapo", "seq_mean_token_mean", None, None)
    want = Engine(device="cpu", compile=False).loss(batch, cfg)
    if mode == "background":
        eng.loss(batch, cfg)  # eager; queues the compile
        assert eng.wait_compiled(30)
    if where == "call":
        with pytest.raises(torch.OutOfMemoryError):
            eng.loss(batch, cfg)
    else:  # the warm-up ran out: not failed; this call runs eager and asks for the compile again
        assert eng.kernel.states()["failed"] == 0
        assert_same_result(eng.loss(batch, cfg), want, 0)
        assert eng.wait_compiled(30)
    assert eng.kernel.enabled and not oom
    calls = eng.kernel.compiled_calls
    assert_same_result(eng.loss(batch, cfg), want, 0)
    assert eng.kernel.compiled_calls == calls + 1
    assert eng.kernel.states() == {"compiled": 1, "compiling": 0, "failed": 0, "over_limit": 0}


def test_background_compile_failure_stays_eager(caplog: pytest.LogCaptureFixture) -> None:
    eng = Engine(device="cpu", compile="background")
    calls = []

    def broken(*args: Any) -> Any:
        calls.append(1)
        raise RuntimeError("inductor exploded")

    eng.kernel._compile = lambda example, lock: broken
    batch = random_batch(7, max_seqs=8, max_len=20)
    cfg = make_config("sapo", "seq_mean_token_mean", None, None)
    want = Engine(device="cpu", compile=False).loss(batch, cfg)
    with caplog.at_level(logging.WARNING, logger="softgate.engine.compiled"):
        assert_same_result(eng.loss(batch, cfg), want, 0)
        assert eng.wait_compiled(30)
        for _ in range(3):
            assert_same_result(eng.loss(batch, cfg), want, 0)
    assert len(calls) == 1 and eng.kernel.ready == 0
    assert eng.kernel.states() == {"compiled": 0, "compiling": 0, "failed": 1, "over_limit": 0}
    assert sum("stays eager" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_background_compile_switches_to_compiled_with_the_same_numbers() -> None:
    """First calls eager (also from several threads while the compile runs), then the
    compiled kernel; every result equals the eager engine's."""
    eng = Engine(device="cpu", compile="background")
    eager = Engine(device="cpu", compile=False)
    compiled_calls = []

    def counting_compile(example: Any, lock: Any) -> Any:
        fn = compile_kernel(example, lock)  # as the engine compiles: AOTInductor for this CPU configuration

        def counting(*args: Any) -> Any:
            compiled_calls.append(threading.current_thread().name)
            return fn(*args)

        return counting

    eng.kernel._compile = counting_compile
    batch = random_batch(11, max_seqs=12, max_len=40, big_deltas=True)
    cfg = make_config("grpo", "seq_mean_token_mean", "k3", ("token", "truncate"), variant=1)
    want = eager.loss(batch, cfg)
    assert_same_result(eng.loss(batch, cfg), want)  # eager; queues the compile
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(5):
                assert_same_result(eng.loss(batch, cfg), want)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    assert eng.wait_compiled(600), "background compile did not finish"
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert eng.kernel.ready == 1
    assert compiled_calls and compiled_calls[0] == "softgate-compile"  # the warm-up batch
    before = len(compiled_calls)
    for _ in range(2):
        assert_same_result(eng.loss(batch, cfg), want)
    assert len(compiled_calls) == before + 2  # later calls run the compiled kernel
    other = make_config("sapo", "token_mean", None, None)
    assert_same_result(eng.loss(batch, other), eager.loss(batch, other))  # a new configuration: eager first
    assert eng.wait_compiled(600) and eng.kernel.ready == 2
    assert_same_result(eng.loss(batch, other), eager.loss(batch, other))
    assert eng.kernel.compiled_calls == len(compiled_calls) - 2  # all but the 2 warm-up runs


def test_cpu_kernels_not_sampled_compile_with_aoti_the_rest_with_dynamo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AOTInductor for a CPU configuration whose ratio and gate are not sampled; dynamo for a
    sampled one (its stride is a Python int) and whenever AOTInductor fails."""
    calls: list[str] = []
    monkeypatch.setattr(compiled, "aoti_compile", lambda ex: calls.append("aoti") or "aoti")
    monkeypatch.setattr(compiled, "aot_compile", lambda ex: calls.append("dynamo") or "dynamo")
    batch = random_batch(3, max_seqs=30, max_len=40)
    cfg = make_config("sapo", "seq_mean_token_mean", None, None)
    full = warmup_args(kernel_args(batch, cfg))
    sampled = warmup_args(kernel_args(batch, cfg, sample_tokens=8))
    assert sampled[8] > 1 and full[8] == 1
    assert compile_kernel(full) == "aoti" and compile_kernel(sampled) == "dynamo"

    def broken(ex: Any) -> Any:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "aoti_compile", broken)
    assert compile_kernel(full) == "dynamo"
    assert calls == ["aoti", "dynamo", "dynamo"]


def test_the_dynamo_lock_is_held_around_compiles_in_this_process_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """compile_kernel holds the lock it is given around dynamo's compile (in this process,
    not thread-safe), never around AOTInductor's build (a child process's)."""
    lock = threading.Lock()
    monkeypatch.setattr(compiled, "aoti_compile", lambda ex: ("aoti", lock.locked()))
    monkeypatch.setattr(compiled, "aot_compile", lambda ex: ("dynamo", lock.locked()))
    batch = random_batch(3, max_seqs=30, max_len=40)
    cfg = make_config("sapo", "seq_mean_token_mean", None, None)
    full = warmup_args(kernel_args(batch, cfg))
    sampled = warmup_args(kernel_args(batch, cfg, sample_tokens=8))
    assert compile_kernel(full, lock) == ("aoti", False)
    assert compile_kernel(sampled, lock) == ("dynamo", True)
    assert not lock.locked()


def test_compiled_calls_run_compiled_while_a_child_process_builds_another_configuration() -> None:
    """A build in a child process (AOTInductor's) holds no lock: meanwhile a configuration
    already compiled keeps running compiled, from any thread."""
    kern = compiled.CompiledKernel("background")
    release, building = threading.Event(), threading.Event()
    slow = {"on": False}

    def fake_compile(example: Any, lock: Any) -> Any:
        if slow["on"]:  # a child's build: no lock
            building.set()
            assert release.wait(30)
        return lambda *args: "compiled"

    kern._compile = fake_compile
    host = _token_terms_args("cpu")
    kern(*host)
    assert kern.wait(30) and kern(*host) == "compiled"
    slow["on"] = True
    other = ({**host[0], "old": host[0]["old"].float()}, *host[1:])  # another configuration (dtype)
    assert kern(*other) != "compiled"  # eager; its build starts in the background
    assert building.wait(30)
    out = _calls_in_a_thread(kern, host)
    release.set()
    assert out == ["compiled"], "a compiled call ran eager while a child process built"
    assert kern.wait(30) and kern(*other) == "compiled"


def test_an_aoti_build_that_fails_in_its_child_raises_with_the_childs_words() -> None:
    """AOTInductor builds in a child process; when the child fails, the error carries its
    exit status and its last lines (compile_kernel logs them and compiles with dynamo)."""
    from softgate.engine import aoti

    batch = random_batch(3, max_seqs=30, max_len=40)
    example = warmup_args(kernel_args(batch, make_config("sapo", "seq_mean_token_mean", None, None)))
    with pytest.raises(RuntimeError, match=r"exited 1: .*no_such_inductor_option"):
        aoti.build(example, {"no_such_inductor_option": True})


def test_an_aoti_build_child_exits_when_its_parent_does(tmp_path: Path) -> None:
    """A server that exits (or is killed) mid-build leaves no compile running and no job
    directory: the child watches its parent, and when it is gone removes the build's
    directory and exits."""
    import subprocess
    import sys
    import time

    job = tmp_path / "softgate-aoti-job"
    job.mkdir()
    (job / "example.pt").write_bytes(b"x" * 100)
    child = (
        "import sys, time; from softgate.engine.aoti import exit_with_parent; "
        "exit_with_parent(int(sys.argv[1]), sys.argv[2]); print('watching', flush=True); time.sleep(120)"
    )
    parent = (
        "import os, subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid()), {str(job)!r}], "
        "stdout=subprocess.PIPE); "
        "assert p.stdout.readline() == b'watching\\n'; print(p.pid, flush=True)"
    )
    out = subprocess.run(
        [sys.executable, "-c", parent], capture_output=True, text=True, timeout=120, check=True
    )
    pid = int(out.stdout)  # the parent has exited: its child must follow within about a second
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # exited, not yet reaped by its new parent
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the build child outlived its parent by 10 s")
    assert not job.exists()


@pytest.fixture(scope="module", params=[None, 1 << 15], ids=["no-codes", "codes"])
def aoti_kernel(request: pytest.FixtureRequest) -> tuple[Any, tuple[Any, ...], Any]:
    """An AOTInductor kernel compiled on the warm-up batch of a configuration (with or without
    the histogram codes, as the server asks for them: `sample_tokens`), the arguments of a
    batch of that configuration, and a function giving another batch's arguments."""
    cfg = make_config("grpo", "seq_mean_token_mean", "k3", ("token", "truncate"), variant=1)

    def args_of(batch: Any) -> tuple[Any, ...]:
        return kernel_args(batch, cfg, sample_tokens=request.param)

    args = args_of(random_batch(5, max_seqs=12, max_len=40, big_deltas=True))
    return compiled.aoti_compile(warmup_args(args)), args, args_of


def test_aoti_kernel_equals_eager_at_other_sizes_and_refuses_inconsistent_lengths(
    aoti_kernel: tuple[Any, tuple[Any, ...], Any],
) -> None:
    """Compiled on the 67-token warm-up batch, the AOTInductor kernel serves other sizes with
    the eager kernel's numbers, and a per-token or per-sequence input of the wrong length is
    an error, never a read past its end (AOTInductor's C++ wrapper checks no sizes)."""
    fn, args, args_of = aoti_kernel
    for seed, seqs in ((6, 3), (7, 40)):
        a = args_of(random_batch(seed, max_seqs=seqs, max_len=90, big_deltas=True))
        got, want = fn(*a), token_terms(*a)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    t = dict(args[0])
    t["old"] = t["old"][:-1].clone()
    with pytest.raises(ValueError, match="inconsistent lengths"):
        fn(t, *args[1:])
    t = dict(args[0])
    t["ylen"] = torch.cat([t["ylen"], t["ylen"][:1]])
    with pytest.raises(ValueError, match="inconsistent lengths"):
        fn(t, *args[1:])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_a_loaded_aoti_kernel_leaves_nothing_on_disk(aoti_kernel: tuple[Any, tuple[Any, ...], Any]) -> None:
    """The package's extracted `aotinductor_*` directory is gone once its library is mapped
    (torch removed it only when the loader was destroyed, which a server's kernels never
    are, so each start left them in /tmp for good), and the kernel still computes."""
    from softgate.engine import aoti

    fn, args, _ = aoti_kernel
    with open("/proc/self/maps") as f:
        mapped = {line.split(maxsplit=5)[5].strip() for line in f if "/aotinductor_" in line}
    assert mapped and all(m.endswith(" (deleted)") for m in mapped), mapped
    dirs = aoti._extracted_dirs()
    assert dirs and not any(os.path.exists(d) for d in dirs), dirs
    for g, w in zip(fn(*args), token_terms(*args), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_aoti_kernel_outputs_are_fresh_tensors_on_every_call(
    aoti_kernel: tuple[Any, tuple[Any, ...], Any],
) -> None:
    """No output comes from a buffer of the calling thread: AOTInductor returns an output of a
    constant size (the values vector, empty codes) as the same tensor on every call of a
    thread, whose exit then takes the GIL to free it, and a pool thread exiting while the
    interpreter finalised aborted `softgate serve` after SIGTERM (std::terminate, -6)."""
    fn, args, _ = aoti_kernel

    def call() -> tuple[Any, ...]:  # on copies: no output can be an input
        return fn({k: v.clone() for k, v in args[0].items()}, *args[1:])

    first, again = call(), call()
    for x, y in zip(first, again, strict=True):
        assert x is not y and x.numel() > 0 and x.data_ptr() != y.data_ptr()
    torch.testing.assert_close(first[7], again[7], rtol=0, atol=0)


@pytest.mark.parametrize("sample_tokens", [None, 8], ids=["aoti", "dynamo"])
def test_compiled_kernels_store_the_gradient_in_grad_out(sample_tokens: int | None) -> None:
    """With grad_out in its dict, a compiled kernel (AOTInductor's, and dynamo's for a sampled
    configuration) returns that tensor as the gradient, filled, and everything else as eager."""
    batch = random_batch(11, max_seqs=30, max_len=40)
    args = kernel_args(batch, make_config("sapo", "seq_mean_token_mean", None, None), sample_tokens)
    out = torch.full_like(args[0]["logp"], float("nan"))
    with_out = ({**args[0], "grad_out": out}, *args[1:])
    got, want = compile_kernel(warmup_args(with_out))(*with_out), token_terms(*args)
    assert got[0].data_ptr() == out.data_ptr()
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_compute_loss_writes_the_gradient_into_grad_out() -> None:
    batch = random_batch(12, max_seqs=30, max_len=40)
    cfg = make_config("grpo", "token_mean", "k3", None)
    want = compute_loss(batch, cfg)
    out = torch.full_like(want.grad, float("nan"))
    got = compute_loss(batch, cfg, grad_out=out)
    assert got.grad.data_ptr() == out.data_ptr() and torch.equal(out, want.grad)
    assert got.metrics == want.metrics and got.loss == want.loss
    for bad in (out[:-1], out.half(), torch.empty(2 * out.numel(), dtype=out.dtype)[::2]):
        with pytest.raises(ValueError, match="grad_out must be a contiguous"):
            compute_loss(batch, cfg, grad_out=bad)
    # with and without grad_out: one compiled configuration (found by an audit: a server's
    # unary call, which passes one, and its stream, which does not, were two; while one was
    # compiled and the other eager, their metrics differed in the last bits)
    keys = []

    def spy(*args: Any) -> Any:
        keys.append(kernel_key(args))
        return token_terms(*args)

    compute_loss(batch, cfg, kernel=spy)
    compute_loss(batch, cfg, kernel=spy, grad_out=out)
    assert keys[0] == keys[1]


def test_compiled_kernel_runs_only_where_it_fits() -> None:
    """Compiled kernels run without dynamo's guard check: sizes it would have turned away run
    eager (fits), strided inputs are made contiguous; results are the eager engine's."""
    import dataclasses

    eng, eager = Engine(device="cpu", compile=True), Engine(device="cpu", compile=False)
    cfg = make_config("sapo", "token_mean", None, None)
    batch = random_batch(5, max_seqs=20, max_len=30, advantages="token", dtype=torch.float32)
    n = batch.logp.numel()
    assert_same_result(eng.loss(batch, cfg), eager.loss(batch, cfg))
    assert eng.kernel.compiled_calls == 1
    wide = torch.zeros(2 * n, dtype=batch.logp.dtype)
    wide[::2] = batch.logp
    strided = dataclasses.replace(batch, logp=wide[::2])
    assert not strided.logp.is_contiguous()
    assert_same_result(eng.loss(strided, cfg), eager.loss(batch, cfg))
    assert eng.kernel.compiled_calls == 2
    one = dataclasses.replace(
        batch, offsets=torch.tensor([0, n]), advantages=batch.advantages, advantage_level="token"
    )
    assert_same_result(eng.loss(one, cfg), eager.loss(one, cfg))  # one sequence: as two, compiled
    assert eng.kernel.compiled_calls == 3
    few = eng.loss(batch, cfg, sample_tokens=1)  # samples 2 tokens, not 1: compiled
    assert few.ratio.numel() == 2 and eng.kernel.compiled_calls == 4
    assert_same_result(few, eager.loss(batch, cfg, sample_tokens=1))


def test_fits() -> None:
    t = {"logp": torch.zeros(10), "ylen": torch.zeros(3)}
    args = (t, {}, "sapo", False, True, None, None, torch.int32)
    assert fits((*args, 1)) and fits((*args, 5)) and not fits((*args, 10))
    assert not fits(({"logp": torch.zeros(1), "ylen": torch.zeros(3)}, *args[1:], 1))
    assert fits(({"logp": torch.zeros(10), "ylen": torch.zeros(1)}, *args[1:], 1))  # (as two)
    assert not fits(({"logp": torch.zeros(10), "ylen": torch.zeros(0)}, *args[1:], 1))


@pytest.mark.parametrize(
    "sample_tokens,gather", [(None, False), (16, False), (None, True)], ids=["aoti", "dynamo", "gather"]
)
def test_a_one_sequence_batch_runs_compiled_with_an_empty_second_sequence(
    sample_tokens: int | None, gather: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer's micro-batch of one long sequence ran eager (a compiled kernel serves B >= 2)
    at 4-5x the compiled time: it now runs compiled with an empty second sequence, which
    changes nothing. Checked against eager where every per-sequence input is read: GSPO's
    sequence ratio (its min / max over live sequences), per-sequence advantages, a sequence
    level mismatch weight, k3_is_seq's sequence KL, OPSM and rollout rejection; also with the
    [B] inputs gathered in the kernel by sequence id, as on a GPU."""
    import dataclasses

    from softgate.engine import (
        KLConfig,
        MismatchConfig,
        RejectionCriterion,
        aggregate,
        chunked,
        loss,
        segments,
        validation,
    )
    from softgate.engine.config import Gspo, LossConfig

    if gather:  # a GPU's code on the CPU: [B] inputs gathered by sequence id in the kernel, the pad too
        for m in (segments, loss, aggregate, validation, compiled, chunked):
            monkeypatch.setattr(m, "host_shortcuts", lambda device: False)
    eng, eager = Engine(device="cpu", compile="sync"), Engine(device="cpu", compile=False)
    batch = random_batch(11, max_seqs=1, max_len=200, advantages="sequence", dtype=torch.float32, num_seqs=1)
    g = torch.Generator().manual_seed(3)
    n = batch.logp.numel()
    rollout = (batch.old_logp + 0.02 * torch.randn(n, generator=g)).clamp(max=-1e-3)
    batch = dataclasses.replace(batch, rollout_logp=rollout, ref_logp=batch.logp - 0.01)
    assert batch.offsets.numel() == 2 and n >= 20
    cfg = LossConfig(
        objective=Gspo(),
        kl=KLConfig("k3_is_seq", 0.1),
        mismatch=MismatchConfig(level="sequence", cap=1.5),
        off_policy_mask_threshold=0.5,
        rejection=(RejectionCriterion(upper=0.5, statistic="k2"),),
    )
    got = eng.loss(batch, cfg, sample_tokens=sample_tokens)
    assert eng.kernel.compiled_calls == 1
    want = eager.loss(batch, cfg, sample_tokens=sample_tokens)
    assert_same_result(got, want)
    assert got.metrics["num_seqs"] == 1 and got.metrics["ratio_min"] == want.metrics["ratio_min"] != 1.0


def test_background_warmup_queues_no_compiles() -> None:
    """serve's warm-up runs every objective eager; real traffic decides what gets compiled."""
    eng = Engine(device="cpu", compile="background")
    eng.warmup()
    assert eng.wait_compiled(0) and eng.kernel.ready == 0 and eng.kernel._worker is None


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("adv", ["token", "sequence"])
def test_kernel_value_checks_match_validation(compile: bool, adv: str) -> None:
    # the values of logp, old_logp and per-token advantages are checked in the kernel's own
    # loop; the error must be exactly the one the full validation gives (field, reason, first
    # index), eager and compiled, and masked tokens may still hold positive garbage
    import dataclasses

    from softgate.engine.errors import InputError
    from softgate.engine.validation import validate_batch, validate_config

    eng = Engine(device="cpu", compile=compile)
    cfg = make_config("sapo", "seq_mean_token_mean", None, None)
    base = random_batch(3, max_seqs=30, max_len=40, advantages=adv, dtype=torch.float32)
    eng.loss(base, cfg)
    m = base.mask
    assert m is not None
    trained = torch.nonzero(m)[:, 0]
    masked = torch.nonzero(~m)[:, 0]
    cases = []
    for field in ("logp", "old_logp") + (("advantages",) if adv == "token" else ()):
        for value in (float("nan"), float("inf"), -float("inf"), 0.5):
            if value == 0.5 and field == "advantages":
                continue
            for where in (trained[len(trained) // 2], trained[-1], masked[0]):
                cases.append((field, value, int(where)))
    for field, value, i in cases:
        x = getattr(base, field).clone()
        x[i] = value
        bad = dataclasses.replace(base, **{field: x})
        want = validate_config(cfg) + validate_batch(bad, cfg)
        if not want:  # a positive log-prob on a masked token
            assert value == 0.5 and not bool(m[i])
            eng.loss(bad, cfg)
            continue
        with pytest.raises(InputError) as ei:
            eng.loss(bad, cfg)
        assert ei.value.violations == want, (field, value, i)
    assert eng.kernel.compiled_calls == (1 + len(cases) if compile else 0)


def test_a_sync_configuration_queued_from_the_event_loop_is_compiled_once() -> None:
    """Found by a review: a configuration the event loop queued for the background was compiled
    a second time by a pool thread's call meanwhile (an AOTInductor build holds no lock), and
    with max_configurations 1 counted as both compiled and over the limit."""
    from softgate.engine.compiled import never_compile_here

    eng = Engine(device="cpu", compile="sync")
    eng.kernel.max_configurations = 1
    compiles: list[str] = []
    building = threading.Event()

    def slow_build(example: Any, lock: Any) -> Any:  # a child's build: no lock held
        compiles.append(threading.current_thread().name)
        building.set()
        time.sleep(0.5)
        return token_terms

    eng.kernel._compile = slow_build
    batch = random_batch(7, max_seqs=8, max_len=20)
    cfg = make_config("sapo", "seq_mean_token_mean", None, None)

    def on_the_loop() -> None:
        never_compile_here()
        eng.loss(batch, cfg)

    t = threading.Thread(target=on_the_loop)
    t.start()
    t.join()
    assert building.wait(10)
    eng.loss(batch, cfg)  # a pool thread's call while the background build runs: eager
    assert eng.wait_compiled(10)
    assert compiles == ["softgate-compile"]
    assert eng.kernel.states() == {"compiled": 1, "compiling": 0, "failed": 0, "over_limit": 0}


def test_a_sync_compile_in_a_pool_thread_is_not_queued_again_from_the_event_loop() -> None:
    """Found by an audit: the reverse order of the test above. A pool thread compiling a "sync"
    configuration for a call its client had given up on marked nothing, so the retry, inline on
    the event loop, queued a second compile of the same configuration (two AOTInductor builds
    at once on a 2-core box)."""
    from softgate.engine.compiled import never_compile_here

    eng = Engine(device="cpu", compile="sync")
    compiles: list[str] = []
    building, release = threading.Event(), threading.Event()

    def slow_build(example: Any, lock: Any) -> Any:
        compiles.append(threading.current_thread().name)
        building.set()
        assert release.wait(30)
        return token_terms

    eng.kernel._compile = slow_build
    batch = random_batch(7, max_seqs=8, max_len=20)
    cfg = make_config("sapo", "seq_mean_token_mean", None, None)
    pool = threading.Thread(target=eng.loss, args=(batch, cfg), name="pool", daemon=True)
    pool.start()
    assert building.wait(30)
    assert eng.kernel.states()["compiling"] == 1

    def on_the_loop() -> None:
        never_compile_here()
        eng.loss(batch, cfg)  # eager, and nothing queued

    loop = threading.Thread(target=on_the_loop, daemon=True)
    loop.start()
    loop.join(30)
    assert not loop.is_alive(), "the event loop waited for a pool thread's compile"
    release.set()
    pool.join(30)
    assert eng.wait_compiled(10)
    assert compiles == ["pool"]
    assert eng.kernel.states() == {"compiled": 1, "compiling": 0, "failed": 0, "over_limit": 0}


def test_new_sync_configurations_compile_one_at_a_time_and_leave_the_pool_free() -> None:
    """Found by an audit: with compile before use, the first call of a new configuration waited
    in its pool thread for the compile lock another configuration's compile held (a minute a
    compile on a loaded box): two such calls held both of a server's workers, and every other
    call (ComputeAdvantages, refusals) waited behind them past its deadline. A new configuration
    whose compile would wait runs eager and compiles in the background; each compiles once."""
    from concurrent.futures import ThreadPoolExecutor

    from softgate.engine.config import AdvantageConfig

    eng = Engine(device="cpu", compile="sync")
    compiles: list[tuple[Any, ...]] = []
    compiling, release = threading.Event(), threading.Event()

    def slow_build(example: Any, lock: Any) -> Any:  # dynamo's: the lock held around it
        with lock or contextlib.nullcontext():
            compiles.append(kernel_key(example))
            compiling.set()
            assert release.wait(60)
        return token_terms

    eng.kernel._compile = slow_build
    batch = random_batch(7, max_seqs=8, max_len=20)
    configs = [make_config(o, "seq_mean_token_mean", None, None) for o in ("sapo", "grpo", "cispo")]
    pool = ThreadPoolExecutor(2)  # a server's default engine_workers
    try:
        first = [pool.submit(eng.loss, batch, cfg) for cfg in configs]
        assert compiling.wait(30)
        rewards, gids = torch.tensor([1.0, 0.0, 0.5, 0.2]), torch.tensor([0, 0, 1, 1])
        other = pool.submit(eng.advantages, rewards, gids, AdvantageConfig())
        other.result(timeout=10)  # (before: waited for the compile, and then for another)
        assert sum(f.done() for f in first) == 2, "a first call that would wait for a compile ran eager"
        release.set()
        for f in first:
            f.result(timeout=30)
        assert eng.wait_compiled(30)
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert len(set(compiles)) == len(compiles) == 3, "a configuration compiled twice"
    assert eng.kernel.states() == {"compiled": 3, "compiling": 0, "failed": 0, "over_limit": 0}
    calls = eng.kernel.compiled_calls
    for cfg in configs:
        eng.loss(batch, cfg)
    assert eng.kernel.compiled_calls == calls + 3


def test_a_configuration_that_failed_in_the_background_is_not_compiled_again_before_use() -> None:
    """A review: a first call handed to the background thread (another compile held the lock)
    whose compile failed there was compiled again in its next caller's thread, and that second
    failure switched every compiled kernel off, those already built included."""
    from concurrent.futures import ThreadPoolExecutor

    eng = Engine(device="cpu", compile="sync")
    compiles: list[str] = []
    compiling, release = threading.Event(), threading.Event()

    def build(example: Any, lock: Any) -> Any:
        with lock or contextlib.nullcontext():
            compiles.append(threading.current_thread().name)
            if len(compiles) == 1:
                compiling.set()
                assert release.wait(60)
            if len(compiles) > 1:
                raise RuntimeError("inductor failed")
        return token_terms

    eng.kernel._compile = build
    batch = random_batch(7, max_seqs=8, max_len=20)
    a, b = (make_config(o, "seq_mean_token_mean", None, None) for o in ("sapo", "grpo"))
    pool = ThreadPoolExecutor(2)
    try:
        first = pool.submit(eng.loss, batch, a)
        assert compiling.wait(30)
        pool.submit(eng.loss, batch, b).result(timeout=30)  # eager; b compiles in the background
        release.set()
        first.result(timeout=30)
        assert eng.wait_compiled(30)
        assert eng.kernel.states()["failed"] == 1
        pool.submit(eng.loss, batch, b).result(timeout=30)
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert len(compiles) == 2, compiles
    assert eng.kernel.enabled
    calls = eng.kernel.compiled_calls
    eng.loss(batch, a)
    assert eng.kernel.compiled_calls == calls + 1


@pytest.mark.parametrize("mode", ["sync", "background"])
def test_the_event_loop_never_waits_for_another_threads_compiled_call(mode: str) -> None:
    """Found by an audit: a compiled call inline on the event loop waited for the kernel lock
    while a pool thread ran a compiled call (of a call already cut at its deadline, say): up to
    a 16M kernel's 50-225 ms, with health checks stalled behind it. The loop runs eager then."""
    from softgate.engine.compiled import never_compile_here

    kern = compiled.CompiledKernel(mode, host_mode=mode)
    inside, release = threading.Event(), threading.Event()

    def slow_compiled(*args: Any) -> str:
        if threading.current_thread().name == "pool":
            inside.set()
            assert release.wait(30)
        return "compiled"

    kern._compile = lambda example, lock: slow_compiled
    args = _token_terms_args("cpu")
    kern(*args)
    assert kern.wait(30) and kern(*args) == "compiled"
    pool = threading.Thread(target=kern, args=args, name="pool", daemon=True)
    pool.start()
    assert inside.wait(30)
    out: list[Any] = []

    def on_the_loop() -> None:
        never_compile_here()
        out.append(kern(*args))

    loop = threading.Thread(target=on_the_loop, daemon=True)
    loop.start()
    loop.join(10)
    release.set()
    pool.join(30)
    assert out and out[0] != "compiled", "the event loop waited for the pool thread's compiled call"


def test_the_event_loop_does_not_wait_for_the_lock_for_a_built_kernel_not_yet_ready() -> None:
    """Found by a review: a "sync" configuration whose kernel is built but not ready (its first
    compiled call ran out of memory, say) took the compile path on the event loop, and waited
    there for the lock another thread's compiled call held."""
    from softgate.engine.compiled import kernel_key, never_compile_here

    kern = compiled.CompiledKernel("sync", host_mode="sync")
    args = _token_terms_args("cpu")
    kern._fns[kernel_key(args)] = lambda *a: "compiled"
    out: list[Any] = []

    def on_the_loop() -> None:
        never_compile_here()
        out.append(kern(*args))

    with kern._lock:  # another thread's compiled call
        loop = threading.Thread(target=on_the_loop, daemon=True)
        loop.start()
        loop.join(10)
        assert out and out[0] != "compiled", "the event loop waited for the kernel lock"
    assert kern.wait(1)  # and it left nothing claimed
    assert kern(*args) == "compiled"


def test_a_compile_whose_warm_up_batch_fails_is_not_left_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: a key was marked queued before its warm-up batch was made; when that
    failed (out of device memory, say) it stayed queued for good and `wait()` never returned."""
    kern = compiled.CompiledKernel("background", host_mode="background")

    def no_memory(args: Any) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(compiled, "warmup_args", no_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        kern(*_token_terms_args("cpu"))
    assert kern.wait(1) and kern.states()["compiling"] == 0


def test_a_cpu_configuration_compiles_with_dynamo_on_a_torch_older_than_aotis_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AOTInductor builds only on a torch it was tested with (aoti.MIN_TORCH: CI's torch is at
    or past it); on an older one (a GPU host's 2.11 crashed once a build was ready) a CPU
    configuration compiles with dynamo."""
    from softgate.engine import aoti

    assert aoti.supported()
    monkeypatch.setattr(compiled, "aoti_compile", lambda example: "aoti")
    monkeypatch.setattr(compiled, "aot_compile", lambda example: "dynamo")
    example = warmup_args(_token_terms_args("cpu"))
    assert compiled.compile_kernel(example) == "aoti"
    monkeypatch.setattr(torch, "__version__", "2.9.1")  # a plain string: compared as a version
    assert not aoti.supported()
    assert compiled.compile_kernel(example) == "dynamo"
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu130")
    assert aoti.supported()


def test_an_aoti_build_is_checked_against_eager_in_its_child() -> None:
    """The child runs the package it built on its example before the server loads it: wrong
    numbers, a wrong dtype or a missing output fail the build (the server then compiles with
    dynamo) rather than reaching a request."""
    from softgate.engine import aoti

    example = warmup_args(_token_terms_args("cpu"))
    aoti.check(token_terms, example)  # the eager kernel passes its own check
    right = token_terms(*example)
    wrong = [
        (right[0] * (1 + 1e-3), *right[1:]),
        (right[0].float() if right[0].dtype == torch.float64 else right[0].double(), *right[1:]),
        right[:-1],
    ]
    for out in wrong:
        with pytest.raises(RuntimeError, match="AOTInductor kernel"):
            aoti.check(lambda *a, out=out: out, example)


def test_dynamos_compile_works_where_its_aot_compile_flag_is_off_by_default() -> None:
    """torch 2.11 has `torch.compile(...).aot_compile` behind `enable_aot_compile`, off by
    default (2.13's is on): without setting it every compile failed on that GPU host and every
    configuration ran eager. Here the flag is turned off as 2.11 ships it."""
    from torch._dynamo import config as dynamo_config

    # torch's own patch, not pytest's monkeypatch: since pytest 9.2 its undo deletes an
    # attribute that is not in the module's __dict__, and a deleted torch config reads as
    # missing for the rest of the process (every later torch.compile failed)
    before = dynamo_config.enable_aot_compile
    with dynamo_config.patch(enable_aot_compile=False):
        args = _token_terms_args("cpu")
        kernel = compiled.aot_compile(warmup_args(args))
        assert not dynamo_config.enable_aot_compile  # set for the compile only
    assert dynamo_config.enable_aot_compile == before  # and the process's flag restored
    with torch.no_grad():
        for g, w in zip(kernel(*args), token_terms(*args), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_a_torch_without_aot_compile_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.4 (pyproject's floor) has neither `torch.compile(...).aot_compile` nor the
    exception dynamo's compile restarts on: the engine runs eager, logging why in words."""
    import torch._dynamo.exc

    monkeypatch.delattr(torch._dynamo.exc, "TensorifyScalarRestartAnalysis", raising=False)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match=r"torch 2\.4\.1 has no torch\.compile\(\.\.\.\)\.aot_compile"):
        compiled.aot_compile(warmup_args(_token_terms_args("cpu")))


def test_a_small_cpu_batch_gives_the_same_bits_whatever_the_callers_thread_count() -> None:
    """A compiled kernel's float64 sums are split by the calling thread's intra-op thread
    count: a server computes small calls on one thread, so the same batch in-process (on the
    caller's threads) differed from the served one in the last bit of the loss and metrics (an
    audit). The engine computes batches of up to ONE_THREAD_MAX_TOKENS on one thread itself."""
    from softgate.engine.engine import ONE_THREAD_MAX_TOKENS
    from softgate.threads import one_thread

    batch = random_batch(8, max_seqs=64, max_len=120, num_seqs=64)
    assert 2000 < batch.logp.numel() <= ONE_THREAD_MAX_TOKENS
    config = make_config("gppo", "token_mean", "k2", None, scale="batch")
    engine = Engine(device="cpu", compile=True)
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, 4))  # (the split needs a team of more than one thread)
    try:
        many = engine.loss(batch, config)
        with one_thread():
            one = engine.loss(batch, config)
    finally:
        torch.set_num_threads(before)
    assert engine.kernel.compiled_calls >= 2
    assert (many.loss, many.policy_loss, many.kl_loss) == (one.loss, one.policy_loss, one.kl_loss)
    assert many.metrics == one.metrics
    assert torch.equal(many.grad, one.grad)


def _two_configurations() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    base = _token_terms_args("cpu")
    return base, ({**base[0], "old": base[0]["old"].float()}, *base[1:])


def test_at_exit_the_compile_running_in_this_process_is_stopped_and_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by an audit: a library process that ended while the background thread compiled
    in it (dynamo: a sampled configuration, or every CPU one on torch < 2.13) aborted, exit
    status 134. At exit (an atexit hook, registered when the thread starts) that compile is
    interrupted and waited for, and queued ones never start."""
    registered: list[Any] = []
    monkeypatch.setattr(compiled.atexit, "register", registered.append)
    kern = compiled.CompiledKernel("background")
    compiling, ended = threading.Event(), threading.Event()
    built: list[Any] = []

    def fake_compile(example: Any, lock: Any) -> Any:
        built.append(kernel_key(example))
        with lock:  # as compile_kernel holds it around a compile in this process
            compiling.set()
            try:
                while True:  # Python code, as dynamo's: the interrupt stops it
                    time.sleep(0.01)
            finally:
                ended.set()

    kern._compile = fake_compile
    first, second = _two_configurations()
    kern(*first)
    kern(*second)  # queued behind the first
    assert compiling.wait(30)
    assert registered == [kern._drain_at_exit]
    t0 = time.monotonic()
    kern._drain_at_exit()
    assert time.monotonic() - t0 < 2 and ended.is_set()
    assert kern._worker is not None and not kern._worker.is_alive()
    assert built == [kernel_key(first)]
    _assert_nothing_left_compiling(kern)  # (the second configuration was queued)


def _assert_nothing_left_compiling(kern: compiled.CompiledKernel) -> None:
    """After the exit hook nothing counts as compiling, and wait() with no timeout returns at
    once (False): an atexit handler calling it hung the interpreter's exit (a review)."""
    assert kern.states()["compiling"] == 0
    done: list[bool] = []
    waiter = threading.Thread(target=lambda: done.append(kern.wait()), daemon=True)
    waiter.start()
    waiter.join(5)
    assert done == [False]


def test_at_exit_a_child_process_build_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AOTInductor build runs in a child process (which exits with this one) and holds no
    lock: exit does not wait for it, and nothing runs here after it."""
    monkeypatch.setattr(compiled.atexit, "register", lambda hook: None)
    kern = compiled.CompiledKernel("background")
    building, release = threading.Event(), threading.Event()
    ran: list[Any] = []

    def fake_compile(example: Any, lock: Any) -> Any:
        building.set()
        assert release.wait(30)  # (a child's build: this thread waits on a pipe)
        return lambda *args: ran.append(args)

    kern._compile = fake_compile
    kern(*_two_configurations()[0])
    assert building.wait(30)
    t0 = time.monotonic()
    kern._drain_at_exit()
    assert time.monotonic() - t0 < 1
    release.set()
    time.sleep(0.2)
    assert ran == [] and kern.ready == 0  # no warm-up run once exiting: the thread parks
    _assert_nothing_left_compiling(kern)


_EXIT_DURING_COMPILE = """
import sys, time
import torch
from softgate.engine import Batch, Engine, Grpo, LossConfig

engine = Engine(device="cpu", compile="background")
batch = Batch(logp=-torch.rand(4096) - 0.01, offsets=Batch.offsets_from_lengths(torch.full((32,), 128)),
              advantages=torch.randn(32))
engine.loss(batch, LossConfig(objective=Grpo()), sample_tokens=100)  # sampled: dynamo, in this process
assert engine.kernel.states()["compiling"] == 1
time.sleep(float(sys.argv[1]))
"""


def test_a_process_that_exits_during_a_background_compile_exits_0() -> None:
    """The audit's case end to end: a script whose sampled call queued a background dynamo
    compile ends 0.5-2.5 s later, mid-compile (without the hook 5 of 7 such runs aborted)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SOFTGATE_ENGINE_COMPILE"}
    for delay in ("0.5", "1.5", "2.5"):
        out = subprocess.run(
            [sys.executable, "-c", _EXIT_DURING_COMPILE, delay],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "terminate called" not in out.stderr, (delay, out.stderr[-2000:])


_FORK_WHILE_A_CALL_HOLDS_THE_LOCK = """
import atexit, os, sys, threading, time
import torch
from softgate.engine import Batch, Engine, LossConfig
from softgate.engine.chunked import chunked_token_terms

hooks = []  # atexit runs hooks last in, first out: these two bracket the engine's exit hook
atexit.register(lambda: print("hook", round(time.monotonic() - hooks[0], 2), flush=True))
engine = Engine(device="cpu", compile="background")
kern = engine.kernel
kern._compile = lambda example, lock: chunked_token_terms  # (a fake compile: the exit hook is real)
batch = Batch(logp=-torch.rand(64) - 0.01, offsets=Batch.offsets_from_lengths(torch.full((4,), 16)),
              advantages=torch.randn(4))
engine.loss(batch, LossConfig())  # queues the compile: the exit hook is registered
assert engine.wait_compiled(30) and kern.ready == 1
held = threading.Event()

def compiled_call():  # holds the lock as a compiled call in progress does
    with kern._lock:
        held.set()
        time.sleep(60)

threading.Thread(target=compiled_call, daemon=True).start()
assert held.wait(10)
pid = os.fork()
if pid == 0:  # the child's copy of the lock is held, by a thread it does not have
    calls = kern.compiled_calls
    if sys.argv[1] == "call":
        engine.loss(batch, LossConfig())
        calls += 1
    atexit.register(lambda: hooks.append(time.monotonic()))
    sys.exit(0 if kern.compiled_calls == calls else 3)  # (sys.exit: atexit hooks run)
t0 = time.monotonic()
while time.monotonic() - t0 < 30:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        os._exit(0)
    time.sleep(0.01)
os.kill(pid, 9)
print("child hung", flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("child", ["exit", "call"])
def test_a_child_forked_while_another_thread_holds_the_lock_calls_compiled_and_exits_at_once(
    child: str,
) -> None:
    """A review: a child made by os.fork() while another thread held the compile lock has a
    copy of it that nobody releases. Its exit hook waited COMPILE_EXIT_WAIT_S for the lock,
    and its first compiled call spun for good. Each kernel's locks are new in the child."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SOFTGATE_ENGINE_COMPILE"}
    out = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", _FORK_WHILE_A_CALL_HOLDS_THE_LOCK, child],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    hook, exited = out.stdout.splitlines()  # the child's exit hook's time, then its exit status
    assert exited == "child 0", out.stdout
    assert float(hook.removeprefix("hook ")) < 1, out.stdout  # (was COMPILE_EXIT_WAIT_S, 5 s)
