"""bench.compare's quality part: every model trained for one wall-clock budget per task with a
Lightning Trainer, then scored (validation loss, ROUGE, BLEU, words per sample), over seeds."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl

from .common import (
    ABLATION,
    DECODE,
    QUALITY_BATCH,
    QUALITY_SRC_LEN,
    QUALITY_TRG_LEN,
    scored_documents,
)
from .compare_models import model_args


class LossClock(pl.Callback):
    """(seconds since the first batch, training loss) after every step."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.points: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.start = self.start or time.perf_counter()
        if outputs is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.points.append((time.perf_counter() - self.start, float(loss)))


def quality_datamodule(task: str, data_dir: Path):
    from data_modules import Seq2SeqDataModule

    dm = Seq2SeqDataModule(corpus=task, data_dir=str(data_dir), max_src_len=QUALITY_SRC_LEN,
                           max_trg_len=QUALITY_TRG_LEN, batch_size=QUALITY_BATCH,
                           tokenizer_vocab_size=4096)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def fit(variant: str, dm, hidden: int, layers: int, seed: int, max_steps: int,
        max_seconds: float | None):
    """Train one quality model with a real Trainer; returns (model, trainer, clock)."""
    from moe_diffuseq import MoEDiffuSeq

    args = model_args(variant, hidden, layers, QUALITY_SRC_LEN, QUALITY_TRG_LEN, None)
    args.update(lr=1e-3, warmup_steps=min(50, max(1, max_steps // 4)))
    pl.seed_everything(seed, verbose=False)  # weights, data order, noise, dropout
    model = MoEDiffuSeq(**args)
    clock = LossClock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps,
                         max_time=None if max_seconds is None else {"seconds": max_seconds},
                         logger=False, callbacks=[clock],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=8, val_check_interval=10**9,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return model, trainer, clock


def seconds_per_step(variants, dm, hidden: int, layers: int, steps: int = 12,
                     rounds: int = 2) -> dict[str, float]:
    """Median training seconds per optimizer step of each variant, from short real fits run in
    turn (interleaved, so a slow spell of the machine slows every model alike); the first 2 steps
    are warm-up."""
    deltas: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            _, _, clock = fit(v, dm, hidden, layers, seed=0, max_steps=steps, max_seconds=600)
            times = [t for t, _ in clock.points]
            deltas[v] += [times[i + 1] - times[i] for i in range(2, len(times) - 1)]
    return {v: sorted(d)[len(d) // 2] for v, d in deltas.items()}


def quality(variant: str, dm, budget: float, step_seconds: float, hidden: int, layers: int,
            rows: list[dict], seed: int, steps: int | None = None) -> dict:
    """Train for the optimizer steps that fit in `budget` seconds at the calibrated
    `step_seconds` (so the learning rate decays to 0 at the budget's end, as in any run of known
    length; a run that overruns by half is stopped by time), then score validation loss, and
    ROUGE/BLEU on the validation `rows` (the scored documents). ``steps``: that many steps
    instead, with no time limit (a run that must not depend on the machine's speed)."""
    from moe_diffuseq.metrics import ROUGE_KEYS, corpus_bleu, rouge_per_document

    planned = steps or max(1, int(budget / step_seconds))
    model, trainer, clock = fit(variant, dm, hidden, layers, seed, planned,
                                None if steps else 1.5 * budget)
    train_seconds = clock.points[-1][0] if clock.points else 0.0
    val_loss = diffusion_validation_loss(model, trainer, dm)
    ancestral = model.sampling_config.sampler == "ancestral"
    sampler, steps = ("ddim", 200) if ancestral else (None, None)
    start = time.perf_counter()
    hyps = model.generate([r["src"] for r in rows], sampler=sampler, steps=steps, seed=seed,
                          decode=DECODE)
    generate_seconds = time.perf_counter() - start
    refs = [r["trg"] for r in rows]
    # Scored once: the means and the bootstrap both use it.
    per_document = rouge_per_document(hyps, refs)
    scores = {key: sum(d[key] for d in per_document) / len(per_document) for key in ROUGE_KEYS}
    return {"seed": seed, "steps": trainer.global_step, "planned_steps": planned,
            "train_seconds": train_seconds, "generate_seconds": generate_seconds,
            # gamma when the budget ran out: it ramps over diffusion.denoise_warmup_steps.
            "denoise_rate_at_end": model.denoise_rate(trainer.global_step),
            "denoise_rate_full": model.denoise_rate(None),
            "val_loss": val_loss, "rougeL": scores["rougeL"], "rouge1": scores["rouge1"],
            "rouge2": scores["rouge2"], "bleu": corpus_bleu(hyps, refs),
            "rougeL_per_document": [d["rougeL"] for d in per_document],
            # Beside ROUGE-L because an F score of short samples moves with their length.
            "generated_words": mean_words(hyps), "reference_words": mean_words(refs),
            "train_loss_vs_seconds": clock.points[:: max(1, len(clock.points) // 200)]}


def diffusion_validation_loss(model, trainer, dm) -> float:
    """Validation loss comparable across the models: the diffusion terms (MSE, rounding, t_T)
    only, at the soft absorbing rate gamma the model last trained at. Lightning's val/loss adds
    the router and absorbing-state regularisers, and scores MoE-DiffuSeq at the full gamma, which
    a short run early in gamma's ramp never trained for."""
    diffusion = model.diffusion_config
    if diffusion.soft_absorbing:
        model.diffusion_config = replace(diffusion, denoise_warmup_steps=0,
                                         denoise_rate=model.denoise_rate(trainer.global_step))
    try:
        val = trainer.validate(model, datamodule=dm, verbose=False)[0]
    finally:
        model.diffusion_config = diffusion
    moe = model.network_config.moe
    router = 0.0 if moe is None else (moe.load_balance_coef * val["val/load_balance"]
                                      + moe.z_loss_coef * val["val/z_loss"])
    return val["val/loss"] - router - diffusion.mask_reg_coef * val["val/mask_norm"]


def mean_words(texts: list[str]) -> float:
    """Mean number of whitespace-separated words per text."""
    return sum(len(t.split()) for t in texts) / max(1, len(texts))


MEANED = ("steps", "train_seconds", "generate_seconds", "val_loss", "rougeL", "rouge1", "rouge2",
          "bleu", "generated_words")


def over_seeds(runs: list[dict], step_seconds: float) -> dict:
    """One model on one task: the seeds' means (what the table and the checks use), the ROUGE-L
    spread over seeds, the per-document ROUGE-L averaged over seeds, and every run's own
    figures."""
    n = len(runs)
    mean = {k: sum(r[k] for r in runs) / n for k in MEANED}
    spread = ((sum((r["rougeL"] - mean["rougeL"]) ** 2 for r in runs) / (n - 1)) ** 0.5
              if n > 1 else 0.0)
    docs = len(runs[0]["rougeL_per_document"])
    first = runs[0]
    return {**mean, "seeds": n, "rougeL_std_over_seeds": spread,
            "seconds_per_step_calibrated": step_seconds,
            "planned_steps": first["planned_steps"], "reference_words": first["reference_words"],
            "denoise_rate_at_end": first["denoise_rate_at_end"],
            "denoise_rate_full": first["denoise_rate_full"],
            "rougeL_per_document": [sum(r["rougeL_per_document"][i] for r in runs) / n
                                    for i in range(docs)],
            "train_loss_vs_seconds": first["train_loss_vs_seconds"],
            "runs": [{k: v for k, v in r.items()
                      if k not in ("rougeL_per_document", "train_loss_vs_seconds")} for r in runs]}


def task_quality(task: str, dm, variants, args) -> dict:
    """Every variant on one task (its data module `dm`): calibrate, then one run of each model in
    turn per seed (the ablation: the first seed only)."""
    width = (args.hidden, args.layers)
    step_seconds = seconds_per_step(variants, dm, *width)
    print(f"  {task}: calibrated s/step {step_seconds}")
    # Read once: every run scores the same documents.
    rows = scored_documents(Path(dm.paths["validation"]), args.docs)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in args.seeds:
        for v in variants:
            if v == ABLATION and seed != args.seeds[0]:
                continue
            runs[v].append(quality(v, dm, args.budget, step_seconds[v], *width, rows, seed,
                                   args.steps))
            last = runs[v][-1]
            print(f"  {task} {v} seed {seed}: {last['steps']} steps, ROUGE-L {last['rougeL']:.3g}")
    return {v: over_seeds(r, step_seconds[v]) for v, r in runs.items()}
