"""Samplers, registered by name: ``ancestral`` (all T steps, the reference), ``ddim`` and
``dpm_solver++`` (multistep, order 2, data prediction; the default) and its stochastic form
``sde_dpm_solver++``.

All work in shifted coordinates y = z - m (see forward_process.py), start the free
positions at y ~ N(0, I) (z ~ m + N(0, I)), keep anchored positions (the source, and any
fixed target span) at their clean embeddings at every step, and return the denoiser's x0
prediction at t = 0. ``steps`` counts denoiser evaluations. Given ``start = (y_t, t)``, a
sampler starts from that noisy state at step t instead of from pure noise at T-1 (a restart).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .schedule import NoiseSchedule

VARIANCES = ("posterior", "fixed_large")
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t (B,L,D), t (B,)) -> x0_hat
Start = tuple[torch.Tensor, int]  # (y_t (B, L, D), t): where a restarted sampler begins


@dataclass
class SamplingProblem:
    """What is fixed and where: clean embeddings on anchored positions, noise elsewhere."""

    anchor: torch.Tensor  # (B, L, D) clean embeddings (read where anchor_mask)
    anchor_mask: torch.Tensor  # (B, L) bool: True where the position is given
    mask_vector: torch.Tensor  # (D,) the absorbing state m (zeros without it)

    def anchored(self, y: torch.Tensor) -> torch.Tensor:
        return torch.where(self.anchor_mask[..., None], self.anchor - self.mask_vector, y)


def timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "time_uniform",
              first: int | None = None) -> list[int]:
    """``steps`` distinct integer steps, decreasing from ``first`` (T-1 unless given) to 0."""
    last = schedule.steps - 1 if first is None else first
    steps = max(1, min(steps, last + 1))
    if steps == 1:
        return [0]
    if spacing == "time_uniform":
        return _unique_decreasing(
            torch.linspace(last, 0, steps, dtype=torch.float64).round().long().tolist())
    if spacing != "logsnr":
        raise ValueError(f"sampling.spacing={spacing!r}: expected time_uniform or logsnr")
    # On the host: the grid is a list of ints, whatever device the schedule's buffers are on.
    lam = schedule.log_snr(torch.arange(schedule.steps)).detach().double().cpu()
    # Uniform in log-SNR, rounded to the nearest integer step. Near t = T one integer step
    # spans a wide log-SNR range and neighbours collapse; densify until `steps` remain.
    for n in range(steps, 8 * (last + 1)):
        targets = torch.linspace(float(lam[last]), float(lam[0]), n, dtype=torch.float64)
        grid = _unique_decreasing((lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist())
        if len(grid) >= steps:
            break
    if len(grid) > steps:  # keep both ends and an even spread of the rest
        keep = torch.linspace(0, len(grid) - 1, steps).round().long().tolist()
        grid = [grid[i] for i in keep]
    return grid


def _unique_decreasing(grid: list[int]) -> list[int]:
    out: list[int] = []
    for t in grid:
        if not out or t < out[-1]:
            out.append(int(t))
    if out[-1] != 0:
        out.append(0)
    return out


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _predict(denoise: Denoise, problem: SamplingProblem, y: torch.Tensor, t: int) -> torch.Tensor:
    """The x0 prediction in y coordinates at integer step t."""
    m = problem.mask_vector
    t_batch = torch.full((y.shape[0],), t, dtype=torch.long, device=y.device)
    return problem.anchored(denoise(problem.anchored(y) + m, t_batch) - m)


def _initial(problem: SamplingProblem, schedule: NoiseSchedule, generator,
             start: Start | None) -> tuple[torch.Tensor, int]:
    """The state a sampler begins from and its step: pure noise at T-1, or ``start``."""
    if start is not None:
        return problem.anchored(start[0]), start[1]
    noise = torch.randn(problem.anchor.shape, generator=generator, device=problem.anchor.device)
    return problem.anchored(noise), schedule.steps - 1


def ancestral(denoise, problem, schedule, steps, spacing, generator, progress,
              variance="posterior", start=None) -> torch.Tensor:
    """DDPM ancestral sampling over every one of the T steps (``steps`` is ignored), with the
    posterior's variance or DiffuSeq's ``fixed_large`` one (beta_t)."""
    if variance not in VARIANCES:
        raise ValueError(f"sampling.variance={variance!r}: expected one of {VARIANCES}")
    log_var = f"{variance}_log_var"
    y, first = _initial(problem, schedule, generator, start)
    x0 = y
    for t in _progress(range(first, -1, -1), progress, "ancestral"):
        x0 = _predict(denoise, problem, y, t)
        t_b = torch.full((y.shape[0],), t, dtype=torch.long, device=y.device)
        mean = (schedule.at("posterior_coef_x0", t_b, y) * x0
                + schedule.at("posterior_coef_xt", t_b, y) * y)
        if t > 0:
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            y = problem.anchored(mean + (0.5 * schedule.at(log_var, t_b, y)).exp() * noise)
    return x0 + problem.mask_vector


def ddim(denoise, problem, schedule, steps, spacing, generator, progress,
         start=None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) on ``steps`` timesteps."""
    y, first = _initial(problem, schedule, generator, start)
    grid = timesteps(schedule, steps, spacing, first)
    ab = schedule.alpha_bar
    x0 = y
    for i in _progress(range(len(grid)), progress, "ddim"):
        t = grid[i]
        x0 = _predict(denoise, problem, y, t)
        if i + 1 == len(grid):
            break
        s = grid[i + 1]
        eps = (y - ab[t].sqrt().to(y.dtype) * x0) / (1.0 - ab[t]).sqrt().to(y.dtype)
        y = problem.anchored(ab[s].sqrt().to(y.dtype) * x0 + (1.0 - ab[s]).sqrt().to(y.dtype) * eps)
    return x0 + problem.mask_vector


