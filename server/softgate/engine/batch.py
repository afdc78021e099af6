"""The ragged batch: flat per-token tensors plus per-sequence offsets. No padding anywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    """A batch of B sequences holding N response tokens in total.

    Token tensors are 1-D of length N (float32 or float64); sequence i owns tokens
    `offsets[i]:offsets[i+1]` (`offsets`: any integer dtype, length B+1, offsets[0] = 0,
    non-decreasing, offsets[B] = N). Either `rewards` + `group_ids` (per sequence) or
    `advantages` (length B per sequence, or N per token) must be given.
    """

    logp: Tensor
    offsets: Tensor
    old_logp: Tensor | None = None  # None: on-policy, old = logp
    mask: Tensor | None = None  # bool or 0/1, None: every token trained on
    ref_logp: Tensor | None = None  # needed when a KL term is configured
    rollout_logp: Tensor | None = None  # needed when a mismatch correction is configured
    rewards: Tensor | None = None  # [B]
    group_ids: Tensor | None = None  # [B] any integer dtype, groups need not be contiguous
    advantages: Tensor | None = None  # [B] or [N], given by the caller
    # "sequence" or "token"; None infers it from the length of `advantages` ([B] or [N]).
    # Needed only when B == N and some sequence is not exactly one token long.
    advantage_level: str | None = None
    # [N] sum over the vocabulary of each token's squared probabilities under the old policy:
    # needed by the optimal_token_baseline estimator (token_baseline.py)
    sum_pi_squared: Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.logp.numel())

    @staticmethod
    def offsets_from_lengths(lengths: Tensor) -> Tensor:
        """offsets[0] = 0, offsets[i+1] = offsets[i] + lengths[i], as int64."""
        out = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(lengths.to(torch.int64), 0, out=out[1:])
        return out
