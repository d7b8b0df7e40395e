"""Does the recipe learn? Tasks with exact answers, each trained to a wall-clock budget.

For each task (code-outline, dialogue-cast, code-lookup) the recipe is trained by a real
Lightning Trainer for ``--minutes`` of training time (evaluation excluded), with a learning
curve of 20-step DPM-Solver++ item F1 against wall-clock. At the end of each run:
  * item metrics of DPM-Solver++ 20 and 10, DDIM 200 and ancestral (all T steps) samples,
    decoded as the recipe's ``sampling.decode`` says (truncate), and DPM-Solver++ 20 also
    decoded DiffuSeq's way (strip: every [SEP] and [PAD] dropped, the rest kept); then the
    recipe's own sampling, DPM-Solver++ 20 followed by its ``sampling.restarts``, against
    DPM-Solver++ 20 alone on the same checkpoint (paired interval);
  * x0 accuracy on target words at fixed t beside rounding z_t (teacher forced);
  * DPM-Solver++ 20 on as many training documents (``training_documents``): well above the
    validation figure, the run overfits; low on both, it underfits.
Ablations (one recipe candidate removed at a time) run on one task (``--ablation_task``,
code-outline unless told) with the same seed, data and budget. A task may add settings to the
recipe (``TASK_SETTINGS``: dialogue-cast points with coverage); its ablations start from that.

    python -m bench.learn --quick --out /tmp/learn.json    # under 10 minutes
    python -m bench.learn                                  # the full run (make bench-learn)

``--steps N`` trains each run N optimizer steps instead (the learning rate decays over the
steps): the way to compare settings of equal step cost, or longer training, on a machine whose
speed drifts between runs.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Timer

from data_modules import Seq2SeqDataModule
from data_modules.corpora import build, is_built
from data_modules.corpora.tasks import DEFAULT_MAX_CHARS, lookup_guess_exact, lookup_swapped
from moe_diffuseq import MoEDiffuSeq
from moe_diffuseq.batch import collate_pairs, encode_pairs
from moe_diffuseq.generation import sampling_settings
from moe_diffuseq.metrics import (
    item_scores,
    mbr_select,
    mean_item_errors,
    paired_bootstrap_interval,
)
from moe_diffuseq.probes import accuracy_table, noise_level_counts, probe_steps, trajectory_accuracy

from .common import dpm_against_ancestral, machine_info, print_table, write_json

# The recipe: the model of lightning_configs/quickstart.yaml.
RECIPE: dict = {
    "network": {
        "embed_dim": 64, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "dropout": 0.0,
        "positions": "target_relative", "source_pointer": True, "pointer_neighbours": True,
        "pointer_span": 8, "pointer_span_dropout": 0.5, "position_init_std": 0.02,
        "short_conv": 11,
        "attention": {"window": 64, "target_global": True},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 128},
    },
    "diffusion": {"steps": 2000, "soft_absorbing": False, "loss_on": "target", "unroll": 0.5,
                  "self_conditioning": 0.5, "timestep_sampler": "high_noise",
                  "timestep_power": 2.0},
    "sampling": {"decode": "truncate", "restarts": 2, "restart_noise": 0.7},
    "lr": 2e-3, "warmup_steps": 100, "lr_decay": "linear", "ema_decay": 0.0,
}
# What a task's runs (its recipe run and its ablations) add to the recipe: options that help answers
# of one shape and not another. Pointer coverage helps a list of distinct source tokens (a cast),
# ties on an outline's names and leans worse on one def line. --no_task_settings: RECIPE everywhere.
TASK_SETTINGS: dict[str, dict] = {"dialogue-cast": {"network": {"pointer_coverage": True}}}
# One candidate changed at a time: a part of the recipe removed (back to DiffuSeq's setting), or a
# candidate from the literature added.
ABLATIONS: dict[str, dict] = {
    "no_source_pointer": {"network": {"source_pointer": False, "pointer_neighbours": False,
                                      "pointer_span": 0, "pointer_coverage": False}},
    "no_pointer_neighbours": {"network": {"pointer_neighbours": False}},
    "no_pointer_span": {"network": {"pointer_span": 0}},
    # Spans as wide as an outline item, not a whole def line: its shape weighs less than NAME.
    "pointer_span_2": {"network": {"pointer_span": 2}},
    # Every example points with the spans: slots agree on a line's shape before NAME picks one.
    "no_span_dropout": {"network": {"pointer_span_dropout": 0.0}},
    # A gate of the hidden state (which reads t) on the neighbour match, noise at high t.
    "neighbour_gate": {"network": {"pointer_neighbour_gate": True}},
    # Coverage of what the other slots drafted: a speaker or name already written scores lower.
    "pointer_coverage": {"network": {"pointer_coverage": True}},
    # Its removal where a task adds it (dialogue-cast): back to the shared recipe.
    "no_pointer_coverage": {"network": {"pointer_coverage": False}},
    "no_unroll": {"diffusion": {"unroll": 0.0}},
    # Off in the recipe since runs took ~1,000 steps; at ~4,000 a run sees each of dialogue-cast's
    # 4,435 training scenes about 17 times.
    "dropout_0.1": {"network": {"dropout": 0.1}},
    "absolute_positions": {"network": {"positions": "absolute"}},
    "no_self_conditioning": {"diffusion": {"self_conditioning": 0.0}},
    "uniform_timesteps": {"diffusion": {"timestep_sampler": "uniform", "timestep_power": 1.0}},
    "constant_lr": {"lr_decay": "constant"},
    # A higher peak: the recipe misses items on its own training documents too (underfits).
    "lr_3e-3": {"lr": 3e-3},
    "plus_skip_connection": {"diffusion": {"skip_connection": True}},
    "no_short_conv": {"network": {"short_conv": 0}},
    "short_conv_5": {"network": {"short_conv": 5}},
    "no_target_global": {"network": {"attention": {"target_global": False}}},
    # The target global both ways: every source position also reads the noisy target, so a source
    # token can tell that the target already holds it (a speaker written twice, one left out).
    "target_keys": {"network": {"attention": {"target_keys": True}}},
    # A window that covers a 600-character source: a speaker tag can see the same tag earlier on.
    "window_256": {"network": {"attention": {"window": 256}}},
    # And a third block: one to find an earlier same tag, one to count the first ones.
    "window_256_layers_3": {"network": {"num_layers": 3, "attention": {"window": 256}}},
    # Source positions counted back from the target: the question at a source's end keeps its rows.
    "target_anchored": {"network": {"positions": "target_anchored"}},
    # A third block: reading the question's NAME and matching it in the body are two hops.
    "num_layers_3": {"network": {"num_layers": 3}},
    "loss_on_all": {"diffusion": {"loss_on": "all"}},
    # The FFN: one dense FFN of the experts' active width, or a shared expert that every token
    # uses beside its top-1 routed one (the same active width).
    "dense_ffn": {"network": {"moe": None, "ffn_hidden": RECIPE["network"]["moe"]["top_k"]
                              * RECIPE["network"]["moe"]["expert_hidden"]}},
    "shared_expert": {"network": {"moe": {"top_k": 1, "shared_expert": True}}},
    # The top_k routed experts summed as one FFN of their joint width, not averaged.
    "routed_scale": {"network": {"moe": {
        "routed_scale": float(RECIPE["network"]["moe"]["top_k"])}}},
    "absorbing_full_rate": {"diffusion": {"soft_absorbing": True, "denoise_rate": 0.5}},
    # Denormal floats kept, not flushed to zero: the CPU multiplies them many times slower.
    "keep_denormals": {"flush_denormal": False},
    # Data settings, not model ones. Batches of similar source lengths: less padding, faster steps.
    "length_bucketing": {"data": {"length_bucketing": True}},
    # Half the batch: a step costs 0.57x, so 1.75x the updates on the same examples.
    "batch_8": {"data": {"batch_size": 8}},
    # The corpus's tokenizer trained as plain byte-level BPE, where a word at a line's start and
    # the same word after a space are different tokens.
    "no_word_starts": {"data": {"tokenizer_word_starts": False}},
}
# Target budget (tokens) per task; the source budget follows --max_chars (about 2.3 characters a
# token at worst with a 4k BPE of code, so sources are never cut).
TASKS = {"code-outline": 48, "dialogue-cast": 48, "code-lookup": 32}
# With --steps the clock must never stop a run first.
STEPS_MODE_CLOCK_S = 30 * 24 * 3600.0


def budgets(task: str, max_chars: int) -> dict:
    return {"max_src_len": -(-max_chars * 10 // 23 // 32) * 32, "max_trg_len": TASKS[task]}


def corpus(task: str, max_chars: int) -> str:
    """The data module's corpus name of a task at this source length."""
    return task if max_chars == DEFAULT_MAX_CHARS else f"{task}-{max_chars}"


