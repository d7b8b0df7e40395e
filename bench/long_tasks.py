"""Long documents at equal wall-clock: MoE-DiffuSeq with the target reading the whole source
(``target_global`` with global target rows, the default), the same global both ways
(``target_keys: true``), the same with the window only, and the DiffuSeq baseline (full sdpa
attention, a dense FFN of the same active width), on tasks with exact answers at sources of 1k to
8k tokens.

Training is staged (Longformer, too, trained in stages of growing length): every model first
trains ``--short_minutes`` on the same task with short sources (``--short_chars``, 600
characters), where a step is cheap and the task's format and pointer are learned; that state is
then trained ``--minutes`` more at each long source length. The source positions past the short
stage's are new rows of the position table, learned in the long stage only. Both stages are the
same seconds of training steps for every model, on the same data and seed, with the learning
benchmark's recipe (bench/learn.py); the long stage reuses the short corpus's tokenizer. From
scratch, a long step costs 10-30x a short one, and no model answered a single long document right
in minutes of CPU.

Each model then answers the same validation documents with 20-step DPM-Solver++ (the sampler is
shared, so only the architecture and the steps it bought differ). Only documents whose source
holds at least half the length's characters are scored, so a length's figures are about sources
that long; the JSON records their measured mean and largest in tokens. Item F1 and exact match
per document give paired bootstrap intervals of MoE-DiffuSeq minus the baseline, and of each
variant minus MoE-DiffuSeq.

    python -m bench.long_tasks --quick --out /tmp/long_tasks.json   # under 10 minutes
    python -m bench.long_tasks                                      # make bench-long

The full run's budget (2 CPU cores): 4 models x (4 minutes short + 3 lengths x (2 minutes long +
scoring)) per task and seed, about 55 minutes a task; the default two tasks (code-lookup,
dialogue-cast) take about 2 hours, and the plan is printed before it starts. code-outline's
targets of 256 tokens cost more still; dialogue-cast's scenes rarely reach 8k tokens (its 8k
length scores the few that hold 4k or more). ``--models moe_diffuseq diffuseq`` trains only the
pair every interval is about, half the time. Two models swap one part for the long stage only,
starting from the short stage of the model they share every parameter with:
``moe_full_attention`` (MoE-DiffuSeq's experts, full attention) and ``dense_windowed`` (the
baseline's dense FFN, MoE-DiffuSeq's attention); against MoE-DiffuSeq they tell what its
attention and what its experts cost a long stage (with all four run, the JSON records each
part's main effect over the 2x2). ``moe_shared_expert`` (every token through one shared expert
beside its top-1 routed one, the same active width) and ``moe_frozen_experts`` (MoE-DiffuSeq's
short stage, its router and experts kept fixed in the long stage) are asked for by name too, as
are ``moe_sdpa`` (the experts with full attention in both stages) and ``moe_full_short``
(MoE-DiffuSeq's long stage from ``moe_sdpa``'s short stage: full attention while it is cheap).
``moe_long_batch`` and ``diffuseq_long_batch`` train their long stage on 3x ``--batch_size``, from
MoE-DiffuSeq's and the baseline's short stages: what a model's long steps buy as larger batches.
``moe_free_router`` trains both stages without the load-balance loss, ``dense_windowed_both`` the
baseline's dense FFN with MoE-DiffuSeq's attention in both stages.
On a GPU pass larger ``--minutes`` and ``--short_minutes``. ``--minutes 0`` scores each short
stage's model at the long lengths as it is; ``--short_cache DIR`` keeps each short stage and
loads it when a later run asks for the same one, so that long-stage settings (``--minutes``,
``--long_lr``) can be compared on one stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from data_modules import Seq2SeqDataModule, load_tokenizer
from data_modules.corpora import build, is_built
from data_modules.corpora.tasks import one_line_defs
from moe_diffuseq import MoEDiffuSeq
from moe_diffuseq.metrics import interval_verdict as verdict
from moe_diffuseq.metrics import paired_bootstrap_interval
from moe_diffuseq.warm_start import WarmStart, sampling_weights

from .common import QUICKSTART_EXPERTS, QUICKSTART_WIDTH, machine_info, print_table, write_json
from .learn import (
    RECIPE,
    TrainingBudget,
    budgets,
    fit_for_budget,
    guess_floor,
    merged,
    score,
    validation_rows,
)
from .learn import corpus as short_corpus

# Sources of about `tokens` tokens: a 4k BPE reads 3.5-3.6 characters a token of stdlib code on
# average (2.3 at worst), so the runs are cut at 3.5 characters a token and the model's source
# budget is 1.5x the name, which no source outgrows.
CHARS_PER_TOKEN = 3.5
BUDGET_FACTOR = 1.5
TARGET_TOKENS = {"code-outline": 256, "dialogue-cast": 64, "code-lookup": 32}
TASKS = tuple(TARGET_TOKENS)
DEFAULT_TASKS = ("code-lookup", "dialogue-cast")  # what 2 CPU cores do in about 2 hours
WIDTH = {**QUICKSTART_WIDTH, "dropout": 0.0}
EXPERTS = QUICKSTART_EXPERTS
# MoE-DiffuSeq's attention: the window with global target rows only.
ROWS_ONLY = {"window": 256, "target_global": True, "target_keys": False}
# A dense FFN of the same active width as top_k experts of expert_hidden.
DENSE_HIDDEN = EXPERTS["top_k"] * EXPERTS["expert_hidden"]
DENSE_FFN = {"moe": None, "ffn_hidden": DENSE_HIDDEN}
# The baseline's attention: full attention through sdpa.
FULL_SDPA = {"backend": "full_sdpa"}
# Every attention setting spelled out, so that a changed default cannot change what a name measures.
MODELS: dict[str, dict] = {
    "moe_diffuseq": {"network": {**WIDTH, "attention": ROWS_ONLY,
                                 "moe": EXPERTS}},
    "moe_both_ways": {"network": {**WIDTH, "attention": {"window": 256, "target_global": True,
                                                         "target_keys": True},
                                  "moe": EXPERTS}},
    "moe_window_only": {"network": {**WIDTH, "attention": {"window": 256, "target_global": False},
                                    "moe": EXPERTS}},
    # Every token through one shared expert and its top-1 routed one (DeepSeekMoE's shared
    # expert): the same active width, a dense path that learns from every token.
    "moe_shared_expert": {"network": {**WIDTH, "attention": ROWS_ONLY,
                                      "moe": {**EXPERTS, "top_k": 1, "shared_expert": True}}},
    # MoE-DiffuSeq whose router and experts stay as the short stage left them (ST-MoE fine-tuned
    # the non-expert parameters alone as well as all): whether updating them costs the long stage.
    "moe_frozen_experts": {"network": {**WIDTH, "attention": ROWS_ONLY,
                                       "moe": EXPERTS}},
    # MoE-DiffuSeq's experts with full attention in both stages, and MoE-DiffuSeq whose short
    # stage is that one (Longformer, too, started from a full-attention model): at 600 characters
    # both attentions cost about the same, and the long stage alone is windowed.
    "moe_sdpa": {"network": {**WIDTH, "attention": FULL_SDPA, "moe": EXPERTS}},
    "moe_full_short": {"network": {**WIDTH, "attention": ROWS_ONLY,
                                   "moe": EXPERTS}},
    # MoE-DiffuSeq without the load-balance loss in either stage: a router free to sharpen, so
    # that a token keeps its experts while the rest of the network trains.
    "moe_free_router": {"network": {**WIDTH, "attention": ROWS_ONLY,
                                    "moe": {**EXPERTS, "load_balance_coef": 0.0}}},
    # MoE-DiffuSeq whose long stage spends its faster steps on larger batches (LONG_BATCH_FACTOR):
    # about the baseline's step count at 4k, each step averaging out more of the noise of a
    # batch of four long documents.
    "moe_long_batch": {"network": {**WIDTH, "attention": ROWS_ONLY,
                                   "moe": EXPERTS}},
    # One part of each model swapped for the long stage only (see SHORT_STAGE_OF): MoE-DiffuSeq's
    # experts with full attention, and the baseline's dense FFN with MoE-DiffuSeq's attention.
    "moe_full_attention": {"network": {**WIDTH, "attention": FULL_SDPA, "moe": EXPERTS}},
    "dense_windowed": {"network": {**WIDTH, "attention": ROWS_ONLY, **DENSE_FFN}},
    # The baseline's dense FFN with MoE-DiffuSeq's attention in both stages (dense_windowed's
    # short stage has full attention): the dense FFN from a windowed short stage.
    "dense_windowed_both": {"network": {**WIDTH, "attention": ROWS_ONLY, **DENSE_FFN}},
    # The same active width as top_k experts of expert_hidden, every token through one FFN.
    "diffuseq": {"network": {**WIDTH, "attention": FULL_SDPA, **DENSE_FFN}},
    # The baseline given the same larger long-stage batch: whether the batch, not the steps
    # MoE-DiffuSeq buys with it, is what helps.
    "diffuseq_long_batch": {"network": {**WIDTH, "attention": FULL_SDPA, **DENSE_FFN}},
}
NAMES = {"moe_diffuseq": "MoE-DiffuSeq", "moe_both_ways": "MoE-DiffuSeq, global both ways",
         "moe_window_only": "MoE-DiffuSeq, window only",
         "moe_shared_expert": "MoE-DiffuSeq, a shared expert and top-1",
         "moe_frozen_experts": "MoE-DiffuSeq, router and experts frozen in the long stage",
         "moe_sdpa": "MoE-DiffuSeq's experts, full attention in both stages",
         "moe_full_short": "MoE-DiffuSeq from a full-attention short stage",
         "moe_long_batch": "MoE-DiffuSeq, 3x the batch in the long stage",
         "moe_free_router": "MoE-DiffuSeq, no load-balance loss",
         "moe_full_attention": "MoE-DiffuSeq, full attention in the long stage",
         "dense_windowed": "dense FFN, MoE-DiffuSeq's attention in the long stage",
         "dense_windowed_both": "dense FFN, MoE-DiffuSeq's attention in both stages",
         "diffuseq": "DiffuSeq (sdpa)",
         "diffuseq_long_batch": "DiffuSeq (sdpa), 3x the batch in the long stage"}
# What `make bench-long` trains: the swapped models below are asked for by name.
DEFAULT_MODELS = ("moe_diffuseq", "moe_both_ways", "moe_window_only", "diffuseq")
# The swapped models start from the short stage of the model whose parameters they share (the
# attention backend has none of its own), so the long stage alone tells attention from experts:
# at the short stage's 600 characters the window covers most pairs, the target reads every one.
SHORT_STAGE_OF = {"moe_full_attention": "moe_diffuseq", "dense_windowed": "diffuseq",
                  "moe_frozen_experts": "moe_diffuseq", "moe_full_short": "moe_sdpa",
                  "moe_long_batch": "moe_diffuseq", "diffuseq_long_batch": "diffuseq"}
# Parameters (by name part) that a model keeps fixed in the long stage.
FROZEN_IN_LONG_STAGE = {"moe_frozen_experts": (".router.", ".experts.")}
# The long stage's batch of a model, as a multiple of --batch_size.
LONG_BATCH_FACTOR = {"moe_long_batch": 3, "diffuseq_long_batch": 3}
# Each variant's interval: its item F1 minus the reference's, paired over the same documents.
VARIANTS: dict[str, tuple[str, str]] = {
    "moe_both_ways": ("f1_both_ways_minus_moe", "moe_diffuseq"),
    "moe_window_only": ("f1_window_only_minus_moe", "moe_diffuseq"),
    "moe_shared_expert": ("f1_shared_expert_minus_moe", "moe_diffuseq"),
    "moe_frozen_experts": ("f1_frozen_experts_minus_moe", "moe_diffuseq"),
    "moe_sdpa": ("f1_sdpa_experts_minus_moe", "moe_diffuseq"),
    "moe_full_short": ("f1_full_short_minus_moe", "moe_diffuseq"),
    "moe_long_batch": ("f1_long_batch_minus_moe", "moe_diffuseq"),
    "moe_free_router": ("f1_free_router_minus_moe", "moe_diffuseq"),
    "diffuseq_long_batch": ("f1_baseline_long_batch_minus_baseline", "diffuseq"),
    # Attention with the experts kept, and experts with the attention kept.
    "moe_full_attention": ("f1_full_attention_minus_moe", "moe_diffuseq"),
    "dense_windowed": ("f1_dense_windowed_minus_moe", "moe_diffuseq"),
    "dense_windowed_both": ("f1_dense_windowed_both_minus_moe", "moe_diffuseq"),
}
# The 2x2 of the long stage's attention and the FFN: (experts, window), (experts, full),
# (dense, window), (dense, full). With all four run, each part's main effect is recorded.
FACTORIAL = ("moe_diffuseq", "moe_full_attention", "dense_windowed", "diffuseq")
# The long stage restarts Adam; a short warm-up keeps its first steps from undoing the short stage.
LONG_STAGE = {"warmup_steps": 10}


def corpus(task: str, tokens: int) -> str:
    """The corpus name of a task with sources of at most ``tokens`` tokens."""
    return f"{task}-{round(tokens * CHARS_PER_TOKEN)}"


def source_tokens(tokenizer, rows: list[dict]) -> dict:
    """Mean and largest source length, in tokens of the run's tokenizer, of the scored rows."""
    lengths = [len(tokenizer.encode(r["src"], add_special_tokens=False).ids) for r in rows]
    return {"mean": round(sum(lengths) / len(lengths)), "max": max(lengths)}


