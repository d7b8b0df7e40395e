"""The forward (noising) process: DiffuSeq partial noising with DiffuSeq-v2's soft absorbing state.

Coordinates: with the absorbing vector m, write y = z - m. Then the continuous part is
the ordinary DDPM process on y, y_t = sqrt(ab_t) * y0 + sqrt(1 - ab_t) * eps, so every
sampler works unchanged on y. With the soft absorbing state off, m = 0 and this is DiffuSeq.
"""

from __future__ import annotations

import torch

from .schedule import NoiseSchedule


def noised_start(emb: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor) -> torch.Tensor:
    """z0 = EMB(w) + sqrt(1 - alpha_bar_0) * eps: the embedding is noised slightly at t = 0."""
    return emb + (1.0 - schedule.alpha_bar[0]).sqrt().to(emb.dtype) * noise


def absorb(
    z_t: torch.Tensor,
    t: torch.Tensor,
    target_mask: torch.Tensor,
    mask_vector: torch.Tensor,
    schedule: NoiseSchedule,
    denoise_rate: float,
    uniform: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discrete part: each target position of the noised z_t becomes m with probability
    gamma * sqrt(1 - ab_t).

    uniform: (B, L) draws in [0, 1). Returns the new z_t and the (B, L) replaced mask.
    """
    rate = denoise_rate * (1.0 - schedule.alpha_bar[t]).sqrt().to(z_t.dtype)  # (B,)
    replaced = (uniform < rate[:, None]) & target_mask
    return torch.where(replaced[..., None], mask_vector.to(z_t.dtype), z_t), replaced


def q_sample(
    z0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    mask_vector: torch.Tensor,
    schedule: NoiseSchedule,
) -> torch.Tensor:
    """Continuous part: z_t = sqrt(ab_t) * (z0 - m) + sqrt(1 - ab_t) * eps + m."""
    m = mask_vector.to(z0.dtype)
    return (schedule.at("alpha_bar", t, z0).sqrt() * (z0 - m)
            + (1.0 - schedule.at("alpha_bar", t, z0)).sqrt() * noise + m)


def forward_process(
    z0: torch.Tensor,
    t: torch.Tensor,
    target_mask: torch.Tensor,
    mask_vector: torch.Tensor,
    schedule: NoiseSchedule,
    denoise_rate: float,
    generator: torch.Generator | None = None,
    absorbable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t for training: noise, absorb, and restore the source (partial noising).

    The replacement comes after the noise, as in DiffuSeq-v2's q_sample (continuous part, then
    discrete part): an absorbed position holds m exactly, a state the
    denoiser can tell apart from a noised token (replacing z0 before the noise would make
    it m + noise, like any noised token whose embedding is m).

    z0: (B, L, D); t: (B,); target_mask: (B, L) True where diffused; absorbable: (B, L) True
    where m may replace the token (None: every target position).
    Returns z_t and the (B, L) mask of positions replaced by m.
    """
    absorb_mask = target_mask if absorbable is None else target_mask & absorbable
    uniform = torch.rand(z0.shape[:2], device=z0.device, generator=generator)
    noise = torch.randn(z0.shape, device=z0.device, generator=generator, dtype=z0.dtype)
    z_t, replaced = absorb(q_sample(z0, t, noise, mask_vector, schedule), t, absorb_mask,
                           mask_vector, schedule, denoise_rate, uniform)
    return torch.where(target_mask[..., None], z_t, z0), replaced
