"""The CLI end to end: fit on a tiny config, load the checkpoint in a new process, generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import data_args

from moe_diffuseq import MoEDiffuSeq
from moe_diffuseq.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus, small_tokenizer_file) -> Path:
    root = tmp_path_factory.mktemp("fit")
    main(["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
          f"--trainer.default_root_dir={root}", "--trainer.max_steps=3"])
    ckpts = sorted(root.rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    return ckpts[-1]


def test_fit_writes_a_self_contained_checkpoint(trained):
    state = torch.load(trained, map_location="cpu", weights_only=True)  # plain types only
    assert state["global_step"] == 3
    assert "moe_diffuseq_tokenizer" in state
    assert state["hyper_parameters"]["network"]["vocab_size"] == 400
    assert isinstance(state["hyper_parameters"]["network"]["moe"], dict)
    assert any(k.startswith("ema.") for k in state["state_dict"])


def test_checkpoint_generates_in_a_fresh_process(trained):
    out = _run(
        "from moe_diffuseq import MoEDiffuSeq\n"
        f"m = MoEDiffuSeq.load_from_checkpoint({str(trained)!r}, map_location='cpu')\n"
        "texts = m.generate(['def add(a, b):\\n    \"\"\"Add.\"\"\"\\n    ...', "
        "'def f():\\n    ...'], steps=5)\n"
        "import json; print(json.dumps(texts))\n"
    )
    texts = json.loads(out.strip().splitlines()[-1])
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


@pytest.mark.parametrize("flush", [True, False])
def test_generation_and_setup_flush_denormals_unless_told_not_to(trained, flush):
    # A fresh process: the flag is process-wide, and this one's earlier fits have set it.
    out = _run(
        "import torch\n"
        "from moe_diffuseq import MoEDiffuSeq\n"
        "tiny = lambda: (torch.tensor([1e-30]) * 1e-9).item()  # a denormal product\n"
        "before = tiny()\n"
        f"m = MoEDiffuSeq.load_from_checkpoint({str(trained)!r}, map_location='cpu',\n"
        f"                                     flush_denormal={flush})\n"
        "m.generate(['def f():\\n    ...'], steps=2)\n"
        "after_generate = tiny()\n"
        "m.setup('predict')\n"
        "print(before, after_generate, tiny())\n"
    )
    before, after_generate, after_setup = map(float, out.split()[-3:])
    assert before > 0
    assert (after_generate == 0 and after_setup == 0) if flush else after_setup == before


def test_generate_command_jsonl_and_stdin(trained, tmp_path, small_corpus):
    out = tmp_path / "samples.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "moe_diffuseq", "generate", "--ckpt", str(trained),
           "--input", str(small_corpus / "validation.jsonl"), "--output", str(out), "--limit", "3",
           "--steps", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and {"source", "sample", "seed", "steps", "sampler", "seconds",
                               "reference"} <= set(rows[0])
    assert (rows[0]["steps"] == 4 and rows[0]["sampler"] == "dpm_solver++"
            and rows[0]["decode"] == "strip" and rows[0]["restarts"] == 0)
    # What was written: the first three sources in file order, with the samples that the Python API
    # draws for them with the same settings and seed (another process: the same numbers).
    from moe_diffuseq.checkpoint import load_checkpoint

    lines = (small_corpus / "validation.jsonl").read_text().splitlines()[:3]
    validation = [json.loads(x) for x in lines]
    assert [r["source"] for r in rows] == [v["src"] for v in validation]
    assert [r["reference"] for r in rows] == [v["trg"] for v in validation]
    expected = load_checkpoint(trained).generate([v["src"] for v in validation], steps=4, seed=0)
    assert [r["sample"] for r in rows] == expected
    done = subprocess.run(cmd[:6] + ["--steps", "3"], input="def f(x):\n", capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["source"] == "def f(x):"


def test_samplers_run_from_a_checkpoint(trained):
    from moe_diffuseq import generation
    from moe_diffuseq.checkpoint import load_checkpoint

    model = load_checkpoint(trained)
    for sampler in ("ancestral", "ddim", "dpm_solver++"):
        (text,) = model.generate(["def g():\n    ..."], sampler=sampler, steps=4)
        # Text of the model's own tokens, and the same draw again for the same seed.
        assert text and model.tokenizer.encode(text, add_special_tokens=False).ids
        assert model.generate(["def g():\n    ..."], sampler=sampler, steps=4) == [text]
    settings = generation.sampling_settings(model.sampling_config, num_candidates=3, steps=3)
    candidates = generation.generate_candidates(model, ["def g():\n    ..."], settings)
    assert len(candidates[0][0]) == 3
    # decode: the same sample as text, whole (strip, the default) or up to its first [SEP]/[PAD].
    (stripped,) = model.generate(["def g():\n    ..."], steps=3, seed=5)
    (truncated,) = model.generate(["def g():\n    ..."], steps=3, seed=5, decode="truncate")
    assert model.sampling_config.decode == "strip" and len(truncated) <= len(stripped)
    with pytest.raises(ValueError, match="sampling.decode"):
        model.generate(["def g():"], steps=2, decode="first")


def test_validate_and_test_verbs_run(trained, small_corpus, small_tokenizer_file, tmp_path):
    for verb in ("validate", "test"):
        main([verb, "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
              f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={trained}"])


def test_corrupt_checkpoint_names_the_file(trained, tmp_path):
    from moe_diffuseq.checkpoint import load_checkpoint

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(trained.read_bytes()[:1000])
    with pytest.raises(ValueError, match="broken.ckpt"):
        load_checkpoint(broken)


def test_help_lists_the_verbs(capsys):
    main(["--help"])
    text = capsys.readouterr().out
    for verb in ("fit", "validate", "test", "predict", "generate", "prepare-data"):
        assert verb in text


def test_print_config_shows_documented_options():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "moe_diffuseq", "fit", "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--model.network.attention.window" in done.stdout
    assert "Local window" in done.stdout  # the dataclass field docstring became help text
    assert "Peak learning rate" in done.stdout


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO))
                                          for p in (REPO / "lightning_configs").rglob("*.yaml")))
def test_every_config_parses(config, capsys):
    path = REPO / config
    args = ["fit"]
    if path.parent.name in ("trainer", "model", "data"):
        # Fragments: compose with the quickstart so that the whole is a valid config.
        args += ["--config", str(REPO / "lightning_configs" / "quickstart.yaml")]
        key = {"trainer": "--trainer", "model": "--model", "data": "--data"}[path.parent.name]
        args += [f"{key}={path}"]
    else:
        args += ["--config", str(path)]
    with pytest.raises(SystemExit) as done:
        main([*args, "--print_config"])
    assert done.value.code in (0, None)
    assert "model:" in capsys.readouterr().out


def test_readme_cast_command_parses(capsys):
    """The README's way to train dialogue-cast: the quickstart with coverage on."""
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "lightning_configs" / "quickstart.yaml"),
              "--data.init_args.corpus", "dialogue-cast-600",
              "--model.network.pointer_coverage", "true", "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "pointer_coverage: true" in printed and "corpus: dialogue-cast-600" in printed


