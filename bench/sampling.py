"""Sampling benchmark: quality against speed of the samplers on one checkpoint, in one run.

    python -m bench.sampling [--ckpt runs/quickstart/checkpoints/last.ckpt]
                             [--data data/code-outline-600/validation.jsonl] [--docs 64]
                             [--quick] [--out FILE.json]

Every sampler answers the same documents from the same checkpoint and seed: ancestral over all T
steps (the reference), DDIM 200, DPM-Solver++ 20 and 10 and its SDE form at 20 steps, each alone,
then DPM-Solver++ 20 followed by restarts (``sampling.restarts``: the sample's tokens noised again
and sampled down in ``restart_steps`` steps). For each: denoiser calls and wall seconds per
document, the speed-up over ancestral, item F1 and exact match (answers that are `` ; `` lists:
the quickstart's task), BLEU and ROUGE-L, and a paired bootstrap interval over documents of its
item F1 minus ancestral's.
Writes JSON and a quality-against-time plot (like DiffuSeq-v2's figure 3).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moe_diffuseq.checkpoint import load_checkpoint
from moe_diffuseq.evaluation import score_generations
from moe_diffuseq.metrics import item_scores, paired_bootstrap_interval

from .common import (
    DOCUMENT_SAMPLE,
    format_interval,
    machine_info,
    print_table,
    scored_documents,
    write_json,
)

# (name, generate's sampling options). Every one sets restarts, so a checkpoint whose own
# sampling defaults restart cannot add restarts to a row that names none.
SAMPLERS: list[tuple[str, dict]] = [
    ("ancestral", {"sampler": "ancestral", "restarts": 0}),
    ("ddim 200", {"sampler": "ddim", "steps": 200, "restarts": 0}),
    ("dpm_solver++ 20", {"sampler": "dpm_solver++", "steps": 20, "restarts": 0}),
    ("dpm_solver++ 10", {"sampler": "dpm_solver++", "steps": 10, "restarts": 0}),
    ("sde_dpm_solver++ 20", {"sampler": "sde_dpm_solver++", "steps": 20, "restarts": 0}),
    ("dpm_solver++ 20 + 2 restarts", {"sampler": "dpm_solver++", "steps": 20, "restarts": 2}),
    ("dpm_solver++ 20 + 4 restarts", {"sampler": "dpm_solver++", "steps": 20, "restarts": 4}),
]
REFERENCE, FAST = "ancestral", "dpm_solver++ 20"
SPEEDUP_TARGET, QUALITY_RATIO_TARGET = 90.0, 0.95


def denoiser_calls(options: dict, diffusion_steps: int, restart_steps: int) -> int:
    """Denoiser evaluations per sample: one per step (DPM-Solver++ here is multistep), T for
    ancestral, plus each restart's steps."""
    first = diffusion_steps if options["sampler"] == "ancestral" else options["steps"]
    again = diffusion_steps if options["sampler"] == "ancestral" else restart_steps
    return first + options.get("restarts", 0) * again


def trained_steps(ckpt: str) -> int | None:
    """The checkpoint's optimizer step count: sample quality depends on it more than on anything
    else."""
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="runs/quickstart/checkpoints/last.ckpt")
    parser.add_argument("--data", default="data/code-outline-600/validation.jsonl",
                        help="jsonl with src and trg (default: the quickstart's task)")
    parser.add_argument("--docs", type=int, default=64,
                        help="validation documents scored (a fixed random sample of the file)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--spacing", default="logsnr", choices=["logsnr", "time_uniform"])
    parser.add_argument("--quick", action="store_true", help="8 documents")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.docs = 8
    for path, hint in ((args.ckpt, "run `make quickstart` first or pass --ckpt"),
                       (args.data, "run `make quickstart` (it builds the data) or pass --data")):
        if not Path(path).exists():
            raise SystemExit(f"error: {path}: no such file ({hint})")
    model = load_checkpoint(args.ckpt)
    rows = scored_documents(Path(args.data), args.docs)
    sources, references = [r["src"] for r in rows], [r["trg"] for r in rows]
    restart_steps = model.sampling_config.restart_steps

    records = []
    for name, options in SAMPLERS:
        start = time.perf_counter()
        hyps = model.generate(sources, seed=0, batch_size=args.batch_size, num_candidates=1,
                              spacing=args.spacing, **options)
        seconds = (time.perf_counter() - start) / len(sources)
        scores = score_generations(hyps, references)
        records.append({
            "name": name, "options": options,
            "denoiser_calls": denoiser_calls(options, model.schedule.steps, restart_steps),
            "seconds_per_document": seconds,
            "item_f1": scores["item_f1"], "exact_match": scores["exact_match"],
            "bleu": scores["bleu"], "rougeL": scores["rougeL"],
            "per_doc_f1": [item_scores(h, r)["item_f1"]
                           for h, r in zip(hyps, references, strict=True)],
            "examples": [{"sample": h, "reference": r}
                         for h, r in zip(hyps[:3], references[:3], strict=True)],
        })
    base = next(r for r in records if r["name"] == REFERENCE)
    for r in records:
        r["speedup_vs_ancestral"] = base["seconds_per_document"] / r["seconds_per_document"]
        r["item_f1_vs_ancestral"] = r["item_f1"] / base["item_f1"] if base["item_f1"] else None
        r["f1_minus_ancestral"] = list(paired_bootstrap_interval(r["per_doc_f1"],
                                                                 base["per_doc_f1"]))
    fast = next(r for r in records if r["name"] == FAST)
    ratio = fast["item_f1_vs_ancestral"]
    checks = {
        "dpm20_speedup": {"target": SPEEDUP_TARGET, "measured": fast["speedup_vs_ancestral"],
                          "met": fast["speedup_vs_ancestral"] >= SPEEDUP_TARGET},
        "dpm20_item_f1_ratio": {"target": QUALITY_RATIO_TARGET, "measured": ratio,
                                "met": ratio is not None and ratio >= QUALITY_RATIO_TARGET},
    }
    print_table(["sampler", "calls", "s/doc", "speed-up", "item F1", "exact", "F1 - ancestral",
                 "BLEU", "ROUGE-L"],
                [[r["name"], r["denoiser_calls"], r["seconds_per_document"],
                  r["speedup_vs_ancestral"], r["item_f1"], r["exact_match"],
                  format_interval(r["f1_minus_ancestral"]),
                  r["bleu"], r["rougeL"]] for r in records])
    for name, check in checks.items():
        measured = "n/a" if check["measured"] is None else f"{check['measured']:.3g}"
        print(f"{name}: {measured} (target {check['target']}) "
              f"{'OK' if check['met'] else 'MISSED'}")
    setup = {"ckpt": args.ckpt, "trained_steps": trained_steps(args.ckpt), "data": args.data,
             "docs": len(sources), "documents": DOCUMENT_SAMPLE, "spacing": args.spacing,
             "restart_noise": model.sampling_config.restart_noise,
             "restart_steps": restart_steps, "decode": model.sampling_config.decode}
    payload = {"benchmark": "sampling", "setup": setup,
               "machine": machine_info(), "results": records, "checks": checks}
    path = write_json("sampling", payload, args.out)
    plot(records, path.with_suffix(".png"))
    print(f"wrote {path}")
    return payload


def plot(records: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        ax.scatter(r["seconds_per_document"], r["item_f1"])
        ax.annotate(r["name"], (r["seconds_per_document"], r["item_f1"]), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="seconds per document (log)", ylabel="item F1",
           title="quality against sampling time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
