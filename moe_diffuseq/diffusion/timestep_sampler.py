"""Training timestep samplers: uniform, and DiffuSeq's loss-aware second-moment resampler."""

from __future__ import annotations

import torch
from torch import nn


class UniformSampler(nn.Module):
    """t ~ U{0, ..., T-1}, importance weight 1."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.steps,), 1.0 / self.steps, dtype=torch.float64)

    def sample(self, batch: int, device: torch.device, generator: torch.Generator | None = None):
        """Returns t (B,) long and importance weights (B,) float = 1 / (T p_t)."""
        probs = self.probabilities().to(device)
        t = torch.multinomial(probs, batch, replacement=True, generator=generator)
        weights = 1.0 / (self.steps * probs[t])
        return t, weights.float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from losses."""


class LossSecondMomentSampler(UniformSampler):
    """p_t proportional to sqrt(E[loss_t^2]) over the last ``history`` losses of each t,
    mixed with ``uniform_prob`` of uniform; uniform until every t has a full history.

    The history is a buffer, so it travels in checkpoints and a resumed run samples alike.
    """

    def __init__(self, steps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(steps)
        self.uniform_prob = uniform_prob
        self.register_buffer("loss_history", torch.zeros(steps, history, dtype=torch.float64))
        self.register_buffer("loss_counts", torch.zeros(steps, dtype=torch.long))

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.loss_history.shape[1]).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().probabilities()
        weights = self.loss_history.square().mean(dim=-1).sqrt().cpu()
        weights = weights / weights.sum()
        return weights * (1.0 - self.uniform_prob) + self.uniform_prob / self.steps

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses (in DDP, pass the all-gathered t and losses)."""
        size = self.loss_history.shape[1]
        for step, loss in zip(t.tolist(), losses.detach().double().tolist(), strict=True):
            count = int(self.loss_counts[step])
            if count == size:
                self.loss_history[step, :-1] = self.loss_history[step, 1:].clone()
                self.loss_history[step, -1] = loss
            else:
                self.loss_history[step, count] = loss
                self.loss_counts[step] = count + 1


class HighNoiseSampler(UniformSampler):
    """p_t proportional to (t + 1)^power (power 1: mean t = 2T/3), importance weight 1: training
    time moves to the high noise where the denoiser must write from the source, and the objective
    moves with it (unlike loss_aware, whose importance weights keep the uniform objective)."""

    def __init__(self, steps: int, power: float = 1.0) -> None:
        super().__init__(steps)
        self.power = power

    def probabilities(self) -> torch.Tensor:
        ramp = torch.arange(1, self.steps + 1, dtype=torch.float64) ** self.power
        return ramp / ramp.sum()

    def sample(self, batch: int, device: torch.device, generator: torch.Generator | None = None):
        t = torch.multinomial(self.probabilities().to(device), batch, replacement=True,
                              generator=generator)
        return t, torch.ones(batch, device=device)


def make_timestep_sampler(name: str, steps: int, power: float = 1.0) -> UniformSampler:
    """The sampler called ``name``; ``power`` is high_noise's exponent."""
    if name == "uniform":
        return UniformSampler(steps)
    if name == "loss_aware":
        return LossSecondMomentSampler(steps)
    if name == "high_noise":
        return HighNoiseSampler(steps, power)
    raise ValueError(f"diffusion.timestep_sampler={name!r}: "
                     "expected uniform, loss_aware or high_noise")