def test_readme_long_stage_command_parses(capsys):
    """The README's second stage: lookup.yaml, then lookup_4k.yaml's changes over it."""
    experiments = REPO / "lightning_configs" / "experiments"
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(experiments / "lookup.yaml"),
              "--config", str(experiments / "lookup_4k.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    for line in ("init_from: runs/lookup/checkpoints/last.ckpt", "corpus: code-lookup-14336",
                 "max_src_len: 6144", "pointer_span_dropout: 0.5", "window: 256",
                 "dirpath: runs/lookup_4k/checkpoints"):
        assert line in printed, line


def test_bad_config_value_names_the_key(capsys):
    with pytest.raises(SystemExit, match=r"moe.top_k=9: must be in \[1, num_experts=4\]"):
        main(["fit", "--config", str(TINY), "--model.network.moe.top_k=9",
              "--data.init_args.train_path=x.jsonl"])


@pytest.mark.parametrize(("option", "message"), [
    ("--model.lr=-1", "model.lr=-1.0: must be >= 0"),
    ("--model.min_lr_ratio=1.5", "model.min_lr_ratio=1.5: must be in [0, 1]"),
    ("--model.warmup_steps=-1", "model.warmup_steps=-1: must be >= 0"),
    ("--model.max_nonfinite_steps=0", "model.max_nonfinite_steps=0: must be >= 1"),
    ("--data.init_args.max_src_len=0", "data.max_src_len=0: must be >= 1"),
    ("--data.init_args.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("--data.init_args.tokenizer_vocab_size=100", "data.tokenizer_vocab_size=100: must be >= 261"),
])
def test_bad_training_values_name_their_key(option, message, small_corpus, small_tokenizer_file,
                                            tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
              f"--trainer.default_root_dir={tmp_path}", option])
    assert message in str(caught.value)


