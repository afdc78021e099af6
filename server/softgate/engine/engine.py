"""Engine: the device-bound entry point every adapter calls. (Skeleton: the engine issue fills it.)"""

from __future__ import annotations

import torch
from torch import Tensor

from softgate.engine.batch import Batch
from softgate.engine.config import AdvantageConfig, LossConfig
from softgate.engine.result import AdvantageResult, LossResult


class Engine:
    """Computes advantages and losses on one device (CUDA when present, else CPU)."""

    def __init__(self, device: str | torch.device | None = None, compile: bool = True) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.compile = compile

    def loss(self, batch: Batch, config: LossConfig) -> LossResult:
        """Validate, move to the device, compute loss + exact per-token gradient + metrics."""
        raise NotImplementedError

    def advantages(
        self, rewards: Tensor, group_ids: Tensor, config: AdvantageConfig
    ) -> AdvantageResult:
        """Per-sequence advantages from rewards and group ids."""
        raise NotImplementedError

    def warmup(self) -> None:
        """Run one small batch through every code path so the first request is fast."""
        raise NotImplementedError
