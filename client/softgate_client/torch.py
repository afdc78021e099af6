"""PyTorch adapter: the service's loss as a differentiable scalar.

    from softgate_client import SoftgateClient
    from softgate_client.torch import softgate_loss

    client = SoftgateClient("softgate:50051", run="qwen3-sapo")
    logp = model_token_logprobs(batch)                      # [B, T], requires grad
    loss = softgate_loss(logp, old_logp, client=client, mask=response_mask,
                         rewards=rewards, group_ids=group_ids, objective="sapo")
    loss.backward()                                         # the policy's parameters get the service's gradient
    print(loss.softgate_result.metrics["clip_high"])

The forward pass sends the batch (detached, on the host) and gets back the loss and the exact
per-token gradient c = d loss / d logp; the backward pass hands `grad_output * c` to logp, so
the model's parameters receive exactly the gradient of the service's loss (logp, the policy's
output, keeps no `.grad` of its own: call `logp.retain_grad()` first to see c there).
`torch.func.grad` / `vjp` work too; `vmap` and forward-mode transforms do not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from softgate_client.errors import invalid_argument

try:
    import torch
except ImportError as e:  # torch is optional: only this module needs it
    raise ImportError(
        "softgate_client.torch needs PyTorch: pip install torch (or the client's extra, "
        "softgate-client[torch]); the rest of softgate_client works without it"
    ) from e

if TYPE_CHECKING:
    from softgate_client.client import LossResult, SoftgateClient

__all__ = ["SoftgateLossFunction", "softgate_loss", "sum_pi_squared"]


def _as_tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only views of the response bytes: never written to
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.to(device=like.device, dtype=like.dtype)


class _FirstOrderOnly(torch.autograd.Function):
    """`c` as a function of logp whose derivative raises: the service returns d loss / d logp
    only, so a second derivative through softgate_loss would silently drop its terms."""

    generate_vmap_rule = True  # (forward is a clone: torch.func.jacrev of the loss vmaps backward)

    @staticmethod
    def forward(c: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return c.clone()  # (a new tensor: an input returned as it is would be marked as aliased)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> Any:  # type: ignore[override]
        raise RuntimeError(
            "softgate_loss has no second derivative: the service returns d loss / d logp only, "
            "so differentiating its gradient again (a gradient penalty, Hessian-vector products) "
            "would silently drop its terms"
        )


class SoftgateLossFunction(torch.autograd.Function):
    """loss = service(logp); d loss / d logp = the service's per-token gradient.

    `apply(logp, compute)` returns (loss, gradient): the gradient is an output, not a tensor made
    in `forward` and saved there, so that torch.func.grad / vjp can save it (setup_context style).
    `compute` keeps the LossResult itself: torch.func copies a dict passed to `apply`."""

    @staticmethod
    def forward(  # type: ignore[override]
        logp: torch.Tensor, compute: Callable[[torch.Tensor], LossResult]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        result = compute(logp.detach())
        loss = torch.tensor(result.loss, dtype=logp.dtype, device=logp.device)
        return loss, _as_tensor(result.grad, logp)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        # logp only as the second-derivative guard's input, its values never read: not saved,
        # so that writing into its storage after the call (the next micro-batch into the same
        # buffer) does not fail backward's version check, as an ordinary loss's would not
        ctx.logp = inputs[0]

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        if torch.is_grad_enabled():  # create_graph=True, torch.func.grad: this backward is itself
            grad = _FirstOrderOnly.apply(grad, ctx.logp)  # a graph, differentiable in grad_output only
        return grad * grad_output, None

    @staticmethod
    def vmap(info: Any, in_dims: Any, *args: Any) -> Any:  # (torch's own message names its internals)
        raise RuntimeError(
            "softgate_loss does not support torch.func.vmap: call it once with the whole batch "
            "(the service batches the sequences itself)"
        )


# a remote call, never traced: torch.compile of a step that calls it breaks the graph here
# (dynamo stepped into the client and failed on the response's read-only buffers)
@torch.compiler.disable
def softgate_loss(
    logp: torch.Tensor,
    old_logp: Any = None,
    *,
    client: SoftgateClient,
    mask: Any = None,
    offsets: Any = None,
    lengths: Any = None,
    rewards: Any = None,
    group_ids: Any = None,
    advantages: Any = None,
    ref_logp: Any = None,
    rollout_logp: Any = None,
    sum_pi_squared: Any = None,
    return_result: bool = False,
    timeout: float | None = None,
    **config: Any,
) -> Any:
    """The service's scalar loss for `logp` (padded [B, T] with `mask`, or flat ragged [N] with
    `offsets` / `lengths`), differentiable w.r.t. `logp` with the service's exact gradient.

    `old_logp` None means on-policy (old = logp). `config` takes the keyword options of
    `SoftgateClient.loss` (objective="sapo", tau_pos=..., aggregation="token_mean", ...).
    The returned tensor has the full result (metrics, per-token outputs) as `.softgate_result`;
    with `return_result=True` the call returns `(loss, result)`.
    """
    if not isinstance(logp, torch.Tensor):
        raise TypeError("softgate_loss: logp must be a torch.Tensor")
    if not callable(getattr(client, "loss", None)):
        raise TypeError(f"softgate_loss: client must be a SoftgateClient, got {type(client).__name__}")
    if not isinstance(return_result, bool):
        raise TypeError(f"softgate_loss: return_result must be a bool, got {return_result!r}")
    if not logp.is_floating_point():  # (the loss, in logp's dtype, was truncated: tensor(-1) for -1.27)
        raise invalid_argument(
            "batch.logp",
            f"bad_dtype: {logp.dtype}; logp must be a floating-point tensor to be differentiated "
            "(float32 or float64)",
        )

    results: list[LossResult] = []

    def compute(lp: torch.Tensor) -> LossResult:
        r = client.loss(
            lp,
            old_logp,
            mask=mask,
            offsets=offsets,
            lengths=lengths,
            rewards=rewards,
            group_ids=group_ids,
            advantages=advantages,
            ref_logp=ref_logp,
            rollout_logp=rollout_logp,
            sum_pi_squared=sum_pi_squared,
            timeout=timeout,
            **config,
        )
        results.append(r)
        return r

    loss, _ = SoftgateLossFunction.apply(logp, compute)
    result = results[-1]
    loss.softgate_result = result  # type: ignore[attr-defined]
    if return_result:
        return loss, result
    return loss


# the float32 temporaries sum_pi_squared holds at a time: two [chunk, V] (the scaled logits, softmax)
SUM_PI_SQUARED_CHUNK_BYTES = 256 * 1024 * 1024


def sum_pi_squared(
    logits: torch.Tensor, temperature: float = 1.0, chunk_bytes: int = SUM_PI_SQUARED_CHUNK_BYTES
) -> torch.Tensor:
    """Each token's sum of squared probabilities over the vocabulary, sum softmax(z)^2 with
    z = logits / temperature, from the logits [..., V] that gave its old_logp (aligned as
    old_logp is: a shifted slice is read in place, not copied), in float32, divided by the
    probabilities' own sum squared (float32 softmax sums to 1 within ~2e-5 at a 152k
    vocabulary; this keeps ~5e-7). Without autograd, a chunk of tokens at a time, so that its
    float32 temporaries stay under `chunk_bytes` (but one token's): the input of
    optimal_token_baseline and of the variance_proxy_* metrics. A token whose logits give no
    distribution (all -inf, a NaN, +inf) is refused, naming it."""
    if not logits.is_floating_point() or logits.dim() < 1 or logits.shape[-1] < 1:
        raise invalid_argument(
            "logits",
            f"bad_shape: a floating [..., V] tensor with V >= 1; got {logits.dtype} {tuple(logits.shape)}",
        )
    try:
        ok = bool(temperature > 0 and temperature < float("inf"))
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise invalid_argument("temperature", f"out_of_range: {temperature!r} is not a finite number > 0")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise invalid_argument("chunk_bytes", f"out_of_range: {chunk_bytes!r} is not an integer >= 1")
    v = logits.shape[-1]
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    flat_out = out.view(-1)
    step = max(1, chunk_bytes // (8 * v))
    start = 0
    with torch.no_grad():
        for rows in _token_rows(logits.detach()):
            for i in range(0, rows.shape[0], step):
                z = rows[i : i + step].to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                p = torch.softmax(z.div_(temperature), -1)
                del z  # (two chunks at a time: the next one's copy comes after this one is gone)
                total = p.sum(-1)
                n = p.shape[0]
                flat_out[start : start + n] = p.square_().sum(-1).div_(total.square_())
                start += n
                del p
    bad = ~torch.isfinite(flat_out)
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0, 0])
        at = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), tuple(out.shape)))
        raise invalid_argument(
            f"logits{list(at)}",
            "non_finite: these logits give no distribution (every entry -inf, a NaN, +inf, or past float32 "
            "after the temperature); mask such a token's logits with finite values",
        )
    return out


def _token_rows(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Views [n, V] of x [..., V] that cover its tokens in order, without a copy: the whole of
    it when its leading dimensions merge, else one leading index at a time (logits[:, :-1])."""
    try:
        rows = x.view(-1, x.shape[-1])
    except RuntimeError:
        for sub in x.unbind(0):
            yield from _token_rows(sub)
        return
    yield rows