def test_a_bad_value_given_in_python_names_its_key():
    from moe_diffuseq.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.lr_decay='cosin': expected one of"):
        MoEDiffuSeq(lr_decay="cosin")


def test_evaluate_command_writes_json_and_markdown(trained, small_corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "moe_diffuseq", "evaluate", "--ckpt", str(trained), "--data",
           str(small_corpus / "validation.jsonl"), "--limit", "4", "--steps", "3", "--seeds", "2",
           "--restarts", "1", "--restart_noise", "0.6", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["documents"] == 4 and report["settings"]["steps"] == 3
    assert report["settings"]["restarts"] == 1 and report["settings"]["restart_noise"] == 0.6
    assert report["settings"]["restart_steps"] == 10
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "sentence_bleu", "dist1",
                "dist2", "self_bleu", "length_ratio"):
        assert key in report["scores"]
    documents = report["documents"]
    references = [json.loads(line)["trg"]
                  for line in (small_corpus / "validation.jsonl").read_text().splitlines()[:4]]
    assert [d["reference"] for d in documents] == references
    mean_f1 = sum(d["item_f1"] for d in documents) / len(documents)
    assert mean_f1 == pytest.approx(report["scores"]["item_f1"])
    assert "| rougeL |" in out.with_suffix(".md").read_text()


def test_predict_verb_writes_predictions(trained, small_corpus, small_tokenizer_file, tmp_path):
    out = tmp_path / "pred.jsonl"
    main(["predict", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
          f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={trained}",
          "--trainer.limit_predict_batches=2",
          "--trainer.callbacks+=moe_diffuseq.callbacks.JsonlPredictionWriter",
          f"--trainer.callbacks.output_path={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and {"id", "source", "sample", "reference"} <= set(rows[0])
    first = json.loads((small_corpus / "validation.jsonl").read_text().splitlines()[0])
    assert rows[0]["id"] == f"{small_corpus / 'validation.jsonl'}:{first['id']}"  # the row's own id


def test_validation_samples_reach_tensorboard(small_corpus, small_tokenizer_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
          f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
          "--trainer.val_check_interval=2",
          "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
          f"--trainer.logger.save_dir={tmp_path}",
          "--trainer.callbacks+=moe_diffuseq.callbacks.ValidationSamples",
          "--trainer.callbacks.num_samples=2",
          "--trainer.callbacks+=moe_diffuseq.callbacks.ExpertLoadMonitor",
          "--trainer.callbacks.every_n_steps=1"])
    (events,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0, "images": 0, "histograms": 0})
    acc.Reload()
    assert "moe/expert_load" in acc.Tags()["images"]
    assert "moe/layer1/load" in acc.Tags()["histograms"]
    assert "val/samples/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("val/samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "**source**" in text and "**sample**" in text
    scalars = acc.Tags()["scalars"]
    for tag in ("train/mse", "train/rounding", "train/tT", "train/load_balance", "train/z_loss",
                "train/denoise_rate", "moe/layer0/load_e0", "val/token_acc", "val/unigram_acc"):
        assert tag in scalars
    # tiny.yaml: gamma 0.5 ramped over 4 steps, so the two training steps used 0 and 0.125.
    assert [e.value for e in acc.Scalars("train/denoise_rate")] == pytest.approx([0.0, 0.125])


