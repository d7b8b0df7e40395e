"""MoEDiffuSeq: the LightningModule that trains and validates the denoiser (sampling:
``generation``; the optimizer: ``optim``; the loss: ``diffusion.losses``). The network is built in
one place, ``configure_model``: at construction when every size is known, else by the Trainer
once the data module's tokenizer gives the vocabulary size."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer

from . import generation
from .batch import Seq2SeqBatch, SpecialIds
from .config import (
    ConfigError,
    DiffusionConfig,
    NetworkConfig,
    SamplingConfig,
    coerce,
    resolve_loss_on,
    to_plain,
)
from .denoiser import Denoiser
from .diffusion import NoiseSchedule, make_timestep_sampler, training_loss
from .evaluation import gather_objects
from .moe import router_metrics
from .optim import (
    LR_DECAYS,
    LrDecay,
    NonFiniteGuard,
    adamw_with_schedule,
    time_limit_fraction,
    update_ema,
)
from .probes import AccuracyTally, noise_level_counts, probe_steps
from .warm_start import WarmStart, copy_weights, describe, read_warm_start


class MoEDiffuSeq(pl.LightningModule):
    """MoE-DiffuSeq: seq2seq diffusion in embedding space with sparse attention and MoE.

    Args:
        network: The denoiser's shape: sizes, attention and mixture-of-experts settings.
        diffusion: Forward process and loss settings.
        sampling: Defaults for generation.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        lr_decay: Learning-rate decay after warm-up, to ``min_lr_ratio * lr`` at the run's end: its
            last step (``trainer.max_steps`` or epochs) or its time limit (``trainer.max_time``),
            whichever comes first.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        ema_decay: Decay of the exponential moving average of the weights used for
            validation and generation (0 disables averaging).
        max_nonfinite_steps: Stop after this many consecutive steps with a NaN/inf loss
            (each such step is skipped with a warning).
        flush_denormal: Make the CPU flush denormal floats to zero (``torch.set_flush_denormal``)
            when the Trainer sets the model up and when ``generate`` starts. The flag is the
            process's: it stays set after the run. On CPU a matmul fed denormals (the rounding
            head's softmax backward gives them once the model is confident) runs several times
            slower; TensorFlow sets the same flags in its thread pools.
        init_from: A checkpoint whose weights start this ``fit`` (a warm start: the optimizer,
            step and schedule start afresh). Its source budget may be shorter than this run's:
            its position rows come first, the new ones are learned from here; every other tensor
            must match in shape. The weights are the ones it generates with (its EMA copy where
            it kept one), and its tokenizer is this run's: the CLI points
            ``data.init_args.tokenizer_path`` at the checkpoint when it is unset. A resume from
            a single-file checkpoint (``ckpt_path``: a file, ``last`` or ``hpc``) restores its
            own weights instead: the CLI does not read ``init_from`` then.
    """

    def __init__(
        self,
        network: NetworkConfig = NetworkConfig(),
        diffusion: DiffusionConfig = DiffusionConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 500,
        lr_decay: LrDecay = "linear",
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.9999,
        max_nonfinite_steps: int = 10,
        flush_denormal: bool = True,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.network_config = coerce(NetworkConfig, network, "network")
        self.diffusion_config = diffusion = coerce(DiffusionConfig, diffusion, "diffusion")
        self.sampling_config = coerce(SamplingConfig, sampling, "sampling")
        checks = [(lr >= 0, "lr", lr, "must be >= 0"),  # 0: steps that change nothing
                  (weight_decay >= 0, "weight_decay", weight_decay, "must be >= 0"),
                  (warmup_steps >= 0, "warmup_steps", warmup_steps, "must be >= 0"),
                  (lr_decay in LR_DECAYS, "lr_decay", lr_decay,
                   f"expected one of {list(LR_DECAYS)}"),
                  (0.0 <= min_lr_ratio <= 1.0, "min_lr_ratio", min_lr_ratio, "must be in [0, 1]"),
                  (0.0 <= ema_decay < 1.0, "ema_decay", ema_decay, "must be in [0, 1)"),
                  (max_nonfinite_steps >= 1, "max_nonfinite_steps", max_nonfinite_steps,
                   "must be >= 1")]
        for ok, key, value, why in checks:
            if not ok:
                raise ConfigError(f"model.{key}={value!r}: {why}")
        # Plain types only, so checkpoints load with weights_only=True and scripts rebuild
        # the model from the file alone.
        self.save_hyperparameters(ignore=["network", "diffusion", "sampling"])
        nested = {"network": self.network_config, "diffusion": diffusion,
                  "sampling": self.sampling_config}
        self.hparams.update({key: to_plain(value) for key, value in nested.items()})
        self.save_hyperparameters(dict(self.hparams))
        self.tokenizer: Tokenizer | None = None
        self.schedule = NoiseSchedule(diffusion.schedule, diffusion.steps)
        self.timestep_sampler = make_timestep_sampler(diffusion.timestep_sampler, diffusion.steps,
                                                      diffusion.timestep_power)
        self.denoiser: Denoiser | None = None
        self.ema: Denoiser | None = None
        self._nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self._tally = AccuracyTally()
        self._test_rows: list[dict[str, str]] = []
        self.last_expert_load: torch.Tensor | None = None
        self._sharded = False  # fully_shard applied (configure_model may run more than once)
        self._warm_start: WarmStart | None = None  # read by setup("fit"), copied by configure_model
        # Weights already given (warm-started, or loaded from a checkpoint): a later fit must not
        # replace them with init_from's.
        self._weights_given = False
        self.register_load_state_dict_post_hook(self._mark_weights_given)
        if self.network_config.sizes_known:
            self.configure_model()

    # ----------------------------------------------------------------- construction
    def flush_denormals(self) -> None:
        """Set the CPU's flush-to-zero flags if ``flush_denormal`` asks for them (a no-op on a
        CPU without them)."""
        # hparams of a checkpoint saved before the option existed lack the key.
        if self.hparams.get("flush_denormal", True):
            torch.set_flush_denormal(True)

    @property
    def loss_on(self) -> str:
        """Positions the losses score: ``diffusion.loss_on``, auto resolved by the source budget."""
        return resolve_loss_on(self.diffusion_config.loss_on, self.network_config.max_src_len)

    @property
    def special_ids(self) -> SpecialIds:
        """Ids of the tokenizer's special tokens."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached: load a checkpoint or call set_tokenizer()")
        return SpecialIds.from_tokenizer(self.tokenizer)

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Attach the tokenizer (saved inside every checkpoint); it sets the vocabulary size. A
        model holds one tokenizer: the data module's and a checkpoint's must be the same."""
        if self.tokenizer is not None and self.tokenizer.to_str() != tokenizer.to_str():
            raise ValueError("the data module's tokenizer differs from the checkpoint's; point the "
                             "data config at the checkpoint's tokenizer.json")
        SpecialIds.from_tokenizer(tokenizer)  # fails early if a special token is missing
        size = tokenizer.get_vocab_size()
        if self.network_config.vocab_size not in (None, size):
            given = self.network_config.vocab_size
            raise ValueError(f"network.vocab_size={given} but the tokenizer has {size} tokens")
        self.network_config = replace(self.network_config, vocab_size=size)
        self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        """Take the tokenizer from the data module; check its length budgets against the model's."""
        self.flush_denormals()
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if getattr(datamodule, "tokenizer", None) is not None:
            self.set_tokenizer(datamodule.tokenizer)
        if stage == "fit" and self.hparams.get("init_from") and not self._weights_given:
            self._read_warm_start(self.hparams.init_from)
        if self.tokenizer is None and self.network_config.vocab_size is None:
            raise RuntimeError("MoEDiffuSeq needs a data module with a tokenizer, or a checkpoint")
        for key in ("max_src_len", "max_trg_len"):
            ours, data = getattr(self.network_config, key), getattr(datamodule, key, None)
            if ours is None:
                raise ValueError(f"network.{key} is unset: give it (the CLI links data.{key})")
            if data is not None and data > ours:
                raise ValueError(f"data.{key}={data} exceeds the model's network.{key}={ours}")
        if stage == "fit" and self._trainer is not None and self.global_rank > 0:
            # seed_everything gives every rank one seed: each would draw the same timesteps,
            # noise and dropout for its own batch. Rank 0 keeps the seed (one process unchanged);
            # a resumed run then restores each rank's saved state over this.
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def skip_init_from(self) -> None:
        """Do not read ``init_from``: a checkpoint the Trainer restores after ``setup`` (a resume,
        ``ckpt_path``) gives this model its weights. The CLI calls this; the config keeps it."""
        self._weights_given = True

    @staticmethod
    def _mark_weights_given(module: MoEDiffuSeq, incompatible_keys) -> None:
        module._weights_given = True  # a script's load_state_dict: a fit keeps these weights

    def _read_warm_start(self, path: str) -> None:
        """Read ``init_from`` and take its tokenizer, which must be the data module's."""
        start = read_warm_start(path)
        theirs = start.diffusion.get("soft_absorbing")
        if theirs is not None and theirs != self.diffusion_config.soft_absorbing:
            # The same tensor either way: a learned m there, a fixed zero here (or the reverse).
            raise ValueError(f"model.init_from={path}: diffusion.soft_absorbing is {theirs} there "
                             f"and {self.diffusion_config.soft_absorbing} here")
        if start.tokenizer is not None:
            if self.tokenizer is not None and self.tokenizer.to_str() != start.tokenizer.to_str():
                raise ValueError(f"model.init_from={path}: its tokenizer differs from the data "
                                 f"module's; give data.init_args.tokenizer_path={path}")
            self.set_tokenizer(start.tokenizer)
        self._warm_start = start

    def warm_start(self, start: WarmStart) -> None:
        """Copy ``start``'s weights into the built denoiser and its EMA copy (see ``init_from``:
        position tables may differ in length, every other tensor must match)."""
        from lightning.pytorch.utilities import rank_zero_info

        if self.denoiser is None:
            raise RuntimeError(f"{start.source}: the network is not built yet (configure_model)")
        network = to_plain(self.network_config)
        for net in (self.denoiser, self.ema):
            if net is not None:
                resized = copy_weights(net, start, network)
        rank_zero_info(describe(start, resized))
        self._weights_given = True

    def configure_model(self) -> None:
        """Build the denoiser (and its EMA copy) once; copy a pending warm start into both; shard
        them under FSDP2."""
        if self.denoiser is None:
            if not self.network_config.sizes_known:
                raise RuntimeError("network.vocab_size, max_src_len and max_trg_len are unknown: "
                                   "give them, or a data module")
            cfg = self.diffusion_config
            skip = self.schedule.alpha_bar if cfg.skip_connection else None
            self.denoiser = Denoiser(self.network_config, soft_absorbing=cfg.soft_absorbing,
                                     self_conditioning=cfg.self_conditioning > 0,
                                     skip_alpha_bar=skip)
            averaged = self.hparams.ema_decay > 0
            self.ema = copy.deepcopy(self.denoiser).requires_grad_(False) if averaged else None
        if self._warm_start is not None:
            if self._sharded:
                raise RuntimeError("model.init_from: this model was sharded by an earlier run of "
                                   "the Trainer; warm-start a new MoEDiffuSeq")
            self.warm_start(self._warm_start)
            self._warm_start = None
        mesh = self.device_mesh  # set by ModelParallelStrategy (FSDP2); None otherwise
        if mesh is not None and not self._sharded:
            # The EMA copy is sharded alike, so that its update is shard-by-shard.
            for net in (self.denoiser, self.ema):
                if net is not None:
                    net.fully_shard(mesh)
            self._sharded = True

    # ----------------------------------------------------------------- training
    def denoise_rate(self, step: int | None = None) -> float:
        """gamma at optimizer step ``step`` (None: the full rate, as validation uses); see
        ``DiffusionConfig.denoise_rate_at``."""
        return self.diffusion_config.denoise_rate_at(step)

    def compute_loss(self, batch: Seq2SeqBatch, t: torch.Tensor, weights: torch.Tensor,
                     denoiser: Denoiser | None = None, generator: torch.Generator | None = None,
                     predict_tokens: bool = False, step: int | None = None):
        """``diffusion.training_loss`` of ``denoiser`` (the training weights unless given) at steps
        ``t`` (B,): the loss, its named parts and the per-example terms."""
        return training_loss(
            self.denoiser if denoiser is None else denoiser, self.schedule, batch, t, weights,
            diffusion=self.diffusion_config, moe=self.network_config.moe, loss_on=self.loss_on,
            pad_id=self.special_ids.pad, step=step, generator=generator,
            predict_tokens=predict_tokens,
        )

    def training_step(self, batch: Seq2SeqBatch, batch_idx: int):
        t, weights = self.timestep_sampler.sample(len(batch), self.device)
        loss, parts, terms = self.compute_loss(batch, t, weights, step=self.global_step)
        bad = not bool(torch.isfinite(loss))
        if self._trainer is not None:
            # Every rank must skip together: one rank skipping its backward would hang DDP.
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if self._nonfinite.skip(bad, loss, self.global_step, batch.example_ids):
            return None
        self.timestep_sampler.update(t, terms.per_example.detach())
        bs = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if self.diffusion_config.soft_absorbing:
            self.log("train/denoise_rate", self.denoise_rate(self.global_step), batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        if stats := terms.router_stats:
            # (layers, experts) load of the last step, for ExpertLoadMonitor's heatmap.
            self.last_expert_load = torch.stack([s.expert_fraction.detach() for s in stats]).cpu()
            self.log_dict(router_metrics(stats), batch_size=bs)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            update_ema(self.ema, self.denoiser, self.hparams.ema_decay, self.global_step)

    @property
    def sampling_network(self) -> Denoiser:
        """The weights used for validation and generation: the EMA when there is one."""
        return self.ema if self.ema is not None else self.denoiser

    # ----------------------------------------------------------------- evaluation
    def validation_step(self, batch: Seq2SeqBatch, batch_idx: int) -> None:
        self._evaluate_step(batch, batch_idx, "val")

    def test_step(self, batch: Seq2SeqBatch, batch_idx: int) -> None:
        """Loss and token accuracy as in validation, plus generation with the default
        sampler, scored at the end of the epoch (ROUGE, BLEU, dist-n, item F1, length ratio)."""
        self._evaluate_step(batch, batch_idx, "test")
        self._test_rows += generation.sample_rows(self, batch, self.sampling_config, seed=batch_idx)

    def _evaluate_step(self, batch: Seq2SeqBatch, batch_idx: int, prefix: str) -> None:
        # A fixed generator per batch: validation numbers are comparable across epochs.
        bs, device, net = len(batch), self.device, self.sampling_network
        generator = torch.Generator(device=device).manual_seed(1234 + batch_idx)
        t = torch.randint(0, self.schedule.steps, (bs,), device=device, generator=generator)
        weights = torch.ones(bs, device=device)
        loss, parts, terms = self.compute_loss(batch, t, weights, net, generator, True)
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log_dict({f"{prefix}/{k}": v for k, v in parts.items()}, batch_size=bs, sync_dist=True)
        # Through run(): one forward of the root, so FSDP2 gathers the embedding table for it.
        steps = probe_steps(self.schedule.steps)
        special = self.special_ids
        levels = net.run(noise_level_counts, self.schedule, batch, special, steps, generator)
        self._tally.add(batch, terms.predicted_ids, self.network_config.vocab_size, levels)

    def _log_accuracy(self, prefix: str) -> None:
        metrics = self._tally.metrics(probe_steps(self.schedule.steps), self.all_gather)
        for name, (value, prog_bar) in metrics.items():
            self.log(f"{prefix}/{name}", value, prog_bar=prog_bar, rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        from .evaluation import gather_objects, score_generations

        self._log_accuracy("test")
        rows, self._test_rows = gather_objects(self._test_rows), []
        if rows:
            scores = score_generations([r["sample"] for r in rows], [r["reference"] for r in rows])
            self.log_dict({f"test/{k}": float(v) for k, v in scores.items()}, rank_zero_only=True)

    def predict_step(self, batch: Seq2SeqBatch, batch_idx: int) -> list[dict[str, Any]]:
        """Sample the target region of each row with the default sampler (seed = batch index)."""
        cfg = self.sampling_config
        rows = generation.sample_rows(self, batch, cfg, seed=batch_idx)
        ids = batch.example_ids or [""] * len(rows)
        return [{"id": i, **row, "sampler": cfg.sampler, "steps": cfg.steps}
                for i, row in zip(ids, rows, strict=True)]

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_with_schedule(
            self.denoiser, lr=hp.lr, weight_decay=hp.weight_decay, warmup_steps=hp.warmup_steps,
            lr_decay=hp.lr_decay, min_lr_ratio=hp.min_lr_ratio,
            estimated_steps=self.trainer.estimated_stepping_batches,
            time_fraction=time_limit_fraction(self.trainer),
        )

    # ----------------------------------------------------------------- generation
    def generate(self, sources: list[str], *, seed: int = 0, templates: list[str] | None = None,
                 progress: bool = False, **sampling: Any) -> list[str]:
        """One target per source (the MBR pick when ``num_candidates`` > 1). ``sampling`` overrides
        fields of the model's ``sampling`` settings (sampler, steps, spacing, clamp, num_candidates,
        batch_size, decode); see ``generation.generate_candidates`` for templates (infilling)."""
        settings = generation.sampling_settings(self.sampling_config, **sampling)
        self.flush_denormals()
        picks = generation.generate_candidates(self, sources, settings, seed=seed,
                                               templates=templates, progress=progress)
        return [candidates[i] for candidates, i in picks]

    # ----------------------------------------------------------------- checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs) -> MoEDiffuSeq:  # type: ignore
        """Lightning's loader; a missing, foreign, truncated or corrupt file: an error naming it."""
        from .checkpoint import named_load_errors

        return named_load_errors(super().load_from_checkpoint, checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from .checkpoint import rng_state, write_extras

        states = [rng_state()]
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank runs this hook; the file (rank 0's) keeps each rank's generators.
            states = gather_objects(states)
        write_extras(checkpoint, self.tokenizer, self.network_config, states)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG (when fitting) and attach the checkpoint's tokenizer. The network was
        built before this hook, by ``configure_model``, from the sizes the checkpoint records."""
        from .checkpoint import read_extras

        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        world = self.trainer.world_size if self._trainer is not None else 1
        tokenizer = read_extras(checkpoint, restore_rng=fitting, rank=self.global_rank,
                                world_size=world)
        self._weights_given = True
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
