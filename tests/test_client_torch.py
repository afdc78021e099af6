"""The torch adapter and the client's torch inputs outside plain float tensors (no server
needed): nested tensors, DTensors, float8 / quantized / other unsupported dtypes, an integer
logp, torch.func transforms (found by an audit of the torch adapter)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from softgate_client import InvalidArgumentError, pack_batch
from softgate_client import config as cfg
from softgate_client._tensors import half_reason
from softgate_client.client import LossResult
from softgate_client.torch import softgate_loss, sum_pi_squared


def refusal(fn: Any) -> tuple[str, str]:
    """(field, description) of the one violation `fn()` is refused with."""
    with pytest.raises(InvalidArgumentError) as ei:
        fn()
    (v,) = ei.value.violations
    return v.field, v.description


class GradClient:
    """Stands for a SoftgateClient: loss = sum(logp^2) / 2 with the gradient logp, from the
    packed batch."""

    def __init__(self) -> None:
        self.calls = 0

    def loss(self, logp: Any, old_logp: Any = None, *, timeout: Any = None, **kw: Any) -> LossResult:
        self.calls += 1
        packed = pack_batch(logp, old_logp, **kw)  # the client's checks of its inputs
        a = packed.layout.unflatten(packed.token["logp"])
        return LossResult(loss=float((a * a).sum() / 2), policy_loss=0.0, kl_loss=0.0, grad=a.copy())


NESTED_HINT = (
    "bad_type: a nested tensor; pass nt.values() with offsets=nt.offsets() (jagged), "
    "or torch.cat(nt.unbind()) with lengths="
)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_a_nested_tensor_is_refused_with_a_hint_that_works(layout) -> None:
    """A strided nested tensor raised torch's "Internal error ... Please file an issue"; a jagged
    one was told to use `.to_dense()`, which torch does not support for jagged tensors."""
    seqs = [-torch.rand(3, dtype=torch.float64) - 0.01, -torch.rand(1, dtype=torch.float64) - 0.01]
    nt = torch.nested.as_nested_tensor(seqs, layout=layout)
    assert refusal(lambda: pack_batch(nt, advantages=[1.0, -1.0])) == ("batch.logp", NESTED_HINT)
    flat = torch.cat(seqs)
    got = refusal(lambda: pack_batch(flat, nt, lengths=[3, 1], advantages=[1.0, -1.0]))
    assert got == ("batch.old_logp", NESTED_HINT)
    # the hint's own recipes work
    if layout is torch.jagged:
        p = pack_batch(nt.values(), offsets=nt.offsets(), advantages=[1.0, -1.0])
    else:
        p = pack_batch(torch.cat(nt.unbind()), lengths=[t.shape[0] for t in nt.unbind()], advantages=[1, -1])
    assert p.layout.offsets.tolist() == [0, 3, 4]


def test_a_dtensor_is_refused_with_full_tensor_as_the_hint() -> None:
    """A DTensor (tensor-parallel log-probs) raised torch's ".numpy() is not supported for tensor
    subclasses", naming no field."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        d = distribute_tensor(-torch.rand(2, 3) - 0.01, mesh, [Shard(0)]).requires_grad_()
        why = "bad_type: a DTensor; pass x.full_tensor() (differentiable)"
        assert refusal(lambda: pack_batch(d, advantages=[1.0, -1.0])) == ("batch.logp", why)
        rec = GradClient()
        assert refusal(lambda: softgate_loss(d, client=rec, advantages=[1.0, -1.0])) == ("batch.logp", why)
        loss = softgate_loss(d.full_tensor(), client=rec, advantages=[1.0, -1.0])  # the hint works
        loss.backward()
        assert torch.equal(d.grad.full_tensor(), d.detach().full_tensor())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_is_refused_as_half_precision(dtype) -> None:
    """float8 raised torch's "Got unsupported ScalarType Float8_e4m3fn", naming no field."""
    lp = -torch.rand(2, 3) - 0.01
    name = str(dtype).removeprefix("torch.")
    field, why = refusal(lambda: pack_batch(lp.to(dtype), advantages=[1.0, -1.0]))
    assert field == "batch.logp" and why.startswith(f"half_precision: logp is {name}; send logp as float32")
    field, why = refusal(lambda: pack_batch(lp, advantages=torch.ones(2).to(dtype)))
    assert field == "batch.advantages" and why.startswith(f"half_precision: advantages is {name}")


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
def test_quantized_and_other_dtypes_numpy_lacks_are_refused_by_name() -> None:
    """A quantized tensor (and any dtype numpy cannot hold, e.g. complex32) raised torch's own
    TypeError "Got unsupported ScalarType ...", naming no field."""
    lp = -torch.rand(2, 3) - 0.01
    q = torch.quantize_per_tensor(lp, 0.1, 0, torch.qint8)
    field, why = refusal(lambda: pack_batch(q, advantages=[1.0, -1.0]))
    assert field == "batch.logp" and why.startswith("bad_dtype: torch.qint8") and "dequantize()" in why
    field, why = refusal(lambda: pack_batch(lp.to(torch.complex32), advantages=[1.0, -1.0]))
    assert field == "batch.logp" and why.startswith("bad_dtype: torch.complex32 (") and "ComplexHalf" in why


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_an_integer_or_bool_logp_is_refused_by_softgate_loss(dtype) -> None:
    """The loss came back cast to logp's dtype: tensor(-1) for a true loss of -1.27, tensor(True)
    for -1.67, with no error. logp is differentiated, so it must be a float tensor (docs)."""
    rec = GradClient()
    with pytest.raises(InvalidArgumentError) as ei:
        softgate_loss(torch.zeros(2, 3, dtype=dtype), client=rec, advantages=[1.0, -1.0])
    (v,) = ei.value.violations
    assert v.field == "batch.logp" and v.reason == "bad_dtype"
    assert "must be a floating-point tensor to be differentiated" in v.description
    assert rec.calls == 0


