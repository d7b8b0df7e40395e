"""The training objective: mse + rounding NLL + tT per example, and the regularisers beside
them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..batch import Seq2SeqBatch
from ..config import DiffusionConfig, MoEConfig
from ..moe import RouterStats, router_losses
from .forward_process import forward_process, noised_start
from .schedule import NoiseSchedule


@dataclass
class DiffusionLossTerms:
    """Per-example loss terms (B,) and what the denoiser predicted."""

    mse: torch.Tensor
    rounding: torch.Tensor
    t_T: torch.Tensor
    router_stats: list[RouterStats]
    mask_norm: torch.Tensor  # ||m||_2 of the absorbing state (its regulariser)
    predicted_ids: torch.Tensor | None  # (B, L) argmax of the rounding head on x0_hat, if asked
    # (B,) cross-entropy of the rounding head on x0_hat, if weighted
    x0_nll: torch.Tensor | None = None
    x0_nll_coef: float = 0.0

    @property
    def per_example(self) -> torch.Tensor:
        total = self.mse + self.rounding + self.t_T
        return total if self.x0_nll is None else total + self.x0_nll_coef * self.x0_nll


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions in mask (B, L) of values (B, L), per example -> (B,)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1.0)


@torch.no_grad()
def unrolled(denoiser, schedule: NoiseSchedule, z0: torch.Tensor, t: torch.Tensor,
             global_mask: torch.Tensor, batch: Seq2SeqBatch,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t made the way a sampler makes it: noise z0 at a step s drawn uniformly from [t, T), let
    the denoiser estimate x0 there, and take one deterministic step (DDIM, the first order of
    DPM-Solver++) from s down to t with that estimate. Returns that z_t and the estimate x0_s.

    Training on the true z_t alone teaches the denoiser to trust its noisy input. When sampling,
    that input carries the denoiser's own earlier, partly wrong, answer, and a denoiser that
    trusts it keeps its first guess (step-unrolled denoising, SUNDAE, for the same reason).
    Nothing is absorbed at s: the sampler never absorbs either."""
    steps = schedule.steps
    span = (steps - t).to(torch.float64)  # how many steps lie in [t, T)
    draw = torch.rand(len(t), device=t.device, generator=generator, dtype=torch.float64)
    s = torch.minimum(t + (draw * span).long(), torch.full_like(t, steps - 1))
    z_s, _ = forward_process(z0, s, batch.input_mask, denoiser.absorbing_state, schedule, 0.0,
                             generator=generator)
    x0_s, _ = denoiser(z_s, s, global_mask, batch.padding_mask, batch.input_mask)
    # The step's coefficients in float64: in bf16, 1 - alpha_bar rounds to 0 at small s.
    ab_s, ab_t = (schedule.alpha_bar.double()[steps_][:, None, None] for steps_ in (s, t))
    keep = ((1.0 - ab_t) / (1.0 - ab_s)).sqrt()  # of z_s - m: the noise carried down
    write = ab_t.sqrt() - keep * ab_s.sqrt()  # of x0_s - m
    m = denoiser.absorbing_state.to(z0.dtype)
    stepped = m + keep.to(z0.dtype) * (z_s - m) + write.to(z0.dtype) * (x0_s - m)
    return stepped, x0_s


@torch.no_grad()
def first_estimates(denoiser, z_t: torch.Tensor, t: torch.Tensor, global_mask: torch.Tensor,
                    batch: Seq2SeqBatch, rows: torch.Tensor, x0_prev: torch.Tensor) -> torch.Tensor:
    """``x0_prev`` with the rows in ``rows`` (B,) bool replaced by the denoiser's own estimate
    from z_t, made without gradient: self-conditioning's first pass (Analog Bits).

    The pass runs on those rows only, not the whole batch: with unrolling on, most rows already
    read x0_s or nothing. It runs on at least one row, so that every rank makes the same denoiser
    calls (FSDP gathers parameters per call)."""
    index = rows.nonzero().squeeze(1)
    if len(index) == 0:
        index = index.new_zeros(1)  # a call whose answer no row reads
    first, _ = denoiser(z_t[index], t[index], global_mask[index], batch.padding_mask[index],
                        batch.input_mask[index])
    kept = rows[index]
    x0_prev = x0_prev.clone()
    x0_prev[index[kept]] = first[kept].to(x0_prev.dtype)
    return x0_prev


