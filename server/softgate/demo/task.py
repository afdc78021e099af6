"""The verifiable task: write a digit string whose digit sum hits the target in the prompt.

Prompt: the target S (0..max_target) as two digit tokens and a separator, e.g. ``1 7 =``.
Response: up to ``max_len`` digit tokens, ended by EOS (or cut at ``max_len``).
Reward (graded, in [0, 1]): ``1 - min(|sum(digits) - S|, reward_scale) / reward_scale``; an
exact hit scores 1 and counts as a success. An empty answer sums to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DIGITS = 10
EOS = 10  # ends a response
SEP = 11  # ends the prompt
VOCAB = 12  # input vocabulary (digits, EOS, SEP)
ACTIONS = 11  # what the policy can emit: digits and EOS


@dataclass(frozen=True)
class DigitSumTask:
    max_target: int = 27
    max_len: int = 5
    reward_scale: float = 5.0

    def sample_targets(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.max_target + 1, (n,), generator=generator)

    def prompts(self, targets: Tensor) -> Tensor:
        """[n, 3] int64 prompt tokens: tens digit, ones digit, SEP."""
        return torch.stack([targets // 10, targets % 10, torch.full_like(targets, SEP)], dim=1)

    def rewards(self, targets: Tensor, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Graded reward and exact-hit flag of responses ``tokens`` [n, T] with ``lengths`` [n]
        (response tokens including a final EOS if any)."""
        t = torch.arange(tokens.shape[1]).unsqueeze(0)
        is_digit = (t < lengths.unsqueeze(1)) & (tokens < DIGITS)
        sums = torch.where(is_digit, tokens, torch.zeros_like(tokens)).sum(dim=1)
        err = (sums - targets).abs().to(torch.float32)
        reward = 1.0 - err.clamp(max=self.reward_scale) / self.reward_scale
        return reward, err == 0