def _step(client: Any) -> Any:
    torch.manual_seed(0)
    x, ids = torch.randn(4, 6, 5, dtype=torch.float64), torch.randint(0, 11, (4, 6))

    def step(w: torch.Tensor) -> torch.Tensor:
        logp = (x @ w).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
        return softgate_loss(logp, client=client, advantages=[1.0, -1.0, 0.5, 2.0])

    return step


def test_torch_func_grad_and_vjp_give_the_backward_gradient() -> None:
    """torch.func.grad / vjp raised torch's "it must override the setup_context staticmethod"."""
    rec = GradClient()
    step = _step(rec)
    w0 = torch.randn(5, 11, dtype=torch.float64)
    w = w0.clone().requires_grad_()
    loss = step(w)
    loss.backward()
    assert loss.softgate_result.loss == loss.item()
    g = torch.func.grad(step)(w0.clone())
    assert torch.allclose(g, w.grad, rtol=1e-12, atol=0)
    out, vjp = torch.func.vjp(step, w0.clone())
    assert out.item() == loss.item()
    assert torch.allclose(vjp(torch.tensor(2.0, dtype=torch.float64))[0], 2 * w.grad, rtol=1e-12, atol=0)


def test_torch_func_jacrev_of_the_loss_is_its_gradient() -> None:
    """jacrev of the scalar loss (a first derivative) raised torch's "You tried to vmap over
    _FirstOrderOnly" (an audit): it vmaps backward, which is a clone."""
    step = _step(GradClient())
    w0 = torch.randn(5, 11, dtype=torch.float64)
    assert torch.equal(torch.func.jacrev(step)(w0.clone()), torch.func.grad(step)(w0.clone()))


