"""AdamW with linear warm-up and a decay to ``min_lr_ratio * lr`` by the run's step or time limit;
the EMA of the weights; the guard that skips non-finite steps."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Timer
from torch import nn

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, total: int, decay: str, min_lr_ratio: float,
              time_fraction: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` of ``total``, with
    ``time_fraction`` of the run's time limit spent: the decay follows whichever limit is nearer."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "constant":
        return 1.0
    by_steps = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, max(by_steps, time_fraction))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel takes these parameters: floating point, all on CPU or all on
    CUDA. Without it, AdamW on CPU loops over the parameters one small op at a time."""
    devices = {param.device.type for param in params}
    return (len(devices) == 1 and devices <= {"cpu", "cuda"}
            and all(param.dtype.is_floating_point for param in params))


LrDecay = Literal["linear", "cosine", "constant"]
"""The shapes of the learning rate's decay after warm-up (``lr_factor``)."""
LR_DECAYS = get_args(LrDecay)


def adamw_with_schedule(
    net: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    lr_decay: str,
    min_lr_ratio: float,
    estimated_steps: float,
    time_fraction: Callable[[], float] | None = None,
) -> dict:
    """Lightning's ``configure_optimizers`` answer: AdamW (no decay on biases and norms) and a
    per-step schedule. ``time_fraction``, where the run has a time limit, says how much of it is
    spent; the decay then ends by that limit if it comes before the last step."""
    decay, no_decay = [], []
    for name, param in net.named_parameters():
        if param.requires_grad:
            # The pointer's span weights mix whole score matrices: a coefficient, not a projection.
            plain = param.dim() < 2 or "norm" in name or name.endswith("span_weight")
            (no_decay if plain else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused_supported(decay + no_decay))
    known = math.isfinite(estimated_steps)
    timed = time_fraction is not None
    # Without a step limit only the clock moves the decay; with neither limit, keep the peak rate.
    total = max(1, int(estimated_steps)) if known else 2**62
    warmup = min(warmup_steps, max(0, total - 1))
    shape = lr_decay if known or timed else "constant"

    def factor(step: int) -> float:
        spent = min(1.0, max(0.0, time_fraction())) if timed else 0.0
        return lr_factor(step, warmup, total, shape, min_lr_ratio, spent)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def time_limit_fraction(trainer: pl.Trainer) -> Callable[[], float] | None:
    """A function giving the share of the run's time limit spent so far, or None where the run has
    none. The limit is a Lightning ``Timer`` callback's duration (``trainer.max_time`` adds one);
    its elapsed time survives a resume."""
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and callback.time_remaining() is not None:
            timer = callback
            duration = max(1e-9, timer.time_elapsed() + timer.time_remaining())
            return lambda: timer.time_elapsed() / duration
    return None


@torch.no_grad()
def update_ema(average: nn.Module, current: nn.Module, decay: float, step: int) -> None:
    """Move ``average``'s weights toward ``current``'s. The decay warms up,
    (1 + step) / (10 + step), so that early averages are not dominated by the random
    initialisation."""
    decay = min(decay, (1 + step) / (10 + step))
    for avg, cur in zip(average.parameters(), current.parameters(), strict=True):
        avg.lerp_(cur.detach(), 1.0 - decay)


class NonFiniteGuard:
    """Skips steps whose loss is NaN/inf, with a warning naming the batch's examples, and stops the
    run (FloatingPointError) after ``max_in_a_row`` such steps in a row."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0

    def skip(self, bad: bool, loss: torch.Tensor, step: int, example_ids: list[str]) -> bool:
        """Whether to skip this step (``bad``: its loss, reduced over ranks, is not finite)."""
        if not bad:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        log.warning("non-finite loss %s at step %d (examples %s); step skipped", loss.item(), step,
                    example_ids[:8])
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(f"{self.in_a_row} consecutive non-finite losses; "
                                     f"last batch's examples: {example_ids}")
        return True
