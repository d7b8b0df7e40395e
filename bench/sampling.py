"""Sampling benchmark: quality versus speed of the samplers on one checkpoint, one run.

    python -m bench.sampling [--ckpt runs/quickstart/checkpoints/last.ckpt]
                             [--data data/code/validation.jsonl] [--docs 32] [--quick]
                             [--out FILE.json]

For ancestral (all T steps), ddim 200, dpm_solver++ 20 and 10: wall seconds per document,
BLEU and ROUGE-L against the references, and the speed-up over ancestral. Writes JSON and a
quality-versus-speed plot (like DiffuSeq-v2's figure 3).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moe_diffuseq.checkpoint import load_checkpoint
from moe_diffuseq.evaluation import score_generations

from .common import DOCUMENT_SAMPLE, machine_info, print_table, scored_documents, write_json

CONFIGS = [("ancestral", None), ("ddim", 200), ("dpm_solver++", 20), ("dpm_solver++", 10)]


def trained_steps(ckpt: str) -> int | None:
    """The checkpoint's optimizer step count: sample quality depends on it more than on anything
    else."""
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="runs/quickstart/checkpoints/last.ckpt")
    parser.add_argument("--data", default="data/code/validation.jsonl")
    parser.add_argument("--docs", type=int, default=32,
                        help="validation documents scored (a fixed random sample of the file)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--spacing", default="logsnr", choices=["logsnr", "time_uniform"])
    parser.add_argument("--quick", action="store_true", help="8 documents")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.docs = 8
    if not Path(args.ckpt).exists():
        raise SystemExit(f"error: {args.ckpt}: no checkpoint "
                         "(run `make quickstart` first or pass --ckpt)")
    model = load_checkpoint(args.ckpt)
    # a fixed random sample: the file's head is one place
    rows = scored_documents(Path(args.data), args.docs)
    sources, references = [r["src"] for r in rows], [r["trg"] for r in rows]

    records = []
    for sampler, steps in CONFIGS:
        start = time.perf_counter()
        hyps = model.generate(sources, sampler=sampler, steps=steps, seed=0,
                              batch_size=args.batch_size, num_candidates=1, spacing=args.spacing)
        seconds = (time.perf_counter() - start) / len(sources)
        scores = score_generations(hyps, references)
        records.append({
            "sampler": sampler,
            "steps": steps or model.schedule.steps,
            "seconds_per_document": seconds,
            "bleu": scores["bleu"],
            "sentence_bleu": scores["sentence_bleu"],
            "rougeL": scores["rougeL"],
        })
    base = records[0]
    for r in records:
        r["speedup_vs_ancestral"] = base["seconds_per_document"] / r["seconds_per_document"]
        r["bleu_vs_ancestral"] = r["bleu"] / base["bleu"] if base["bleu"] > 0 else None
        r["rougeL_vs_ancestral"] = r["rougeL"] / base["rougeL"] if base["rougeL"] > 0 else None
    dpm20 = next(r for r in records if r["sampler"] == "dpm_solver++" and r["steps"] == 20)
    checks = {
        "dpm20_speedup": {"target": 90.0, "measured": dpm20["speedup_vs_ancestral"],
                          "met": dpm20["speedup_vs_ancestral"] >= 90},
        "dpm20_bleu_ratio": {"target": 0.95, "measured": dpm20["bleu_vs_ancestral"],
                             "met": dpm20["bleu_vs_ancestral"] is not None
                             and dpm20["bleu_vs_ancestral"] >= 0.95},
    }
    print_table(["sampler", "steps", "s/doc", "speed-up", "BLEU", "sent-BLEU", "ROUGE-L"],
                [[r["sampler"], r["steps"], r["seconds_per_document"], r["speedup_vs_ancestral"],
                  r["bleu"], r["sentence_bleu"], r["rougeL"]] for r in records])
    for name, check in checks.items():
        measured = "n/a" if check["measured"] is None else f"{check['measured']:.3g}"
        print(f"{name}: {measured} (target {check['target']}) "
              f"{'OK' if check['met'] else 'MISSED'}")
    setup = {"ckpt": args.ckpt, "trained_steps": trained_steps(args.ckpt), "data": args.data,
             "docs": len(sources), "documents": DOCUMENT_SAMPLE, "spacing": args.spacing}
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
        ax.scatter(r["seconds_per_document"], r["bleu"])
        ax.annotate(f"{r['sampler']} {r['steps']}", (r["seconds_per_document"], r["bleu"]))
    ax.set_xscale("log")
    ax.set(xlabel="seconds per document (log)", ylabel="BLEU", title="quality versus sampling time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
