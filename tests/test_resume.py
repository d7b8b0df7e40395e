"""Resume after SIGKILL reproduces the uninterrupted run; SIGUSR1 leaves a loadable checkpoint."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import data_args

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_fit(root: Path, corpus: Path, tokenizer: Path, version: str,
               *extra: str) -> tuple[subprocess.Popen, Path]:
    """A `moe-diffuseq fit` of the tiny model, started and not waited for, with its own DDP port
    so that two runs can go at once; its output goes to files under ``root`` named by
    ``version`` (returned: the path stem)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
           "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, "-m", "moe_diffuseq", "fit", "--config", str(TINY),
           *data_args(corpus, tokenizer),
           f"--trainer.default_root_dir={root}", "--trainer.max_steps=6",
           "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
           "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
           f"--trainer.logger.save_dir={root}",
           "--trainer.logger.name=csv", f"--trainer.logger.version={version}",
           "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
           f"--trainer.callbacks.dirpath={root / 'ckpt'}", "--trainer.callbacks.save_last=true",
           "--trainer.callbacks.every_n_train_steps=1", *extra]
    root.mkdir(parents=True, exist_ok=True)
    stem = root / f"run-{version}"
    # Files, not pipes: a run not yet waited for must never block on a full pipe.
    with open(f"{stem}.out", "w") as out, open(f"{stem}.err", "w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=root), stem


def _finish(started: tuple[subprocess.Popen, Path]) -> subprocess.CompletedProcess:
    run, stem = started
    run.wait(timeout=600)
    return subprocess.CompletedProcess(run.args, run.returncode, Path(f"{stem}.out").read_text(),
                                       Path(f"{stem}.err").read_text())


def _fit(root: Path, corpus: Path, tokenizer: Path, version: str,
         *extra: str) -> subprocess.CompletedProcess:
    return _finish(_start_fit(root, corpus, tokenizer, version, *extra))


def _losses(root: Path, version: str) -> dict[int, tuple[int, float]]:
    """{step: (epoch, train/loss)} as the CSV logger wrote them."""
    with open(root / "csv" / version / "metrics.csv") as handle:
        return {int(r["step"]): (int(r["epoch"]), float(r["train/loss"]))
                for r in csv.DictReader(handle) if r.get("train/loss")}


def _resume_matches_uninterrupted(tmp_path: Path, small_corpus: Path, tokenizer: Path, rows: int,
                                  *extra: str) -> None:
    """Kill a run at step 3 (mid-epoch 0), resume it with --ckpt_path last, and check that steps
    3-17 see the same batches in the same epochs as an uninterrupted run: 6 steps an epoch."""
    lines = (small_corpus / "train.jsonl").read_text().splitlines()
    assert len(lines) >= rows
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text("\n".join(lines[:rows]) + "\n")
    (corpus / "validation.jsonl").write_text((small_corpus / "validation.jsonl").read_text())
    steps = ["--trainer.max_steps=18", *extra]
    # The uninterrupted and the killed run are independent: run them at once (both are mostly
    # start-up), and the resumed run after the killed one.
    full = _start_fit(tmp_path / "full", corpus, tokenizer, "full", *steps)
    killed = _finish(_start_fit(tmp_path / "cut", corpus, tokenizer, "first", *steps,
                                "--trainer.callbacks+=helpers.KillAtStep",
                                "--trainer.callbacks.step=3"))
    full = _finish(full)
    assert full.returncode == 0, full.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _fit(tmp_path / "cut", corpus, tokenizer, "resumed", *steps, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, after = _losses(tmp_path / "full", "full"), _losses(tmp_path / "cut", "resumed")
    assert sorted(after) == list(range(3, 18)) and set(after) <= set(reference)
    assert [reference[s][0] for s in range(18)] == [s // 6 for s in range(18)]  # 6 batches an epoch
    # exact on CPU; the tolerance only absorbs float printing
    for step, (epoch, loss) in after.items():
        ref_epoch, ref_loss = reference[step]
        assert epoch == ref_epoch, (step, epoch, ref_epoch)
        assert abs(loss - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss)), (step, loss, ref_loss)
    state = torch.load(tmp_path / "cut" / "ckpt" / "last.ckpt", map_location="cpu",
                       weights_only=True)
    assert state["global_step"] == 18


@pytest.mark.parametrize("streaming", [False, True])
def test_sigkill_then_resume_matches_uninterrupted_run_across_epochs(tmp_path, small_corpus,
                                                                     small_tokenizer_file,
                                                                     streaming):
    # 24 training rows at batch 4: 6 steps an epoch. Streamed, the rows pass through a shuffle
    # buffer reseeded every epoch.
    extra = ["--data.init_args.streaming=true", "--data.init_args.shuffle_buffer=16"]
    _resume_matches_uninterrupted(tmp_path, small_corpus, small_tokenizer_file, 24,
                                  *(extra if streaming else []))


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_ddp_resume_matches_uninterrupted_run_across_epochs(tmp_path, small_corpus,
                                                            small_tokenizer_file, streaming):
    # Two processes (gloo) over 48 rows at batch 4: 6 steps an epoch. Lightning would wrap a
    # plain sampler in its own shuffling DistributedSampler, whose order depends on the length
    # left: resumed mid-epoch, the ranks then read other rows than an uninterrupted run.
    extra = ["--data.init_args.streaming=true", "--data.init_args.shuffle_buffer=16"]
    _resume_matches_uninterrupted(tmp_path, small_corpus, small_tokenizer_file, 48,
                                  "--trainer.accelerator=cpu", "--trainer.devices=2",
                                  "--trainer.strategy=ddp", *(extra if streaming else []))


def test_sigusr1_saves_a_loadable_checkpoint_and_stops(tmp_path, small_corpus,
                                                       small_tokenizer_file):
    from moe_diffuseq.checkpoint import load_checkpoint

    done = _fit(tmp_path, small_corpus, small_tokenizer_file, "sig",
                "--trainer.callbacks+=moe_diffuseq.callbacks.PreemptionCheckpoint",
                f"--trainer.callbacks.dirpath={tmp_path / 'preempt'}",
                "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step=2")
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(tmp_path / "preempt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3  # the step in flight finished, then it stopped
    assert load_checkpoint(tmp_path / "preempt" / "last.ckpt").generate(["def f():"], steps=2)


def test_resuming_with_a_changed_model_setting_names_it(tmp_path, small_corpus,
                                                        small_tokenizer_file):
    first = _fit(tmp_path, small_corpus, small_tokenizer_file, "first", "--trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    changed = _fit(tmp_path, small_corpus, small_tokenizer_file, "changed", "--trainer.max_steps=3",
                   f"--ckpt_path={ckpt}", "--model.network.hidden_size=64",
                   "--model.network.attention.window=16")
    assert changed.returncode != 0
    message = changed.stderr.strip().splitlines()[-1]
    assert ("model.network.hidden_size: 32 -> 64" in message
            and "model.network.attention.window: 8 -> 16" in message)
    assert "Traceback" not in changed.stderr  # one clear line
    allowed = _fit(tmp_path, small_corpus, small_tokenizer_file, "allowed", "--trainer.max_steps=3",
                   f"--ckpt_path={ckpt}", "--model.lr=0.01")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "changed setting: model.lr: 0.0003 -> 0.01" in allowed.stderr


def test_each_rank_gets_its_own_rng_state_back():
    # Ranks draw timesteps and noise from their own generators, and their states part as soon as
    # they draw differently shaped tensors: a checkpoint keeps each, and each rank takes its own.
    from moe_diffuseq.checkpoint import read_extras, rng_state

    states = []
    for rank in range(2):
        torch.manual_seed(10 + rank)
        states.append(rng_state())
    checkpoint = {"moe_diffuseq_torch_rng": states}
    for rank in range(2):
        read_extras(checkpoint, restore_rng=True, rank=rank, world_size=2)
        assert torch.equal(torch.get_rng_state(), states[rank]["cpu"])
    # Another number of processes cannot replay the draws; the ranks still draw differently.
    draws = []
    for rank in range(3):
        read_extras(checkpoint, restore_rng=True, rank=rank, world_size=3)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    torch.manual_seed(0)
    old = {"moe_diffuseq_torch_rng": torch.get_rng_state()}  # a one-process checkpoint
    expected = torch.rand(3)
    read_extras(old, restore_rng=True)
    assert torch.equal(torch.rand(3), expected)


def test_a_setting_the_checkpoint_predates_counts_as_its_default():
    """A checkpoint made before a config key existed loads with that key's default; resuming it
    with another value is a change, named, not a missing weight deep in the state dict."""
    from moe_diffuseq.resume_check import changed_settings

    saved = {"network": {"source_pointer": True, "hidden_size": 64}}
    forbidden, _ = changed_settings(saved, {"network": {"source_pointer": True, "hidden_size": 64,
                                                        "pointer_span": 8}})
    assert forbidden == ["network.pointer_span: 0 -> 8"]
    same, _ = changed_settings(saved, {"network": {"source_pointer": True, "hidden_size": 64,
                                                   "pointer_span": 0}})
    assert same == []
