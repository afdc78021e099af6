"""Segment (per-sequence) reductions over offsets, without padding.

Sums give the same bits on every call. On the CPU numpy's `add.reduceat` sums each sequence
(pairwise, in the values' dtype); `index_add_`, which added token by token, took 55-190 ms at
16M tokens against ~4 and was 10x less accurate. On CUDA `index_add_` adds with atomics in
whatever order the threads run (results differed in the last bits from call to call on an
H200), so there each run of consecutive values is summed by a segmented reduction
(`torch.segment_reduce`, cub's DeviceSegmentedReduce: a fixed order per segment).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor


class Segments:
    """The ragged layout of a batch: `lengths` [B], per-sequence sums and counts, and (for GPU
    gathers) the sequence id of every token [N]."""

    def __init__(self, offsets: Tensor, num_tokens: int) -> None:
        self.offsets = offsets
        self.num_tokens = num_tokens
        # on the CPU through numpy (offsets are int64 after validation): 4k tokens ~70 -> ~20
        # us between requests, cache-cold. A slice, not np.diff: numpy's Python-level functions
        # cost ~20 us each after an idle millisecond, a slice ~8
        # `host_lengths`: the same lengths as a numpy array on the host (None elsewhere), for
        # the host's numpy steps without a conversion each (~2-5 us a small call)
        if host_shortcuts(offsets.device):
            o = offsets.numpy()
            self.host_lengths: np.ndarray | None = o[1:] - o[:-1]
            self.lengths = torch.from_numpy(self.host_lengths)
        else:
            self.host_lengths = None
            self.lengths = offsets[1:] - offsets[:-1]
        self.num_seqs = int(self.lengths.numel())

    @functools.cached_property
    def ids(self) -> Tensor:
        """The sequence id of every token [N], int32 (half the memory traffic of int64 in every
        gather; B < 2^31 always), for the gathers of a GPU kernel (the CPU engine expands
        per-sequence values instead, see compute_loss). Built on first use: 64 MB at 16M tokens."""
        return torch.repeat_interleave(self.lengths.to(torch.int32), output_size=self.num_tokens)

    def expand(self, x: Tensor) -> Tensor:
        """A per-sequence tensor at every token ([B] -> [N]): numpy's repeat on the host, a
        gather by sequence id elsewhere."""
        if self.host_lengths is not None:
            return torch.from_numpy(x.detach().numpy().repeat(self.host_lengths))
        return x[self.ids]

    def sum(self, x: Tensor) -> Tensor:
        """Per-sequence sum of a per-token tensor ([N] -> [B]); 0 for empty sequences."""
        if use_segment_reduce(x.device):
            return segment_sum(x, self.offsets)
        if host_shortcuts(x.device):
            return torch.from_numpy(_reduceat(x.detach().contiguous().numpy(), self.offsets.numpy()))
        return torch.zeros(self.num_seqs, dtype=x.dtype, device=x.device).index_add_(0, self.ids, x)

    def mean(self, x: Tensor, trained: Tensor) -> Tensor:
        """Per-sequence mean of a per-token tensor over each sequence's `trained` tokens ([N] ->
        [B]; `x` 0 on the others); 0 for a sequence without any."""
        return self.sum(x) / trained.clamp(min=1).to(x.dtype)

    def max(self, x: Tensor) -> Tensor:
        """Per-sequence maximum of a per-token tensor ([N] -> [B]); -inf for empty sequences."""
        if self.num_tokens == 0 or self.num_seqs == 0:  # (no zero-size launch on CUDA)
            return torch.full((self.num_seqs,), -math.inf, dtype=x.dtype, device=x.device)
        return torch.segment_reduce(x, "max", offsets=self.offsets, initial=-math.inf)

    def count(self, m: Tensor) -> Tensor:
        """Per-sequence number of True values of a bool tensor ([N] -> [B], int64), exact."""
        if self.num_tokens == 0:
            return torch.zeros(self.num_seqs, dtype=torch.int64, device=m.device)
        if (
            self.num_tokens >= _WORDS_MIN_TOKENS
            and host_shortcuts(m.device)
            and m.is_contiguous()
            and m.data_ptr() % 8 == 0
        ):
            p = _prefix_counts_by_words(m, self.offsets)
            return p[1:] - p[:-1]
        c = torch.cumsum(m, 0, dtype=torch.int32 if self.num_tokens < 2**31 else torch.int64)
        end = torch.where(self.offsets[1:] > 0, c[(self.offsets[1:] - 1).clamp(min=0)], 0)
        start = torch.where(self.offsets[:-1] > 0, c[(self.offsets[:-1] - 1).clamp(min=0)], 0)
        return (end - start).to(torch.int64)


def _reduceat(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sums of the runs x[offsets[i]:offsets[i+1]], 0 for empty runs (reduceat alone would give
    an empty run the value at its offset)."""
    out = np.zeros(len(offsets) - 1, dtype=x.dtype)
    nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
    if nonempty.size:
        out[nonempty] = np.add.reduceat(x, offsets[nonempty])
    return out