def long_rows(name: str, data_dir: str, docs: int, min_chars: int) -> list[dict]:
    """The first ``docs`` validation rows (a fixed random sample, seed 0) whose source holds at
    least ``min_chars`` characters."""
    kept = [r for r in validation_rows(name, data_dir, None) if len(r["src"]) >= min_chars][:docs]
    if not kept:
        raise ValueError(f"{Path(data_dir) / name / 'validation.jsonl'}: no validation source of "
                         f"{min_chars} characters or more")
    return kept


def grow_into(model: MoEDiffuSeq, model_name: str, state: dict[str, torch.Tensor]) -> None:
    """Start ``model`` from a short stage's weights as ``model.init_from`` starts a run: its
    position table keeps the short one's rows first (the extra rows stay as initialised)."""
    model.warm_start(WarmStart(f"the short stage of {model_name}", sampling_weights(state),
                               None, {}))


def freeze_for_long_stage(model: MoEDiffuSeq, model_name: str) -> list[str]:
    """Fix the parameters ``FROZEN_IN_LONG_STAGE`` names for ``model_name``; returns their names."""
    parts = FROZEN_IN_LONG_STAGE.get(model_name, ())
    frozen = []
    for key, parameter in model.named_parameters():
        if any(part in key for part in parts):
            parameter.requires_grad_(False)  # AdamW skips a parameter with no gradient
            frozen.append(key)
    return frozen


