"""Callbacks the tests load by class path into `moe-diffuseq fit` subprocesses."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl

from moe_diffuseq.callbacks import GlobalBatchSize


class KillAtStep(pl.Callback):
    """SIGKILL this process when a training batch starts after ``step`` optimizer steps
    (the checkpoint of that step has been written by then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(pl.Callback):
    """Send ``signum`` to this process once, at the start of the batch after ``step`` steps."""

    def __init__(self, step: int, signum: int = int(signal.SIGUSR1)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class GlobalBatchSizeSpy(GlobalBatchSize):
    """GlobalBatchSize that records the accumulation it set, in ``GlobalBatchSizeSpy.seen``."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        GlobalBatchSizeSpy.seen["accumulate"] = trainer.accumulate_grad_batches


def data_args(corpus, tokenizer) -> list[str]:
    """CLI overrides that point tests/configs/tiny.yaml at the small corpus and tokenizer."""
    return [
        f"--data.init_args.train_path={corpus / 'train.jsonl'}",
        f"--data.init_args.val_path={corpus / 'validation.jsonl'}",
        f"--data.init_args.test_path={corpus / 'validation.jsonl'}",
        f"--data.init_args.tokenizer_path={tokenizer}",
        f"--data.init_args.data_dir={corpus / 'work'}",
    ]


class RngRecorder(pl.Callback):
    """Write a digest of this rank's torch RNG state at its first training batch to
    ``folder/rank<r>.txt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import hashlib

        import torch

        if trainer.global_step == 0:
            digest = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()
            with open(os.path.join(self.folder, f"rank{trainer.global_rank}.txt"), "w") as out:
                out.write(digest)