def diffusion_loss_terms(
    denoiser,
    schedule: NoiseSchedule,
    batch: Seq2SeqBatch,
    t: torch.Tensor,
    *,
    denoise_rate: float,
    loss_on: str = "all",
    generator: torch.Generator | None = None,
    predict_tokens: bool = False,
    absorbable: torch.Tensor | None = None,
    self_condition_rate: float = 0.0,
    unroll_rate: float = 0.0,
    x0_nll_coef: float = 0.0,
) -> DiffusionLossTerms:
    """Noise the batch at steps t (B,), denoise it, and score the x0 prediction.

    ``absorbable`` (B, L): the target positions the soft absorbing state may replace (None: all).
    ``self_condition_rate``: the share of examples whose denoiser also reads its own first x0
    estimate (made without gradient), as sampling feeds it the previous step's; unrolled examples
    read the estimate their step down made instead.
    ``unroll_rate``: the share of examples whose target z_t is made as a sampler makes it, one
    deterministic step down from a higher noise level with the denoiser's own x0 (``unrolled``).
    ``x0_nll_coef``: weight of the cross-entropy of the rounding head on x0_hat at the target's
    positions, a loss on the token the denoiser writes rather than on its embedding distance.
    """
    target_mask = batch.input_mask
    emb = denoiser.embed(batch.input_ids)  # (B, L, E)
    noise = torch.randn(emb.shape, device=emb.device, dtype=emb.dtype, generator=generator)
    z0 = noised_start(emb, schedule, noise)
    m = denoiser.absorbing_state
    z_t, _ = forward_process(z0, t, target_mask, m, schedule, denoise_rate, generator=generator,
                                   absorbable=absorbable)
    global_mask = denoiser.global_tokens(batch.global_mask, target_mask, batch.padding_mask)
    if unroll_rate > 0:
        # Every row is stepped, not only the chosen ones: each rank must run the same forward
        # passes, or FSDP's parameter gathers would not pair up across ranks.
        stepped, x0_s = unrolled(denoiser, schedule, z0, t, global_mask, batch, generator)
        unroll_rows = torch.rand(len(t), device=z_t.device, generator=generator) < unroll_rate
        z_t = torch.where(unroll_rows[:, None, None] & target_mask[..., None], stepped, z_t)
    x0_prev = None
    if self_condition_rate > 0:
        chosen = torch.rand(len(t), device=z_t.device, generator=generator) < self_condition_rate
        x0_prev = torch.zeros_like(z_t)
        if unroll_rate > 0:  # an unrolled row reads the estimate it was stepped with, as sampling
            x0_prev = torch.where(unroll_rows[:, None, None], x0_s, x0_prev)
            chosen = chosen & ~unroll_rows
        x0_prev = first_estimates(denoiser, z_t, t, global_mask, batch, chosen, x0_prev)
    x0_hat, stats = denoiser(z_t, t, global_mask, batch.padding_mask, target_mask, x0_prev)

    scored = ~batch.padding_mask
    if loss_on == "target":
        scored = scored & target_mask
    elif loss_on != "all":
        raise ValueError(f"diffusion.loss_on={loss_on!r}: expected all or target")
    # At t = 0 DiffuSeq scores against the un-noised embedding (its t0 loss).
    target = torch.where((t == 0)[:, None, None], emb, z0)
    mse = _masked_mean((x0_hat - target).square().mean(-1), scored)
    # Rounding NLL on the scored positions only: the (N, V) logits are the largest tensor.
    # Zeros of the cross-entropy's own dtype: under autocast it is float32 whatever z0's is.
    ce = F.cross_entropy(denoiser.logits(z0[scored]), batch.input_ids[scored], reduction="none")
    nll = ce.new_zeros(scored.shape).masked_scatter(scored, ce)
    rounding = _masked_mean(nll, scored)
    last = torch.full_like(t, schedule.steps - 1)
    # Mean of q(z_T | z0) minus the prior's mean m: sqrt(ab_T) * (z0 - m) (m = 0 in DiffuSeq).
    t_T = _masked_mean((schedule.at("alpha_bar", last, z0).sqrt() * (z0 - m)).square().mean(-1),
                       scored)
    x0_nll = None
    if x0_nll_coef > 0:
        written = target_mask & ~batch.padding_mask
        ce = F.cross_entropy(denoiser.logits(x0_hat[written]), batch.input_ids[written],
                             reduction="none")
        x0_nll = ce.new_zeros(written.shape).masked_scatter(written, ce)
        x0_nll = _masked_mean(x0_nll, written)
    predicted = None
    if predict_tokens:  # (B, L, V) logits: only when asked (validation), not every step
        with torch.no_grad():
            predicted = denoiser.logits(x0_hat).argmax(-1)
    return DiffusionLossTerms(
        mse=mse, rounding=rounding, t_T=t_T, router_stats=stats, mask_norm=m.norm(),
        predicted_ids=predicted, x0_nll=x0_nll, x0_nll_coef=x0_nll_coef,
    )


def training_loss(
    denoiser,
    schedule: NoiseSchedule,
    batch: Seq2SeqBatch,
    t: torch.Tensor,
    weights: torch.Tensor,
    *,
    diffusion: DiffusionConfig,
    moe: MoEConfig | None,
    loss_on: str,
    pad_id: int,
    step: int | None = None,
    generator: torch.Generator | None = None,
    predict_tokens: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], DiffusionLossTerms]:
    """The whole objective at steps ``t`` (B,): the weighted diffusion terms plus the router and
    absorbing-state regularisers. Returns the loss, its named parts (for logging) and the terms.
    ``step``: the optimizer step, for the absorbing rate's ramp (None: the full rate)."""
    cfg = diffusion
    terms = denoiser.run(
        diffusion_loss_terms, schedule, batch, t, denoise_rate=cfg.denoise_rate_at(step),
        loss_on=loss_on,
        generator=generator, predict_tokens=predict_tokens, x0_nll_coef=cfg.x0_nll_coef,
        absorbable=None if cfg.absorb_padding else batch.input_ids != pad_id,
        # Evaluation always self-conditions, as sampling does; training on a share of examples.
        self_condition_rate=(cfg.self_conditioning if denoiser.training
                             else float(cfg.self_conditioning > 0)),
        unroll_rate=cfg.unroll if denoiser.training else 0.0,
    )
    device = terms.mse.device
    balance, z_loss = (x.to(device) for x in router_losses(terms.router_stats))
    mask_reg = terms.mask_norm if cfg.soft_absorbing else torch.zeros((), device=device)
    loss = (weights * terms.per_example).mean() + cfg.mask_reg_coef * mask_reg
    if moe is not None:
        loss = loss + moe.load_balance_coef * balance + moe.z_loss_coef * z_loss
    parts = {"mse": terms.mse.mean(), "rounding": terms.rounding.mean(), "tT": terms.t_T.mean(),
             **({"x0_nll": terms.x0_nll.mean()} if terms.x0_nll is not None else {}),
             "load_balance": balance, "z_loss": z_loss, "mask_norm": mask_reg}
    return loss, parts, terms
