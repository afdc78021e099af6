"""Aggregation: loss = sum alpha * l with alpha_{i,t} = m_{i,t} * w_i, where the per-sequence
weight w_i is 1/N_tok (token_mean), 1/(|y_i| N_seq) (seq_mean_token_mean), 1/N_seq
(seq_mean_token_sum) or 1/K (token_sum_norm).

N_tok defaults to this request's trained tokens, N_seq to its non-empty sequences (|y_i| > 0);
a caller splitting a step into shards passes the global values so shard sums equal the whole.
A zero default normaliser (fully masked batch) is taken as 1 (an empty sequence's
seq_mean_token_mean weight is 0): every alpha is 0 there, so loss 0 and zero gradient.
The KL term may have a mode of its own (KLConfig.aggregation), with the same normalisers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softgate.engine.config import AggregationConfig, LossConfig
from softgate.engine.segments import host_shortcuts


def kl_aggregation(config: LossConfig) -> AggregationConfig | None:
    """The KL term's aggregation where it has a mode of its own (KLConfig.aggregation, not the
    policy term's), with the policy term's normalisers; None: the policy term's."""
    kl = config.kl
    if kl is None or kl.aggregation is None or kl.aggregation == config.aggregation.mode:
        return None
    return dataclasses.replace(config.aggregation, mode=kl.aggregation)


def sequence_weights(cfg: AggregationConfig, ylen: Tensor | np.ndarray, dtype: torch.dtype) -> Tensor:
    """w_i per sequence [B] from the trained-token counts `ylen` [B] (int64, a tensor or, in
    host memory, a numpy array), on their device; one weight for every sequence (0-d) where
    the mode's is the same for all (every mode but seq_mean_token_mean), so that the kernel
    needs no per-token sequence id for it."""
    # on the host through numpy: these torch ops cost ~50 us a small call (cold), and the cast
    # too (torch's `.to`: ~15 us of a 4k call's engine in a loop; numpy's, the same rounding)
    if isinstance(ylen, np.ndarray) or host_shortcuts(ylen.device):
        w = _weights(cfg, ylen if isinstance(ylen, np.ndarray) else ylen.numpy(), np)
        np_dtype = _NP_FLOATS.get(dtype)
        if np_dtype is None:
            return torch.from_numpy(np.asarray(w)).to(dtype)
        if _given_normaliser(cfg):  # a weight may lie past float32's range: inf, refused later
            with np.errstate(over="ignore"):
                return torch.from_numpy(np.asarray(w, dtype=np_dtype))
        return torch.from_numpy(np.asarray(w, dtype=np_dtype))
    return torch.as_tensor(_weights(cfg, ylen.to(torch.float64), torch), device=ylen.device).to(dtype)


_NP_FLOATS: dict[torch.dtype, Any] = {torch.float32: np.float32, torch.float64: np.float64}


def _given_normaliser(cfg: AggregationConfig) -> bool:
    """Whether the caller gave a normaliser (any positive float): weights from this request's
    own counts (integers, at least 1) are at most 1."""
    return cfg.num_tokens is not None or cfg.num_seqs is not None or cfg.constant is not None


# (total, count of non-empty sequences (counts are >= 0: nonzero is non-empty), at least 1 of
# a count, at least 1 of each count): numpy's ufuncs called directly and Python's max on its
# ints, since numpy's Python-level functions and methods (`clip`, `sum`) cost ~2-17 us each in
# a small call, a ufunc on a scalar ~2
_NP_OPS: tuple[Any, ...] = (np.add.reduce, np.count_nonzero, max, np.maximum)
_TORCH_OPS: tuple[Any, ...] = (torch.sum, torch.count_nonzero, torch.clamp_min, torch.clamp_min)


def _weights(cfg: AggregationConfig, yl: Any, xp: Any) -> Any:
    """The weights of counts `yl` (int64 numpy or float64 torch: the same float64 operations,
    the same bits; the counts and their sums are exact), with `xp` numpy or torch: an array,
    or one float64 for all."""
    total, count, at_least_1, each_at_least_1 = _NP_OPS if xp is np else _TORCH_OPS
    mode = cfg.mode
    if mode == "token_mean":
        n = float(cfg.num_tokens) if cfg.num_tokens else at_least_1(total(yl), 1)
        return 1.0 / xp.asarray(n, dtype=xp.float64)
    if mode == "token_sum_norm":
        assert cfg.constant is not None
        return xp.asarray(1.0 / cfg.constant, dtype=xp.float64)
    ns = float(cfg.num_seqs) if cfg.num_seqs else at_least_1(count(yl), 1)
    if mode == "seq_mean_token_sum":
        return 1.0 / xp.asarray(ns, dtype=xp.float64)
    if mode == "seq_mean_token_mean":
        # 1 / (|y_i| N_seq), 0 for an empty sequence
        return xp.true_divide(yl > 0, each_at_least_1(yl, 1) * xp.asarray(ns, dtype=xp.float64))
    raise ValueError(f"unknown aggregation mode {mode!r}")
