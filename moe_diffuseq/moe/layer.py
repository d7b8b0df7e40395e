"""The mixture-of-experts feed-forward layer and its dense counterpart."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .experts import DISPATCH, Experts
from .losses import load_balancing_loss, router_entropy, router_z_loss
from .router import TopKRouter


@dataclass
class RouterStats:
    """What one MoE layer's router did in one forward pass (padding excluded)."""

    load_balancing_loss: torch.Tensor  # scalar, 1.0 at perfect balance
    z_loss: torch.Tensor  # scalar
    expert_fraction: torch.Tensor  # (E,) fraction of routed slots per expert (before drops)
    dropped_fraction: torch.Tensor  # scalar, fraction of slots dropped by the capacity
    entropy: torch.Tensor  # scalar, mean router entropy in nats


def capacity_keep(expert_index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(N, k) bool: which slots fit their expert's capacity.

    Priority is first choices before second choices, then token order (as in GShard/Switch).
    """
    n_tokens, top_k = expert_index.shape
    by_priority = expert_index.t().reshape(-1)  # (k*N,) slot-major
    one_hot = F.one_hot(by_priority, num_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of the slot within its expert
    return (position < capacity).view(top_k, n_tokens).t()


class MoEFeedForward(nn.Module):
    """Top-k routed mixture of GELU MLP experts.

    Args:
        d_model: width of the tokens.
        d_hidden: hidden width of each expert.
        num_experts: E.
        top_k: experts per token.
        capacity_factor: None for dropless; else each expert takes at most
            ceil(capacity_factor * N * k / E) slots and overflow slots are dropped (their
            tokens then pass through the residual only).
        jitter: multiplicative router input noise in training.
        dispatch: "sorted" (fast) or "looped" (reference).
        shared_expert: add one expert that every token uses, besides the routed ones.
        routed_scale: factor on the routed experts' weighted sum (their weights sum to 1).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        jitter: float = 0.0,
        dispatch: str = "sorted",
        shared_expert: bool = False,
        routed_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch={dispatch!r} is not one of {sorted(DISPATCH)}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.dispatch = dispatch
        self.routed_scale = routed_scale
        self.router = TopKRouter(d_model, num_experts, top_k, jitter)
        self.experts = Experts(num_experts, d_model, d_hidden)
        self.shared = DenseFeedForward(d_model, d_hidden) if shared_expert else None

    @classmethod
    def from_config(cls, d_model: int, config: MoEConfig) -> MoEFeedForward:
        """The layer that ``config`` describes, at width ``d_model``."""
        return cls(
            d_model, config.expert_hidden, config.num_experts, config.top_k,
            capacity_factor=config.capacity_factor, jitter=config.jitter, dispatch=config.dispatch,
            shared_expert=config.shared_expert, routed_scale=config.routed_scale,
        )

    def forward(self, x: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats]:
        """x: (..., d_model); padding_mask: x.shape[:-1] bool, True on padding (output 0 there)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        # Route the real tokens only; without padding, skip the gather and the scatter back.
        padded = padding_mask is not None and bool(padding_mask.any())
        real = (~padding_mask).reshape(-1).nonzero().squeeze(1) if padded else None
        tokens = flat if real is None else flat.index_select(0, real)  # (N, d) real tokens only

        routing = self.router(tokens)
        index, weight = routing.expert_index, routing.expert_weight
        n_tokens = tokens.shape[0]
        slot_token = torch.arange(n_tokens, device=x.device).repeat_interleave(self.top_k)
        slot_expert, slot_weight = index.reshape(-1), weight.reshape(-1)
        if self.routed_scale != 1.0:
            slot_weight = slot_weight * self.routed_scale
        keep = None
        if self.capacity_factor is not None and n_tokens > 0:
            capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.num_experts)
            keep = capacity_keep(index, self.num_experts, capacity)
            kept = keep.reshape(-1)
            slot_token, slot_expert, slot_weight = (slot_token[kept], slot_expert[kept],
                                                    slot_weight[kept])
        out = DISPATCH[self.dispatch](self.experts, tokens, slot_token, slot_expert, slot_weight)
        if self.shared is not None:
            out = out + self.shared(tokens)[0]

        if real is not None:
            out = flat.new_zeros(flat.shape, dtype=out.dtype).index_copy(0, real, out)
        counts = torch.bincount(index.reshape(-1), minlength=self.num_experts).float()
        stats = RouterStats(
            load_balancing_loss=load_balancing_loss(routing.probs, index, self.num_experts),
            z_loss=router_z_loss(routing.logits),
            expert_fraction=counts / max(1, index.numel()),
            dropped_fraction=(~keep).float().mean() if keep is not None else counts.new_zeros(()),
            entropy=router_entropy(routing.probs),
        )
        return out.reshape(shape), stats


class DenseFeedForward(nn.Module):
    """A plain GELU MLP with the MoE layer's interface (its stats are None)."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return self.fc2(F.gelu(self.fc1(x))), None


def router_metrics(stats: list[RouterStats]) -> dict[str, torch.Tensor | float]:
    """Per-layer expert load, mean router entropy and dropped fraction, named for logging."""
    metrics: dict[str, torch.Tensor | float] = {}
    for layer, s in enumerate(stats):
        for e, frac in enumerate(s.expert_fraction.tolist()):
            metrics[f"moe/layer{layer}/load_e{e}"] = frac
    metrics["moe/entropy"] = torch.stack([s.entropy for s in stats]).mean()
    metrics["moe/dropped_fraction"] = torch.stack([s.dropped_fraction for s in stats]).mean()
    return metrics
