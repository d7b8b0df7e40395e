"""Router losses as pure functions. Padding is excluded by the caller."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # layer.py imports this module
    from .layer import RouterStats


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor,
                        num_experts: int) -> torch.Tensor:
    """E * sum_e f_e * P_e; 1.0 at perfect balance.

    probs: (N, E) router probabilities of the N real tokens; expert_index: (N, k) chosen
    experts. f_e is the fraction of the N*k routed slots that went to e (so it sums to 1),
    P_e the mean router probability of e.
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = torch.bincount(expert_index.flatten(), minlength=num_experts).to(probs.dtype)
    fraction = counts / expert_index.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(z_t)^2 over the N real tokens; logits (N, E)."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the router distribution; log(E) is uniform, 0 is one-hot."""
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


def router_losses(stats: list[RouterStats]) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-balance and z-loss, averaged over the MoE layers (zeros without MoE layers)."""
    if not stats:
        zero = torch.zeros(())
        return zero, zero
    balance = torch.stack([s.load_balancing_loss for s in stats]).mean()
    z_loss = torch.stack([s.z_loss for s in stats]).mean()
    return balance, z_loss
