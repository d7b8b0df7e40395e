"""Generation: sources in, text out.

    encode (sources, templates) -> sample_ids (one sampler run) -> decode_targets
    generate_candidates: seeds per source, the candidate MBR picks

``sample_rows`` is the one sample-and-decode step that the test loop, the predict loop and the
``ValidationSamples`` callback share. Every function takes the ``SamplingConfig`` to use; the
model's ``sampling`` settings are the defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import torch

from .batch import Seq2SeqBatch, collate_pairs, decode_sources, decode_targets, encode_pairs
from .config import SamplingConfig
from .diffusion import SamplingProblem, q_sample, run_sampler
from .metrics import mbr_select

if TYPE_CHECKING:
    from .denoiser import Denoiser
    from .lit_module import MoEDiffuSeq


def sampling_settings(base: SamplingConfig, **overrides: Any) -> SamplingConfig:
    """``base`` with the given fields replaced (None keeps the base's value); an unknown key is an
    error."""
    known = {f.name for f in fields(SamplingConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown sampling settings {unknown}; known: {sorted(known)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def encode(model: MoEDiffuSeq, sources: list[str],
           templates: list[str] | None = None) -> tuple[Seq2SeqBatch, torch.Tensor | None]:
    """Collate sources for sampling. Returns the batch and, with templates, the (B, L) mask of
    target positions whose tokens are given.

    A template is target text in which each ``[MASK]`` token marks one position to fill; its
    other tokens stay fixed, and every position after it is free (so the model still chooses
    where the output ends).
    """
    net, special = model.network_config, model.special_ids
    pairs = encode_pairs(model.tokenizer, sources, templates, net.max_src_len, net.max_trg_len)
    batch = collate_pairs(pairs, special, net.max_trg_len)
    if templates is None:
        return batch, None
    fixed = torch.zeros_like(batch.input_mask)
    for row, pair in enumerate(pairs):
        start = len(pair.src_ids) + 2
        tokens = torch.tensor(pair.trg_ids, dtype=torch.long)
        fixed[row, start : start + len(tokens)] = tokens != special.mask
    # Positions after the template are free: reset them (collation put [SEP] [PAD]* there).
    free = batch.input_mask & ~fixed
    batch.input_ids = torch.where(free, torch.full_like(batch.input_ids, special.pad),
                                  batch.input_ids)
    return batch, fixed


@torch.no_grad()
def sample_ids(
    model: MoEDiffuSeq,
    batch: Seq2SeqBatch,
    sampling: SamplingConfig,
    seed: int,
    fixed_mask: torch.Tensor | None = None,
    progress: bool = False,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample the target region of a collated batch; returns rounded token ids (B, L).

    ``fixed_mask`` (B, L) marks target positions whose tokens in ``batch.input_ids`` are given
    (infilling): they stay anchored, like the source, at every step. ``observe(t, x0)`` is called
    with each step's timesteps (B,) and x0 estimate (B, L, E), for probes of the trajectory.
    """
    net = model.sampling_network
    was_training = net.training
    net.eval()
    device = model.device
    batch = batch if batch.input_ids.device == device else batch.to(device)
    anchor_mask = ~batch.input_mask | batch.padding_mask
    if fixed_mask is not None:
        anchor_mask = anchor_mask | fixed_mask.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)

    def sample(net: Denoiser) -> torch.Tensor:
        global_mask = net.global_tokens(batch.global_mask, batch.input_mask, batch.padding_mask)
        table = net.word_embedding.weight
        previous: list[torch.Tensor] = []  # the last x0 estimate, for self-conditioning

        def denoise(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x0, _ = net(z_t, t, global_mask, batch.padding_mask, batch.input_mask,
                        previous[-1] if previous else None)
            previous[:] = [x0]
            if observe is not None:
                observe(t, x0)
            if sampling.clamp:  # snap to the nearest word embedding (DiffuSeq's clamping trick)
                x0 = table[torch.cdist(x0, table[None].expand(x0.shape[0], -1, -1)).argmin(-1)]
            return x0

        def rounded(x0: torch.Tensor) -> torch.Tensor:
            # Round the free positions only: anchored ones keep their tokens, and the (N, V)
            # logits of a long source would cost more than the sampling steps themselves.
            ids = batch.input_ids.clone()
            ids[free] = net.logits(x0[free]).argmax(-1)
            return ids

        free = ~anchor_mask
        schedule = model.schedule
        problem = SamplingProblem(net.embed(batch.input_ids), anchor_mask, net.absorbing_state)
        x0 = run_sampler(sampling.sampler, denoise, problem, schedule, sampling.steps,
                         sampling.spacing, generator, progress, sampling.variance)
        t_restart = round(sampling.restart_noise * (schedule.steps - 1))
        t = torch.full((len(batch),), t_restart, dtype=torch.long, device=device)
        for _ in range(sampling.restarts):
            clean = net.embed(rounded(x0))
            noise = torch.randn(clean.shape, generator=generator, device=device, dtype=clean.dtype)
            y = q_sample(clean, t, noise, problem.mask_vector, schedule) - problem.mask_vector
            x0 = run_sampler(sampling.sampler, denoise, problem, schedule, sampling.restart_steps,
                             sampling.spacing, generator, progress, sampling.variance,
                             start=(y, t_restart))
        return rounded(x0)

    try:
        return net.run(sample)  # one "forward" of the root, so FSDP2 gathers its parameters
    finally:
        net.train(was_training)


def sample_rows(model: MoEDiffuSeq, batch: Seq2SeqBatch, sampling: SamplingConfig,
                seed: int) -> list[dict[str, str]]:
    """Sample a collated batch's targets; per row its ``source``, ``reference`` and ``sample`` as
    text (``sampling.decode``). The test loop, the predict loop and ``ValidationSamples`` share
    it."""
    tokenizer, special = model.tokenizer, model.special_ids
    samples = decode_targets(tokenizer, sample_ids(model, batch, sampling, seed).cpu(), batch,
                             special, sampling.decode)
    references = decode_targets(tokenizer, batch.input_ids.cpu(), batch, special, sampling.decode)
    sources = decode_sources(tokenizer, batch, special)
    return [{"source": s, "reference": r, "sample": g}
            for s, r, g in zip(sources, references, samples, strict=True)]


def generate_candidates(
    model: MoEDiffuSeq,
    sources: list[str],
    sampling: SamplingConfig,
    *,
    seed: int = 0,
    templates: list[str] | None = None,
    progress: bool = False,
) -> list[tuple[list[str], int]]:
    """Per source: ``sampling.num_candidates`` samples (seeds seed, seed+1, ...) and the index MBR
    picks.

    With ``templates`` (one per source), given target tokens stay fixed and only the ``[MASK]``
    positions and the positions after the template are sampled (infilling).
    """
    if templates is not None and len(templates) != len(sources):
        raise ValueError(f"{len(templates)} templates for {len(sources)} sources")
    results: list[tuple[list[str], int]] = []
    chunks = range(0, len(sources), sampling.batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="documents", unit="batch")
    for start in chunks:
        end = start + sampling.batch_size
        batch, fixed = encode(model, [str(s) for s in sources[start:end]],
                              None if templates is None else templates[start:end])
        per_seed = [
            decode_targets(model.tokenizer,
                           sample_ids(model, batch, sampling, seed + c, fixed, progress).cpu(),
                           batch, model.special_ids, sampling.decode)
            for c in range(sampling.num_candidates)
        ]
        for candidates in zip(*per_seed, strict=True):
            results.append((list(candidates), mbr_select(list(candidates))))
    return results
