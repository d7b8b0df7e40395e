"""Noise schedules alpha_bar(t) over integer steps 0..T-1, as in DiffuSeq."""

from __future__ import annotations

import math

import torch
from torch import nn


def alpha_bar_fn(name: str):
    """Continuous alpha_bar on [0, 1] for the named schedule (None for linear betas)."""
    if name == "sqrt":
        return lambda s: 1.0 - math.sqrt(s + 1e-4)
    if name == "cosine":
        return lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    if name == "linear":
        return None
    raise ValueError(f"diffusion.schedule={name!r}: expected sqrt, cosine or linear")


def make_betas(name: str, steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """(T,) float64 betas; alpha_bar_t = prod_{i<=t} (1 - beta_i)."""
    fn = alpha_bar_fn(name)
    if fn is None:
        scale = 1000.0 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    betas = [min(1.0 - fn((i + 1) / steps) / fn(i / steps), max_beta) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float64)


class NoiseSchedule(nn.Module):
    """Per-step coefficients of the forward process and its posterior (float64 buffers)."""

    def __init__(self, name: str = "sqrt", steps: int = 2000) -> None:
        super().__init__()
        self.name = name
        self.steps = steps
        betas = make_betas(name, steps)
        ab = torch.cumprod(1.0 - betas, dim=0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        posterior_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        buffers = {
            "betas": betas,
            "alpha_bar": ab,
            "alpha_bar_prev": ab_prev,
            "posterior_var": posterior_var,
            # log variance clipped at t=0, where the posterior variance is 0 (as DiffuSeq)
            "posterior_log_var": torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]])),
            # DiffuSeq's "fixed large" variance: beta_t (the posterior's at t = 0).
            "fixed_large_log_var": torch.log(torch.cat([posterior_var[1:2], betas[1:]])),
            "posterior_coef_x0": betas * ab_prev.sqrt() / (1.0 - ab),
            "posterior_coef_xt": (1.0 - ab_prev) * (1.0 - betas).sqrt() / (1.0 - ab),
        }
        for key, value in buffers.items():
            self.register_buffer(key, value, persistent=False)

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Coefficient ``name`` at steps t (B,), shaped to broadcast over ``like`` (B, ...)."""
        value = getattr(self, name)[t].to(like.dtype)
        return value.view(-1, *([1] * (like.dim() - 1)))

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t = log(alpha_t / sigma_t), float64."""
        ab = self.alpha_bar[t]
        return 0.5 * (torch.log(ab) - torch.log1p(-ab))