def long_batch_size(model_name: str, args) -> int:
    """The long stage's batch of ``model_name``: ``--batch_size`` times its LONG_BATCH_FACTOR."""
    return args.batch_size * LONG_BATCH_FACTOR.get(model_name, 1)


def model_config(model_name: str, sizes: dict, args, change: dict | None = None) -> dict:
    config = merged(merged(RECIPE, MODELS[model_name]), {"network": sizes})
    return merged(merged(config, change or {}), args.model)


def short_sizes(task: str, args) -> dict:
    """The short stage's source and target budgets."""
    return {**budgets(task, args.short_chars), "max_trg_len": TARGET_TOKENS[task]}


def short_stage_file(task: str, model_name: str, seed: int, args) -> Path:
    """Where ``--short_cache`` keeps a short stage: named by everything the stage depends on."""
    settings = {"task": task, "seed": seed,
                "config": model_config(model_name, short_sizes(task, args), args),
                **{key: getattr(args, key) for key in ("short_minutes", "short_chars",
                                                       "short_batch_size", "vocab", "data_dir")}}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(args.short_cache) / f"{task}-{model_name}-seed{seed}-{digest}.pt"


def short_stage(task: str, model_name: str, seed: int, args) -> dict:
    """Train ``model_name`` for ``args.short_minutes`` on the task's short sources; returns its
    weights (CPU), the tokenizer file the long stage reuses, and what the stage did. With
    ``--short_cache``, a stage trained before under the same settings is loaded instead."""
    cached = short_stage_file(task, model_name, seed, args) if args.short_cache else None
    if cached is not None and cached.exists():
        print(f"   short stage from {cached}", flush=True)
        return torch.load(cached, map_location="cpu", weights_only=True)
    pl.seed_everything(seed, verbose=False)
    name = short_corpus(task, args.short_chars)
    sizes = short_sizes(task, args)
    data = Seq2SeqDataModule(corpus=name, data_dir=args.data_dir, batch_size=args.short_batch_size,
                             tokenizer_vocab_size=args.vocab, seed=seed, **sizes)
    model = MoEDiffuSeq(**model_config(model_name, sizes, args))
    budget = TrainingBudget(args.short_minutes * 60)
    trainer = fit_for_budget(model, data, budget, args.accelerator)
    stage = {"state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
             "tokenizer": str(data.tokenizer_file),
             "info": {"steps": trainer.global_step, "trained_s": round(budget.trained_s, 1)}}
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(stage, cached)
    return stage


