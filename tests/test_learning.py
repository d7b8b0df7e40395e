"""The model learns to write from its source: a copy task, end to end.

A tiny MoE-DiffuSeq is trained by a real Lightning Trainer on real stdlib code lines to copy
the first words of a source of varying length, then sampled with 20-step DPM-Solver++.
The probe beside it permutes the sources across the batch: a model that copies must then
fail, so the test cannot pass by learning the targets' marginal distribution.
"""

from __future__ import annotations

import json
import random

import lightning.pytorch as pl
import pytest
import torch

from data_modules import Seq2SeqDataModule
from moe_diffuseq import MoEDiffuSeq
from moe_diffuseq.batch import SpecialIds, collate_pairs, encode_pairs
from moe_diffuseq.diffusion import diffusion_loss_terms
from moe_diffuseq.generation import sampling_settings
from moe_diffuseq.probes import trajectory_accuracy

COPY_TOKENS = 3


def _copy_pairs(tokenizer, texts: list[str], count: int, seed: int) -> list[dict]:
    """Source: 8-24 tokens of code; target: its first COPY_TOKENS tokens.

    Both are token ids that survive decoding and encoding again (the data module reads text), so
    the target is exactly the source's first tokens: a slice is re-encoded from its text, and a
    target whose last piece reads differently alone is drawn again.
    """
    rng = random.Random(seed)
    stream = tokenizer.encode(" ".join(" ".join(texts).split()), add_special_tokens=False).ids
    rows = []
    while len(rows) < count:
        length = rng.randint(8, 24)
        start = rng.randrange(len(stream) - length)
        src = tokenizer.encode(tokenizer.decode(stream[start : start + length]),
                               add_special_tokens=False).ids
        trg = src[:COPY_TOKENS]
        if tokenizer.encode(tokenizer.decode(trg), add_special_tokens=False).ids == trg:
            rows.append({"src": src, "trg": trg})
    return rows


def _x0_accuracy_at_t_max(model: MoEDiffuSeq, batch) -> float:
    """Teacher-forced x0 accuracy on target words at t = T-1 (pure noise on the target)."""
    t = torch.full((len(batch),), model.schedule.steps - 1)
    terms = diffusion_loss_terms(
        model.sampling_network.eval(), model.schedule, batch, t, denoise_rate=0.0, loss_on="target",
        generator=torch.Generator().manual_seed(0), predict_tokens=True,
    )
    special = SpecialIds.from_tokenizer(model.tokenizer)
    words = batch.input_mask & (batch.input_ids != special.pad) & (batch.input_ids != special.sep)
    return float(((terms.predicted_ids == batch.input_ids) & words).sum() / words.sum())


@pytest.mark.timeout(120)
# plain: DiffuSeq's network; recipe: the shipped configs' pointer (neighbours, spans, span
# dropout) and unrolled steps.
@pytest.mark.parametrize("network,diffusion", [
    ({}, {}),
    ({"source_pointer": True, "pointer_neighbours": True, "pointer_span": 8,
      "pointer_span_dropout": 0.5, "position_init_std": 0.02},
     {"unroll": 0.5}),
], ids=["plain", "recipe"])
def test_tiny_model_learns_to_copy_from_a_source_of_varying_length(small_corpus, small_tokenizer,
                                                                   tmp_path, network, diffusion):
    texts = [json.loads(line)["trg"]
             for line in (small_corpus / "train.jsonl").read_text().splitlines()]
    decode = small_tokenizer.decode
    for split, count, seed in (("train", 2000, 0), ("validation", 64, 1)):
        rows = _copy_pairs(small_tokenizer, texts, count, seed)
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(json.dumps({"src": decode(r["src"]), "trg": decode(r["trg"])}) + "\n"
                    for r in rows)
        )
    tokenizer_file = tmp_path / "tokenizer.json"
    small_tokenizer.save(str(tokenizer_file))
    pl.seed_everything(0)
    data = Seq2SeqDataModule(
        train_path=str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "validation.jsonl"),
        tokenizer_path=str(tokenizer_file), max_src_len=32, max_trg_len=6, batch_size=32,
        data_dir=str(tmp_path / "work"),
    )
    model = MoEDiffuSeq(
        network={"max_src_len": 32, "max_trg_len": 6, "embed_dim": 32, "hidden_size": 64,
                 "num_layers": 2, "num_heads": 4, "dropout": 0.0, "attention": {"window": 64},
                 **network,
                 "moe": {"num_experts": 2, "top_k": 1, "expert_hidden": 128}},
        diffusion={"steps": 2000, "soft_absorbing": False, "loss_on": "target", **diffusion},
        lr=2e-3, warmup_steps=20, lr_decay="constant", ema_decay=0.0,
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=260, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)

    rows = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    samples = model.generate([r["src"] for r in rows], sampler="dpm_solver++", steps=20, seed=0)
    exact = (sum(s.strip() == r["trg"].strip() for s, r in zip(samples, rows, strict=True))
             / len(rows))
    assert exact >= 0.8, list(zip(samples[:8], [r["trg"] for r in rows[:8]], strict=True))

    # Along the sampler's own trajectory the x0 estimate is right by the end, as its samples are.
    special = SpecialIds.from_tokenizer(small_tokenizer)
    srcs, trgs = [r["src"] for r in rows], [r["trg"] for r in rows]
    intact = collate_pairs(encode_pairs(small_tokenizer, srcs, trgs, 32, 6), special, 6)
    path = trajectory_accuracy(model, intact, sampling_settings(model.sampling_config,
                                                                sampler="dpm_solver++", steps=20))
    assert len(path) == 20 and path[0]["t"] == 1999 and path[-1]["x0_acc"] >= 0.8

    # Validation logs what the denoiser writes at fixed noise levels beside rounding z_t: at
    # t = T-1 the input holds nothing (rounding ~0), and a model that copies is right anyway.
    metrics = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         limit_val_batches=2).validate(model, datamodule=data, verbose=False)[0]
    assert metrics["val/x0_acc_t1999"] >= 0.8 and metrics["val/round_acc_t1999"] <= 0.05
    assert {f"val/x0_acc_t{t}" for t in (0, 250, 500, 1000, 1499, 1999)} <= set(metrics)

    # The probe: the same targets behind another row's source. Copying, the model now fails.
    cut = collate_pairs(encode_pairs(small_tokenizer, srcs[1:] + srcs[:1], trgs, 32, 6), special, 6)
    with torch.no_grad():
        assert _x0_accuracy_at_t_max(model, intact) >= 0.8
        assert _x0_accuracy_at_t_max(model, cut) <= 0.2