def merged(base: dict, change: dict) -> dict:
    """``base`` with ``change`` merged in, nested dicts key by key."""
    out = dict(base)
    for key, value in change.items():
        out[key] = (merged(out[key], value)
                    if isinstance(value, dict) and isinstance(out.get(key), dict) else value)
    return out


def task_recipe(task: str, args) -> dict:
    """The recipe a task trains: RECIPE, then the task's settings (unless --no_task_settings),
    then --model, which has the last word."""
    settings = {} if args.no_task_settings else TASK_SETTINGS.get(task, {})
    return merged(merged(RECIPE, settings), args.model)


def _split_rows(name: str, data_dir: str, split: str) -> list[dict]:
    """Every row of one split of a built corpus."""
    path = Path(data_dir) / name / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def validation_rows(name: str, data_dir: str, docs: int | None) -> list[dict]:
    """The first ``docs`` rows (None: all) of a fixed random sample (seed 0) of a corpus's
    validation split."""
    rows = _split_rows(name, data_dir, "validation")
    random.Random(0).shuffle(rows)
    return rows[:docs]


def training_rows(name: str, data_dir: str, docs: int) -> list[dict]:
    """``docs`` rows of a fixed random sample (seed 0) of a corpus's training split."""
    rows = _split_rows(name, data_dir, "train")
    return random.Random(0).sample(rows, min(docs, len(rows)))