def dpm_solver_pp(denoise, problem, schedule, steps, spacing, generator, progress,
                  start=None, stochastic: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M): multistep second order in log-SNR with data prediction.

    The first step is first order (no history yet), and so is the last when fewer than 15
    steps are taken, which keeps few-step sampling stable (Lu et al., 2022). ``stochastic``
    solves the reverse SDE instead of the probability-flow ODE (SDE-DPM-Solver++(2M), same
    paper): each step forgets part of its state and draws fresh noise, so a wrong early guess
    can be revised; its first-order step is exactly DDPM's posterior step.
    """
    y, first = _initial(problem, schedule, generator, start)
    grid = timesteps(schedule, steps, spacing, first)
    ab = schedule.alpha_bar
    lam = schedule.log_snr(torch.tensor(grid))
    alpha = ab[grid].sqrt()
    sigma = (1.0 - ab[grid]).sqrt()
    x0_prev, h_prev = None, None
    x0 = y
    for i in _progress(range(len(grid)), progress, "dpm_solver++"):
        x0 = _predict(denoise, problem, y, grid[i])
        if i + 1 == len(grid):
            break
        h = float(lam[i + 1] - lam[i])
        first_order = x0_prev is None or (i + 2 == len(grid) and len(grid) < 15)
        if first_order:
            d = x0
        else:
            r = h_prev / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        ratio = float(sigma[i + 1] / sigma[i])
        if stochastic:
            kept = math.expm1(-2.0 * h)  # e^{-2h} - 1, in (-1, 0)
            noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            y = problem.anchored(ratio * math.exp(-h) * y
                                 - float(alpha[i + 1]) * kept * d
                                 + float(sigma[i + 1]) * (-kept) ** 0.5 * noise)
        else:
            y = problem.anchored(ratio * y
                                 - float(alpha[i + 1]) * math.expm1(-h) * d)
        x0_prev, h_prev = x0, h
    return x0 + problem.mask_vector


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ancestral": ancestral,
    "ddim": ddim,
    "dpm_solver++": dpm_solver_pp,
    "sde_dpm_solver++": partial(dpm_solver_pp, stochastic=True),
}


def run_sampler(
    name: str,
    denoise: Denoise,
    problem: SamplingProblem,
    schedule: NoiseSchedule,
    steps: int = 20,
    spacing: str = "time_uniform",
    generator: torch.Generator | None = None,
    progress: bool = False,
    variance: str = "posterior",
    start: Start | None = None,
) -> torch.Tensor:
    """Run the named sampler; returns the final x0 estimate in z coordinates (B, L, D).
    ``variance`` applies to ``ancestral``, the one stochastic sampler; ``start`` = (y_t, t)
    begins at step t from y_t (shifted coordinates) instead of from pure noise."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is not one of {sorted(SAMPLERS)}")
    options = {"variance": variance} if name == "ancestral" else {}
    with torch.no_grad():
        return SAMPLERS[name](denoise, problem, schedule, steps, spacing, generator, progress,
                              start=start, **options)
