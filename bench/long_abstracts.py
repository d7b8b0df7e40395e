"""Long documents, generative: a vignette's body -> its abstract (the ``scientific`` corpus) at a
long source length. MoE-DiffuSeq and the DiffuSeq baseline train the same seconds, then each
writes the abstract of the same documents with 20-step DPM-Solver++; ROUGE-L per document gives
a paired bootstrap interval of MoE-DiffuSeq minus the baseline (and of each variant minus
MoE-DiffuSeq).

The protocol is bench/long_tasks.py's: every model first trains ``--short_minutes`` on the body's
first ``--short_tokens`` tokens (the abstracts' words and form, at a cheap step), then
``--minutes`` more with the source cut at ``--tokens``; the long stage reuses the short stage's
tokenizer and grows its position table. Scored are the validation and test documents whose body
holds at least half the length's characters. The corpus is small (about 100 training vignettes),
so the figures say what each model makes of the same seconds on a long source, not how well a
summariser generalises.

    python -m bench.long_abstracts --quick --out /tmp/long_abstracts.json  # under 10 minutes
    python -m bench.long_abstracts                     # make bench-long-abstracts

The full run's budget (2 CPU cores): 2 models x (4 minutes short + 6 minutes at 4k tokens +
scoring), about 25 minutes. ``--corpus`` takes any built seq2seq corpus (``code``, ``dialogue``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from data_modules import Seq2SeqDataModule, load_tokenizer
from data_modules.corpora import build, is_built
from moe_diffuseq import MoEDiffuSeq
from moe_diffuseq.metrics import interval_verdict as verdict
from moe_diffuseq.metrics import paired_bootstrap_interval, rouge_per_document

from .common import machine_info, print_table, write_json
from .learn import TrainingBudget, fit_for_budget
from .long_tasks import (
    CHARS_PER_TOKEN,
    DEFAULT_MODELS,
    LONG_STAGE,
    MODELS,
    NAMES,
    VARIANTS,
    add_run_options,
    grow_into,
    model_config,
    seed_mean,
)

TARGET_TOKENS = 256  # an abstract of up to ~190 words; longer ones are cut
SPLITS = ("validation", "test")  # the validation split alone holds a dozen vignettes


def scored_rows(corpus: str, data_dir: str, docs: int | None, min_chars: int) -> list[dict]:
    """The held-out rows (validation, then test) whose source holds at least ``min_chars``
    characters, at most ``docs`` of them."""
    rows = []
    for split in SPLITS:
        path = Path(data_dir) / corpus / f"{split}.jsonl"
        rows += [row for row in map(json.loads, path.read_text().splitlines())
                 if len(row["src"]) >= min_chars]
    if not rows:
        raise ValueError(f"{Path(data_dir) / corpus}: no validation or test source of {min_chars} "
                         "characters or more")
    return rows[:docs]


def train_stage(model_name: str, seed: int, args, max_src_len: int, minutes: float,
                batch_size: int, short: dict | None = None) -> tuple[MoEDiffuSeq, dict]:
    """Train ``model_name`` for ``minutes`` with sources cut at ``max_src_len`` tokens; from
    ``short`` (a short stage's weights and tokenizer) when given. Returns the model (on the
    trainer's device) and what the stage did."""
    pl.seed_everything(seed, verbose=False)
    sizes = {"max_src_len": max_src_len, "max_trg_len": TARGET_TOKENS}
    # The long stage reads with the short stage's tokenizer: its embeddings are trained on it.
    tokenizer_option = ({"tokenizer_path": short["tokenizer"]} if short
                        else {"tokenizer_vocab_size": args.vocab})
    data = Seq2SeqDataModule(corpus=args.corpus, data_dir=args.data_dir, batch_size=batch_size,
                             seed=seed, **tokenizer_option, **sizes)
    model = MoEDiffuSeq(**model_config(model_name, sizes, args, LONG_STAGE if short else None))
    if short:
        model.set_tokenizer(load_tokenizer(short["tokenizer"]))
        model.configure_model()
        grow_into(model, model_name, short["state"])
    budget = TrainingBudget(minutes * 60)
    trainer = fit_for_budget(model, data, budget, args.accelerator)
    tokenizer_file = short["tokenizer"] if short else str(data.tokenizer_file)
    return model, {"steps": trainer.global_step, "trained_s": round(budget.trained_s, 1),
                   "tokens_per_s": round(budget.positions / max(budget.trained_s, 1e-9)),
                   "tokenizer": tokenizer_file}


def score_rouge(model: MoEDiffuSeq, rows: list[dict]) -> dict:
    """ROUGE-L (F1, 0-100) of each document's sample against its abstract, and their mean."""
    start = time.perf_counter()
    samples = model.generate([r["src"] for r in rows], seed=0, sampler="dpm_solver++", steps=20,
                             restarts=0)
    per_doc = [d["rougeL"] for d in rouge_per_document(samples, [r["trg"] for r in rows])]
    words = [len(s.split()) for s in samples]
    return {"rougeL": sum(per_doc) / len(per_doc), "per_doc_rougeL": per_doc,
            "sample_words": sum(words) / len(words), "seconds": round(time.perf_counter() - start),
            "examples": [{"sample": s, "reference": r["trg"]}
                         for s, r in zip(samples[:2], rows[:2], strict=True)]}


def compare(runs: list[dict], models: list[str]) -> dict:
    """Per model the seed-mean ROUGE-L; the paired intervals of MoE-DiffuSeq minus the baseline
    and of each variant minus MoE-DiffuSeq, over documents (each document's seed mean)."""
    per_doc = {m: seed_mean([r for r in runs if r["model"] == m], "per_doc_rougeL")
               for m in models}
    intervals = {"rougeL_moe_minus_baseline": paired_bootstrap_interval(
        per_doc["moe_diffuseq"], per_doc["diffuseq"])}
    for m, (key, reference) in VARIANTS.items():  # long_tasks' pairs, scored by ROUGE-L
        if m in models:
            intervals[key.replace("f1_", "rougeL_", 1)] = paired_bootstrap_interval(
                per_doc[m], per_doc[reference])
    return {"rougeL": {m: sum(v) / len(v) for m, v in per_doc.items()},
            "intervals": {k: list(v) for k, v in intervals.items()},
            "verdicts": {k: verdict(v) for k, v in intervals.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1k tokens, 1 + 1 min per model, 8 documents")
    parser.add_argument("--corpus", default="scientific",
                        help="a seq2seq corpus (built if missing): scientific, code or dialogue")
    parser.add_argument("--tokens", type=int, default=None,
                        help="the long stage's source length in tokens (default 4096; quick 1024)")
    parser.add_argument("--short_tokens", type=int, default=256,
                        help="the short stage's source length in tokens")
    parser.add_argument("--short_minutes", type=float, default=None,
                        help="training minutes on short sources first (default 4; quick 1)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training minutes at --tokens (default 6; quick 1)")
    parser.add_argument("--models", nargs="+", default=["moe_diffuseq", "diffuseq"],
                        choices=list(DEFAULT_MODELS),
                        help="the models trained; moe_diffuseq and diffuseq are required")
    parser.add_argument("--seeds", type=int, default=1, help="seeds averaged per document")
    parser.add_argument("--docs", type=int, default=None,
                        help="held-out documents scored (default all; quick 8)")
    parser.add_argument("--short_batch_size", type=int, default=16)
    add_run_options(parser)
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (1024 if args.quick else 4096)
    args.short_minutes = args.short_minutes if args.short_minutes is not None else (
        1.0 if args.quick else 4.0)
    args.minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 6.0)
    args.docs = args.docs or (8 if args.quick else None)
    if missing := [m for m in ("moe_diffuseq", "diffuseq") if m not in args.models]:
        parser.error(f"--models: {' and '.join(missing)} missing: the interval compares "
                     "MoE-DiffuSeq with the baseline")
    if args.short_minutes <= 0 or args.minutes <= 0:
        parser.error("--short_minutes and --minutes must be > 0")
    if args.short_tokens >= args.tokens:
        parser.error(f"--short_tokens {args.short_tokens} must be below --tokens {args.tokens}")
    args.models = [m for m in MODELS if m in args.models]
    print(f"plan: {len(args.models) * args.seeds} models x ({args.short_minutes:g} min at "
          f"{args.short_tokens} tokens + {args.minutes:g} min at {args.tokens}), plus scoring",
          flush=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not is_built(args.corpus, Path(args.data_dir) / args.corpus):
        build(args.corpus, Path(args.data_dir) / args.corpus)
    min_chars = round(args.tokens * CHARS_PER_TOKEN / 2)  # sources that fill half the length
    rows = scored_rows(args.corpus, args.data_dir, args.docs, min_chars)

    runs, start = [], time.perf_counter()
    for model_name in args.models:
        for seed in range(args.seeds):
            print(f"== {model_name}, seed {seed}: {args.short_minutes:g} min at "
                  f"{args.short_tokens} tokens", flush=True)
            model, short_info = train_stage(model_name, seed, args, args.short_tokens,
                                            args.short_minutes, args.short_batch_size)
            short = {"state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                     "tokenizer": short_info["tokenizer"]}
            model, info = train_stage(model_name, seed, args, args.tokens, args.minutes,
                                      args.batch_size, short)
            result = score_rouge(model, rows)
            print(f"   {args.tokens} tokens: {info['steps']} steps, {info['tokens_per_s']} "
                  f"tokens/s, ROUGE-L {result['rougeL']:.1f}", flush=True)
            runs.append({"model": model_name, "seed": seed, "short_stage": short_info, **info,
                         **result})

    table = compare(runs, args.models)
    ci = table["intervals"]["rougeL_moe_minus_baseline"]
    print_table(["model", "long steps", "ROUGE-L"],
                [[NAMES[m], sum(r["steps"] for r in runs if r["model"] == m) / args.seeds,
                  table["rougeL"][m]] for m in args.models])
    print(f"MoE-DiffuSeq - baseline ROUGE-L: [{ci[0]:+.2f}, {ci[1]:+.2f}] "
          f"{table['verdicts']['rougeL_moe_minus_baseline']}")
    payload = {"machine": machine_info(),
               "settings": {**vars(args), "docs_scored": len(rows),
                            "source_chars_min": min_chars,
                            "target_tokens": TARGET_TOKENS,
                            "models": {m: MODELS[m] for m in args.models},
                            "sampler": "dpm_solver++ 20",
                            "wall_s": round(time.perf_counter() - start)},
               "runs": runs, "table": table,
               "summary": {"tokens": args.tokens, "rougeL": table["rougeL"],
                           "rougeL_moe_minus_baseline": ci,
                           "verdict": table["verdicts"]["rougeL_moe_minus_baseline"]}}
    write_json("long_abstracts", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