def train_and_score(task: str, tokens: int, model_name: str, seed: int, args,
                    rows: list[dict], short: dict) -> dict:
    """The short stage's model trained ``args.minutes`` more at this length, then scored."""
    pl.seed_everything(seed, verbose=False)
    sizes = {"max_src_len": -(-int(tokens * BUDGET_FACTOR) // 32) * 32,
             "max_trg_len": TARGET_TOKENS[task]}
    data = Seq2SeqDataModule(corpus=corpus(task, tokens), data_dir=args.data_dir,
                             batch_size=long_batch_size(model_name, args),
                             tokenizer_path=short["tokenizer"],
                             seed=seed, **sizes)
    long_stage = LONG_STAGE if args.long_lr is None else {**LONG_STAGE, "lr": args.long_lr}
    model = MoEDiffuSeq(**model_config(model_name, sizes, args, long_stage))
    tokenizer = load_tokenizer(short["tokenizer"])
    model.set_tokenizer(tokenizer)
    model.configure_model()
    grow_into(model, model_name, short["state"])
    frozen = freeze_for_long_stage(model, model_name)
    budget = TrainingBudget(args.minutes * 60)
    if args.minutes > 0:
        trainer = fit_for_budget(model, data, budget, args.accelerator)
    else:
        trainer = None
        model.to(torch.device("cuda" if args.accelerator != "cpu" and torch.cuda.is_available()
                              else "cpu"))
    # Plain DPM-Solver++ 20, as settings.sampler says: the recipe would add its restarts.
    result = score(model, rows, sampler="dpm_solver++", steps=20, restarts=0)
    return {"task": task, "tokens": tokens, "model": model_name, "seed": seed,
            "short_stage": short["info"], "frozen_parameters": len(frozen),
            "batch_size": long_batch_size(model_name, args),
            "steps": trainer.global_step if trainer else 0, "trained_s": round(budget.trained_s, 1),
            "tokens_per_s": round(budget.positions / max(budget.trained_s, 1e-9)),
            "source_tokens": source_tokens(tokenizer, rows), **floor(task, rows, result),
            **lookup_breakdown(task, tokenizer, rows, result), **result}


def floor(task: str, rows: list[dict], result: dict) -> dict:
    """code-lookup's floor (a random def line of the source) and the paired interval of the
    model's exact match minus it; nothing for the other tasks."""
    if task != "code-lookup":
        return {}
    mean, interval = guess_floor(rows, result["per_doc_exact"])
    return {"guess_exact": mean, "exact_minus_guess_interval": interval}


# Bins of how far back, in source tokens, code-lookup's answer lies from its question (the
# default window reaches 128 positions to each side), and of how many def lines its source holds.
DISTANCE_EDGES = (0, 128, 1024, 4096, 8192)
CANDIDATE_EDGES = (1, 6, 16, 41)


def binned(values: list[int], exact: list[float], edges: tuple[int, ...]) -> list[dict]:
    """Mean exact match per bin ``[edge, next edge)`` of ``values``; empty bins left out."""
    bins: dict[int, list[float]] = {}
    for value, right in zip(values, exact, strict=True):
        bins.setdefault(max(e for e in edges if e <= value), []).append(right)
    return [{"from": edge, "docs": len(v), "exact_match": sum(v) / len(v)}
            for edge, v in sorted(bins.items())]


def lookup_breakdown(task: str, tokenizer, rows: list[dict], result: dict) -> dict:
    """code-lookup's exact match per bin of the answer's distance from the question (source
    tokens from its def line to the end of the source) and per bin of the source's def lines
    (the candidates a lookup chooses among): which long sources are the hard ones. Nothing for
    the other tasks."""
    if task != "code-lookup":
        return {}
    back, candidates = [], []
    for row in rows:
        # The answer is a line of the source; the last copy is the one nearest the question.
        where = max(row["src"].rfind(row["trg"].strip()), 0)
        back.append(len(tokenizer.encode(row["src"][where:], add_special_tokens=False).ids))
        candidates.append(max(1, len(one_line_defs(row["src"]))))
    exact = result["per_doc_exact"]
    return {"exact_by_answer_distance": binned(back, exact, DISTANCE_EDGES),
            "exact_by_def_lines": binned(candidates, exact, CANDIDATE_EDGES)}


def seed_mean(runs: list[dict], key: str) -> list[float]:
    """Per-document ``key`` averaged over the runs' seeds (the runs share their documents)."""
    return [sum(col) / len(col) for col in zip(*(r[key] for r in runs), strict=True)]


def compare(results: list[dict], tasks: list[str], lengths: list[int],
            models: list[str] | None = None) -> dict:
    """{task: {tokens: {model: means, "intervals": paired intervals}}} over the seeds, for
    ``models`` (default all; MoE-DiffuSeq and the baseline always among them)."""
    models = models or list(MODELS)
    out: dict = {}
    for task in tasks:
        for tokens in lengths:
            cell = {}
            by_model = {m: [r for r in results if (r["task"], r["tokens"], r["model"])
                            == (task, tokens, m)] for m in models}
            if not all(by_model.values()):
                continue
            f1 = {m: seed_mean(runs, "per_doc_f1") for m, runs in by_model.items()}
            exact = {m: seed_mean(runs, "per_doc_exact") for m, runs in by_model.items()}
            for m in models:
                cell[m] = {"item_f1": sum(f1[m]) / len(f1[m]),
                           "exact_match": sum(exact[m]) / len(exact[m]),
                           "steps": sum(r["steps"] for r in by_model[m]) / len(by_model[m]),
                           "tokens_per_s": sum(r["tokens_per_s"] for r in by_model[m])
                           / len(by_model[m])}
            pairs = {"f1_moe_minus_baseline": (f1["moe_diffuseq"], f1["diffuseq"]),
                     "exact_moe_minus_baseline": (exact["moe_diffuseq"], exact["diffuseq"]),
                     **{key: (f1[m], f1[reference]) for m, (key, reference) in VARIANTS.items()
                        if m in models}}
            cell["intervals"] = {name: list(paired_bootstrap_interval(a, b))
                                 for name, (a, b) in pairs.items()}
            if all(m in models for m in FACTORIAL):
                cell["factorial"] = main_effects(*(f1[m] for m in FACTORIAL))
            out.setdefault(task, {})[str(tokens)] = cell
    return out


def main_effects(moe_window: list[float], moe_full: list[float], dense_window: list[float],
                 dense_full: list[float]) -> dict:
    """Per-document item F1 of the 2x2 -> each part's main effect (full attention minus the
    window, a dense FFN minus the experts, each averaged over the other part): the mean and a
    bootstrap interval over documents."""
    cells = list(zip(moe_window, moe_full, dense_window, dense_full, strict=True))
    effects = {"full_attention_minus_window": [(b - a + d - c) / 2 for a, b, c, d in cells],
               "dense_ffn_minus_experts": [(c - a + d - b) / 2 for a, b, c, d in cells]}
    return {name: {"mean": sum(v) / len(v),
                   "interval": list(paired_bootstrap_interval(v, [0.0] * len(v)))}
            for name, v in effects.items()}


def summarise(table: dict, lengths: list[int]) -> dict:
    """The JSON summary: throughput ratios at 8k, F1 per task, model and length, and the first
    length at which MoE-DiffuSeq wins on item F1 (interval above 0) in at least two tasks."""

    def speed(task_cells: dict, model: str) -> float | None:
        cell = task_cells.get("8192", {})
        return cell[model]["tokens_per_s"] if model in cell else None

    ratios = {"target_global_cost_8k": [], "speedup_vs_sdpa_8k": []}
    for cells in table.values():
        on, off, base = (speed(cells, m) for m in ("moe_diffuseq", "moe_window_only", "diffuseq"))
        if on and off:
            ratios["target_global_cost_8k"].append(off / on)
        if on and base:  # a run without the window-only model still has this ratio
            ratios["speedup_vs_sdpa_8k"].append(on / base)
    f1 = {task: {m: {length: cell[m]["item_f1"] for length, cell in cells.items()}
                 for m in MODELS if all(m in cell for cell in cells.values())}
          for task, cells in table.items()}
    wins_from = None
    for tokens in lengths:
        wins = [task for task, cells in table.items() if str(tokens) in cells
                and verdict(cells[str(tokens)]["intervals"]["f1_moe_minus_baseline"]) == "better"]
        if len(wins) >= 2:
            wins_from = tokens
            break
    return {
        **{k: (sum(v) / len(v) if v else None) for k, v in ratios.items()},
        "f1": f1,
        "moe_wins_from_tokens": wins_from,
        "verdicts": {task: {length: verdict(cell["intervals"]["f1_moe_minus_baseline"])
                            for length, cell in cells.items()} for task, cells in table.items()},
    }


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(table)), figsize=(4.5 * max(1, len(table)), 3.6),
                             squeeze=False)
    for ax, (task, cells) in zip(axes[0], table.items(), strict=False):
        lengths = sorted(cells, key=int)
        for m in (m for m in MODELS if m in cells[lengths[0]]):
            ax.plot([int(n) for n in lengths], [cells[n][m]["item_f1"] for n in lengths],
                    marker="o", label=NAMES[m])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("source tokens")
        ax.set_ylabel("item F1, DPM-Solver++ 20")
        ax.set_title(task)
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every staged long benchmark shares: long-stage batch, vocabulary, device,
    data, output and a config change for every model."""
    parser.add_argument("--batch_size", type=int, default=4, help="the long stage's batch")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--accelerator", default="auto",
                        help="Lightning accelerator: auto (a GPU where present), cpu or gpu")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", type=json.loads, default={},
                        help="JSON merged into every model's config, e.g. a smaller network")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="code-lookup at 4k tokens, 1 + 0.5 min per model, 16 documents")
    parser.add_argument("--tasks", nargs="+", default=None, choices=TASKS,
                        help=f"default {' '.join(DEFAULT_TASKS)}; quick code-lookup")
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="source lengths in tokens (default 1024 4096 8192; quick 4096)")
    parser.add_argument("--short_minutes", type=float, default=None,
                        help="training minutes on short sources first (default 4; quick 1)")
    parser.add_argument("--short_chars", type=int, default=600,
                        help="the short stage's longest source, in characters")
    parser.add_argument("--short_batch_size", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=None,
                        help="training minutes at each long length (default 2; quick 0.5; "
                             "0 scores the short stage's model as it is)")
    parser.add_argument("--long_lr", type=float, default=None,
                        help="the long stage's peak learning rate (default: the recipe's)")
    parser.add_argument("--short_cache", default=None,
                        help="a folder that keeps each short stage, and loads it when the same "
                             "model, task, seed and stage settings come again (a clock-budgeted "
                             "stage: reuse it on the machine that trained it)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        choices=list(MODELS),
                        help=f"the models trained (default {' '.join(DEFAULT_MODELS)}); "
                             "moe_diffuseq and diffuseq, the pair every interval is about, are "
                             "required")
    parser.add_argument("--seeds", type=int, default=1, help="seeds averaged per document")
    parser.add_argument("--docs", type=int, default=None,
                        help="validation documents scored (default 32; quick 16)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    tasks = args.tasks or (["code-lookup"] if args.quick else list(DEFAULT_TASKS))
    lengths = sorted(args.lengths or ([4096] if args.quick else [1024, 4096, 8192]))
    if args.minutes is None:
        args.minutes = 0.5 if args.quick else 2.0
    if args.short_minutes is None:
        args.short_minutes = 1.0 if args.quick else 4.0
    if args.short_minutes <= 0:
        parser.error("--short_minutes must be > 0: the long stage starts from its model")
    if args.model.get("network", {}).get("positions", "target_relative") == "absolute":
        parser.error("--model: the stages need the target's own positions (target_relative or "
                     "target_anchored): a target slot must keep its position when the source grows")
    if missing := [m for m in ("moe_diffuseq", "diffuseq") if m not in args.models]:
        parser.error(f"--models: {' and '.join(missing)} missing: every interval compares "
                     "MoE-DiffuSeq with the baseline")
    args.models = [m for m in MODELS if m in args.models]  # table order, no repeats
    args.docs = args.docs or (16 if args.quick else 32)
    runs = len(tasks) * len(args.models) * args.seeds
    # A swapped model trains no short stage of its own.
    short_stages = len(tasks) * len({SHORT_STAGE_OF.get(m, m) for m in args.models}) * args.seeds
    print(f"plan: {short_stages} short stages x {args.short_minutes:g} min + {runs} models x "
          f"{len(lengths)} lengths x {args.minutes:g} min = "
          f"{short_stages * args.short_minutes + runs * len(lengths) * args.minutes:.0f} min "
          "training (less for short stages found in --short_cache), plus data and scoring",
          flush=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    for task in tasks:  # build what is missing first
        for name in (short_corpus(task, args.short_chars), *(corpus(task, n) for n in lengths)):
            if not is_built(name, Path(args.data_dir) / name):
                build(name, Path(args.data_dir) / name)
    results, start = [], time.perf_counter()
    for task in tasks:
        rows = {n: long_rows(corpus(task, n), args.data_dir, args.docs,
                             round(n * CHARS_PER_TOKEN / 2)) for n in lengths}
        shorts: dict[tuple[str, int], dict] = {}  # one short stage per model it starts
        for model_name in args.models:
            for seed in range(args.seeds):
                owner = SHORT_STAGE_OF.get(model_name, model_name)
                print(f"== {task}: {model_name}, seed {seed}, short stage of {owner} "
                      f"({args.short_chars} characters)", flush=True)
                if (owner, seed) not in shorts:
                    shorts[owner, seed] = short_stage(task, owner, seed, args)
                short = shorts[owner, seed]
                for tokens in lengths:
                    r = train_and_score(task, tokens, model_name, seed, args, rows[tokens], short)
                    print(f"   {tokens} tokens: {r['steps']} steps, {r['tokens_per_s']} tokens/s, "
                          f"item F1 {r['item_f1']:.3f}, exact {r['exact_match']:.3f}", flush=True)
                    results.append(r)

    table = compare(results, tasks, lengths, args.models)
    printed = []
    for task, cells in table.items():
        for tokens, cell in cells.items():
            ci = cell["intervals"]["f1_moe_minus_baseline"]
            printed.append([task, tokens, *(cell[m]["item_f1"] for m in args.models),
                            f"[{ci[0]:+.3f}, {ci[1]:+.3f}]", verdict(ci)])
    print_table(["task", "tokens", *(NAMES[m] + " F1" for m in args.models),
                 "MoE - baseline F1", "verdict"], printed)
    summary = summarise(table, lengths)
    payload = {"machine": machine_info(),
               "settings": {**vars(args), "tasks": tasks, "lengths": lengths,
                            "models": {m: MODELS[m] for m in args.models}, "recipe": RECIPE,
                            "short_stage_of": {m: SHORT_STAGE_OF[m] for m in args.models
                                               if m in SHORT_STAGE_OF},
                            # The short stages' own models, where they are not among the above.
                            "short_stage_models": {SHORT_STAGE_OF[m]: MODELS[SHORT_STAGE_OF[m]]
                                                   for m in args.models if m in SHORT_STAGE_OF
                                                   and SHORT_STAGE_OF[m] not in args.models},
                            "variants": {m: list(VARIANTS[m]) for m in args.models
                                         if m in VARIANTS},
                            "frozen_in_long_stage": {m: list(FROZEN_IN_LONG_STAGE[m])
                                                     for m in args.models
                                                     if m in FROZEN_IN_LONG_STAGE},
                            "long_batch_factor": {m: LONG_BATCH_FACTOR[m] for m in args.models
                                                  if m in LONG_BATCH_FACTOR},
                            "sampler": "dpm_solver++ 20",
                            "wall_s": round(time.perf_counter() - start)},
               "runs": results, "table": table, "summary": summary}
    path = write_json("long_tasks", payload, args.out)
    plot(table, path.with_suffix(".png"))
    print(json.dumps({k: v for k, v in summary.items() if k != "f1"}, indent=2))
    return payload


if __name__ == "__main__":
    main()
