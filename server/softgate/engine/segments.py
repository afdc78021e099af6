"""Segment (per-sequence) reductions and broadcasts over offsets, without padding."""

from __future__ import annotations

import torch
from torch import Tensor


class Segments:
    """The ragged layout of a batch: `lengths` [B] and the sequence id of every token [N]."""

    def __init__(self, offsets: Tensor, num_tokens: int) -> None:
        self.offsets = offsets
        self.lengths = offsets[1:] - offsets[:-1]
        self.num_seqs = int(self.lengths.numel())
        self.num_tokens = num_tokens
        # 0,0,..,1,1,..: int32 halves the memory traffic of every gather (B < 2^31 always)
        self.ids = torch.repeat_interleave(self.lengths.to(torch.int32), output_size=num_tokens)

    def sum(self, x: Tensor) -> Tensor:
        """Per-sequence sum of a per-token tensor ([N] -> [B]); 0 for empty sequences."""
        return torch.zeros(self.num_seqs, dtype=x.dtype, device=x.device).index_add_(0, self.ids, x)

    def count(self, m: Tensor) -> Tensor:
        """Per-sequence number of True values of a bool tensor ([N] -> [B], int64), exact."""
        if self.num_tokens == 0:
            return torch.zeros(self.num_seqs, dtype=torch.int64, device=m.device)
        c = torch.cumsum(m, 0, dtype=torch.int32 if self.num_tokens < 2**31 else torch.int64)
        end = torch.where(self.offsets[1:] > 0, c[(self.offsets[1:] - 1).clamp(min=0)], 0)
        start = torch.where(self.offsets[:-1] > 0, c[(self.offsets[:-1] - 1).clamp(min=0)], 0)
        return (end - start).to(torch.int64)

    def expand(self, x: Tensor) -> Tensor:
        """Per-sequence values broadcast to their tokens ([B] -> [N])."""
        return x[self.ids]
