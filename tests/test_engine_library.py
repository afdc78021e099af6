"""The engine used as a library, without a server in front (`Engine().loss(Batch(...), ...)`):
what a trainer passes that a server never would (numpy and torch scalars in a config, meta
tensors, arguments of the wrong type, a gradient buffer that is an input), and what it does
with the results (pickled errors, autograd). Each test comes from an audit of that use."""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from softgate.engine import (
    AdvantageConfig,
    AggregationConfig,
    Batch,
    Engine,
    FieldViolation,
    Grpo,
    InputError,
    KLConfig,
    LossConfig,
    MismatchConfig,
    Sapo,
)
from softgate.engine.validation import REASON_CODES

E = Engine(device="cpu", compile=False)


def _batch(**kw: Any) -> Batch:
    lengths = torch.tensor([3, 2, 4, 1])
    n = int(lengths.sum())
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(n, generator=g, dtype=torch.float64) - 0.1
    fields: dict[str, Any] = {
        "logp": logp,
        "old_logp": logp + 0.05 * torch.randn(n, generator=g, dtype=torch.float64),
        "ref_logp": logp - 0.1,
        "rollout_logp": logp + 0.02,
        "offsets": Batch.offsets_from_lengths(lengths),
        "rewards": torch.tensor([1.0, 0.0, 0.5, 1.0]),
        "group_ids": torch.tensor([0, 0, 1, 1]),
    }
    return Batch(**{**fields, **kw})


def _refusal(call: Any) -> list[tuple[str, str]]:
    with pytest.raises(InputError) as ei:
        call()
    assert all(v.code in REASON_CODES for v in ei.value.violations)
    return [(v.field, v.code) for v in ei.value.violations]


# ---------------------------------------------------------------- the device


@pytest.mark.skipif(torch.cuda.is_available(), reason="a host without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 3)])
def test_a_cuda_engine_without_cuda_is_refused_when_made(device: Any) -> None:
    """It was made, ran small batches on the host, then failed with a bare AssertionError
    ("Torch not compiled with CUDA enabled") on the first batch over host_max_tokens."""
    with pytest.raises(ValueError, match=r"device 'cuda(:\d)?': CUDA is not available"):
        Engine(device=device)


def test_a_cuda_device_this_host_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        ValueError, match=r"device 'cuda:3': this host has 2 CUDA device\(s\), cuda:0..cuda:1"
    ):
        Engine(device="cuda:3")
    assert Engine(device="cuda:1", compile=False).device == torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("device", "why"), [("meta", "runs on cpu or cuda, not meta"), ("foo", "is not a device")]
)
def test_a_device_that_is_not_cpu_or_cuda_is_refused(device: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"device '{device}'.*{why}"):
        Engine(device=device)


# ---------------------------------------------------------------- the configuration


def test_numbers_given_as_numpy_or_torch_scalars_are_taken_as_numbers() -> None:
    """`AggregationConfig(num_tokens=mask.sum())` (a normaliser after all_reduce) was refused
    with `tensor(14) is not a finite number`; numpy's float32 and int64 too."""
    batch = _batch()
    plain = LossConfig(
        objective=Grpo(eps_low=0.25, eps_high=0.5),
        aggregation=AggregationConfig(mode="token_mean", num_tokens=14, num_seqs=4),
        kl=KLConfig(beta=0.5),
        mismatch=MismatchConfig(cap=3.0),
        log_ratio_clamp=10.0,
    )
    scalars = LossConfig(
        objective=Grpo(eps_low=np.float32(0.25), eps_high=torch.tensor(0.5, dtype=torch.float64)),  # type: ignore[arg-type]
        aggregation=AggregationConfig(
            mode="token_mean",
            num_tokens=torch.tensor(14),  # type: ignore[arg-type]
            num_seqs=np.int64(4),  # type: ignore[arg-type]
        ),
        kl=KLConfig(beta=torch.tensor([0.5])),  # type: ignore[arg-type]
        mismatch=MismatchConfig(cap=np.float64(3.0)),
        log_ratio_clamp=np.float32(10.0),  # type: ignore[arg-type]
    )
    assert scalars == plain and hash(scalars) == hash(plain)  # values, not tensors
    assert type(scalars.aggregation.num_tokens) is int and type(scalars.objective.eps_low) is float
    assert Sapo(tau_pos=np.float32(2.0)) == Sapo(tau_pos=2.0)  # type: ignore[arg-type]
    got, want = E.loss(batch, scalars), E.loss(batch, plain)
    assert got.loss == want.loss and torch.equal(got.grad, want.grad)
    # what is no number is still refused, naming the field
    assert _refusal(lambda: E.loss(batch, LossConfig(kl=KLConfig(beta=torch.ones(2))))) == [  # type: ignore[arg-type]
        ("kl.beta", "out_of_range")
    ]
    assert _refusal(lambda: E.loss(batch, LossConfig(objective=Sapo(tau_pos="1")))) == [  # type: ignore[arg-type]
        ("objective.sapo.tau_pos", "out_of_range")
    ]


