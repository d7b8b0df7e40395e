"""Real multi-process training on CPU (gloo): DDP and FSDP2, two processes each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import data_args

from moe_diffuseq.moe import MoEFeedForward

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
FSDP_CPU = REPO / "lightning_configs" / "trainer" / "fsdp_cpu.yaml"


def _fit(tmp_path: Path, corpus: Path, tokenizer: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "moe_diffuseq", "fit", "--config", str(TINY),
           *data_args(corpus, tokenizer),
           f"--trainer.default_root_dir={tmp_path}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def _fit_fsdp_cpu(tmp_path: Path, corpus: Path, tokenizer: Path,
                  *extra: str) -> subprocess.CompletedProcess:
    # The trainer file comes after _fit's own flags, so the run directory is given again after it.
    return _fit(tmp_path, corpus, tokenizer, "--trainer", str(FSDP_CPU), "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}", *extra)


def _load_and_generate(ckpt: Path) -> list[str]:
    from moe_diffuseq.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt)
    return model.generate(["def f(x):\n    ..."], steps=3)


def test_unused_experts_still_get_gradients():
    """Stacked expert weights: an expert with no tokens gets a zero gradient, never None,
    so DDP's gradient sync sees every parameter in every step."""
    moe = MoEFeedForward(8, 8, num_experts=4, top_k=1)
    with torch.no_grad():
        moe.router.proj.weight.zero_()
        moe.router.proj.weight[0] = 5.0  # every token to expert 0
    y, stats = moe(torch.ones(6, 8))
    y.sum().backward()
    assert stats.expert_fraction[1:].sum() == 0
    assert all(p.grad is not None for p in moe.parameters())
    assert torch.all(moe.experts.w1.grad[1:] == 0) and moe.experts.w1.grad[0].abs().sum() > 0


@pytest.mark.slow
def test_ddp_two_processes(tmp_path, small_corpus, small_tokenizer_file):
    done = _fit(tmp_path, small_corpus, small_tokenizer_file, "--trainer.accelerator=cpu",
                "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=3",
                "--trainer.callbacks+=helpers.RngRecorder",
                f"--trainer.callbacks.folder={tmp_path}")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr
    # Each rank draws its own timesteps and noise for its own batch.
    draws = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert draws[0] != draws[1]
    (ckpt,) = tmp_path.rglob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert len(_load_and_generate(ckpt)) == 1


@pytest.mark.slow
def test_fsdp2_two_processes(tmp_path, small_corpus, small_tokenizer_file):
    done = _fit_fsdp_cpu(tmp_path, small_corpus, small_tokenizer_file,
                         "--trainer.max_steps=3", "--trainer.val_check_interval=3",
                         "--trainer.limit_val_batches=2")
    assert done.returncode == 0, done.stderr[-4000:]
    (ckpt,) = tmp_path.rglob("*.ckpt")
    assert ckpt.is_file()  # consolidated to one file
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert len(_load_and_generate(ckpt)) == 1


@pytest.mark.slow
def test_sharded_checkpoint_consolidates_to_one_loadable_file(tmp_path, small_corpus,
                                                              small_tokenizer_file):
    done = _fit_fsdp_cpu(tmp_path, small_corpus, small_tokenizer_file,
                         "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                         "--trainer.strategy.init_args.save_distributed_checkpoint=true",
                         "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                         f"--trainer.callbacks.dirpath={tmp_path / 'ck'}",
                         "--trainer.callbacks.every_n_train_steps=1")
    assert done.returncode == 0, done.stderr[-4000:]
    (folder,) = (tmp_path / "ck").glob("*.ckpt")
    assert folder.is_dir() and (folder / ".metadata").is_file()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    out = tmp_path / "one.ckpt"
    done = subprocess.run([sys.executable, "-m", "moe_diffuseq", "consolidate", str(folder),
                           "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_load_and_generate(out)) == 1


@pytest.mark.slow
def test_fsdp2_warm_start_copies_the_checkpoint_before_sharding(tmp_path, small_corpus,
                                                               small_tokenizer_file):
    short = tmp_path / "short"
    short.mkdir()
    done = _fit(short, small_corpus, small_tokenizer_file, "--trainer.max_steps=3")
    assert done.returncode == 0, done.stderr[-4000:]
    (start,) = short.rglob("*.ckpt")
    warm = tmp_path / "warm"
    warm.mkdir()
    # lr 0: the step changes nothing, so the saved weights are the ones each shard started from.
    done = _fit_fsdp_cpu(warm, small_corpus, small_tokenizer_file, "--trainer.max_steps=1",
                         "--trainer.limit_val_batches=0", f"--model.init_from={start}",
                         "--model.lr=0", "--data.init_args.max_src_len=40",
                         "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                         f"--trainer.callbacks.dirpath={warm / 'ck'}",
                         "--trainer.callbacks.every_n_train_steps=1")
    assert done.returncode == 0, done.stderr[-4000:]
    (ckpt,) = (warm / "ck").glob("*.ckpt")
    before = torch.load(start, map_location="cpu", weights_only=True)["state_dict"]
    after = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in before.items():
        if key.startswith("ema."):
            new = after["denoiser." + key[len("ema."):]]
            torch.testing.assert_close(new[: len(value)], value, rtol=0, atol=0, msg=key)