def test_infilling_keeps_given_tokens_and_source_fixed(trained):
    from moe_diffuseq import generation
    from moe_diffuseq.checkpoint import load_checkpoint

    model = load_checkpoint(trained)
    sources = ["def add(a, b):\n    ...", "def g():\n    ..."]
    templates = ["def add(a, b):\n[MASK][MASK][MASK]    return a + b", "[MASK][MASK] g():"]
    batch, fixed = generation.encode(model, sources, templates)
    assert fixed.any() and not (fixed & ~batch.input_mask).any()
    for sampler in ("dpm_solver++", "ancestral"):
        settings = generation.sampling_settings(model.sampling_config, sampler=sampler, steps=4)
        ids = generation.sample_ids(model, batch, settings, seed=1, fixed_mask=fixed)
        assert torch.equal(ids[fixed], batch.input_ids[fixed])
        source = ~batch.input_mask
        assert torch.equal(ids[source], batch.input_ids[source])
    texts = model.generate(sources, templates=templates, steps=4)
    assert texts[0].startswith("def add(a, b):\n")  # fixed tokens before the first gap


def test_generate_command_infills_templates_from_a_column(trained, tmp_path):
    path = tmp_path / "infill.jsonl"
    path.write_text(json.dumps({"src": "def add(a, b):\n    ...",
                                "tpl": "def add(a, b):\n[MASK][MASK]"}) + "\n")
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "moe_diffuseq", "generate", "--ckpt", str(trained),
                           "--input", str(path), "--output", str(out), "--steps", "3",
                           "--template_key", "tpl"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text())["sample"].startswith("def add(a, b):\n")


