"""Train/inference mismatch weights v = exp(old - rollout) (stop-gradient), per token or per
sequence (exp of the masked sum), truncated at `cap` (TIS) or zeroed outside [lo, hi] ("IcePop").

The log-weight is clamped to +-log_ratio_clamp before exp so v is always finite. v multiplies
the policy objective's per-token loss (and so its gradient); the KL term is not weighted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softgate.engine.segments import Segments


def mismatch_log_weights(level: str, lv_raw: Tensor, seg: Segments, clamp: float) -> Tensor:
    """Clamped log v: per token from lv_raw = old - rollout (0 on masked tokens), or per
    sequence ([B], from the masked sum) when level is 'sequence'."""
    if level == "sequence":
        return seg.sum(lv_raw).clamp(-clamp, clamp)
    return lv_raw.clamp(-clamp, clamp)


def mismatch_weights(mode: str, lv: Tensor, prm: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(v, changed) per token from the clamped log-weight; `changed` marks tokens whose weight
    was truncated at prm["cap"] ('truncate') or zeroed outside [prm["vlo"], prm["vhi"]] ('mask')."""
    v = torch.exp(lv)
    if mode == "truncate":
        cap = prm["cap"]
        changed = v > cap
        return torch.clamp(v, max=cap), changed
    changed = (v < prm["vlo"]) | (v > prm["vhi"])
    return torch.where(changed, torch.zeros_like(v), v), changed
