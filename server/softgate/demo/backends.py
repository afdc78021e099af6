"""Where the demo's losses and gradients come from: a running softgate over gRPC (the default,
through the client's torch adapter ``softgate_loss``), or the in-process engine
(``--in-process``: no network, the same math).

Either way ``loss(...)`` returns a scalar tensor whose backward hands the service's exact
per-token gradient c = d loss / d logp to ``logp`` (``logp.backward(c)``)."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from softgate.demo.runs import RunSpec
from softgate.engine.objectives import OBJECTIVE_KIND


class LossBackend(Protocol):
    def loss(
        self,
        spec: RunSpec,
        *,
        logp: torch.Tensor,  # [b, T] padded, requires grad
        old_logp: torch.Tensor,  # [b, T], the sampler's log-probs
        mask: torch.Tensor,  # [b, T] bool
        rewards: torch.Tensor,  # [b]
        group_ids: torch.Tensor,  # [b] int64
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def close(self) -> None: ...


def _f(m: dict[str, Any], key: str) -> float | None:
    v = m.get(key)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _by_sign(m: dict[str, Any], pos_key: str, neg_key: str) -> float:
    """Share over all signed tokens of a per-sign fraction pair (weighted by the sign counts)."""
    pos, neg = _f(m, pos_key), _f(m, neg_key)
    n_pos, n_neg = _f(m, "tokens_pos"), _f(m, "tokens_neg")
    if n_pos is not None and n_neg is not None and n_pos + n_neg > 0:
        return ((pos or 0.0) * n_pos + (neg or 0.0) * n_neg) / (n_pos + n_neg)
    vals = [v for v in (pos, neg) if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


def curve_metrics(objective: str, m: dict[str, Any]) -> dict[str, float]:
    """The service's batch metrics under the demo's curve names.

    ``trust_region`` is the share of tokens with a nonzero advantage that the trust region acts
    on: for SAPO the gate saturation (gate weight w below 0.5), for the clip objectives the
    clip fraction (A>0 tokens above 1+eps_high, A<0 tokens below 1-eps_low; GMPO and DPPO by
    their own bounds). It and
    ``grad_retained`` are NaN (left out of every average) for a mini-batch without such tokens:
    there is no gradient to gate, and the engine's stand-ins (0 and 1) would read as a trust
    region that let everything through."""
    if OBJECTIVE_KIND.get(objective) == "sapo":  # (sapo_seq too)
        trust = _by_sign(m, "gate_saturation_pos", "gate_saturation_neg")
    else:
        trust = _by_sign(m, "clip_high", "clip_low")

    def get(key: str) -> float:
        v = _f(m, key)
        return math.nan if v is None else v

    signal = (_f(m, "tokens_pos") or 0.0) + (_f(m, "tokens_neg") or 0.0) > 0
    return {
        "trust_region": trust if signal else math.nan,
        "grad_retained": get("grad_retained") if signal else math.nan,
        "approx_kl": get("approx_kl"),
        "ratio_max": get("ratio_max"),
        "degenerate_groups": get("degenerate_group_frac"),
    }


class GrpcBackend:
    """Losses from a softgate server, through the client's torch adapter; `client_options`:
    SoftgateClient's keywords (TLS)."""

    def __init__(self, target: str, **client_options: Any) -> None:
        from softgate_client import SoftgateClient

        self.client = SoftgateClient(target, run="softgate-demo", **client_options)
        self.calls: dict[str, int] = {}  # loss calls per run (clip_cov's seed: RunSpec.call_params)

    def loss(self, spec, *, logp, old_logp, mask, rewards, group_ids):
        from softgate_client.torch import softgate_loss

        call = self.calls[spec.key] = self.calls.get(spec.key, -1) + 1

        loss, result = softgate_loss(
            logp,
            old_logp,
            client=self.client,
            mask=mask,
            rewards=rewards,
            group_ids=group_ids,
            objective=spec.objective,
            return_result=True,
            **spec.call_params(call),
        )
        return loss, curve_metrics(spec.objective, dict(result.metrics))

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


class EngineBackend:
    """The same computation without the network: softgate's engine in this process."""

    def __init__(self) -> None:
        from softgate.engine import Engine

        self.engine = Engine(device="cpu", compile=False)
        self.calls: dict[str, int] = {}  # loss calls per run (clip_cov's seed: RunSpec.call_params)

    def loss(self, spec, *, logp, old_logp, mask, rewards, group_ids):
        from softgate.engine import OBJECTIVES, Batch, LossConfig

        call = self.calls[spec.key] = self.calls.get(spec.key, -1) + 1
        mask = mask.bool()
        lengths = mask.sum(dim=1)
        batch = Batch(
            logp=logp.detach()[mask],  # ragged: each row's tokens are a prefix, so rows stay contiguous
            offsets=Batch.offsets_from_lengths(lengths),
            old_logp=old_logp[mask],
            rewards=rewards,
            group_ids=group_ids.to(torch.int64),
        )
        config = LossConfig(objective=OBJECTIVES[spec.objective](**spec.call_params(call)))
        result = self.engine.loss(batch, config)
        grad = torch.zeros_like(logp)
        grad[mask] = result.grad.to(device=logp.device, dtype=logp.dtype)
        # a scalar with the engine's loss value whose gradient w.r.t. logp is exactly `grad`
        loss = (logp * grad).sum() - (logp.detach() * grad).sum() + result.loss
        return loss, curve_metrics(spec.objective, dict(result.metrics))

    def close(self) -> None:
        pass


__all__ = ["EngineBackend", "GrpcBackend", "LossBackend", "curve_metrics"]
