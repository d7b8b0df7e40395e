"""Diffusion in embedding space: schedule, forward process, timestep samplers, samplers."""

from .forward_process import absorb, forward_process, noised_start, q_sample
from .losses import DiffusionLossTerms, diffusion_loss_terms, training_loss
from .samplers import SAMPLERS, SamplingProblem, run_sampler, timesteps
from .schedule import NoiseSchedule, make_betas
from .timestep_sampler import LossSecondMomentSampler, UniformSampler, make_timestep_sampler

__all__ = [
    "DiffusionLossTerms",
    "diffusion_loss_terms",
    "training_loss",
    "SAMPLERS",
    "LossSecondMomentSampler",
    "NoiseSchedule",
    "SamplingProblem",
    "UniformSampler",
    "absorb",
    "forward_process",
    "make_betas",
    "make_timestep_sampler",
    "noised_start",
    "q_sample",
    "run_sampler",
    "timesteps",
]
