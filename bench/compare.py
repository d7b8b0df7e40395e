"""MoE-DiffuSeq against the DiffuSeq baseline, in one run.

    python -m bench.compare [--quick] [--out FILE.json]      (make bench-compare)

Both models are built from lightning_configs/model/{moe_diffuseq,diffuseq_baseline}.yaml
(attention kind, FFN kind, absorbing state, default sampler) at one *bench width* that a
2-core CPU can train at 8k tokens (--hidden, --layers; the same for both). Measured:

1. training tokens/s at source lengths 1k-8k (target 256), fwd+bwd+AdamW step, batch 1,
   interleaved: MoE-DiffuSeq (banded) and the baseline with full attention as `sdpa` and
   as `eager`;
2. peak memory of one training step, each figure in its own process;
3. sampling seconds per document with each model's default sampler (MoE-DiffuSeq:
   dpm_solver++ 20 steps; baseline: ancestral 2000 steps, timed over 20 steps and scaled
   by 100: every ancestral step costs the same);
4. quality at one wall-clock training budget per task (Lightning Trainer, max_time): validation
   loss and ROUGE-1/2/L, BLEU on validation documents (baseline sampled with DDIM 200
   steps, as DiffuSeq's own fast setting, to keep the run short).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from .common import (
    current_rss_mb,
    machine_info,
    measure_in_subprocess,
    peak_rss_mb,
    print_table,
    random_batch,
    reset_peak_rss,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"moe": "moe_diffuseq", "sdpa": "diffuseq_baseline", "eager": "diffuseq_baseline"}


def model_args(variant: str, hidden: int, layers: int, src_len: int, trg_len: int, vocab: int | None) -> dict:
    cfg = yaml.safe_load((ROOT / "lightning_configs" / "model" / f"{VARIANTS[variant]}.yaml").read_text())
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


def train_step_fn(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        t, w = model.timestep_sampler.sample(1, torch.device("cpu"))
        loss, _, _ = model._loss(model.denoiser, batch, t, w)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def memory_child(variant: str, src_len: int, trg_len: int, hidden: int, layers: int) -> dict:
    model = build(variant, hidden, layers, src_len, trg_len)
    step = train_step_fn(model, random_batch(src_len, trg_len))
    reset_peak_rss()
    before = current_rss_mb()
    step()
    return {"peak_mb": peak_rss_mb() - before}


def sampling_seconds(variant: str, hidden: int, layers: int, src_len: int, trg_len: int) -> float:
    model = build(variant, hidden, layers, src_len, trg_len).eval()
    cfg = model.sampling_config
    batch = random_batch(src_len, trg_len)
    timed_steps = min(cfg.steps, 20)
    model.sample_ids(batch, sampler=cfg.sampler if cfg.sampler != "ancestral" else "ddim", steps=2, seed=0)  # warm-up
    start = time.perf_counter()
    if cfg.sampler == "ancestral":  # every ancestral step costs one denoiser pass: time 20, scale
        model.sample_ids(batch, sampler="ddim", steps=timed_steps, seed=0)
        return (time.perf_counter() - start) * model.schedule.steps / timed_steps
    model.sample_ids(batch, sampler=cfg.sampler, steps=cfg.steps, seed=0)
    return time.perf_counter() - start


def quality(variant: str, task: str, seconds: float, hidden: int, layers: int, docs: int) -> dict:
    import lightning.pytorch as pl

    from data_modules import Seq2SeqDataModule
    from moe_diffuseq.evaluation import score_generations

    dm = Seq2SeqDataModule(corpus=task, data_dir=str(ROOT / "data"), max_src_len=256, max_trg_len=128,
                           batch_size=16, tokenizer_vocab_size=4096)
    dm.prepare_data()
    dm.setup("fit")
    args = model_args(variant, hidden, layers, 256, 128, None)
    args.update(lr=1e-3, warmup_steps=50)
    from moe_diffuseq import MoEDiffuSeq

    torch.manual_seed(0)
    model = MoEDiffuSeq(**args)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_time={"seconds": seconds}, max_steps=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=8, val_check_interval=10**9, check_val_every_n_epoch=None,
                         num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    val = trainer.validate(model, datamodule=dm, verbose=False)[0]
    rows = [json.loads(x) for x in Path(dm.paths["validation"]).read_text().splitlines()[:docs]]
    sampler, steps = ("ddim", 200) if model.sampling_config.sampler == "ancestral" else (None, None)
    hyps = model.generate([r["src"] for r in rows], sampler=sampler, steps=steps, seed=0)
    scores = score_generations(hyps, [r["trg"] for r in rows])
    return {"steps": trainer.global_step, "val_loss": val["val/loss"], "rougeL": scores["rougeL"],
            "rouge1": scores["rouge1"], "rouge2": scores["rouge2"], "bleu": scores["bleu"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--trg-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per model and task")
    parser.add_argument("--tasks", nargs="*", default=["code", "dialogue", "scientific"], help="corpora for the quality part (give none to skip it)")
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="lengths 1k-2k, 60 s budgets, code only, 8 docs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(args.child[0], int(args.child[1]), args.trg_len, args.hidden, args.layers)))
        return {}
    if args.quick:
        args.lengths, args.repeats, args.budget, args.tasks, args.docs = [1024, 2048], 1, 60.0, ["code"], 8

    throughput, memory = {}, {}
    for length in args.lengths:
        steps = {v: train_step_fn(build(v, args.hidden, args.layers, length, args.trg_len), random_batch(length, args.trg_len))
                 for v in VARIANTS}
        times = {v: [] for v in VARIANTS}
        for fn in steps.values():
            fn()  # warm-up
        for _ in range(args.repeats):  # interleaved
            for v, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[v].append(time.perf_counter() - start)
        tokens = length + args.trg_len + 3
        throughput[length] = {v: tokens / sorted(t)[len(t) // 2] for v, t in times.items()}
        memory[length] = {v: measure_in_subprocess("bench.compare", ["--child", v, str(length), "--trg-len", str(args.trg_len),
                                                                     "--hidden", str(args.hidden), "--layers", str(args.layers)]).get("peak_mb")
                          for v in VARIANTS}
        print(f"  length {length}: tokens/s {throughput[length]}, peak MB {memory[length]}")
    length = args.lengths[0]
    sampling = {v: sampling_seconds(v, args.hidden, args.layers, length, args.trg_len) for v in ("moe", "sdpa")}
    tasks = [t for t in args.tasks if t != "scientific" or (ROOT / "data" / "scientific" / "train.jsonl").exists()]
    qualities = {t: {v: quality(v, t, args.budget, args.hidden, args.layers, args.docs) for v in ("moe", "sdpa")} for t in tasks}

    def ratio(a, b):
        return a / b if a is not None and b else None

    summary = {
        "train_speedup_4k": ratio(throughput.get(4096, {}).get("moe"), throughput.get(4096, {}).get("sdpa")),
        "train_speedup_8k": ratio(throughput.get(8192, {}).get("moe"), throughput.get(8192, {}).get("sdpa")),
        "memory_ratio_8k_eager": ratio(memory.get(8192, {}).get("moe"), memory.get(8192, {}).get("eager")),
        "memory_ratio_8k_sdpa": ratio(memory.get(8192, {}).get("moe"), memory.get(8192, {}).get("sdpa")),
        "sampling_speedup": ratio(sampling["sdpa"], sampling["moe"]),
        "quality": {t: {"moe_rougeL": q["moe"]["rougeL"], "baseline_rougeL": q["sdpa"]["rougeL"]} for t, q in qualities.items()},
    }
    rows = [[n, *(throughput[n][v] for v in VARIANTS), *(memory[n][v] for v in VARIANTS)] for n in args.lengths]
    print_table(["length", "moe tok/s", "sdpa tok/s", "eager tok/s", "moe MB", "sdpa MB", "eager MB"], rows)
    print_table(["task", "model", "steps", "val loss", "ROUGE-L", "BLEU"],
                [[t, v, q["steps"], q["val_loss"], q["rougeL"], q["bleu"]] for t, qs in qualities.items() for v, q in qs.items()])
    print(json.dumps(summary, indent=2))
    payload = {"benchmark": "compare", "machine": machine_info(),
               "setup": {k: getattr(args, k) for k in ("lengths", "trg_len", "hidden", "layers", "repeats", "budget", "tasks", "docs", "quick")},
               "throughput_tokens_per_s": throughput, "peak_memory_mb": memory, "sampling_seconds_per_document": sampling,
               "quality": qualities, "summary": summary}
    path = write_json("compare", payload, args.out)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path}")
    return payload


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


if __name__ == "__main__":
    main()
