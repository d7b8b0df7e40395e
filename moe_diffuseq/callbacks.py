"""Callbacks: generated samples in the logger during validation; predictions to jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only

from .generation import sample_rows


class ValidationSamples(pl.Callback):
    """At the end of each validation, sample targets for a few validation sources with the
    model's default sampler and log them as text (source, reference, sample), on rank zero.

    Args:
        num_samples: How many sources of the first validation batch to sample.
        seed: Sampling seed, fixed so that samples are comparable across validations.
    """

    def __init__(self, num_samples: int = 4, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self._batch = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        if batch_idx == 0 and self._batch is None:
            self._batch = batch

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        batch, self._batch = self._batch, None
        if batch is None or trainer.sanity_checking or pl_module.tokenizer is None:
            return
        batch = batch.rows(self.num_samples)
        rows = sample_rows(pl_module, batch, pl_module.sampling_config, seed=self.seed)
        columns = ["source", "reference", "sample"]
        text = "\n\n".join("\n".join(f"**{c}**\n```\n{row[c]}\n```" for c in columns)
                           for row in rows)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard
                experiment.add_text("val/samples", text, global_step=trainer.global_step)
            elif hasattr(logger, "log_text"):  # e.g. W&B
                logger.log_text("val/samples", columns=columns,
                                data=[[row[c] for c in columns] for row in rows])


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes what ``predict`` returns (one dict per example) to a jsonl file.

    Args:
        output_path: File to write; each rank writes its own file (``.rank{r}`` suffix) when
            there are several ranks.
    """

    def __init__(self, output_path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self._handle = None

    def _path(self, trainer) -> Path:
        if trainer.world_size > 1:
            return self.output_path.with_suffix(
                f".rank{trainer.global_rank}{self.output_path.suffix}")
        return self.output_path

    def on_predict_start(self, trainer, pl_module) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("w", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx):
        for row in prediction:
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class ExpertLoadMonitor(pl.Callback):
    """Every ``every_n_steps`` training steps, draw the expert load of every MoE layer as a
    heatmap (layers x experts, fraction of routed slots) into TensorBoard.

    Args:
        every_n_steps: Steps between two images.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = every_n_steps

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        load = getattr(pl_module, "last_expert_load", None)
        if load is None or trainer.global_step % self.every_n_steps:
            return
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("moe/expert_load", expert_load_figure(load),
                                      global_step=trainer.global_step)
                for layer, row in enumerate(load):
                    experiment.add_histogram(f"moe/layer{layer}/load", row,
                                             global_step=trainer.global_step)


def expert_load_figure(load):
    """A heatmap figure of a (layers, experts) load matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts = load.shape
    fig, ax = plt.subplots(figsize=(1 + 0.5 * experts, 1 + 0.4 * layers))
    image = ax.imshow(load.float().cpu().numpy(), vmin=0, aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="MoE layer", title="fraction of routed slots")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


class DataReport(pl.Callback):
    """At the end of each training epoch, log what the data module left out or cut: rows
    skipped per reason (``on_bad_row: skip``) and examples truncated or dropped by the
    length budgets. Works with any data module that has a ``report() -> dict`` method."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        report = (getattr(trainer.datamodule, "report", None) if trainer.datamodule is not None
                  else None)
        if report is None:
            return
        counts = report()
        if counts:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"data report after epoch {trainer.current_epoch}: {counts}")
            for key, value in counts.items():
                name = "data/" + key.replace(": ", "/").replace(" ", "_").replace(",", "")
                pl_module.log(name, float(value), rank_zero_only=True)


class GlobalBatchSize(pl.Callback):
    """Make the global batch size the one knob: gradient accumulation is derived as
    global_batch_size / (per-device batch size x devices x nodes).

    Args:
        global_batch_size: Examples per optimizer step over all devices and nodes.
    """

    def __init__(self, global_batch_size: int) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size}: must be >= 1")
        self.global_batch_size = global_batch_size

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        per_device = (getattr(trainer.datamodule, "hparams", {}).get("batch_size")
                      if trainer.datamodule else None)
        if per_device is None:
            raise ValueError("GlobalBatchSize needs a data module with a batch_size setting")
        per_step = per_device * trainer.world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"data.batch_size={per_device} x world size {trainer.world_size} (devices x nodes)"
            )
        trainer.accumulate_grad_batches = self.global_batch_size // per_step


class PreemptionCheckpoint(pl.Callback):
    """On SIGUSR1 or SIGTERM, finish the current step, write ``last.ckpt`` and stop.

    Under SLURM, Lightning's own SLURM plugin handles SIGUSR1 (checkpoint and requeue), so
    only SIGTERM is taken there.

    Args:
        dirpath: Folder of the checkpoint; default: the ModelCheckpoint's folder, else
            ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._requested: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        import signal

        from lightning.fabric.plugins.environments import SLURMEnvironment

        signals = [signal.SIGTERM] + ([] if SLURMEnvironment.detect() else [signal.SIGUSR1])
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum, frame) -> None:
        self._requested = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._requested is None:
            return
        folder = Path(self.dirpath
                      or (trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback
                          else None)
                      or Path(trainer.default_root_dir) / "checkpoints")
        # atomic (Lightning writes through a transaction)
        trainer.save_checkpoint(folder / "last.ckpt")
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"signal {self._requested}: saved {folder / 'last.ckpt'} "
                       f"at step {trainer.global_step}; stopping")
        trainer.should_stop = True
        self._requested = None

    def on_train_end(self, trainer, pl_module) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