def score(model: MoEDiffuSeq, rows: list[dict], **sampling) -> dict:
    start = time.perf_counter()
    samples = model.generate([r["src"] for r in rows], seed=0, **sampling)
    per_doc = [item_scores(s, r["trg"]) for s, r in zip(samples, rows, strict=True)]
    means = {key: sum(d[key] for d in per_doc) / len(per_doc) for key in per_doc[0]}
    return {**means, "seconds": time.perf_counter() - start,
            "errors": mean_item_errors(samples, [r["trg"] for r in rows]),
            "per_doc_f1": [d["item_f1"] for d in per_doc],
            "per_doc_exact": [d["exact_match"] for d in per_doc],
            "examples": [{"sample": s, "reference": r["trg"]}
                         for s, r in zip(samples[:4], rows[:4], strict=True)]}



class TrainingBudget(Timer):
    """Stops training after ``budget_s`` seconds of training steps (evaluation excluded), and
    counts the input positions (source and target, padding included) the steps processed. A
    Lightning Timer whose clock runs during steps only, so a learning-rate decay ends with the
    budget as it ends with ``trainer.max_time``."""

    def __init__(self, budget_s: float) -> None:
        super().__init__(duration=timedelta(seconds=budget_s), interval="step", verbose=False)
        self.budget_s, self.trained_s, self.positions = budget_s, 0.0, 0
        self._start = None

    def time_elapsed(self, stage: str = "train") -> float:
        return self.trained_s

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trained_s += time.perf_counter() - self._start
        self.positions += batch.input_ids.numel()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class LearningCurve(TrainingBudget):
    """A TrainingBudget that also scores DPM-Solver++ 20 item F1 every ``every_s`` seconds of
    training, or every ``every_steps`` steps where the run is a number of steps."""

    def __init__(self, rows: list[dict], budget_s: float, every_s: float,
                 every_steps: int | None = None) -> None:
        super().__init__(budget_s)
        self.rows, self.every_s, self.next_eval = rows, every_s, every_s
        self.every_steps = every_steps
        self.points: list[dict] = []

    def _due(self, trainer) -> bool:
        if self.every_steps:
            return (trainer.global_step % self.every_steps == 0
                    or trainer.global_step >= trainer.max_steps)
        if self.trained_s >= self.next_eval or self.trained_s >= self.budget_s:
            self.next_eval += self.every_s
            return True
        return False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._due(trainer):
            result = score(pl_module, self.rows, sampler="dpm_solver++", steps=20, restarts=0)
            pl_module.train()
            self.points.append({"seconds": round(self.trained_s, 1), "step": trainer.global_step,
                                "item_f1": result["item_f1"], "exact_match": result["exact_match"]})
            print(f"    {self.trained_s:6.0f}s step {trainer.global_step:5d}  "
                  f"item F1 {result['item_f1']:.3f}  exact {result['exact_match']:.3f}", flush=True)


