"""The benchmarks' plumbing: tiny runs produce their JSON, and README's results are generated."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from bench import attention, moe, report
from bench.common import ABLATION, QUALITY_BATCH, QUALITY_SRC_LEN, QUALITY_TRG_LEN


def test_readme_results_section_is_generated_from_the_json():
    assert report.main(["--check"]) == 0, "README.md is stale: run `python -m bench.report`"


def test_headline_runs_go_to_the_readme_and_the_others_to_the_experiments_page():
    """Each recorded run lands in exactly one of the two pages, and the experiments page, one
    folder down, links its plots one folder up."""
    readme, experiments = report.render(), report.render_experiments()
    for name, title in (*report.LEARN_TITLES.items(), *report.LONG_TASKS_TITLES.items()):
        if (report.RESULTS / f"{name}.json").exists():
            headline = name in ("learn", "long_tasks")
            assert (f"### {title}" in readme, f"### {title}" in experiments) == (headline,
                                                                                not headline)
    assert "](bench/results/" not in experiments and "](../bench/results/" in experiments
    assert report.github_anchor("code-lookup at 4k tokens: a 1.7x batch (`x_y.json`)") == (
        "code-lookup-at-4k-tokens-a-17x-batch-x_yjson")


def test_attention_bench_tiny_run_writes_json_and_plot(tmp_path):
    out = tmp_path / "attention.json"
    attention.main(["--lengths", "256", "512", "--repeats", "1", "--no-flex", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert [r["length"] for r in payload["results"]] == [256, 512]
    assert all(r["dense_peak_mb"] is not None and r["banded_fwd_bwd_s"] > 0
               for r in payload["results"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_moe_bench_tiny_run_writes_json(tmp_path):
    out = tmp_path / "moe.json"
    moe.main(["--tokens", "256", "--d-model", "32", "--expert-hidden", "32", "--repeats", "1",
              "--out", str(out)])
    payload = json.loads(out.read_text())
    variants = {r["variant"] for r in payload["results"]}
    assert variants == {"dense_ffn", "moe_sorted", "moe_looped", "all_experts"}
    assert set(payload["checks"]) == {"moe_speed_vs_dense_float32", "moe_speed_vs_dense_bfloat16"}


def _built_code_corpus(tmp_path, small_corpus, extra_train_row: str = ""):
    """tmp_path/data/code from the small corpus, marked built so prepare_data keeps it."""
    from data_modules.corpora import MARKER, VERSIONS

    data = tmp_path / "data" / "code"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text((small_corpus / "train.jsonl").read_text() + extra_train_row)
    (data / "validation.jsonl").write_text((small_corpus / "validation.jsonl").read_text())
    (data / MARKER).write_text(VERSIONS["code"] + "\n")
    return data


def test_compare_bench_tiny_run_covers_every_part(tmp_path, small_corpus):
    from bench import compare
    from bench.compare_models import model_args

    _built_code_corpus(tmp_path, small_corpus)
    out = tmp_path / "compare.json"
    compare.main(["--lengths", "64", "--trg-len", "16", "--hidden", "32", "--layers", "1",
                  "--repeats", "1", "--efficiency-length", "64", "--tasks", "code",
                  "--steps", "2", "--docs", "2", "--seeds", "0", "1",
                  "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    payload = json.loads(out.read_text())
    summary = payload["summary"]
    assert summary["sampling_speedup"] > 0 and set(summary["sampling_speedup_by_length"]) == {"64"}
    for model in ("moe", "sdpa"):
        assert all(v > 0 for v in payload["peak_memory_mb"]["64"].values())
        efficiency = summary["linear_efficiency"][model]
        assert 0 < efficiency["ffn"] and 0 < efficiency["projections"]
    for model in ("moe", "sdpa", ABLATION):  # the ablation runs by default, first seed only
        quality = payload["quality"]["code"][model]
        assert quality["steps"] > 0 and quality["train_loss_vs_seconds"]
        assert quality["seconds_per_step_calibrated"] > 0
        assert [r["seed"] for r in quality["runs"]] == ([0] if model == ABLATION else [0, 1])
        # A fixed step count, not a time budget: a shared CPU cannot cut a run short.
        assert [(r["steps"], r["planned_steps"]) for r in quality["runs"]] == [(2, 2)] * len(
            quality["runs"])
        runs = quality["runs"]
        assert quality["rougeL"] == sum(r["rougeL"] for r in runs) / len(runs)
        assert len(quality["rougeL_per_document"]) == 2
        assert quality["generated_words"] == sum(r["generated_words"] for r in runs) / len(runs)
        assert all(r["reference_words"] == quality["reference_words"] > 0 for r in runs)
    low, high = summary["quality"]["code"]["rougeL_difference_ci95"]
    assert low <= high and summary["quality"]["code"]["seeds"] == 2
    assert "moe_no_absorbing_rougeL" in summary["quality"]["code"]
    # moe_diffuseq.yaml ramps gamma over its warm-up: 2 steps end early in it; the baseline
    # has none.
    moe_quality, base_quality = (payload["quality"]["code"][v] for v in ("moe", "sdpa"))
    assert 0 <= moe_quality["denoise_rate_at_end"] < moe_quality["denoise_rate_full"] == 0.5
    assert base_quality["denoise_rate_at_end"] == base_quality["denoise_rate_full"] == 0.0
    section = "\n".join(report._compare_section("compare", payload))
    assert "early in that ramp" in section and "means over seeds 0, 1" in section
    assert "paired bootstrap interval" in section
    assert payload["scoring"]["decode"] == "strip" and "as in DiffuSeq's evaluation" in section
    assert "| sample words | reference words |" in section
    assert ("2 validation documents per task drawn at random from each split (random sample, "
            "seed 0; the same documents") in section
    assert model_args(ABLATION, 32, 1, 64, 16, None)["diffusion"]["soft_absorbing"] is False
    assert model_args("moe", 32, 1, 64, 16, None)["diffusion"]["soft_absorbing"] is True
    assert "sampling_speedup" in payload["checks"] and "quality_code" in payload["checks"]
    missed = {name for name, c in payload["checks"].items() if not c["met"]}
    assert set(payload["profiles"]) == missed
    assert all("Self CPU" in table for table in payload["profiles"].values())
    assert out.with_suffix(".png").stat().st_size > 0
    assert (tmp_path / "compare_quality.png").stat().st_size > 0
    assert not out.with_suffix(".partial.json").exists()  # a finished run leaves only its JSON


def test_mean_words_counts_whitespace_separated_words():
    from bench.compare_quality import mean_words

    assert mean_words(["a b  c", "", "d\ne"]) == pytest.approx(5 / 3)
    assert mean_words([]) == 0


def test_quality_scores_a_fixed_random_sample_of_the_validation_split(tmp_path):
    from bench import common

    path = tmp_path / "validation.jsonl"
    path.write_text("".join(json.dumps({"src": f"s{i}", "trg": f"t{i}"}) + "\n"
                            + ("\n" if i == 3 else "") for i in range(40)))
    picked = [int(r["src"][1:]) for r in common.scored_documents(path, 8)]
    # Sorted, distinct, and not the split's head.
    assert picked == sorted(picked) and len(set(picked)) == 8 and picked != list(range(8))
    # The same for every model and seed.
    assert common.scored_documents(path, 8) == common.scored_documents(path, 8)
    # A small split: whole.
    assert [r["src"] for r in common.scored_documents(path, 100)] == [f"s{i}" for i in range(40)]


def test_quality_miss_profiles_both_models_at_the_quality_runs_shape():
    from argparse import Namespace

    from bench.compare_profile import profile_table

    table = profile_table("quality_code", {}, Namespace(hidden=32, layers=1, trg_len=16))
    shape = (f"source {QUALITY_SRC_LEN}, target {QUALITY_TRG_LEN}, batch {QUALITY_BATCH}, "
             "one training step")
    assert f"MoE-DiffuSeq, {shape}" in table and f"baseline (sdpa), {shape}" in table
    assert table.count("Self CPU time total") == 2


def test_compare_bench_checks_every_task_before_measuring(tmp_path, small_corpus):
    from bench import compare
    from data_modules.rows import BadRowError

    bad_row = json.dumps({"src": "x", "trg": " "}) + "\n"
    data = _built_code_corpus(tmp_path, small_corpus, extra_train_row=bad_row)
    out = tmp_path / "compare.json"
    rows = len((data / "train.jsonl").read_text().splitlines())
    with pytest.raises(BadRowError, match=f"train.jsonl, line {rows}: empty target"):
        compare.main(["--lengths", "64", "--trg-len", "16", "--hidden", "32", "--layers", "1",
                      "--tasks", "code", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    # Nothing measured yet.
    assert not out.exists() and not out.with_suffix(".partial.json").exists()


def test_diffusion_validation_loss_is_the_diffusion_terms_at_the_trained_gamma(
        tmp_path, small_corpus, small_tokenizer_file):
    from dataclasses import replace

    import lightning.pytorch as pl

    from bench.compare_models import model_args
    from bench.compare_quality import diffusion_validation_loss
    from data_modules import Seq2SeqDataModule
    from moe_diffuseq import MoEDiffuSeq

    dm = Seq2SeqDataModule(train_path=str(small_corpus / "train.jsonl"),
                           val_path=str(small_corpus / "validation.jsonl"),
                           tokenizer_path=str(small_tokenizer_file), max_src_len=32, max_trg_len=16,
                           batch_size=4)
    model = MoEDiffuSeq(**model_args("moe", 32, 1, 32, 16, None))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=2, num_sanity_val_steps=0,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    before = model.diffusion_config
    loss = diffusion_validation_loss(model, trainer, dm)
    # Restored: generation and later fits see the configured ramp.
    assert model.diffusion_config is before
    # By hand: validate at the gamma of step 2 with no ramp, and take the regularisers out of
    # val/loss.
    gamma = model.denoise_rate(2)
    assert 0 < gamma < before.denoise_rate
    model.diffusion_config = replace(before, denoise_rate=gamma, denoise_warmup_steps=0)
    val = trainer.validate(model, datamodule=dm, verbose=False)[0]
    model.diffusion_config = before
    moe = model.network_config.moe
    regularisers = (moe.load_balance_coef * val["val/load_balance"]
                    + moe.z_loss_coef * val["val/z_loss"]
                    + before.mask_reg_coef * val["val/mask_norm"])
    assert regularisers > 0 and loss == pytest.approx(val["val/loss"] - regularisers)
    full = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    assert full != pytest.approx(val["val/loss"])  # val/loss at the full gamma is another figure


def tiny_outline_learn_run(tmp_path, *options: str) -> dict:
    """bench.learn on code-outline (sources from one stdlib package) with a tiny model; its JSON."""
    from bench import learn
    from data_modules.corpora import build
    from data_modules.corpora.code import stdlib_root

    build("code-outline-600", tmp_path / "data" / "code-outline-600", root=stdlib_root() / "email")
    out = tmp_path / "learn.json"
    tiny = {"network": {"embed_dim": 16, "hidden_size": 32, "num_layers": 1,
                        "moe": {"expert_hidden": 32}},
            "diffusion": {"steps": 20}}
    learn.main(["--tasks", "code-outline", "--max_chars", "600", "--vocab", "300",
                "--data_dir", str(tmp_path / "data"), "--model", json.dumps(tiny),
                "--out", str(out), *options])
    return json.loads(out.read_text())


def test_learn_bench_records_code_lookups_floor(tmp_path):
    from bench import learn
    from data_modules.corpora import build
    from data_modules.corpora.code import stdlib_root

    build("code-lookup-600", tmp_path / "data" / "code-lookup-600", root=stdlib_root() / "email")
    tiny = {"network": {"embed_dim": 16, "hidden_size": 32, "num_layers": 1},
            "diffusion": {"steps": 20}}
    payload = learn.main(["--tasks", "code-lookup", "--max_chars", "600", "--vocab", "300",
                          "--minutes", "0.03", "--curve_points", "1", "--docs", "4",
                          "--ancestral_docs", "0", "--ablations", "--data_dir",
                          str(tmp_path / "data"), "--model", json.dumps(tiny),
                          "--out", str(tmp_path / "learn.json")])
    recipe = payload["runs"][0]
    assert 0.0 < recipe["guess_exact"] < 1.0  # every answer is one of two or more def lines
    low, high = recipe["dpm20_exact_minus_guess_interval"]
    assert -1.0 <= low <= high <= 1.0
    swap = recipe["question_swap"]
    assert swap["documents"] >= 1 and 0.0 < swap["both_right_guess"] < 1.0
    assert 0.0 <= swap["both_right"] <= swap["swapped_exact"] <= 1.0
    section = "\n".join(report._learn(payload))
    assert "code-lookup's floor" in section and "both right by guess" in section


def test_learn_bench_tiny_run_writes_summary_curve_and_plot(tmp_path, capsys):
    payload = tiny_outline_learn_run(tmp_path, "--minutes", "0.05", "--curve_points", "2",
                                     "--docs", "4", "--ancestral_docs", "2",
                                     "--ablations", "absolute_positions")
    assert ("plan: 2 runs of 0.05 min each; the recipe on code-outline; ablations on "
            "code-outline: absolute_positions") in capsys.readouterr().out
    out = tmp_path / "learn.json"
    assert [r["name"] for r in payload["runs"]] == ["recipe", "absolute_positions"]
    recipe = payload["runs"][0]
    assert recipe["steps"] >= 1 and len(recipe["curve"]) >= 1
    assert set(recipe["sampling"]) == {"dpm20", "dpm10", "ddim200", "ancestral",
                                        "dpm20_strip", "dpm20_restarts"}
    assert set(recipe["restarts_minus_dpm20_interval"]) == {"f1", "exact"}
    # t = f * (T - 1), T = 20
    assert set(recipe["noise_levels"]) == {"0", "2", "5", "10", "14", "19"}
    assert set(recipe["noise_levels"]["19"]) == {"denoiser", "round_z_t", "source_cut"}
    assert [p["t"] for p in recipe["trajectory"]] == sorted(
        {p["t"] for p in recipe["trajectory"]}, reverse=True)
    summary = payload["summary"]
    assert 0.0 <= summary["outline_item_f1"] <= 1.0 and summary["cast_item_f1"] is None
    assert 0.0 <= summary["outline_item_f1_restarts"] <= 1.0
    assert summary["dpm20_vs_ancestral_task"] == "code-outline"
    compared = recipe["dpm20_vs_ancestral"]  # recorded with the run; the summary and report read it
    assert compared["documents"] == 2 and summary["dpm20_vs_ancestral_f1"] == compared["ratio"]
    assert compared["dpm20_f1"] == sum(recipe["sampling"]["dpm20"]["per_doc_f1"][:2]) / 2
    assert payload["settings"]["recipe"]["network"]["hidden_size"] == 32  # the config trained
    assert payload["settings"]["task_settings"] == {}  # none for code-outline
    payload["settings"]["task_settings"] = {"code-outline": {"network": {"short_conv": 5}}}
    assert ('code-outline\'s runs add `{"network": {"short_conv": 5}}` to the recipe.'
            in "\n".join(report._learn(payload)))
    assert len(payload["runs"][1]["f1_minus_recipe_interval"]) == 2
    assert out.with_suffix(".png").stat().st_size > 0
    errors = recipe["sampling"]["dpm20"]["errors"]
    assert set(errors) == {"repeated", "cut", "invented", "missed", "items"}
    assert all(value >= 0 for value in errors.values())
    section = "\n".join(report._learn(payload))
    assert "| code-outline | recipe | 2 |" in section  # dpm20 against ancestral on its 2 documents
    assert "Where DPM-Solver++ 20's items go wrong" in section
    fitted = recipe["training_documents"]  # the same sampler on 4 training documents
    assert 0.0 <= fitted["item_f1"] <= 1.0 and set(fitted["errors"]) == set(errors)
    assert fitted["minus_validation_f1"] == pytest.approx(
        fitted["item_f1"] - recipe["sampling"]["dpm20"]["item_f1"])
    assert "| code-outline | recipe | " in section and "training - validation F1" in section


def test_learn_task_settings_add_to_the_recipe_and_model_has_the_last_word():
    from argparse import Namespace

    from bench import learn

    plain = Namespace(no_task_settings=False, model={})
    assert learn.task_recipe("code-outline", plain) == learn.RECIPE
    cast = learn.task_recipe("dialogue-cast", plain)
    assert cast["network"]["pointer_coverage"] is True
    assert cast["network"]["pointer_span"] == learn.RECIPE["network"]["pointer_span"]
    told = Namespace(no_task_settings=False, model={"network": {"pointer_coverage": False}})
    assert learn.task_recipe("dialogue-cast", told)["network"]["pointer_coverage"] is False
    shared = Namespace(no_task_settings=True, model={})
    assert learn.task_recipe("dialogue-cast", shared) == learn.RECIPE


def test_learn_bench_steps_budget_ends_each_run_at_that_step(tmp_path):
    from bench import learn

    payload = tiny_outline_learn_run(tmp_path, "--steps", "6", "--curve_points", "3",
                                     "--docs", "2", "--ancestral_docs", "0", "--ablations",
                                     "--sample_seeds", "2")
    recipe = payload["runs"][0]
    assert recipe["steps"] == 6
    spread = recipe["dpm20_seeds"]
    assert spread["seeds"] == 2 and len(spread["item_f1_per_seed"]) == 2
    assert spread["item_f1_per_seed"][0] == recipe["sampling"]["dpm20"]["item_f1"]  # seed 0
    assert min(spread["item_f1_per_seed"]) <= spread["item_f1_mean"] <= spread["oracle_item_f1"]
    assert spread["mbr_item_f1"] <= spread["oracle_item_f1"]
    assert len(spread["per_doc_mbr_f1"]) == len(spread["per_doc_seed_mean_f1"]) == 2
    low, high = spread["mbr_minus_seed_mean_interval"]
    assert -1.0 <= low <= high <= 1.0
    assert [p["step"] for p in recipe["curve"]] == [2, 4, 6]
    # --ancestral_docs 0 skips the 2000-step sampler; the summary and the report say so.
    assert "ancestral" not in recipe["sampling"] and "dpm20_vs_ancestral" not in recipe
    assert payload["summary"]["dpm20_vs_ancestral_f1"] is None
    assert "Each run trains 6 optimizer steps" in "\n".join(report._learn(payload, "learn_steps"))
    assert payload["settings"]["minutes"] is None  # a step budget, not a clock
    assert "| MBR minus mean |" in "\n".join(report._learn(payload, "learn_steps"))
    for refused in (["--steps", "0"], ["--steps", "6", "--minutes", "1"], ["--sample_seeds", "0"]):
        with pytest.raises(SystemExit):
            learn.main(refused)


def test_long_cost_bench_tiny_run_measures_every_model(tmp_path):
    from bench import long_cost

    out = tmp_path / "long_cost.json"
    payload = long_cost.main(["--lengths", "64", "--trg-len", "8", "--window", "16",
                              "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    for model in ("target_global", "target_both_ways", "window_only", "sdpa_baseline"):
        result = payload["results"][model]["64"]
        assert "error" not in result, result
        assert result["step_s"] > 0 and result["tokens_per_s"] > 0
        assert result["attention_fwd_bwd_s"] > 0
    # The 8k ratios need the 8k runs: absent here, so not a pass.
    assert payload["summary"]["target_global_cost_8k"] is None
    checks = payload["summary"]["checks"]
    assert checks == {"target_global_cost_8k": False, "speedup_vs_sdpa_8k": False}


def test_long_tasks_main_effects_average_each_part_over_the_other():
    from bench.long_tasks import main_effects

    # Full attention adds 1 to every document whatever the FFN; the FFN changes nothing.
    effects = main_effects([0.0, 0.5], [1.0, 1.5], [0.0, 0.5], [1.0, 1.5])
    assert effects["full_attention_minus_window"]["mean"] == 1.0
    assert effects["full_attention_minus_window"]["interval"] == [1.0, 1.0]
    assert effects["dense_ffn_minus_experts"]["mean"] == 0.0
    # A dense FFN that helps only with the window counts half: averaged over the attention.
    effects = main_effects([0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0])
    assert effects["dense_ffn_minus_experts"]["mean"] == 0.5
    assert effects["full_attention_minus_window"]["mean"] == -0.5


def test_long_tasks_bench_tiny_run_compares_every_model_with_intervals(tmp_path):
    from bench import learn, long_tasks
    from data_modules.corpora import build
    from data_modules.corpora.code import stdlib_root

    for name in (long_tasks.corpus("code-lookup", 256), learn.corpus("code-lookup", 300)):
        build(name, tmp_path / "data" / name, root=stdlib_root() / "email")
    out = tmp_path / "long_tasks.json"
    tiny = {"network": {"embed_dim": 16, "hidden_size": 32, "num_layers": 1},
            "diffusion": {"steps": 20}}
    payload = long_tasks.main(["--tasks", "code-lookup", "--lengths", "256", "--minutes", "0.03",
                               "--short_minutes", "0.03", "--short_chars", "300",
                               "--docs", "4", "--vocab", "300", "--data_dir",
                               str(tmp_path / "data"), "--model", json.dumps(tiny),
                               "--models", *long_tasks.MODELS, "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    runs = {r["model"]: r for r in payload["runs"]}
    assert set(runs) == set(long_tasks.MODELS)
    # A swapped model's long stage starts from its owner's short stage, the very same one.
    for model, owner in long_tasks.SHORT_STAGE_OF.items():
        assert runs[model]["short_stage"] == runs[owner]["short_stage"]
    assert runs["moe_frozen_experts"]["frozen_parameters"] > 0
    assert runs["moe_diffuseq"]["frozen_parameters"] == 0
    # Both stages trained: the short sources first, then the long ones.
    assert all(r["short_stage"]["steps"] >= 1 and r["steps"] >= 1 for r in runs.values())
    # Only sources of at least half the length's characters are scored.
    assert all(r["source_tokens"]["max"] >= 256 * long_tasks.CHARS_PER_TOKEN / 2 / 4
               for r in runs.values())
    assert all(0 < r["source_tokens"]["mean"] <= r["source_tokens"]["max"] for r in runs.values())
    cell = payload["table"]["code-lookup"]["256"]
    assert set(cell["intervals"]) == {"f1_moe_minus_baseline", "exact_moe_minus_baseline",
                                      *(key for key, _ in long_tasks.VARIANTS.values())}
    low, high = cell["intervals"]["f1_moe_minus_baseline"]
    assert low <= high
    # All four of the 2x2 ran: each part's main effect is recorded and reported.
    assert set(cell["factorial"]) == {"full_attention_minus_window", "dense_ffn_minus_experts"}
    summary = payload["summary"]
    assert set(summary["f1"]["code-lookup"]) == set(long_tasks.MODELS)
    assert summary["target_global_cost_8k"] is None  # no 8k run: absent, not a pass
    assert summary["verdicts"]["code-lookup"]["256"] in ("better", "worse", "tie")
    assert out.with_suffix(".png").stat().st_size > 0
    # The report names each column from the model's recorded attention settings.
    section = "\n".join(report._long_tasks(payload))
    assert "MoE-DiffuSeq (rows only) F1" in section and "| both ways F1 |" in section
    assert "both ways - MoE" in section and "window only - MoE" in section
    assert "Main effects of the long stage's attention and of the FFN" in section
    assert "router and experts fixed in the long stage" in section
    assert "rows only, full-attention short stage from full attention, experts's" in section
    # code-lookup's floor, a random def line of the source, is recorded and reported.
    assert all(0.0 < r["guess_exact"] < 1.0 for r in runs.values())
    assert "code-lookup's floor" in section
    # Exact match by the answer's distance from the question: every scored document in a bin.
    for r in runs.values():
        for key in ("exact_by_answer_distance", "exact_by_def_lines"):
            assert sum(b["docs"] for b in r[key]) == len(r["per_doc_exact"])
    assert "tokens back from the" in section and "def lines the source holds" in section


def test_long_task_names_read_a_short_stage_model_that_did_not_run_its_own_long_stage():
    from bench import long_tasks

    models = ["moe_diffuseq", "moe_full_short", "diffuseq"]
    settings = {"models": {m: long_tasks.MODELS[m] for m in models},
                "short_stage_of": {"moe_full_short": "moe_sdpa"},
                "short_stage_models": {"moe_sdpa": long_tasks.MODELS["moe_sdpa"]}}
    names = report._long_task_names(settings)
    assert names["moe_full_short"] == "rows only, full-attention short stage"
    assert names["moe_sdpa"] == "full attention, experts"
    assert names["moe_diffuseq"] == "MoE-DiffuSeq (rows only)"


def test_long_batch_models_train_their_long_stage_on_a_larger_batch_and_are_named_for_it():
    from bench import long_tasks

    args = argparse.Namespace(batch_size=4)
    assert long_tasks.long_batch_size("moe_diffuseq", args) == 4
    assert long_tasks.long_batch_size("moe_long_batch", args) == 4 * long_tasks.LONG_BATCH_FACTOR[
        "moe_long_batch"]
    # Each starts from the short stage of the model whose config it shares.
    for model, owner in (("moe_long_batch", "moe_diffuseq"), ("diffuseq_long_batch", "diffuseq")):
        assert long_tasks.SHORT_STAGE_OF[model] == owner
        assert long_tasks.MODELS[model] == long_tasks.MODELS[owner]
    models = ("moe_diffuseq", "moe_long_batch", "diffuseq", "diffuseq_long_batch")
    settings = {"models": {m: long_tasks.MODELS[m] for m in models},
                "long_batch_factor": {m: long_tasks.LONG_BATCH_FACTOR[m] for m in models
                                      if m in long_tasks.LONG_BATCH_FACTOR}}
    names = report._long_task_names(settings)
    assert names["moe_long_batch"] == "rows only, 3x the batch in the long stage"
    assert names["diffuseq_long_batch"] == "DiffuSeq (sdpa), 3x the batch in the long stage"
    assert names["diffuseq"] == "DiffuSeq (sdpa)"

    alone = {"models": {m: long_tasks.MODELS[m] for m in ("moe_diffuseq", "moe_free_router",
                                                           "dense_windowed_both")}}
    assert report._long_task_names(alone)["moe_free_router"] == "rows only, no load-balance loss"
    # Its own windowed short stage: no short-stage note, unlike dense_windowed's.
    assert report._long_task_names(alone)["dense_windowed_both"] == "dense FFN, rows only"
    assert "dense_windowed_both" not in long_tasks.SHORT_STAGE_OF


def test_frozen_experts_keep_their_weights_through_a_long_stage_step():
    from bench import long_tasks
    from moe_diffuseq import MoEDiffuSeq

    tiny = {"network": {"embed_dim": 16, "hidden_size": 32, "num_layers": 1, "vocab_size": 50,
                        "max_src_len": 24, "max_trg_len": 8}, "diffusion": {"steps": 20}}
    model = MoEDiffuSeq(**long_tasks.model_config("moe_frozen_experts", {}, argparse.Namespace(
        model=tiny)))
    model.configure_model()
    frozen = long_tasks.freeze_for_long_stage(model, "moe_frozen_experts")
    assert frozen and all(".router." in k or ".experts." in k for k in frozen)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    # Every trainable parameter gets a gradient; the frozen ones must not move, decay included.
    loss = sum(p.square().sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and not changed & set(frozen)
    assert long_tasks.freeze_for_long_stage(model, "moe_diffuseq") == []


def test_lookup_breakdown_bins_answer_distance_and_def_lines(small_tokenizer):
    from bench import long_tasks

    near = {"src": "x = 1\ndef f(a):\n    pass\n# signature of f", "trg": "def f(a):"}
    filler = "y = 2\n" * 400
    defs = "".join(f"def h{i}(c):\n" for i in range(6))
    far = {"src": f"def g(b):\n{defs}{filler}# signature of g", "trg": "def g(b):"}
    out = long_tasks.lookup_breakdown("code-lookup", small_tokenizer, [near, far, near],
                                      {"per_doc_exact": [1.0, 0.0, 0.0]})
    distance, lines = out["exact_by_answer_distance"], out["exact_by_def_lines"]
    assert [(b["from"], b["docs"], b["exact_match"]) for b in distance] == [(0, 2, 0.5),
                                                                           (1024, 1, 0.0)]
    # near: one def line; far: g and h0..h5, seven.
    assert [(b["from"], b["docs"], b["exact_match"]) for b in lines] == [(1, 2, 0.5), (6, 1, 0.0)]
    assert long_tasks.lookup_breakdown("dialogue-cast", small_tokenizer, [near], {}) == {}


def test_long_tasks_bench_trains_only_the_models_asked_for(tmp_path):
    from bench import learn, long_tasks
    from data_modules.corpora import build
    from data_modules.corpora.code import stdlib_root

    with pytest.raises(SystemExit):  # every interval needs the baseline
        long_tasks.main(["--models", "moe_diffuseq", "moe_window_only"])
    with pytest.raises(SystemExit):  # a target slot must keep its position as the source grows
        long_tasks.main(["--model", '{"network": {"positions": "absolute"}}'])
    for name in (long_tasks.corpus("code-lookup", 256), learn.corpus("code-lookup", 300)):
        build(name, tmp_path / "data" / name, root=stdlib_root() / "email")
    tiny = {"network": {"embed_dim": 16, "hidden_size": 32, "num_layers": 1,
                        "positions": "target_anchored"},
            "diffusion": {"steps": 20}}
    payload = long_tasks.main(["--tasks", "code-lookup", "--lengths", "256", "--minutes", "0.02",
                               "--short_minutes", "0.02", "--short_chars", "300", "--docs", "3",
                               "--vocab", "300", "--data_dir", str(tmp_path / "data"),
                               "--models", "diffuseq", "moe_diffuseq", "--model",
                               json.dumps(tiny), "--out", str(tmp_path / "long_tasks.json")])
    assert [r["model"] for r in payload["runs"]] == ["moe_diffuseq", "diffuseq"]
    cell = payload["table"]["code-lookup"]["256"]
    assert set(cell["intervals"]) == {"f1_moe_minus_baseline", "exact_moe_minus_baseline"}
    assert set(payload["summary"]["f1"]["code-lookup"]) == {"moe_diffuseq", "diffuseq"}
    section = "\n".join(report._long_tasks(payload))
    assert "MoE-DiffuSeq (rows only) F1" in section and "window only - MoE" not in section
    assert "Every model here also has" in section and "target_anchored" in section
    assert "Each variant's item F1" not in section  # no variant trained: no empty table


def test_long_abstracts_bench_scores_rouge_l_with_a_paired_interval(tmp_path):
    from bench import long_abstracts
    from data_modules.corpora import build
    from data_modules.corpora.code import stdlib_root

    with pytest.raises(SystemExit):  # the interval needs the baseline
        long_abstracts.main(["--models", "moe_diffuseq"])
    with pytest.raises(SystemExit):  # the short stage must be the shorter one
        long_abstracts.main(["--tokens", "256", "--short_tokens", "256"])
    data = tmp_path / "data"
    build("code", data / "code", root=stdlib_root() / "email")
    with pytest.raises(ValueError, match="no validation or test source"):
        long_abstracts.scored_rows("code", str(data), None, 10**9)
    tiny = {"network": {"embed_dim": 16, "hidden_size": 32, "num_layers": 1},
            "diffusion": {"steps": 20}}
    out = tmp_path / "long_abstracts.json"
    payload = long_abstracts.main(["--corpus", "code", "--tokens", "128", "--short_tokens", "32",
                                   "--short_minutes", "0.02", "--minutes", "0.02", "--docs", "3",
                                   "--vocab", "300", "--data_dir", str(data), "--model",
                                   json.dumps(tiny), "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    runs = {r["model"]: r for r in payload["runs"]}
    assert set(runs) == {"moe_diffuseq", "diffuseq"}
    for r in runs.values():  # both stages trained, every scored document has its ROUGE-L
        assert r["short_stage"]["steps"] >= 1 and r["steps"] >= 1
        assert len(r["per_doc_rougeL"]) == payload["settings"]["docs_scored"] == 3
        assert all(0.0 <= x <= 100.0 for x in r["per_doc_rougeL"])
    low, high = payload["summary"]["rougeL_moe_minus_baseline"]
    assert low <= high and payload["summary"]["verdict"] in ("better", "worse", "tie")
    section = "\n".join(report._long_abstracts(payload))
    assert "| MoE-DiffuSeq (rows only) |" in section
    assert "ROUGE-L, MoE-DiffuSeq (rows only) minus the baseline: [" in section


def test_long_tasks_short_cache_reuses_each_short_stage(tmp_path, capsys):
    from bench import learn, long_tasks
    from data_modules.corpora import build
    from data_modules.corpora.code import stdlib_root

    for name in (long_tasks.corpus("code-lookup", 256), learn.corpus("code-lookup", 300)):
        build(name, tmp_path / "data" / name, root=stdlib_root() / "email")
    tiny = {"network": {"embed_dim": 16, "hidden_size": 32, "num_layers": 1},
            "diffusion": {"steps": 20}}
    argv = ["--tasks", "code-lookup", "--lengths", "256", "--minutes", "0",
            "--short_minutes", "0.02", "--short_chars", "300", "--docs", "3", "--vocab", "300",
            "--data_dir", str(tmp_path / "data"), "--models", "moe_diffuseq", "diffuseq",
            "--model", json.dumps(tiny), "--short_cache", str(tmp_path / "cache")]
    first = long_tasks.main([*argv, "--out", str(tmp_path / "first.json")])
    assert len(list((tmp_path / "cache").glob("code-lookup-*.pt"))) == 2
    capsys.readouterr()
    again = long_tasks.main([*argv, "--out", str(tmp_path / "again.json")])
    assert capsys.readouterr().out.count("short stage from") == 2  # nothing trained again
    # The same weights, scored with the same seed: the same answers.
    for a, b in zip(first["runs"], again["runs"], strict=True):
        assert a["short_stage"] == b["short_stage"] and a["per_doc_f1"] == b["per_doc_f1"]
    # Another short budget is another stage.
    changed = [*argv[:7], "0.03", *argv[8:]]
    assert changed[6] == "--short_minutes"
    long_tasks.main([*changed, "--out", str(tmp_path / "changed.json")])
    assert len(list((tmp_path / "cache").glob("code-lookup-*.pt"))) == 4


def test_quality_check_is_met_by_its_interval_not_its_point_estimate():
    from bench.compare import target_checks

    def quality(low, high):
        return {"quality": {"code": {"moe_rougeL": 0.3, "baseline_rougeL": 0.2,
                                     "rougeL_difference_ci95": (low, high)}}}

    tie = target_checks(quality(-0.05, 0.25))["quality_code"]
    assert tie["measured"] > 0 and not tie["met"] and tie["verdict"] == "tie"
    win = target_checks(quality(0.01, 0.2))["quality_code"]
    assert win["met"] and win["verdict"] == "better"


def test_sampling_bench_scores_every_sampler_against_ancestral(tmp_path, small_corpus,
                                                               small_tokenizer_file):
    from helpers import data_args

    from bench import sampling
    from moe_diffuseq.cli import main as cli

    tiny = Path(__file__).parent / "configs" / "tiny.yaml"
    cli(["fit", "--config", str(tiny), *data_args(small_corpus, small_tokenizer_file),
         f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3",
         "--model.sampling.restarts=3"])  # a checkpoint that restarts by default
    ckpt = sorted(tmp_path.rglob("*.ckpt"))[-1]
    out = tmp_path / "sampling.json"
    payload = sampling.main(["--ckpt", str(ckpt), "--data",
                             str(small_corpus / "validation.jsonl"), "--docs", "4",
                             "--out", str(out)])
    records = {r["name"]: r for r in payload["results"]}
    assert list(records) == [name for name, _ in sampling.SAMPLERS]
    # Every row names its restarts, so the checkpoint's own 3 cannot slip into a plain sampler.
    assert all("restarts" in options for _, options in sampling.SAMPLERS)
    # T = 100, restart_steps 10 (the default).
    assert records["ancestral"]["denoiser_calls"] == 100
    assert records["dpm_solver++ 20"]["denoiser_calls"] == 20
    assert records["dpm_solver++ 20 + 4 restarts"]["denoiser_calls"] == 60
    assert records["ancestral"]["f1_minus_ancestral"] == [0.0, 0.0]
    assert all(len(r["per_doc_f1"]) == 4 for r in records.values())
    assert set(payload["checks"]) == {"dpm20_speedup", "dpm20_item_f1_ratio"}
    assert json.loads(out.read_text())["setup"]["restart_steps"] == 10
    assert out.with_suffix(".png").stat().st_size > 0
    assert "dpm_solver++ 20 + 2 restarts" in "\n".join(report._sampling(payload))


def test_every_learn_ablation_is_a_valid_configuration():
    from bench.learn import ABLATIONS, RECIPE, TASK_SETTINGS, merged
    from moe_diffuseq.config import DiffusionConfig, NetworkConfig

    starts = [RECIPE, *(merged(RECIPE, change) for change in TASK_SETTINGS.values())]
    for change in [{}, *ABLATIONS.values()]:
        for start in starts:
            config = merged(start, change)
            DiffusionConfig(**config["diffusion"])  # raises ConfigError naming the bad key
            NetworkConfig(**config["network"])
