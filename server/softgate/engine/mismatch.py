"""Train/inference mismatch weights v = exp(old - rollout) (stop-gradient), per token or per
sequence (exp of the masked sum), clamped to [floor, cap] (TIS; floor 0 by default) or zeroed
outside [lo, hi] ("IcePop").

The log-weight is not clamped: exp may overflow to inf, which the truncation (min with cap) or
the window (inf > hi: zeroed) turns into the spec's finite weight, and a very negative one
underflows to 0, as exp does. v multiplies the policy objective's per-token loss (and so its
gradient); the KL term is not weighted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softgate.engine.segments import Segments


def mismatch_log_weights(level: str, lv_raw: Tensor, seg: Segments) -> Tensor:
    """log v: per token, lv_raw = old - rollout (0 on masked tokens), or per sequence ([B],
    the masked sum) when level is 'sequence'."""
    return seg.sum(lv_raw) if level == "sequence" else lv_raw


def mismatch_weights(mode: str, lv: Tensor, prm: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(v, changed) per token from the log-weight; `changed` marks tokens whose weight was
    clamped to [prm["floor"], prm["cap"]] ('truncate') or zeroed outside [prm["vlo"],
    prm["vhi"]] ('mask')."""
    v = torch.exp(lv)
    if mode == "truncate":
        floor, cap = prm["floor"], prm["cap"]
        changed = (v > cap) | (v < floor)
        return torch.clamp(v, min=floor, max=cap), changed
    changed = (v < prm["vlo"]) | (v > prm["vhi"])
    return torch.where(changed, torch.zeros_like(v), v), changed
