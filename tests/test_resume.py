"""Resume after SIGKILL reproduces the uninterrupted run; SIGUSR1 leaves a loadable checkpoint."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from helpers import data_args

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def _fit(root: Path, corpus: Path, tokenizer: Path, version: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "moe_diffuseq", "fit", "--config", str(TINY),
           *data_args(corpus, tokenizer),
           f"--trainer.default_root_dir={root}", "--trainer.max_steps=6", "--trainer.limit_val_batches=0",
           "--trainer.enable_progress_bar=false",
           "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}",
           "--trainer.logger.name=csv", f"--trainer.logger.version={version}",
           "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
           f"--trainer.callbacks.dirpath={root / 'ckpt'}", "--trainer.callbacks.save_last=true",
           "--trainer.callbacks.every_n_train_steps=1", *extra]
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=root)


def _losses(root: Path, version: str) -> dict[int, float]:
    with open(root / "csv" / version / "metrics.csv") as handle:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, small_corpus, small_tokenizer_file):
    full = _fit(tmp_path / "full", small_corpus, small_tokenizer_file, "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _fit(tmp_path / "cut", small_corpus, small_tokenizer_file, "first",
                  "--trainer.callbacks+=helpers.KillAtStep", "--trainer.callbacks.step=3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _fit(tmp_path / "cut", small_corpus, small_tokenizer_file, "resumed", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, after = _losses(tmp_path / "full", "full"), _losses(tmp_path / "cut", "resumed")
    assert sorted(after) == [3, 4, 5] and set(after) <= set(reference)
    for step, loss in after.items():  # exact on CPU; the tolerance only absorbs float printing
        assert abs(loss - reference[step]) <= 1e-6 * max(1.0, abs(reference[step])), (step, loss, reference[step])
    state = torch.load(tmp_path / "cut" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6


def test_sigusr1_saves_a_loadable_checkpoint_and_stops(tmp_path, small_corpus, small_tokenizer_file):
    from moe_diffuseq.checkpoint import load_checkpoint

    done = _fit(tmp_path, small_corpus, small_tokenizer_file, "sig",
                "--trainer.callbacks+=moe_diffuseq.callbacks.PreemptionCheckpoint",
                f"--trainer.callbacks.dirpath={tmp_path / 'preempt'}",
                "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step=2")
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(tmp_path / "preempt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3  # the step in flight finished, then it stopped
    assert load_checkpoint(tmp_path / "preempt" / "last.ckpt").generate(["def f():"], steps=2)
