"""Scale-out pieces that run on one CPU: global batch size, faults, trainer configs, SLURM
script."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import GlobalBatchSizeSpy, data_args

from moe_diffuseq.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def test_global_batch_size_derives_accumulation(small_corpus, small_tokenizer_file, tmp_path):
    GlobalBatchSizeSpy.seen.clear()
    main(["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
          f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0", "--trainer.callbacks+=helpers.GlobalBatchSizeSpy",
          "--trainer.callbacks.global_batch_size=12"])
    assert GlobalBatchSizeSpy.seen["accumulate"] == 3  # 12 / (batch 4 x 1 device)
    # An expected error reaches the user as one line (SystemExit), not a traceback.
    with pytest.raises(SystemExit,
                       match="global_batch_size=10 is not a multiple of data.batch_size=4"):
        main(["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
              f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
              "--trainer.callbacks+=moe_diffuseq.callbacks.GlobalBatchSize",
              "--trainer.callbacks.global_batch_size=10"])


def test_nan_loss_is_skipped_then_stops_with_example_ids(small_corpus, small_tokenizer_file,
                                                         tmp_path, monkeypatch):
    from moe_diffuseq.diffusion import losses

    real = losses.diffusion_loss_terms

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms.mse = terms.mse * float("nan")
        return terms

    monkeypatch.setattr(losses, "diffusion_loss_terms", poisoned)
    with pytest.raises(SystemExit, match=r"3 consecutive non-finite losses; "
                                                 r"last batch's examples: \['.*train.jsonl:[^']+'"):
        main(["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
              f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=10",
              "--model.max_nonfinite_steps=3",
              "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
              "--trainer.callbacks.every_n_train_steps=1"])
    # Skipped steps leave the weights as they were: whatever was checkpointed is finite.
    for ckpt in (tmp_path / "ckpt").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_sbatch_script_parses_and_renders_srun_for_2_nodes_x_4_gpus(tmp_path):
    script = REPO / "scripts" / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    fake = tmp_path / "bin"
    fake.mkdir()
    srun = fake / "srun"
    srun.write_text('#!/bin/bash\necho "srun $*" >> "$SRUN_LOG"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "srun.log"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SRUN_LOG": str(log),
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4"}
    subprocess.run(["bash", str(script), "lightning_configs/experiments/code.yaml"], check=True,
                   env=env, cwd=tmp_path)
    line = log.read_text().strip().splitlines()[-1]
    assert line.startswith("srun --kill-on-bad-exit=1 moe-diffuseq fit "
                           "--config lightning_configs/experiments/code.yaml")
    assert ("--trainer.num_nodes=2" in line and "--trainer.devices=4" in line
            and "--ckpt_path=last" in line)
    text = script.read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in text and "#SBATCH --requeue" in text


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    from moe_diffuseq.checkpoint import load_checkpoint

    path = tmp_path / "half.ckpt"
    torch.save({"state_dict": {}}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="half.ckpt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nothere.ckpt"):
        load_checkpoint(tmp_path / "nothere.ckpt")


def test_data_report_logs_skipped_rows_at_epoch_end(small_corpus, small_tokenizer_file, tmp_path):
    import csv
    import json

    rows = [json.loads(x) for x in (small_corpus / "train.jsonl").read_text().splitlines()[:8]]
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"{broken\n"
                      + b'{"src": "a", "trg": ""}\n')
    main(["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
          f"--data.init_args.train_path={train}", "--data.init_args.on_bad_row=skip",
          f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=4",
          "--trainer.max_epochs=2", "--trainer.limit_val_batches=0",
          "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
          f"--trainer.logger.save_dir={tmp_path}",
          "--trainer.callbacks+=moe_diffuseq.callbacks.DataReport"])
    (metrics,) = tmp_path.rglob("metrics.csv")
    logged = {k: v for row in csv.DictReader(metrics.open()) for k, v in row.items() if v}
    assert (float(logged["data/skipped/not_JSON"]) == 1
            and float(logged["data/skipped/empty_target"]) == 1)
