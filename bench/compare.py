"""MoE-DiffuSeq against the DiffuSeq baseline, in one run.

    python -m bench.compare [--quick] [--out FILE.json]      (make bench-compare)

Both models are built from lightning_configs/model/{moe_diffuseq,diffuseq_baseline}.yaml
(attention kind, FFN kind, absorbing state, default sampler) at one *bench width* that a
2-core CPU can train at 8k tokens (--hidden, --layers; the same for both). Measured:

1. training tokens/s at source lengths 1k-8k (target 256), fwd+bwd+AdamW step, batch 1,
   interleaved: MoE-DiffuSeq (banded) and the baseline with full attention as `sdpa` and
   as `eager`;
2. peak memory of one training step, each figure in its own process;
3. sampling seconds per document at every length with each model's default sampler, median
   of --repeats runs (MoE-DiffuSeq: dpm_solver++ 20 steps; baseline (sdpa): ancestral 2000
   steps, timed over 20 steps and scaled by 100: every ancestral step costs the same);
4. linear-layer efficiency at --efficiency-length: fwd+bwd time of the bare matmuls of the
   FFN/MoE experts and of the attention projections (same shapes, same token counts per
   expert), timed in the same run, divided by the layer's own fwd+bwd time;
5. quality at one wall-clock training budget per task (Lightning Trainer): each model's
   seconds per step are calibrated first (short fits, interleaved), and each then trains for
   the steps that fit in the budget, so its learning rate decays to 0 at the budget's end as
   in any run of known length (a time limit of 1.5x the budget guards against a slow spell).
   Training loss against wall-clock, then validation loss and ROUGE-1/2/L, BLEU and the mean
   words per sample on --docs validation documents, a fixed random sample of the split, the
   same for every model and seed (baseline sampled with DDIM 200 steps, as DiffuSeq's own fast
   setting, to keep the run short); --seeds runs per model (weights, data order and noise seeded), averaged,
   with a paired bootstrap interval over documents for the ROUGE-L difference; and, as an
   ablation that tells where a quality gap comes from, MoE-DiffuSeq with the soft absorbing
   state off, first seed only (--no-ablation skips it);
6. for every missed target, a torch.profiler table of the slowest part (kept in the JSON
   and the README); for a quality target, one training step of each model at the quality shape.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from moe_diffuseq.metrics import paired_bootstrap_interval

from .common import (
    DOCUMENT_SAMPLE,
    RESULTS,
    current_rss_mb,
    machine_info,
    measure_in_subprocess,
    peak_rss_mb,
    print_table,
    random_batch,
    reset_peak_rss,
    scored_documents,
    time_call,
    train_step_fn,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"moe": "moe_diffuseq", "sdpa": "diffuseq_baseline", "eager": "diffuseq_baseline"}
# The quality part's ablation: MoE-DiffuSeq with the soft absorbing state off, to tell what a
# quality gap comes from (the absorbing state, or the sparse attention and the experts).
ABLATION = "moe_no_absorbing"
MODEL_NAMES = {"moe": "MoE-DiffuSeq", "sdpa": "baseline (sdpa)", "eager": "baseline (eager)",
               ABLATION: "MoE-DiffuSeq, absorbing off"}
# The quality part's shape: short enough that a 2-core CPU takes a few hundred steps in the budget.
QUALITY_SRC_LEN, QUALITY_TRG_LEN, QUALITY_BATCH = 256, 128, 16
# Samples to text as DiffuSeq's evaluation does: every [SEP] and [PAD] dropped, the other tokens kept.
DECODE = "strip"


def model_args(variant: str, hidden: int, layers: int, src_len: int, trg_len: int, vocab: int | None) -> dict:
    config_name = VARIANTS["moe" if variant == ABLATION else variant]
    cfg = yaml.safe_load((ROOT / "lightning_configs" / "model" / f"{config_name}.yaml").read_text())
    if variant == ABLATION:
        cfg["diffusion"]["soft_absorbing"] = False
    heads = max(1, hidden // 64)
    cfg.update(hidden_size=hidden, num_layers=layers, num_heads=heads, embed_dim=min(cfg["embed_dim"], hidden),
               max_src_len=src_len, max_trg_len=trg_len, vocab_size=vocab, ema_decay=0.0)
    cfg["moe"]["expert_hidden"] = hidden  # MoE: 8 experts of h, top-2; baseline: dense 2h: same active FFN
    if variant == "eager":
        cfg["attention"]["backend"] = "full_eager"
    return cfg


def build(variant, hidden, layers, src_len, trg_len, vocab=4096):
    from moe_diffuseq import MoEDiffuSeq

    torch.manual_seed(0)
    return MoEDiffuSeq(**model_args(variant, hidden, layers, src_len, trg_len, vocab))


def memory_child(variant: str, src_len: int, trg_len: int, hidden: int, layers: int) -> dict:
    model = build(variant, hidden, layers, src_len, trg_len)
    step = train_step_fn(model, random_batch(src_len, trg_len))
    reset_peak_rss()
    before = current_rss_mb()
    step()
    return {"peak_mb": peak_rss_mb() - before}


def sampling_seconds(variant: str, hidden: int, layers: int, src_len: int, trg_len: int, repeats: int) -> float:
    """Seconds to sample one document with the model's default sampler, median of repeats."""
    model = build(variant, hidden, layers, src_len, trg_len).eval()
    cfg = model.sampling_config
    batch = random_batch(src_len, trg_len)
    if cfg.sampler == "ancestral":  # every ancestral step costs one denoiser pass: time 20, scale
        timed_steps = min(cfg.steps, 20)
        seconds = time_call(lambda: model.sample_ids(batch, sampler="ddim", steps=timed_steps, seed=0), repeats=repeats)
        return seconds * model.schedule.steps / timed_steps
    return time_call(lambda: model.sample_ids(batch, sampler=cfg.sampler, steps=cfg.steps, seed=0), repeats=repeats)