def fit_for_budget(model: MoEDiffuSeq, data: Seq2SeqDataModule, budget: TrainingBudget,
                   accelerator: str, max_steps: int = -1) -> pl.Trainer:
    """Train until ``budget`` (or ``max_steps``) stops it, with no validation, logging or
    checkpoints; the model is left on the trainer's device, ready to score."""
    trainer = pl.Trainer(accelerator=accelerator, max_epochs=10_000, max_steps=max_steps,
                         logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=[budget])
    trainer.fit(model, datamodule=data)
    model.to(trainer.strategy.root_device)  # the trainer hands the model back on the CPU
    return trainer


def reference_batch(model: MoEDiffuSeq, sources: list[str], targets: list[str]):
    """Sources and their reference targets collated at the model's budgets, on its device."""
    net = model.network_config
    pairs = encode_pairs(model.tokenizer, sources, targets, net.max_src_len, net.max_trg_len)
    return collate_pairs(pairs, model.special_ids, net.max_trg_len).to(model.device)


def noise_table(model: MoEDiffuSeq, rows: list[dict], batch_size: int = 16) -> dict:
    """Teacher-forced x0 accuracy on the target's words at fixed t over ``rows``, beside rounding
    z_t and beside the denoiser with each source swapped for the next row's (``source_cut``): a
    denoiser that reads its source loses accuracy when the source is cut off."""
    steps = probe_steps(model.schedule.steps)
    sources, targets = [r["src"] for r in rows], [r["trg"] for r in rows]
    counts = {}
    model.eval()
    for name, shown in (("intact", sources), ("cut", sources[1:] + sources[:1])):
        generator = torch.Generator(device=model.device).manual_seed(0)
        counts[name] = 0
        for i in range(0, len(rows), batch_size):
            batch = reference_batch(model, shown[i : i + batch_size], targets[i : i + batch_size])
            counts[name] = counts[name] + noise_level_counts(
                model.sampling_network, model.schedule, batch, model.special_ids, steps,
                generator).cpu()
    intact, cut = (accuracy_table(steps, counts[k]) for k in ("intact", "cut"))
    return {str(t): {**intact[t], "source_cut": cut[t]["denoiser"]} for t in steps}


def guess_floor(rows: list[dict], per_doc_exact: list[float]) -> tuple[float, list[float]]:
    """code-lookup's floor over ``rows`` (a random def line of each source) and the paired
    interval of the model's per-document exact match minus it."""
    floors = [lookup_guess_exact(r["src"], r["trg"]) for r in rows]
    return sum(floors) / len(floors), list(paired_bootstrap_interval(per_doc_exact, floors))


