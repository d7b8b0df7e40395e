"""MoE-DiffuSeq against the DiffuSeq baseline, in one run.

    python -m bench.compare [--quick] [--out FILE.json]      (make bench-compare)

Both models are built from lightning_configs/model/{moe_diffuseq,diffuseq_baseline}.yaml
(attention kind, FFN kind, absorbing state, default sampler) at one *bench width* (--hidden,
--layers; the same for both). Measured:

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
   setting, to keep the run short); --seeds runs per model (weights, data order and noise
   seeded), averaged, with a paired bootstrap interval over documents for the ROUGE-L
   difference; and, as an ablation that tells where a quality gap comes from, MoE-DiffuSeq
   with the soft absorbing state off, first seed only (--no-ablation skips it);
6. for every missed target, a torch.profiler table of the slowest part (kept in the JSON
   and the README); for a quality target, one training step of each model at the quality shape.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_diffuseq.metrics import interval_verdict, paired_bootstrap_interval

from .common import (
    ABLATION,
    DECODE,
    DOCUMENT_SAMPLE,
    RESULTS,
    ROOT,
    VARIANTS,
    machine_info,
    print_table,
    write_json,
)
from .compare_plots import plot
from .compare_profile import profile_table
from .compare_quality import quality_datamodule, task_quality
from .compare_sampling import sampling_seconds
from .compare_speed import linear_efficiency, memory_child, peak_memory, training_throughput

TARGETS = {"train_speedup_4k": (">=", 1.3), "train_speedup_8k": (">=", 2.0),
           "memory_ratio_8k_eager": ("<=", 0.3), "memory_ratio_8k_sdpa": ("<=", 1.0),
           "sampling_speedup": (">=", 90.0)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--trg-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--efficiency-length", type=int, default=4096,
                        help="source length of the linear-layer efficiency")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="training seconds per model, task and seed")
    parser.add_argument("--tasks", nargs="*", default=["code", "dialogue", "scientific"],
                        help="corpora for the quality part (give none to skip it)")
    parser.add_argument("--docs", type=int, default=64,
                        help="validation documents scored per quality run "
                             "(a fixed random sample of the split)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one quality run per model, task and seed, averaged "
                             "(the ablation runs the first seed only)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"),
                        help="where the corpora are (built when missing)")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false",
                        help="skip the quality run of MoE-DiffuSeq without the soft absorbing "
                             "state")
    parser.add_argument("--steps", type=int, default=None,
                        help="train each quality model exactly this many steps, with no time "
                             "limit, instead of the steps that fit in --budget")
    parser.add_argument("--quick", action="store_true",
                        help="the 4k and 8k lengths the targets name, at half the width "
                             "(hidden 128, 2 layers); 45 s budgets, code only, 8 docs, one "
                             "seed, no ablation")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if len(set(args.seeds)) != len(args.seeds) or args.docs < 1 or args.budget <= 0:
        parser.error("--seeds must be distinct, --docs at least 1 and --budget positive; "
                     f"got {args.seeds}, {args.docs}, {args.budget}")
    if args.quick:
        args.lengths, args.repeats, args.budget = [4096, 8192], 1, 45.0
        args.hidden, args.layers = 128, 2
        args.tasks, args.docs, args.seeds = ["code"], 8, [0]
        args.ablation = False
        args.efficiency_length = 4096
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:  # one memory figure, in its own process (compare_speed.peak_memory)
        variant, length = args.child
        figure = memory_child(variant, int(length), args.trg_len, args.hidden, args.layers)
        print(json.dumps(figure))
        return {}
    width = (args.hidden, args.layers)
    data_dir = Path(args.data_dir)
    tasks = [t for t in args.tasks
             if t != "scientific" or (data_dir / "scientific" / "train.jsonl").exists()]
    # Every task's rows are checked first: a bad row found late would end the run after measuring.
    datamodules = {task: quality_datamodule(task, data_dir) for task in tasks}
    # Rewritten after each part, so that a run that dies keeps its finished parts.
    partial = Path(args.out or RESULTS / "compare.json").with_suffix(".partial.json")

    throughput, memory, sampling = {}, {}, {}
    for length in args.lengths:
        throughput[length] = training_throughput(length, args.trg_len, *width, args.repeats)
        memory[length] = peak_memory(length, args.trg_len, *width)
        sampling[length] = {v: sampling_seconds(v, *width, length, args.trg_len, args.repeats)
                            for v in ("moe", "sdpa")}
        print(f"  length {length}: tokens/s {throughput[length]}, peak MB {memory[length]}, "
              f"sampling s {sampling[length]}")
    efficiency = {v: linear_efficiency(v, *width, args.efficiency_length, args.trg_len,
                                       args.repeats) for v in ("moe", "sdpa")}
    quality_variants = ("moe", "sdpa", ABLATION) if args.ablation else ("moe", "sdpa")
    qualities: dict[str, dict] = {}
    setup = {k: getattr(args, k) for k in ("lengths", "trg_len", "hidden", "layers", "repeats",
                                           "efficiency_length", "budget", "tasks", "docs", "seeds",
                                           "quick", "ablation")}
    # Shared by the partial files and the final payload; qualities fills in as tasks finish.
    measured = {"throughput_tokens_per_s": throughput, "peak_memory_mb": memory,
                "sampling_seconds_per_document": sampling, "linear_efficiency": efficiency,
                "quality": qualities}
    for task in tasks:
        write_json("compare", {"benchmark": "compare (partial)", "machine": machine_info(),
                               "setup": setup, **measured}, partial)
        qualities[task] = task_quality(task, datamodules[task], quality_variants, args)
    partial.unlink(missing_ok=True)

    summary = summarize(throughput, memory, sampling, efficiency, qualities)
    checks = target_checks(summary)
    profiles = {name: profile_table(name, summary, args)
                for name, c in checks.items() if not c["met"]}
    print_results(args.lengths, throughput, memory, sampling, efficiency, qualities, checks,
                  profiles)
    payload = {"benchmark": "compare", "machine": machine_info(), "setup": setup,
               # How quality was scored: the samples' text rule, val_loss's terms, the documents.
               "scoring": {"decode": DECODE,
                           "val_loss": "diffusion terms at the last training gamma",
                           "documents": DOCUMENT_SAMPLE},
               **measured, "summary": summary, "checks": checks, "profiles": profiles}
    path = write_json("compare", payload, args.out)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path}")
    return payload


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarize(throughput: dict, memory: dict, sampling: dict, efficiency: dict,
              qualities: dict) -> dict:
    """The figures the targets are judged on, from the measurements."""
    sampling_by_length = {n: _ratio(s["sdpa"], s["moe"]) for n, s in sampling.items()}
    at_4k, at_8k = throughput.get(4096, {}), throughput.get(8192, {})
    memory_8k = memory.get(8192, {})
    return {
        "train_speedup_4k": _ratio(at_4k.get("moe"), at_4k.get("sdpa")),
        "train_speedup_8k": _ratio(at_8k.get("moe"), at_8k.get("sdpa")),
        "memory_ratio_8k_eager": _ratio(memory_8k.get("moe"), memory_8k.get("eager")),
        "memory_ratio_8k_sdpa": _ratio(memory_8k.get("moe"), memory_8k.get("sdpa")),
        # The smallest over the lengths: the target holds at every length or not at all.
        "sampling_speedup": min(sampling_by_length.values()),
        "sampling_speedup_by_length": sampling_by_length,
        "linear_efficiency": {v: {k: e[k] for k in ("ffn", "projections")}
                              for v, e in efficiency.items()},
        # Means over the seeds; the interval: paired bootstrap over documents (seed-averaged).
        "quality": {t: {"moe_rougeL": q["moe"]["rougeL"], "baseline_rougeL": q["sdpa"]["rougeL"],
                        "rougeL_difference_ci95": paired_bootstrap_interval(
                            q["moe"]["rougeL_per_document"], q["sdpa"]["rougeL_per_document"]),
                        "seeds": q["moe"]["seeds"],
                        "moe_val_loss": q["moe"]["val_loss"],
                        "baseline_val_loss": q["sdpa"]["val_loss"],
                        **({"moe_no_absorbing_rougeL": q[ABLATION]["rougeL"]}
                           if ABLATION in q else {})}
                    for t, q in qualities.items()},
    }


def target_checks(summary: dict) -> dict:
    """The targets this run measured, met or not; quality: MoE-DiffuSeq's ROUGE-L not worse than
    the baseline's, judged by the paired interval over documents."""
    checks = {}
    for name, (op, target) in TARGETS.items():
        value = summary.get(name)
        if value is not None:
            met = value >= target if op == ">=" else value <= target
            checks[name] = {"measured": value, "target": f"{op} {target}", "met": met}
    for task, q in summary["quality"].items():
        # "Not worse" holds only when the paired interval's lower bound is at least 0; a point
        # estimate above 0 inside an interval that holds 0 is a tie, not a win.
        interval = q["rougeL_difference_ci95"]
        checks[f"quality_{task}"] = {"measured": q["moe_rougeL"] - q["baseline_rougeL"],
                                     "target": "interval lower bound >= 0 (ROUGE-L difference)",
                                     "met": interval[0] >= 0, "ci95": interval,
                                     "verdict": interval_verdict(interval)}
    return checks


