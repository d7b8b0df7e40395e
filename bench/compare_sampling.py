"""bench.compare's sampling cost: seconds per document with each model's default sampler."""

from __future__ import annotations

from dataclasses import replace

from moe_diffuseq.generation import sample_ids

from .common import random_batch, time_call
from .compare_models import build


def sampling_seconds(variant: str, hidden: int, layers: int, src_len: int, trg_len: int,
                     repeats: int) -> float:
    """Seconds to sample one document with the model's default sampler, median of repeats."""
    model = build(variant, hidden, layers, src_len, trg_len).eval()
    cfg = model.sampling_config
    batch = random_batch(src_len, trg_len)
    if cfg.sampler == "ancestral":  # every ancestral step costs one denoiser pass: time 20, scale
        timed = replace(cfg, sampler="ddim", steps=min(cfg.steps, 20))
        seconds = time_call(lambda: sample_ids(model, batch, timed, seed=0), repeats=repeats)
        return seconds * model.schedule.steps / timed.steps
    return time_call(lambda: sample_ids(model, batch, cfg, seed=0), repeats=repeats)
