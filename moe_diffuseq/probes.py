"""What the denoiser gets right at each noise level, beside what rounding its input gets.

A denoiser that only learns to round its noisy input z_t scores well on the usual token
accuracy (a mean over t) and writes nothing at high noise, where sampling starts. These
counts show it at a glance: x0 accuracy on the target's word tokens at fixed t, teacher
forced, next to the accuracy of rounding z_t itself.
"""

from __future__ import annotations

import torch

from .batch import Seq2SeqBatch, SpecialIds
from .diffusion import NoiseSchedule, forward_process, noised_start

# Fixed noise levels, as fractions of the schedule (t = round(f * (T - 1))).
NOISE_FRACTIONS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def probe_steps(steps: int) -> list[int]:
    """The probed timesteps of a T-step schedule (0, T/8, T/4, T/2, 3T/4, T-1 for T = 2000)."""
    return sorted({round(f * (steps - 1)) for f in NOISE_FRACTIONS})


def word_positions(batch: Seq2SeqBatch, special: SpecialIds) -> torch.Tensor:
    """(B, L) bool: the target's word tokens ([SEP] and [PAD] excluded)."""
    ids = batch.input_ids
    return batch.input_mask & ~batch.padding_mask & (ids != special.pad) & (ids != special.sep)


@torch.no_grad()
def noise_level_counts(
    denoiser,
    schedule: NoiseSchedule,
    batch: Seq2SeqBatch,
    special: SpecialIds,
    steps: list[int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(len(steps), 3) long: [denoiser correct, rounding z_t correct, word tokens] per t.

    No position is absorbed (gamma 0): this asks what the network reads from the source and
    from the noisy target, not how it fills the absorbing state.
    """
    words = word_positions(batch, special)
    emb = denoiser.embed(batch.input_ids)
    counts = []
    for step in steps:
        t = torch.full((len(batch),), step, device=emb.device, dtype=torch.long)
        noise = torch.randn(emb.shape, device=emb.device, dtype=emb.dtype, generator=generator)
        z0 = noised_start(emb, schedule, noise)
        z_t, _ = forward_process(z0, t, batch.input_mask, denoiser.absorbing_state, schedule, 0.0,
                                 generator=generator)
        global_mask = denoiser.global_tokens(batch.global_mask, batch.input_mask,
                                             batch.padding_mask)
        x0_hat, _ = denoiser(z_t, t, global_mask, batch.padding_mask, batch.input_mask)
        if denoiser.self_condition is not None:  # a second pass reading the first, as sampling does
            x0_hat, _ = denoiser(z_t, t, global_mask, batch.padding_mask, batch.input_mask, x0_hat)
        truth = batch.input_ids[words]
        predicted = denoiser.logits(x0_hat[words]).argmax(-1)
        rounded = denoiser.logits(z_t[words]).argmax(-1)
        counts.append(torch.stack([(predicted == truth).sum(), (rounded == truth).sum(),
                                   words.sum()]))
    return torch.stack(counts)


@torch.no_grad()
def trajectory_accuracy(model, batch: Seq2SeqBatch, sampling, seed: int = 0) -> list[dict]:
    """x0 accuracy on the target's words at each step of one sampler run over ``batch`` (whose
    target tokens are the references; the sampler never reads them). Teacher-forced accuracy that
    is high at mid noise beside a trajectory that stays where its first step put it says that
    sampling never refines its first guess."""
    from .generation import sample_ids

    words = word_positions(batch, model.special_ids).to(model.device)
    truth = batch.input_ids.to(model.device)
    total = words.sum().clamp_min(1)
    net = model.sampling_network
    points: list[dict] = []

    def observe(t: torch.Tensor, x0: torch.Tensor) -> None:
        right = (net.logits(x0).argmax(-1) == truth) & words
        points.append({"t": int(t[0]), "x0_acc": float(right.sum() / total)})

    sample_ids(model, batch, sampling, seed, observe=observe)
    return points


def accuracy_table(steps: list[int], counts: torch.Tensor) -> dict[int, dict[str, float]]:
    """{t: {"denoiser": acc, "round_z_t": acc}} from summed ``noise_level_counts``."""
    total = counts[:, 2].clamp_min(1).double()
    return {
        step: {"denoiser": float(counts[i, 0] / total[i]),
               "round_z_t": float(counts[i, 1] / total[i])}
        for i, step in enumerate(steps)
    }


class AccuracyTally:
    """Sums over the batches of one validation or test epoch: token accuracy of the rounded x0
    prediction on target tokens (mean over t), the unigram baseline beside it, and the per-noise
    counts of ``noise_level_counts``."""

    KEYS = ("correct", "total", "counts", "noise_levels")

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, batch: Seq2SeqBatch, predicted_ids: torch.Tensor, vocab_size: int,
            noise_levels: torch.Tensor) -> None:
        scored = batch.input_mask & ~batch.padding_mask
        parts = {
            "correct": ((predicted_ids == batch.input_ids) & scored).sum(),
            "total": scored.sum(),
            "counts": torch.bincount(batch.input_ids[scored], minlength=vocab_size),
            "noise_levels": noise_levels,
        }
        for key, value in parts.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def metrics(self, steps: list[int], gather) -> dict[str, tuple[torch.Tensor | float, bool]]:
        """{name: (value, in the progress bar)} over all ranks (``gather``:
        LightningModule.all_gather), and the tally is reset; empty when nothing was added."""
        sums, self.sums = self.sums, {}
        if not sums:
            return {}
        correct, total, counts, levels = (gather(sums[k]).reshape(-1, *sums[k].shape).sum(0)
                                          for k in self.KEYS)
        total = total.clamp_min(1).float()
        out: dict[str, tuple[torch.Tensor | float, bool]] = {
            "token_acc": (correct.float() / total, True),
            "unigram_acc": (counts.max().float() / total, False),
        }
        # x0 accuracy on target words at fixed t beside rounding z_t: a run that only learns to
        # round shows it here (high accuracy where rounding is high, none at t = T-1).
        for step, acc in accuracy_table(steps, levels).items():
            top = step == steps[-1]
            out[f"x0_acc_t{step}"] = (acc["denoiser"], top)
            out[f"round_acc_t{step}"] = (acc["round_z_t"], top)
        return out
