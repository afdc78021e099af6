"""PyTorch adapter: the service's loss as a differentiable scalar.

    from softgate_client import SoftgateClient
    from softgate_client.torch import softgate_loss

    client = SoftgateClient("softgate:50051", run="qwen3-sapo")
    logp = model_token_logprobs(batch)                      # [B, T], requires grad
    loss = softgate_loss(logp, old_logp, client=client, mask=response_mask,
                         rewards=rewards, group_ids=group_ids, objective="sapo")
    loss.backward()                                         # logp.grad = the service's exact gradient
    print(loss.softgate_result.metrics["clip_high"])

The forward pass sends the batch (detached, on the host) and gets back the loss and the exact
per-token gradient c = d loss / d logp; the backward pass hands `grad_output * c` to logp, so
the model's parameters receive exactly the gradient of the service's loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from softgate_client.client import LossResult, SoftgateClient

__all__ = ["SoftgateLossFunction", "softgate_loss"]


def _as_tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only views of the response bytes: never written to
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.to(device=like.device, dtype=like.dtype)


class SoftgateLossFunction(torch.autograd.Function):
    """loss = service(logp); d loss / d logp = the service's per-token gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logp: torch.Tensor, compute: Callable[[torch.Tensor], LossResult], box: dict[str, Any]
    ) -> torch.Tensor:
        result = compute(logp.detach())
        box["result"] = result
        ctx.save_for_backward(_as_tensor(result.grad, logp))
        return torch.tensor(result.loss, dtype=logp.dtype, device=logp.device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: a second derivative was asked for
            raise RuntimeError(
                "softgate_loss has no second derivative: the service returns d loss / d logp only, "
                "so backward with create_graph=True (a gradient penalty, Hessian-vector products) "
                "would silently drop its terms"
            )
        (grad,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad * grad_output, None, None


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

    def compute(lp: torch.Tensor) -> LossResult:
        return client.loss(
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
            timeout=timeout,
            **config,
        )

    box: dict[str, Any] = {}
    loss = SoftgateLossFunction.apply(logp, compute, box)
    result = box["result"]
    loss.softgate_result = result  # type: ignore[attr-defined]
    if return_result:
        return loss, result
    return loss