def test_softgate_loss_checks_its_own_arguments_by_name() -> None:
    """A client that is not one, return_result not a bool, a call's stream or run of the wrong
    type: AttributeErrors from inside, or taken silently (stream=0 streamed by size; an audit)."""
    logp = -torch.ones(2, 3, requires_grad=True)
    for client in (None, "127.0.0.1:50051"):
        with pytest.raises(TypeError, match="client must be a SoftgateClient"):
            softgate_loss(logp, client=client, advantages=[1.0, -1.0])
    with pytest.raises(TypeError, match="return_result must be a bool"):
        softgate_loss(logp, client=GradClient(), advantages=[1.0, -1.0], return_result="no")
    from softgate_client import SoftgateClient

    with SoftgateClient("127.0.0.1:1") as c:  # (refused before anything is sent)
        with pytest.raises(ValueError, match="stream: 0 must be True, False or None"):
            c.loss(logp.detach(), None, advantages=[1.0, -1.0], stream=0)
        with pytest.raises(ValueError, match="run: 5 must be a str"):
            c.loss(logp.detach(), None, advantages=[1.0, -1.0], run=5)
        # loss_packed (pack_batch's partner): AttributeErrors from inside (an audit)
        from softgate_client import LossConfig, pack_batch

        packed = pack_batch(logp.detach(), None, advantages=[1.0, -1.0])
        with pytest.raises(ValueError, match="config: bad_type: expected a LossConfig, got NoneType"):
            c.loss_packed(packed, None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="packed: bad_type: expected pack_batch's result, got dict"):
            c.loss_packed({}, LossConfig())  # type: ignore[arg-type]


def test_torch_func_vmap_and_a_second_derivative_are_refused_clearly() -> None:
    """vmap raised torch's message about softgate's internals (setup_context)."""
    rec = GradClient()
    step = _step(rec)
    w0 = torch.randn(5, 11, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"softgate_loss does not support torch\.func\.vmap"):
        torch.func.vmap(step)(torch.stack([w0, w0]))
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.func.grad(lambda w: torch.func.grad(step)(w).sum())(w0.clone())
    # create_graph=True: the first derivative as without it; only a second one raises
    w = w0.clone().requires_grad_()
    (g,) = torch.autograd.grad(step(w), w, create_graph=True)
    assert torch.allclose(g, torch.func.grad(step)(w0.clone()), rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="no second derivative"):
        g.pow(2).sum().backward()


def test_backward_survives_writes_into_logp_s_buffer_after_the_call() -> None:
    """The next micro-batch written into the buffer logp is a slice of, before backward:
    backward failed torch's version check on a logp it never reads (an audit); an ordinary
    loss of the slice backpropagates, and so does this one, with the same gradient."""
    rec = GradClient()
    torch.manual_seed(0)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    buf = torch.zeros(8, 6, dtype=torch.float64)
    buf[:4] = torch.nn.functional.logsigmoid(w)
    loss = softgate_loss(buf[:4], client=rec, advantages=[1.0, -1.0, 0.5, 2.0])
    buf[4:] = -1.0
    loss.backward()
    ls = torch.nn.functional.logsigmoid(w)  # (GradClient's gradient: logp as sent)
    want = torch.autograd.grad((ls * ls.detach()).sum(), w)[0]
    assert w.grad is not None and torch.allclose(w.grad, want, rtol=1e-12, atol=0)


def test_the_precision_note_is_each_dtypes_own() -> None:
    """A float16 logp was refused with bf16's figure (~3% ratio noise; float16's is ~0.4%)."""
    bf16, fp16 = half_reason("logp", "bfloat16"), half_reason("logp", "float16")
    assert "bfloat16 log-probs carry up to 3.2% ratio noise" in bf16
    assert "float16 log-probs carry up to 0.4% ratio noise" in fp16 and "bf" not in fp16
    assert "float8_e4m3fn log-probs carry up to 64.9%" in half_reason("old_logp", "float8_e4m3fn")
    assert "log-probs" not in half_reason("advantages", "float16")


def test_a_config_section_of_the_wrong_type_reads_as_english() -> None:
    field, why = refusal(lambda: cfg.LossConfig(objective="grpo"))  # type: ignore[arg-type]
    assert (field, why) == ("config.objective", "bad_type: expected an Objective, got str")
    field, why = refusal(lambda: cfg.LossConfig(kl="k3"))  # type: ignore[arg-type]
    assert (field, why) == ("config.kl", "bad_type: expected a KLConfig, got str")


