"""Top-k softmax router, computed in fp32 with autocast off."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """Routing decision for N tokens."""

    logits: torch.Tensor  # (N, E) fp32
    probs: torch.Tensor  # (N, E) fp32 softmax
    expert_index: torch.Tensor  # (N, k) long
    expert_weight: torch.Tensor  # (N, k) fp32, renormalised to sum to 1 per token


class TopKRouter(nn.Module):
    """Linear router: softmax over experts, top-k, renormalised weights."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, jitter: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter = jitter
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (N, d_model)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = nn.functional.linear(x, self.proj.weight.float())  # (N, E)
            probs = logits.softmax(dim=-1)
            weight, index = probs.topk(self.top_k, dim=-1)
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return Routing(logits=logits, probs=probs, expert_index=index, expert_weight=weight)