def host_shortcuts(device: torch.device) -> bool:
    """Whether work on `device` takes the CPU's shortcuts (numpy for lengths, sums, weights and
    offsets; per-sequence values expanded to their tokens before the kernel) rather than the
    device-generic torch code a GPU runs. Tests turn it off to run the GPU's path on the CPU."""
    return device.type == "cpu"


def use_segment_reduce(device: torch.device) -> bool:
    """Whether sums on `device` go through `segment_sum` (CUDA) rather than `index_add_`."""
    return device.type == "cuda"


def segment_sum(x: Tensor, offsets: Tensor) -> Tensor:
    """Sums of the runs x[offsets[i]:offsets[i+1]] ([N] -> [len(offsets) - 1]), 0 for empty
    runs, each added in a fixed order."""
    b = offsets.numel() - 1
    if b <= 0 or x.numel() == 0:
        return torch.zeros(max(b, 0), dtype=x.dtype, device=x.device)
    return torch.segment_reduce(x, "sum", offsets=offsets, unsafe=True, initial=0)


# From this many tokens on, CPU counts read the mask 8 bytes at a time: torch.cumsum over N
# tokens is a sequential pass plus an int32 copy of the mask (~15 ms at 16M tokens, one core),
# the word sums below ~5 ms and parallel.
_WORDS_MIN_TOKENS = 1 << 16
_ONES = 0x0101010101010101  # times a word of 0/1 bytes: their sum lands in the top byte
_LOW_BYTES = [(1 << (8 * r)) - 1 for r in range(8)]


def _prefix_counts_by_words(m: Tensor, offsets: Tensor) -> Tensor:
    """Number of True values of `m` before each offset ([B+1], int64), exact. `m` is a
    contiguous, 8-byte aligned bool tensor of at least 8 elements on the CPU."""
    n = m.numel()
    nw = n // 8
    u = m.view(torch.uint8)
    w = u[: nw * 8].view(torch.int64)
    before = torch.zeros(nw + 1, dtype=torch.int64)
    torch.cumsum((w * _ONES) >> 56, 0, out=before[1:])  # before[j]: True values in words < j
    q = torch.div(offsets, 8, rounding_mode="floor")
    r = offsets - 8 * q
    low = torch.tensor(_LOW_BYTES, dtype=torch.int64)[r]
    part = ((w[q.clamp(max=nw - 1)] & low) * _ONES) >> 56  # bytes of the offset's word before it
    if n > nw * 8:  # offsets in the last, partial word (< 8 tokens) count those tokens directly
        tail = torch.zeros(8, dtype=torch.int64)
        torch.cumsum(u[nw * 8 :], 0, out=tail[1 : n - nw * 8 + 1])
        part = torch.where(q >= nw, tail[r], part)
    return before[q.clamp(max=nw)] + part