def question_swap(model: MoEDiffuSeq, rows: list[dict]) -> dict:
    """Does the model read code-lookup's question? Each document is asked again about another
    function of the same source (DPM-Solver++ 20, the same seed): ``both_right`` is the fraction
    answered right both times, beside ``both_right_guess``, what copying a random def line each
    time gets; ``same_answer`` the fraction that wrote one line for two different questions;
    ``same_answer_reseeded`` the fraction that wrote the same line for the first question from
    another seed's noise: a model that reads NAME keeps its answer when the noise changes, one
    whose noise picks the line keeps it when the question changes."""
    pairs = [(r, swapped) for r in rows if (swapped := lookup_swapped(r)) is not None]
    kw = {"sampler": "dpm_solver++", "steps": 20, "restarts": 0}
    asked = model.generate([r["src"] for r, _ in pairs], seed=0, **kw)
    again = model.generate([s["src"] for _, s in pairs], seed=0, **kw)
    reseeded = model.generate([r["src"] for r, _ in pairs], seed=1, **kw)
    right = [(item_scores(a, r["trg"])["exact_match"], item_scores(b, s["trg"])["exact_match"])
             for a, b, (r, s) in zip(asked, again, pairs, strict=True)]
    guess = [lookup_guess_exact(r["src"], r["trg"]) * lookup_guess_exact(s["src"], s["trg"])
             for r, s in pairs]
    return {"documents": len(pairs),
            "both_right": sum(x * y for x, y in right) / len(pairs),
            "both_right_guess": sum(guess) / len(pairs),
            "swapped_exact": sum(y for _, y in right) / len(pairs),
            "same_answer": _same(asked, again), "same_answer_reseeded": _same(asked, reseeded)}


def _same(first: list[str], second: list[str]) -> float:
    """The fraction of samples written the same both times."""
    return sum(a.strip() == b.strip() for a, b in zip(first, second, strict=True)) / len(first)


def trajectory(model: MoEDiffuSeq, rows: list[dict], docs: int = 32) -> list[dict]:
    """x0 accuracy on the reference's words at each step of 20-step DPM-Solver++ over the first
    ``docs`` rows (``probes.trajectory_accuracy``)."""
    rows = rows[:docs]
    batch = reference_batch(model, [r["src"] for r in rows], [r["trg"] for r in rows])
    settings = sampling_settings(model.sampling_config, sampler="dpm_solver++", steps=20,
                                 restarts=0)
    return trajectory_accuracy(model, batch, settings)


def seed_spread(model: MoEDiffuSeq, rows: list[dict], seeds: int) -> dict:
    """DPM-Solver++ 20 item F1 from sampling seeds 0 .. seeds-1 on one checkpoint: each seed's
    mean, their mean, the best seed's F1 per document (``oracle_item_f1``: what a perfect pick
    among the seeds would score) and MBR's pick (``mbr_item_f1``, sentence-BLEU consensus), with
    paired intervals of MBR against each document's seed mean and against seed 0. A figure from
    seed 0 alone can sit anywhere in the seeds' range; an interval over documents does not show it.
    """
    kw = {"sampler": "dpm_solver++", "steps": 20, "restarts": 0}
    samples = [model.generate([r["src"] for r in rows], seed=seed, **kw) for seed in range(seeds)]
    f1 = [[item_scores(s, r["trg"])["item_f1"] for s, r in zip(per_seed, rows, strict=True)]
          for per_seed in samples]
    per_seed = [sum(x) / len(x) for x in f1]
    picks = [mbr_select([samples[seed][i] for seed in range(seeds)]) for i in range(len(rows))]
    mbr = [f1[p][i] for i, p in enumerate(picks)]
    # Each document's expected F1 from one sampling seed: what MBR's pick must beat.
    seed_mean = [sum(col) / seeds for col in zip(*f1, strict=True)]
    return {"seeds": seeds, "item_f1_per_seed": per_seed,
            "item_f1_mean": sum(per_seed) / seeds,
            "oracle_item_f1": sum(max(col) for col in zip(*f1, strict=True)) / len(rows),
            "mbr_item_f1": sum(mbr) / len(rows), "per_doc_mbr_f1": mbr,
            "per_doc_seed_mean_f1": seed_mean,
            "mbr_minus_seed_mean_interval": list(paired_bootstrap_interval(mbr, seed_mean)),
            "mbr_minus_seed0_interval": list(paired_bootstrap_interval(mbr, f1[0]))}