@pytest.mark.parametrize(
    ("verb", "make", "extra", "message"),
    [
        ("generate", lambda d: d, [], "is a directory"),
        ("generate", lambda d: _write(d / "bad.txt", b"def f():\n\xff\xfe\n"), [],
         "bad.txt, line 2: not UTF-8"),
        ("generate", lambda d: _write(d / "empty.jsonl", b"\n\n"), [], "no sources in"),
        ("generate", lambda d: _write(d / "ok.txt", b"x\n"), ["--limit", "0"],
         "--limit 0: must be >= 1"),
        ("evaluate", lambda d: _write(d / "ok.jsonl", b'{"src": "x", "trg": "y"}\n'),
         ["--limit", "-1"], "--limit -1: must be >= 1"),
        ("evaluate", lambda d: d / "missing.jsonl", [], "--data"),
        ("generate", lambda d: _write(d / "ok.txt", b"x\n"),
         ["--output", "/proc/forbidden/out.jsonl"], "--output /proc/forbidden/out.jsonl"),
        # A JSON value is text, or the line that holds it is named (a suffix in any case).
        ("generate", lambda d: _write(d / "rows.JSONL", b'{"src": "x"}\n\n{"src": null}\n'), [],
         "rows.JSONL, line 3: 'src' is null"),
        ("generate", lambda d: _write(d / "rows.jsonl", b'{"src": 3}\n'), [],
         "rows.jsonl, line 1: 'src' is a JSON int, not a string"),
        ("generate", lambda d: _write(d / "rows.jsonl", b'{"src": "x",}\n'), [],
         "rows.jsonl, line 1: not JSON"),
        ("evaluate", lambda d: _write(d / "pairs.jsonl",
                                      b'{"src": "x", "trg": "y"}\n{"src": "z"}\n'), [],
         "pairs.jsonl, line 2: no 'trg' key"),
        ("evaluate", lambda d: _write(d / "pairs.jsonl", b'{"src": "x", "trg": " "}\n'), [],
         "pairs.jsonl, line 1: 'trg' is empty"),
    ],
)
def test_bad_input_fails_before_sampling_and_names_the_fault(trained, tmp_path, verb, make, extra,
                                                             message):
    source = make(tmp_path)
    flag = "--input" if verb == "generate" else "--data"
    with pytest.raises(SystemExit) as caught:
        main([verb, "--ckpt", str(trained), flag, str(source), *extra])
    assert message in str(caught.value)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_generate_creates_the_output_folder(trained, tmp_path):
    source = _write(tmp_path / "sources.txt", b"def add(a, b):\n")
    out = tmp_path / "new" / "folder" / "samples.jsonl"
    main(["generate", "--ckpt", str(trained), "--input", str(source), "--output", str(out),
          "--steps", "2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == ["def add(a, b):"] and rows[0]["steps"] == 2


@pytest.mark.parametrize("kind", ["random", "foreign", "truncated"])
def test_a_bad_checkpoint_is_named_without_the_unsafe_advice(trained, tmp_path, kind):
    from moe_diffuseq.checkpoint import load_checkpoint

    path = tmp_path / f"{kind}.ckpt"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "foreign":
        torch.save({"payload": Path("not-a-tensor")}, path)  # an object weights_only refuses
    else:
        data = trained.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    for load in (load_checkpoint,
                 lambda p: MoEDiffuSeq.load_from_checkpoint(p, map_location="cpu")):
        with pytest.raises(ValueError) as caught:
            load(path)
        message = str(caught.value)
        assert (message.startswith(f"{path}: not a MoE-DiffuSeq checkpoint")
                and "weights_only" not in message)


def test_a_checkpoint_folder_points_to_consolidate_and_consolidate_wants_one(trained, tmp_path):
    folder = tmp_path / "sharded.ckpt"
    (folder / ".metadata").parent.mkdir()
    (folder / ".metadata").write_bytes(b"")
    with pytest.raises(SystemExit, match=rf"{folder}: a sharded checkpoint folder; merge it .*"
                                         rf"moe-diffuseq consolidate {folder}"):
        main(["generate", "--ckpt", str(folder), "--input",
              str(_write(tmp_path / "sources.txt", b"def f():\n"))])
    for given in (trained, tmp_path / "nowhere"):
        with pytest.raises(SystemExit, match=rf"{given}: not a sharded checkpoint folder"):
            main(["consolidate", str(given)])
    with pytest.raises(SystemExit, match=rf"{tmp_path}: is a folder; expected a checkpoint file"):
        main(["evaluate", "--ckpt", str(tmp_path), "--data", str(_write(
            tmp_path / "pairs.jsonl", b'{"src": "x", "trg": "y"}\n'))])


def test_a_whole_checkpoint_that_cannot_load_is_not_called_corrupt(trained, tmp_path):
    """A file that reads but fails later (a config check, a device) says why, not "truncated"."""
    from moe_diffuseq.checkpoint import load_checkpoint

    state = torch.load(trained, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["network"]["moe"]["top_k"] = 99  # more than its experts
    edited = tmp_path / "edited.ckpt"
    torch.save(state, edited)
    with pytest.raises(ValueError) as caught:
        load_checkpoint(edited)
    assert str(caught.value).startswith(f"{edited}: cannot be loaded") and "top_k" in str(
        caught.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"cannot be loaded \(RuntimeError: .*CUDA"):
            load_checkpoint(trained, map_location="cuda")
    # A whole torch file of another program's is still not ours.
    foreign = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match=rf"{foreign}: not a MoE-DiffuSeq checkpoint"):
        load_checkpoint(foreign)


def test_a_too_long_source_is_truncated_with_a_warning_and_recorded(trained, tmp_path, capsys):
    source = _write(tmp_path / "long.txt", ("x = 1 + 2 " * 400 + "\n").encode() + b"def f():\n")
    out = tmp_path / "samples.jsonl"
    main(["generate", "--ckpt", str(trained), "--input", str(source), "--output", str(out),
          "--steps", "2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["src_truncated"] > 0 and rows[1]["src_truncated"] == 0
    captured = capsys.readouterr()
    assert "1 of 2 sources exceed the model's 24-token source budget" in captured.err
    assert len(captured.out) < 3000  # the preview is clipped, not the whole 4,000-character source


def test_evaluate_warns_of_and_records_truncated_sources(trained, tmp_path, capsys):
    rows = [{"src": "x = 1 + 2 " * 400, "trg": "def f"}, {"src": "def f():", "trg": "def f"}]
    data = _write(tmp_path / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    main(["evaluate", "--ckpt", str(trained), "--data", str(data), "--steps", "2",
          "--out", str(tmp_path / "report")])
    assert "1 of 2 sources exceed the model's 24-token source budget" in capsys.readouterr().err
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["settings"]["sources_truncated"] == 1
    assert [d["src_truncated"] > 0 for d in saved["documents"]] == [True, False]


def test_fit_checks_its_checkpoint_folder_before_training(small_corpus, small_tokenizer_file,
                                                          tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: a file in the way instead
            locked.chmod(0o700)
            locked.rmdir()
            locked.write_text("a file where the folder should be")
        with pytest.raises(SystemExit,
                           match=r"trainer.callbacks\[0\].init_args.dirpath=.*locked/ckpt"):
            main(["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
                  f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
                  "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  f"--trainer.callbacks.dirpath={locked / 'ckpt'}"])
    finally:
        if locked.is_dir():
            locked.chmod(0o700)


def test_a_bad_option_is_one_line_without_the_usage_dump(capsys):
    with pytest.raises(SystemExit,
                       match=r"unrecognized arguments: --model.network.hidden_sise=9") as caught:
        main(["fit", "--config", str(TINY), "--model.network.hidden_sise=9"])
    assert "\n" not in str(caught.value)
    with pytest.raises(SystemExit, match=r'moe-diffuseq generate: Parser key "steps": '
                                         r'Expected a .*int.* Got value: abc'):
        main(["generate", "--ckpt", "x.ckpt", "--steps", "abc"])
    printed = capsys.readouterr()
    assert ("usage:" not in printed.out + printed.err
            and len((printed.out + printed.err).splitlines()) <= 3)


@pytest.mark.parametrize("fault", ["random_ckpt", "data_dir", "missing_column", "nan_loss"])
def test_fit_faults_are_one_line_naming_the_place(fault, small_corpus, small_tokenizer_file,
                                                  tmp_path):
    args = ["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
            f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=4"]
    if fault == "random_ckpt":  # resume from a file that is no checkpoint: before any training
        bad = tmp_path / "random.ckpt"
        bad.write_bytes(os.urandom(2048))
        args.append(f"--ckpt_path={bad}")
        expected = f"{bad}: not a MoE-DiffuSeq checkpoint"
    elif fault == "data_dir":
        args.append(f"--data.init_args.train_path={small_corpus}")
        expected = f"{small_corpus}: is a directory"
    elif fault == "missing_column":
        renamed = tmp_path / "renamed.jsonl"
        renamed.write_text(json.dumps({"source": "a b", "trg": "c"}) + "\n")
        args.append(f"--data.init_args.val_path={renamed}")
        expected = f"{renamed}: missing column(s) ['src']"
    else:  # every loss non-finite: the run stops naming the batch's examples
        args += ["--model.lr=1e30", "--model.max_nonfinite_steps=2"]
        expected = "2 consecutive non-finite losses; last batch's examples"
    with pytest.raises(SystemExit) as caught:
        main(args)
    message = str(caught.value)
    assert expected in message and "\n" not in message and "weights_only" not in message


@pytest.mark.parametrize(("config", "field", "key"), [
    ("AttentionConfig", "backend", "network.attention.backend"),
    ("MoEConfig", "dispatch", "network.moe.dispatch"),
    ("NetworkConfig", "positions", "network.positions"),
    ("DiffusionConfig", "timestep_sampler", "diffusion.timestep_sampler"),
    ("SamplingConfig", "sampler", "sampling.sampler"),
])
def test_a_choice_given_in_python_or_a_checkpoint_is_checked(config, field, key):
    """The parser checks a Literal's choices on the command line; the dataclass checks them for
    a Python call and a checkpoint's hyperparameters, naming the key."""
    from moe_diffuseq import config as settings

    with pytest.raises(settings.ConfigError, match=rf"{key}='nope': expected one of \['"):
        getattr(settings, config)(**{field: "nope"})