def print_results(lengths, throughput, memory, sampling, efficiency, qualities, checks,
                  profiles) -> None:
    rows = [[n, *(throughput[n][v] for v in VARIANTS), *(memory[n][v] for v in VARIANTS),
             sampling[n]["moe"], sampling[n]["sdpa"]] for n in lengths]
    print_table(["length", "moe tok/s", "sdpa tok/s", "eager tok/s", "moe MB", "sdpa MB",
                 "eager MB", "moe sample s", "sdpa sample s"], rows)
    print_table(["model", "ffn", "projections"],
                [[v, e["ffn"], e["projections"]] for v, e in efficiency.items()])
    print_table(["task", "model", "s/step", "steps", "val loss", "ROUGE-L", "ROUGE-L sd", "BLEU"],
                [[t, v, q["seconds_per_step_calibrated"], q["steps"], q["val_loss"], q["rougeL"],
                  q["rougeL_std_over_seeds"], q["bleu"]]
                 for t, qs in qualities.items() for v, q in qs.items()])
    for name, c in checks.items():
        verdict = "OK" if c["met"] else "MISSED"
        if "verdict" in c:
            verdict += f" ({c['verdict']}, 95% interval [{c['ci95'][0]:+.3g}, {c['ci95'][1]:+.3g}])"
        print(f"{name}: {c['measured']:.3g} (target {c['target']}) {verdict}")
    for name, table in profiles.items():
        print(f"profile for {name}:\n{table}")


if __name__ == "__main__":
    main()