def test_the_adapter_without_torch_says_what_to_install() -> None:
    """Found by an audit: a bare `No module named 'torch'`. The rest of the client imports fine."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import softgate_client\n"
        "try:\n"
        "    import softgate_client.torch\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, e, '|', type(e.__cause__).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pip install torch" in r.stdout and "softgate-client[torch]" in r.stdout, r.stdout
    assert r.stdout.strip().endswith("| ModuleNotFoundError"), r.stdout


def test_sum_pi_squared_from_the_logits() -> None:
    """sum softmax(logits / T)^2 per token, in float32 to ~1e-6 of float64's, bit-equal
    whatever the chunk (one token at a time here), from bf16 logits as from their float32,
    without autograd; what the engine accepts beside old_logp from the same logits."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 5, 1000, generator=g) * 6).requires_grad_(True)
    got = sum_pi_squared(z, temperature=0.7)
    want = torch.softmax(z.detach().double() / 0.7, -1).square().sum(-1)
    assert got.shape == (3, 5) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert torch.equal(sum_pi_squared(z, 0.7, chunk_bytes=1), got)
    half = z.detach().bfloat16()
    assert torch.equal(sum_pi_squared(half, 0.7), sum_pi_squared(half.float(), 0.7))
    # a causal LM's shifted logits, a slice whose tokens do not merge into one view: read in place
    shifted = z.detach()[:, :-1]
    assert not shifted.is_contiguous()
    assert torch.equal(sum_pi_squared(shifted, 0.7, chunk_bytes=3 * 8 * 1000), got[:, :-1])
    assert torch.equal(sum_pi_squared(z.detach()[1, 2], 0.7), got[1, 2])  # one token, [V]
    # a Qwen-size vocabulary: float32 softmax sums to 1 within ~2e-5 on the CPU; normalised
    big = torch.randn(8, 152064, generator=g) * 4
    want = torch.softmax(big.double(), -1).square().sum(-1)
    torch.testing.assert_close(sum_pi_squared(big).double(), want, rtol=2e-6, atol=0)
    # the engine takes it with old_logp from the same scaled logits (on trained tokens it must
    # be within [pi^2, 1])
    from softgate.engine import Batch, Engine, LossConfig

    old = torch.log_softmax(z.detach() / 0.7, -1)[..., 0].reshape(-1)
    batch = Batch(
        logp=old,
        old_logp=old,
        offsets=Batch.offsets_from_lengths(torch.full((3,), 5)),
        advantages=torch.tensor([1.0, -1.0, 0.5]),
        advantage_level="sequence",
        sum_pi_squared=got.reshape(-1),
    )
    assert Engine(device="cpu", compile=False).loss(batch, LossConfig()).metrics["variance_proxy_w"] > 0


@pytest.mark.parametrize(
    ("logits", "temperature", "field"),
    [
        (torch.zeros(2, 3, dtype=torch.int64), 1.0, "logits"),
        (torch.zeros(2, 0), 1.0, "logits"),
        (torch.zeros(2, 3), 0.0, "temperature"),
        (torch.zeros(2, 3), float("nan"), "temperature"),
        (torch.zeros(2, 3), float("inf"), "temperature"),
        (torch.zeros(2, 3), "1", "temperature"),  # (a bare TypeError, unnamed; an audit)
        (torch.zeros(2, 3), None, "temperature"),
        (torch.zeros(2, 3), 1.0, "chunk_bytes"),
        (torch.tensor([[0.0, 1.0], [-torch.inf, -torch.inf]]), 1.0, "logits[1]"),
        (torch.tensor([[[0.0, torch.nan]]]), 1.0, "logits[0, 0]"),
    ],
)
def test_sum_pi_squared_refuses_bad_input_by_name(
    logits: torch.Tensor, temperature: float, field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        sum_pi_squared(logits, temperature, **({"chunk_bytes": 2.5e8} if field == "chunk_bytes" else {}))
    assert [v.field for v in e.value.violations] == [field]