def test_a_config_or_batch_of_the_wrong_type_is_an_input_error() -> None:
    """`Engine.loss(batch, None)`, a dict for a config or a batch gave an AttributeError."""
    batch = _batch()
    assert _refusal(lambda: E.loss(batch, None)) == [("config", "bad_type")]  # type: ignore[arg-type]
    assert _refusal(lambda: E.loss(batch, {"objective": "sapo"})) == [("config", "bad_type")]  # type: ignore[arg-type]
    assert _refusal(lambda: E.loss(None, LossConfig())) == [("batch", "bad_type")]  # type: ignore[arg-type]
    assert _refusal(lambda: E.advantages(batch.rewards, batch.group_ids, {})) == [("config", "bad_type")]  # type: ignore[arg-type]
    with pytest.raises(
        InputError, match=r"config: bad_type: expected a softgate\.engine\.LossConfig, got dict"
    ):
        E.loss(batch, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("sample_tokens", [0, -1, 2.5, True])
def test_sample_tokens_below_1_is_refused(sample_tokens: Any) -> None:
    """0 and -1 were taken as 2 (a sample of two tokens) without a word."""
    assert _refusal(lambda: E.loss(_batch(), LossConfig(), sample_tokens=sample_tokens)) == [
        ("sample_tokens", "out_of_range")
    ]


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize("name", ["logp", "old_logp", "offsets", "rewards"])
def test_a_meta_tensor_is_named_as_bad_device(name: str) -> None:
    """torch's NotImplementedError ("Cannot copy out of meta tensor") came out instead."""
    batch = _batch(**{name: getattr(_batch(), name).to("meta")})
    assert _refusal(lambda: E.loss(batch, LossConfig())) == [(name, "bad_device")]


def test_meta_rewards_or_group_ids_for_advantages_are_named_as_bad_device() -> None:
    b = _batch()
    assert _refusal(lambda: E.advantages(b.rewards.to("meta"), b.group_ids, AdvantageConfig())) == [
        ("rewards", "bad_device")
    ]
    assert _refusal(lambda: E.advantages(b.rewards, b.group_ids.to("meta"), AdvantageConfig())) == [
        ("group_ids", "bad_device")
    ]


def test_a_grad_out_that_shares_an_inputs_memory_is_refused() -> None:
    """`grad_out=logp` was accepted, and the caller's logp overwritten by the gradient."""
    batch = _batch()
    before = batch.logp.clone()
    with pytest.raises(ValueError, match=r"grad_out shares memory with batch\.logp"):
        E.loss(batch, LossConfig(), grad_out=batch.logp)
    assert torch.equal(batch.logp, before)
    n = batch.logp.numel()
    buf = torch.empty(2 * n + 1, dtype=torch.float64)
    shared = _batch(old_logp=buf[:n].copy_(batch.old_logp))
    with pytest.raises(ValueError, match=r"grad_out shares memory with batch\.old_logp"):
        E.loss(shared, LossConfig(), grad_out=buf[n - 1 : 2 * n - 1])  # one element in common
    res = E.loss(shared, LossConfig(), grad_out=buf[n : 2 * n])  # the same buffer, no overlap
    assert res.grad.data_ptr() == buf[n:].data_ptr()
    assert torch.equal(res.grad, E.loss(batch, LossConfig()).grad)
    with pytest.raises(ValueError, match=r"grad_out must be a torch\.Tensor, got list"):
        E.loss(batch, LossConfig(), grad_out=[0.0] * n)  # type: ignore[arg-type]


def test_a_grad_out_over_the_same_bytes_as_an_input_in_another_storage_is_refused() -> None:
    """Two views of one buffer (numpy slices, frombuffer at two offsets) are two storages:
    the check compares their bytes, not their storages (a review)."""
    batch = _batch()
    n, size = batch.logp.numel(), batch.logp.element_size()
    raw = bytearray(2 * n * size)
    logp = torch.frombuffer(raw, dtype=torch.float64, count=n).copy_(batch.logp)
    overlapping = torch.frombuffer(raw, dtype=torch.float64, count=n, offset=(n // 2) * size)
    assert logp.untyped_storage().data_ptr() != overlapping.untyped_storage().data_ptr()
    shared = _batch(logp=logp)
    with pytest.raises(ValueError, match=r"grad_out shares memory with batch\.logp"):
        E.loss(shared, LossConfig(), grad_out=overlapping)
    assert torch.equal(logp, batch.logp)
    apart = torch.frombuffer(raw, dtype=torch.float64, count=n, offset=n * size)
    assert torch.equal(E.loss(shared, LossConfig(), grad_out=apart).grad, E.loss(batch, LossConfig()).grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rewards_are_accepted(dtype: torch.dtype) -> None:
    """Rewards are reduced in float64 whatever their dtype (docs/engine.md): half ones were
    refused with the log-probs' ratio-noise reason. 0, 0.5 and 1 are exact in both."""
    batch = _batch()
    half = _batch(rewards=batch.rewards.to(dtype))
    got, want = E.loss(half, LossConfig()), E.loss(batch, LossConfig())
    assert got.loss == want.loss and torch.equal(got.grad, want.grad)
    adv = E.advantages(half.rewards, half.group_ids, AdvantageConfig())
    assert adv.advantages.dtype == torch.float32
    assert torch.equal(
        adv.advantages, E.advantages(batch.rewards, batch.group_ids, AdvantageConfig()).advantages
    )
    nan = batch.rewards.to(dtype)
    nan[2] = float("nan")
    assert _refusal(lambda: E.advantages(nan, batch.group_ids, AdvantageConfig())) == [
        ("rewards", "non_finite")
    ]


def test_half_precision_log_probs_give_their_own_dtypes_figure() -> None:
    """float16 log-probs were refused quoting bfloat16's ~3% ratio noise (float16's is ~0.4%)."""
    batch = _batch()
    for dtype, figure in ((torch.bfloat16, "3.2%"), (torch.float16, "0.4%")):
        name = str(dtype).removeprefix("torch.")
        with pytest.raises(InputError) as ei:
            E.loss(_batch(logp=batch.logp.to(dtype)), LossConfig())
        why = ei.value.violations[0].reason
        assert why.startswith(f"half_precision: logp is {name}; send logp as float32 or float64"), why
        assert f"{name} log-probs carry up to {figure} ratio noise" in why
        assert ("bf" in why) == (dtype == torch.bfloat16)
    adv = _batch(advantages=torch.ones(4, dtype=torch.bfloat16), rewards=None, group_ids=None)
    with pytest.raises(
        InputError, match="half_precision: advantages is bfloat16; send advantages as float32"
    ) as ei:
        E.loss(adv, LossConfig())
    assert "log-probs" not in str(ei.value)


def test_integer_rewards_give_float32_advantages() -> None:
    """AdvantageResult: float64 for float64 rewards, float32 for any other dtype."""
    g = torch.tensor([0, 0, 1, 1])
    for dtype, want in (
        (torch.int32, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ):
        assert (
            E.advantages(torch.tensor([1, 0, 2, 1], dtype=dtype), g, AdvantageConfig()).advantages.dtype
            == want
        )


def test_advantages_record_no_autograd_graph() -> None:
    """With rewards that require grad, the result carried a graph and each call warned
    (`Converting a tensor with requires_grad=True to a scalar`)."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = E.advantages(rewards, torch.tensor([0, 0, 1, 1]), AdvantageConfig())
    assert not res.advantages.requires_grad and res.advantages.grad_fn is None


# ---------------------------------------------------------------- errors


def test_an_input_error_survives_pickle_and_copy() -> None:
    """Its message came back one character per violation ("l; o; g; p; ...") from a worker
    process (ProcessPoolExecutor, Ray), pickle or copy."""
    err = InputError(
        [FieldViolation("logp", "non_finite: value is NaN", 3), FieldViolation("kl.beta", "out_of_range")]
    )
    for back in (pickle.loads(pickle.dumps(err)), copy.copy(err), copy.deepcopy(err)):
        assert (
            type(back) is InputError
            and str(back) == str(err) == "logp[3]: non_finite: value is NaN; kl.beta: out_of_range"
        )
        assert back.violations == err.violations and back.reasons == ["non_finite", "out_of_range"]
