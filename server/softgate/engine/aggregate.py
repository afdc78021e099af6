"""Aggregation: the per-token weight alpha_{i,t} with loss = sum alpha * l (alpha = 0 on masked
tokens), for token_mean, seq_mean_token_mean, seq_mean_token_sum and token_sum_norm.

N_tok defaults to this request's trained tokens, N_seq to its non-empty sequences (|y_i| > 0);
a caller splitting a step into shards passes the global values so shard sums equal the whole.
A zero default normaliser (fully masked batch) gives alpha = 0, so loss 0 and zero gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softgate.engine.config import AggregationConfig
from softgate.engine.segments import Segments


def token_weights(cfg: AggregationConfig, mf: Tensor, ylen: Tensor, seg: Segments) -> Tensor:
    """alpha per token. `mf` is the float loss mask [N], `ylen` the trained tokens per sequence [B]."""
    mode = cfg.mode
    if mode == "token_mean":
        if cfg.num_tokens:
            return mf / cfg.num_tokens
        return mf / mf.sum().clamp(min=1)  # counts are integers: 0 only when mf is all 0
    if mode == "token_sum_norm":
        assert cfg.constant is not None
        return mf / cfg.constant
    ns = (
        torch.as_tensor(cfg.num_seqs, dtype=mf.dtype, device=mf.device)
        if cfg.num_seqs
        else (ylen > 0).sum().to(mf.dtype).clamp(min=1)
    )
    if mode == "seq_mean_token_sum":
        return mf / ns
    if mode == "seq_mean_token_mean":
        w = torch.where(ylen > 0, 1 / (ylen.clamp(min=1) * ns), torch.zeros_like(ylen))
        return seg.expand(w) * mf
    raise ValueError(f"unknown aggregation mode {mode!r}")