def gemm_seconds(shapes: list[tuple[int, int, int]], repeats: int) -> float:
    """fwd+bwd of bare matmuls, one linear layer per (rows, in, out): y = x @ w, dx = dy @ w.T, dw = x.T @ dy."""
    operands = [(torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)) for m, k, n in shapes if m > 0]

    def run():
        for x, w, dy in operands:
            x @ w, dy @ w.t(), x.t() @ dy

    return time_call(run, repeats=repeats)


def layer_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    """fwd+bwd of fn(x) (parameter and input gradients), median of repeats."""
    x = x.detach().requires_grad_(True)

    def run():
        y = fn(x)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(torch.ones_like(y))

    return time_call(run, repeats=repeats)


def linear_efficiency(variant: str, hidden: int, layers: int, length: int, trg_len: int, repeats: int) -> dict:
    """Fraction of a same-shape GEMM's speed that the FFN/MoE and the attention projections reach."""
    model = build(variant, hidden, layers, length, trg_len)
    block = model.denoiser.blocks[0]
    tokens = length + trg_len + 3
    x = torch.randn(1, tokens, hidden)
    ffn = block.ffn
    if hasattr(ffn, "experts"):
        with torch.no_grad():
            index = ffn.router(x.reshape(-1, hidden)).expert_index
        counts = torch.bincount(index.reshape(-1), minlength=ffn.num_experts).tolist()
        width = ffn.experts.w1.shape[-1]
        ffn_shapes = [s for n in counts for s in ((n, hidden, width), (n, width, hidden))]
    else:
        ffn_shapes = [(tokens, hidden, ffn.fc1.out_features), (tokens, ffn.fc1.out_features, hidden)]
    attn = block.attn
    proj_shapes = [(tokens, hidden, attn.qkv.out_features), (tokens, hidden, attn.out.out_features)]
    ffn_gemm, ffn_layer = gemm_seconds(ffn_shapes, repeats), layer_seconds(ffn, x, repeats)
    proj_gemm = gemm_seconds(proj_shapes, repeats)
    proj_layer = layer_seconds(lambda h: attn.out(attn.qkv(h)[..., :hidden]), x, repeats)
    return {"ffn": ffn_gemm / ffn_layer, "projections": proj_gemm / proj_layer,
            "ffn_layer_s": ffn_layer, "ffn_gemm_s": ffn_gemm, "projections_layer_s": proj_layer, "projections_gemm_s": proj_gemm}


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
                           max_trg_len=QUALITY_TRG_LEN, batch_size=QUALITY_BATCH, tokenizer_vocab_size=4096)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def fit(variant: str, dm, hidden: int, layers: int, seed: int, max_steps: int, max_seconds: float):
    """Train one quality model with a real Trainer; returns (model, trainer, clock)."""
    from moe_diffuseq import MoEDiffuSeq

    args = model_args(variant, hidden, layers, QUALITY_SRC_LEN, QUALITY_TRG_LEN, None)
    args.update(lr=1e-3, warmup_steps=min(50, max(1, max_steps // 4)))
    pl.seed_everything(seed, verbose=False)  # weights, data order, noise, dropout
    model = MoEDiffuSeq(**args)
    clock = LossClock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_time={"seconds": max_seconds}, logger=False,
                         callbacks=[clock], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=8, val_check_interval=10**9, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return model, trainer, clock


def seconds_per_step(variants, dm, hidden: int, layers: int, steps: int = 12, rounds: int = 2) -> dict[str, float]:
    """Median training seconds per optimizer step of each variant, from short real fits run in turn
    (interleaved, so a slow spell of the machine slows every model alike); the first 2 steps are warm-up."""
    deltas: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            _, _, clock = fit(v, dm, hidden, layers, seed=0, max_steps=steps, max_seconds=600)
            times = [t for t, _ in clock.points]
            deltas[v] += [times[i + 1] - times[i] for i in range(2, len(times) - 1)]
    return {v: sorted(d)[len(d) // 2] for v, d in deltas.items()}


def quality(variant: str, dm, budget: float, step_seconds: float, hidden: int, layers: int, rows: list[dict], seed: int) -> dict:
    """Train for the optimizer steps that fit in `budget` seconds at the calibrated `step_seconds`
    (so the learning rate decays to 0 at the budget's end, as in any run of known length; a run that
    overruns by half is stopped by time), then score validation loss, and ROUGE/BLEU on the validation
    `rows` (the scored documents)."""
    from moe_diffuseq.metrics import ROUGE_KEYS, corpus_bleu, rouge_per_document

    planned = max(1, int(budget / step_seconds))
    model, trainer, clock = fit(variant, dm, hidden, layers, seed, planned, 1.5 * budget)
    train_seconds = clock.points[-1][0] if clock.points else 0.0
    val_loss = diffusion_validation_loss(model, trainer, dm)
    sampler, steps = ("ddim", 200) if model.sampling_config.sampler == "ancestral" else (None, None)
    start = time.perf_counter()
    hyps = model.generate([r["src"] for r in rows], sampler=sampler, steps=steps, seed=seed, decode=DECODE)
    generate_seconds = time.perf_counter() - start
    refs = [r["trg"] for r in rows]
    per_document = rouge_per_document(hyps, refs)  # scored once: the means and the bootstrap both use it
    scores = {key: sum(d[key] for d in per_document) / len(per_document) for key in ROUGE_KEYS}
    # The soft absorbing state's gamma when the budget ran out (it ramps over diffusion.denoise_warmup_steps).
    return {"seed": seed, "steps": trainer.global_step, "planned_steps": planned, "train_seconds": train_seconds,
            "generate_seconds": generate_seconds,
            "denoise_rate_at_end": model.denoise_rate(trainer.global_step), "denoise_rate_full": model.denoise_rate(None),
            "val_loss": val_loss, "rougeL": scores["rougeL"], "rouge1": scores["rouge1"], "rouge2": scores["rouge2"],
            "bleu": corpus_bleu(hyps, refs), "rougeL_per_document": [d["rougeL"] for d in per_document],
            # Sample length beside ROUGE-L: the F score of samples far shorter than their references moves with their length.
            "generated_words": mean_words(hyps), "reference_words": mean_words(refs),
            "train_loss_vs_seconds": clock.points[:: max(1, len(clock.points) // 200)]}


def diffusion_validation_loss(model, trainer, dm) -> float:
    """Validation loss comparable across the models: the diffusion terms (MSE, rounding, t_T) only,
    at the soft absorbing rate gamma the model last trained at. Lightning's val/loss adds the router
    and absorbing-state regularisers, and scores MoE-DiffuSeq at the full gamma, which a short run
    early in gamma's ramp never trained for (so its val/loss read ~25% above the baseline's)."""
    from dataclasses import replace

    diffusion = model.diffusion_config
    if diffusion.soft_absorbing:
        model.diffusion_config = replace(diffusion, denoise_rate=model.denoise_rate(trainer.global_step), denoise_warmup_steps=0)
    try:
        val = trainer.validate(model, datamodule=dm, verbose=False)[0]
    finally:
        model.diffusion_config = diffusion
    moe = model.moe_config
    return (val["val/loss"] - moe.load_balance_coef * val["val/load_balance"] - moe.z_loss_coef * val["val/z_loss"]
            - diffusion.mask_reg_coef * val["val/mask_norm"])


def mean_words(texts: list[str]) -> float:
    """Mean number of whitespace-separated words per text."""
    return sum(len(t.split()) for t in texts) / max(1, len(texts))


MEANED = ("steps", "train_seconds", "generate_seconds", "val_loss", "rougeL", "rouge1", "rouge2", "bleu", "generated_words")


def over_seeds(runs: list[dict], step_seconds: float) -> dict:
    """One model on one task: the seeds' means (what the table and the checks use), the ROUGE-L
    spread over seeds, the per-document ROUGE-L averaged over seeds, and every run's own figures."""
    n = len(runs)
    mean = {k: sum(r[k] for r in runs) / n for k in MEANED}
    spread = (sum((r["rougeL"] - mean["rougeL"]) ** 2 for r in runs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    docs = len(runs[0]["rougeL_per_document"])
    return {**mean, "seeds": n, "rougeL_std_over_seeds": spread, "seconds_per_step_calibrated": step_seconds,
            "planned_steps": runs[0]["planned_steps"], "reference_words": runs[0]["reference_words"],
            "denoise_rate_at_end": runs[0]["denoise_rate_at_end"], "denoise_rate_full": runs[0]["denoise_rate_full"],
            "rougeL_per_document": [sum(r["rougeL_per_document"][i] for r in runs) / n for i in range(docs)],
            "train_loss_vs_seconds": runs[0]["train_loss_vs_seconds"],
            "runs": [{k: v for k, v in r.items() if k not in ("rougeL_per_document", "train_loss_vs_seconds")} for r in runs]}


def task_quality(task: str, dm, variants, args) -> dict:
    """Every variant on one task (its data module `dm`): calibrate, then one run of each model in turn per
    seed (the ablation: the first seed only)."""
    width = (args.hidden, args.layers)
    step_seconds = seconds_per_step(variants, dm, *width)
    print(f"  {task}: calibrated s/step {step_seconds}")
    rows = scored_documents(Path(dm.paths["validation"]), args.docs)  # read once: every run scores the same documents
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in args.seeds:
        for v in variants:
            if v == ABLATION and seed != args.seeds[0]:
                continue
            runs[v].append(quality(v, dm, args.budget, step_seconds[v], *width, rows, seed))
            print(f"  {task} {v} seed {seed}: {runs[v][-1]['steps']} steps, ROUGE-L {runs[v][-1]['rougeL']:.3g}")
    return {v: over_seeds(r, step_seconds[v]) for v, r in runs.items()}


TARGETS = {"train_speedup_4k": (">=", 1.3), "train_speedup_8k": (">=", 2.0), "memory_ratio_8k_eager": ("<=", 0.3),
           "memory_ratio_8k_sdpa": ("<=", 1.0), "sampling_speedup": (">=", 90.0)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--trg-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--efficiency-length", type=int, default=4096, help="source length of the linear-layer efficiency")
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per model, task and seed")
    parser.add_argument("--tasks", nargs="*", default=["code", "dialogue", "scientific"], help="corpora for the quality part (give none to skip it)")
    parser.add_argument("--docs", type=int, default=64, help="validation documents scored per quality run (a fixed random sample of the split)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one quality run per model, task and seed, averaged (the ablation runs the first seed only)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="where the corpora are (built when missing)")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false",
                        help="skip the quality run of MoE-DiffuSeq without the soft absorbing state")
    parser.add_argument("--quick", action="store_true", help="lengths 1k-2k, 60 s budgets, code only, 8 docs, one seed, no ablation")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or args.docs < 1 or args.budget <= 0:
        parser.error(f"--seeds must be distinct, --docs at least 1 and --budget positive; got {args.seeds}, {args.docs}, {args.budget}")
    if args.child:
        print(json.dumps(memory_child(args.child[0], int(args.child[1]), args.trg_len, args.hidden, args.layers)))
        return {}
    if args.quick:
        args.lengths, args.repeats, args.budget, args.tasks, args.docs, args.seeds = [1024, 2048], 1, 60.0, ["code"], 8, [0]
        args.ablation = False
        args.efficiency_length = 2048
    width = (args.hidden, args.layers)
    data_dir = Path(args.data_dir)
    tasks = [t for t in args.tasks if t != "scientific" or (data_dir / "scientific" / "train.jsonl").exists()]
    # Every task's data is built and read (each row checked) before the hour of measuring: a bad row in
    # the last task's files would otherwise end the run after every other figure was measured.
    datamodules = {task: quality_datamodule(task, data_dir) for task in tasks}
    # What is measured so far, rewritten after each part: a run that dies keeps its finished parts.
    partial = Path(args.out or RESULTS / "compare.json").with_suffix(".partial.json")

    throughput, memory, sampling = {}, {}, {}
    for length in args.lengths:
        steps = {v: train_step_fn(build(v, *width, length, args.trg_len), random_batch(length, args.trg_len)) for v in VARIANTS}
        times = {v: [] for v in VARIANTS}
        for fn in steps.values():
            fn()  # warm-up
        for _ in range(args.repeats):  # interleaved
            for v, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[v].append(time.perf_counter() - start)
        del steps
        tokens = length + args.trg_len + 3
        throughput[length] = {v: tokens / sorted(t)[len(t) // 2] for v, t in times.items()}
        memory[length] = {v: measure_in_subprocess("bench.compare", ["--child", v, str(length), "--trg-len", str(args.trg_len),
                                                                     "--hidden", str(args.hidden), "--layers", str(args.layers)]).get("peak_mb")
                          for v in VARIANTS}
        sampling[length] = {v: sampling_seconds(v, *width, length, args.trg_len, args.repeats) for v in ("moe", "sdpa")}
        print(f"  length {length}: tokens/s {throughput[length]}, peak MB {memory[length]}, sampling s {sampling[length]}")
    efficiency = {v: linear_efficiency(v, *width, args.efficiency_length, args.trg_len, args.repeats) for v in ("moe", "sdpa")}
    quality_variants = ("moe", "sdpa", ABLATION) if args.ablation else ("moe", "sdpa")
    qualities: dict[str, dict] = {}
    setup = {k: getattr(args, k) for k in ("lengths", "trg_len", "hidden", "layers", "repeats", "efficiency_length",
                                           "budget", "tasks", "docs", "seeds", "quick", "ablation")}
    # The figures, shared by the partial files and the final payload (qualities fills in as tasks finish).
    measured = {"throughput_tokens_per_s": throughput, "peak_memory_mb": memory, "sampling_seconds_per_document": sampling,
                "linear_efficiency": efficiency, "quality": qualities}
    for task in tasks:
        write_json("compare", {"benchmark": "compare (partial)", "machine": machine_info(), "setup": setup, **measured}, partial)
        qualities[task] = task_quality(task, datamodules[task], quality_variants, args)
    partial.unlink(missing_ok=True)

    def ratio(a, b):
        return a / b if a is not None and b else None

    sampling_by_length = {n: ratio(s["sdpa"], s["moe"]) for n, s in sampling.items()}
    summary = {
        "train_speedup_4k": ratio(throughput.get(4096, {}).get("moe"), throughput.get(4096, {}).get("sdpa")),
        "train_speedup_8k": ratio(throughput.get(8192, {}).get("moe"), throughput.get(8192, {}).get("sdpa")),
        "memory_ratio_8k_eager": ratio(memory.get(8192, {}).get("moe"), memory.get(8192, {}).get("eager")),
        "memory_ratio_8k_sdpa": ratio(memory.get(8192, {}).get("moe"), memory.get(8192, {}).get("sdpa")),
        # The smallest speed-up over the lengths: the target holds at every length or not at all.
        "sampling_speedup": min(sampling_by_length.values()),
        "sampling_speedup_by_length": sampling_by_length,
        "linear_efficiency": {v: {k: e[k] for k in ("ffn", "projections")} for v, e in efficiency.items()},
        # Means over --seeds runs; the interval: paired bootstrap over documents of the seed-averaged ROUGE-L.
        "quality": {t: {"moe_rougeL": q["moe"]["rougeL"], "baseline_rougeL": q["sdpa"]["rougeL"],
                        "rougeL_difference_ci95": paired_bootstrap_interval(q["moe"]["rougeL_per_document"],
                                                                            q["sdpa"]["rougeL_per_document"]),
                        "seeds": q["moe"]["seeds"],
                        "moe_val_loss": q["moe"]["val_loss"], "baseline_val_loss": q["sdpa"]["val_loss"],
                        **({"moe_no_absorbing_rougeL": q[ABLATION]["rougeL"]} if ABLATION in q else {})}
                    for t, q in qualities.items()},
    }
    checks = target_checks(summary)
    profiles = {name: profile_table(name, summary, args) for name, c in checks.items() if not c["met"]}

    rows = [[n, *(throughput[n][v] for v in VARIANTS), *(memory[n][v] for v in VARIANTS), sampling[n]["moe"], sampling[n]["sdpa"]]
            for n in args.lengths]
    print_table(["length", "moe tok/s", "sdpa tok/s", "eager tok/s", "moe MB", "sdpa MB", "eager MB", "moe sample s", "sdpa sample s"], rows)
    print_table(["model", "ffn", "projections"], [[v, e["ffn"], e["projections"]] for v, e in efficiency.items()])
    print_table(["task", "model", "s/step", "steps", "val loss", "ROUGE-L", "ROUGE-L sd", "BLEU"],
                [[t, v, q["seconds_per_step_calibrated"], q["steps"], q["val_loss"], q["rougeL"], q["rougeL_std_over_seeds"], q["bleu"]]
                 for t, qs in qualities.items() for v, q in qs.items()])
    for name, c in checks.items():
        print(f"{name}: {c['measured']:.3g} (target {c['target']}) {'OK' if c['met'] else 'MISSED'}")
    for name, table in profiles.items():
        print(f"profile for {name}:\n{table}")
    payload = {"benchmark": "compare", "machine": machine_info(), "setup": setup,
               # How quality was scored: samples to text as DiffuSeq's evaluation does; val_loss: the diffusion terms.
               "scoring": {"decode": DECODE, "val_loss": "diffusion terms at the last training gamma",
                           "documents": DOCUMENT_SAMPLE},
               **measured, "summary": summary, "checks": checks, "profiles": profiles}
    path = write_json("compare", payload, args.out)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path}")
    return payload


def target_checks(summary: dict) -> dict:
    """The issue's targets that this run measured, met or not; quality: MoE-DiffuSeq's ROUGE-L >= the baseline's."""
    checks = {}
    for name, (op, target) in TARGETS.items():
        value = summary.get(name)
        if value is not None:
            checks[name] = {"measured": value, "target": f"{op} {target}", "met": value >= target if op == ">=" else value <= target}
    for task, q in summary["quality"].items():  # the seeds' means; the interval is reported beside, not judged
        checks[f"quality_{task}"] = {"measured": q["moe_rougeL"] - q["baseline_rougeL"], "target": ">= 0 (ROUGE-L difference)",
                                     "met": q["moe_rougeL"] >= q["baseline_rougeL"], "ci95": q["rougeL_difference_ci95"]}
    return checks


def profile_table(name: str, summary: dict, args) -> str:
    """torch.profiler table of the slowest part behind a missed target: MoE-DiffuSeq's side, and for a
    quality target the baseline's too, at the quality runs' shape (so the two tables show where the
    per-step gap goes)."""
    from torch.profiler import ProfilerActivity, profile

    if name.startswith("quality_"):
        length, trg_len, batch_size, variants = QUALITY_SRC_LEN, QUALITY_TRG_LEN, QUALITY_BATCH, ("moe", "sdpa")
    else:
        trg_len, batch_size, variants = args.trg_len, 1, ("moe",)
        if name == "sampling_speedup":
            by_length = summary["sampling_speedup_by_length"]
            length = min(by_length, key=by_length.get)
        else:
            length = 4096 if name.endswith("4k") else 8192
    memory = name.startswith("memory")
    tables = []
    for variant in variants:
        model = build(variant, args.hidden, args.layers, length, trg_len)
        batch = random_batch(length, trg_len, batch=batch_size)
        if name == "sampling_speedup":
            model.eval()
            sampler = model.sampling_config.sampler
            model.sample_ids(batch, sampler=sampler, steps=2, seed=0)  # warm-up

            def work(model=model, batch=batch, sampler=sampler):
                model.sample_ids(batch, sampler=sampler, steps=5, seed=0)
        else:
            work = train_step_fn(model, batch)
            work()  # warm-up (optimizer state)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=memory) as prof:
            work()
        sort = "self_cpu_memory_usage" if memory else "self_cpu_time_total"
        what = "5 sampling steps" if name == "sampling_speedup" else "one training step"
        tables.append(f"{MODEL_NAMES[variant]}, source {length}, target {trg_len}, batch {batch_size}, {what}:\n"
                      + prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40))
    return "\n".join(tables)


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(int(n) for n in payload["throughput_tokens_per_s"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for v in VARIANTS:
        ax_t.plot(lengths, [payload["throughput_tokens_per_s"][n][v] for n in lengths], "o-", label=v)
        ax_m.plot(lengths, [payload["peak_memory_mb"][n][v] or float("nan") for n in lengths], "o-", label=v)
    ax_t.set(xscale="log", xlabel="source length", ylabel="training tokens/s", title="throughput")
    ax_m.set(xscale="log", yscale="log", xlabel="source length", ylabel="peak MB (one step)", title="memory")
    ax_t.legend()
    ax_m.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    if payload["quality"]:
        plot_quality(payload["quality"], path.with_name(path.stem + "_quality.png"))


def plot_quality(qualities: dict, path) -> None:
    """Training loss against wall-clock seconds, one panel per task, both models."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(qualities), figsize=(5 * len(qualities), 4), squeeze=False)
    for ax, (task, per_model) in zip(axes[0], qualities.items(), strict=True):
        for v, q in per_model.items():
            points = q["train_loss_vs_seconds"]
            if not points:
                continue
            seconds, losses = zip(*points, strict=True)
            window = max(1, len(losses) // 20)  # running mean: single-batch losses are noisy
            smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                      for i in range(len(losses))]
            ax.plot(seconds, smooth, label=f"{MODEL_NAMES.get(v, v)}: val loss {q['val_loss']:.3g}")
        ax.set(xlabel="training wall-clock s", ylabel="training loss (running mean)", title=task)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