def run(task: str, config: dict, args, rows: list[dict], final: bool) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    config = dict(config)
    data_change = config.pop("data", {})
    data = Seq2SeqDataModule(corpus=corpus(task, args.max_chars), data_dir=args.data_dir,
                             batch_size=data_change.pop("batch_size", args.batch_size),
                             tokenizer_vocab_size=args.vocab,
                             seed=args.seed, **budgets(task, args.max_chars), **data_change)
    model = MoEDiffuSeq(**merged(config, {"network": budgets(task, args.max_chars)}))
    if args.steps:  # no clock: the step limit ends the run and the learning-rate decay
        curve = LearningCurve(rows, STEPS_MODE_CLOCK_S, STEPS_MODE_CLOCK_S,
                              every_steps=max(1, args.steps // args.curve_points))
        trainer = fit_for_budget(model, data, curve, args.accelerator, max_steps=args.steps)
    else:
        curve = LearningCurve(rows, args.minutes * 60, args.minutes * 60 / args.curve_points)
        trainer = fit_for_budget(model, data, curve, args.accelerator)
    out = {"task": task, "steps": trainer.global_step, "trained_s": round(curve.trained_s, 1),
           "curve": curve.points}
    out["noise_levels"] = noise_table(model, rows)
    out["trajectory"] = trajectory(model, rows)
    # Each sampler alone (no restarts), then the recipe's own sampling: DPM-Solver++ 20 and its
    # restarts, on the same checkpoint and seed.
    samplers = {"dpm20": {"sampler": "dpm_solver++", "steps": 20, "restarts": 0},
                "dpm10": {"sampler": "dpm_solver++", "steps": 10, "restarts": 0}}
    if model.sampling_config.restarts:
        samplers["dpm20_restarts"] = {"sampler": "dpm_solver++", "steps": 20}
    if final:
        samplers |= {# Same seed, so the same samples, decoded DiffuSeq's way: every [SEP] and
                     # [PAD] dropped, what follows them kept.
                     "dpm20_strip": {"sampler": "dpm_solver++", "steps": 20, "decode": "strip",
                                     "restarts": 0},
                     "ddim200": {"sampler": "ddim", "steps": 200, "restarts": 0}}
    out["sampling"] = {name: score(model, rows, **kw) for name, kw in samplers.items()}
    # The same sampler on as many training documents: a gap to validation is overfitting.
    fitted = score(model, training_rows(corpus(task, args.max_chars), args.data_dir, len(rows)),
                   **samplers["dpm20"])
    out["training_documents"] = {key: fitted[key] for key in ("item_f1", "exact_match", "errors")}
    out["training_documents"]["minus_validation_f1"] = (fitted["item_f1"]
                                                        - out["sampling"]["dpm20"]["item_f1"])
    if args.sample_seeds > 1:
        out["dpm20_seeds"] = seed_spread(model, rows, args.sample_seeds)
    if task == "code-lookup":
        # Above the floor with an interval above 0: the model reads NAME, not only the format.
        out["guess_exact"], out["dpm20_exact_minus_guess_interval"] = guess_floor(
            rows, out["sampling"]["dpm20"]["per_doc_exact"])
        out["question_swap"] = question_swap(model, rows)
    if final and args.ancestral_docs:
        out["sampling"]["ancestral"] = score(model, rows[: args.ancestral_docs],
                                             sampler="ancestral", restarts=0)
        out["dpm20_vs_ancestral"] = dpm_against_ancestral(out["sampling"])
    if "dpm20_restarts" in out["sampling"]:
        out["restarts_minus_dpm20_interval"] = {
            key: paired_bootstrap_interval(out["sampling"]["dpm20_restarts"][f"per_doc_{key}"],
                                           out["sampling"]["dpm20"][f"per_doc_{key}"])
            for key in ("f1", "exact")}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="code-outline only, 3 minutes, no ablations")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None,
                        help="training minutes per run (default 15; quick 3)")
    budget.add_argument("--steps", type=int, default=None,
                        help="train each run this many optimizer steps instead of --minutes (the "
                             "learning rate decays over the steps): compares settings of equal "
                             "step cost on a machine whose speed drifts")
    parser.add_argument("--tasks", nargs="+", default=None, choices=sorted(TASKS))
    parser.add_argument("--ablations", nargs="*", default=None, choices=sorted(ABLATIONS),
                        help="ablations to run on --ablation_task (default: all; quick: none)")
    parser.add_argument("--ablation_task", default="code-outline", choices=sorted(TASKS),
                        help="the task the ablations run on")
    parser.add_argument("--docs", type=int, default=None,
                        help="validation documents scored (default 128; quick 32)")
    parser.add_argument("--ancestral_docs", type=int, default=None,
                        help="documents for the 2000-step sampler (default 64; quick 8; 0: none)")
    parser.add_argument("--curve_points", type=int, default=5)
    parser.add_argument("--sample_seeds", type=int, default=1,
                        help="also score DPM-Solver++ 20 from this many sampling seeds on each "
                             "checkpoint: their mean, range, best-of and MBR pick (1: seed 0 only)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--accelerator", default="auto",
                        help="Lightning accelerator: auto (a GPU where present), cpu or gpu")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--max_chars", type=int, default=None,
                        help=f"longest source, in characters (default {DEFAULT_MAX_CHARS}; "
                             "quick 600)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", type=json.loads, default={},
                        help='JSON merged into the recipe, e.g. '
                             '\'{"network": {"hidden_size": 512}}\' on a GPU')
    parser.add_argument("--no_task_settings", action="store_true",
                        help="train every task with the shared recipe alone, without the "
                             "settings a task adds to it (" + "; ".join(
                                 f"{task}: {json.dumps(change)}"
                                 for task, change in TASK_SETTINGS.items()) + ")")
    args = parser.parse_args(argv)
    if not args.steps:  # a step budget has no minutes
        args.minutes = args.minutes or (3.0 if args.quick else 15.0)
    args.max_chars = args.max_chars or (600 if args.quick else DEFAULT_MAX_CHARS)
    args.docs = args.docs or (32 if args.quick else 128)
    if args.ancestral_docs is None:  # 0 is a choice: no ancestral sampling (minutes per run)
        args.ancestral_docs = 8 if args.quick else 64
    tasks = args.tasks or (["code-outline"] if args.quick else list(TASKS))
    ablations = (args.ablations if args.ablations is not None
                 else ([] if args.quick else list(ABLATIONS)))
    if args.sample_seeds < 1:
        parser.error(f"--sample_seeds {args.sample_seeds}: must be >= 1")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: must be >= 1")
    budget_text = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    # Said first: without --ablations a full run goes on into every ablation, for hours.
    print(f"plan: {len(tasks) + len(ablations)} runs of {budget_text} each; the recipe on "
          f"{', '.join(tasks)}; ablations on {args.ablation_task}: "
          f"{', '.join(ablations) or 'none (--ablations NAME ... to run some)'}", flush=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    trained = {*tasks, *([args.ablation_task] if ablations else [])}
    # Build what is missing first.
    for task in trained:
        name = corpus(task, args.max_chars)
        if not is_built(name, Path(args.data_dir) / name):
            build(name, Path(args.data_dir) / name)
    runs = []
    for task in tasks:
        print(f"== {task}: recipe, {budget_text}", flush=True)
        rows = validation_rows(corpus(task, args.max_chars), args.data_dir, args.docs)
        runs.append({"name": "recipe", **run(task, task_recipe(task, args), args, rows,
                                             final=True)})
    ablation_rows = (validation_rows(corpus(args.ablation_task, args.max_chars), args.data_dir,
                                     args.docs) if ablations else [])
    for name in ablations:
        print(f"== {args.ablation_task}: ablation {name}, {budget_text}", flush=True)
        config = merged(task_recipe(args.ablation_task, args), ABLATIONS[name])
        runs.append({"name": name, **run(args.ablation_task, config, args, ablation_rows,
                                         final=False)})

    recipe_runs = {r["task"]: r for r in runs if r["name"] == "recipe"}
    table = []
    for r in runs:
        s = r["sampling"]
        table.append([r["task"], r["name"], r["steps"], s["dpm20"]["item_f1"],
                      s["dpm20"]["exact_match"], s.get("ancestral", {}).get("item_f1"),
                      list(r["noise_levels"].values())[-1]["denoiser"]])
        if r["name"] != "recipe" and r["task"] in recipe_runs:  # paired over the same documents
            base = recipe_runs[r["task"]]["sampling"]["dpm20"]["per_doc_f1"]
            r["f1_minus_recipe_interval"] = paired_bootstrap_interval(s["dpm20"]["per_doc_f1"],
                                                                      base)
    print_table(["task", "run", "steps", "dpm20 F1", "dpm20 exact", "ancestral F1",
                 "x0 acc t=T-1"], table)

    def pick(task: str, sampler: str, key: str):
        return recipe_runs[task]["sampling"][sampler][key] if task in recipe_runs else None

    summary = {
        "outline_item_f1": pick("code-outline", "dpm20", "item_f1"),
        "outline_exact": pick("code-outline", "dpm20", "exact_match"),
        "cast_item_f1": pick("dialogue-cast", "dpm20", "item_f1"),
        "lookup_exact": pick("code-lookup", "dpm20", "exact_match"),
    }
    if any("dpm20_restarts" in r["sampling"] for r in recipe_runs.values()):
        summary |= {  # the recipe's own sampling: DPM-Solver++ 20 and its restarts
            "outline_item_f1_restarts": pick("code-outline", "dpm20_restarts", "item_f1"),
            "outline_exact_restarts": pick("code-outline", "dpm20_restarts", "exact_match"),
            "cast_item_f1_restarts": pick("dialogue-cast", "dpm20_restarts", "item_f1"),
            "lookup_exact_restarts": pick("code-lookup", "dpm20_restarts", "exact_match"),
        }
    if recipe_runs:  # code-outline's where it ran, else the first task's
        task = "code-outline" if "code-outline" in recipe_runs else next(iter(recipe_runs))
        summary["dpm20_vs_ancestral_task"] = task
        against = recipe_runs[task].get("dpm20_vs_ancestral")  # absent with --ancestral_docs 0
        summary["dpm20_vs_ancestral_f1"] = against["ratio"] if against else None
    payload = {"machine": machine_info(),
               "settings": {**vars(args), "recipe": merged(RECIPE, args.model), "tasks": TASKS,
                            "task_settings": {} if args.no_task_settings else {
                                task: change for task, change in TASK_SETTINGS.items()
                                if task in trained}},
               "runs": runs, "summary": summary}
    path = write_json("learn", payload, args.out)
    plot(runs, path.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    return payload


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r["curve"]:
            ax.plot([p["seconds"] / 60 for p in r["curve"]], [p["item_f1"] for p in r["curve"]],
                    marker="o", label=f"{r['task']} {r['name']}")
    ax.set_xlabel("training minutes (2-core CPU)")
    ax.set_ylabel("item F1, DPM-Solver++ 20 steps")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
