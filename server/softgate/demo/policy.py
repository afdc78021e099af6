"""A tiny autoregressive policy (embedding -> GRU -> logits), trained from scratch on CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from softgate.demo.task import ACTIONS, EOS, VOCAB


class GruPolicy(nn.Module):
    def __init__(self, hidden: int = 64, embed: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, ACTIONS)

    def forward(self, tokens: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out, h = self.gru(self.embed(tokens), h)
        return torch.log_softmax(self.head(out), dim=-1), h


@dataclass
class Rollout:
    prompts: Tensor  # [B, P] int64
    tokens: Tensor  # [B, T] int64, response tokens (padded with EOS after the end)
    mask: Tensor  # [B, T] bool, True on response tokens (digits and the final EOS)
    lengths: Tensor  # [B] int64
    old_logp: Tensor  # [B, T] float32, log-prob of each sampled token at sampling time


@torch.no_grad()
def sample(policy: GruPolicy, prompts: Tensor, max_len: int, generator: torch.Generator) -> Rollout:
    """Sample one response per prompt row (temperature 1), recording the sampler's log-probs."""
    b = prompts.shape[0]
    _, h = policy(prompts[:, :-1])
    inp = prompts[:, -1:]
    tokens = torch.full((b, max_len), EOS, dtype=torch.int64)
    old = torch.zeros((b, max_len), dtype=torch.float32)
    alive = torch.ones(b, dtype=torch.bool)
    mask = torch.zeros((b, max_len), dtype=torch.bool)
    for t in range(max_len):
        logp, h = policy(inp, h)
        logp = logp[:, 0]
        tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        tok = torch.where(alive, tok, torch.full_like(tok, EOS))
        mask[:, t] = alive
        tokens[:, t] = tok
        old[:, t] = logp.gather(1, tok.unsqueeze(1)).squeeze(1)
        alive = alive & (tok != EOS)
        inp = tok.unsqueeze(1)
    return Rollout(prompts, tokens, mask, mask.sum(dim=1), old)


def token_logp(policy: GruPolicy, prompts: Tensor, tokens: Tensor) -> Tensor:
    """Teacher-forced log-prob [B, T] of each response token under the current policy."""
    seq = torch.cat([prompts, tokens[:, :-1]], dim=1)
    logp, _ = policy(seq)
    logp = logp[:, prompts.shape[1] - 1 :]
    return logp.gather(2, tokens.unsqueeze(2)).squeeze(2)
