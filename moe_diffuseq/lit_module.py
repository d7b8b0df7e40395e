"""MoEDiffuSeq: the LightningModule that trains, validates and samples the denoiser."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer

from .batch import (
    Seq2SeqBatch,
    SpecialIds,
    collate_pairs,
    decode_sources,
    decode_targets,
    encode_pairs,
)
from .config import (
    AttentionConfig,
    DiffusionConfig,
    MoEConfig,
    SamplingConfig,
    coerce,
    resolve_loss_on,
    to_plain,
)
from .denoiser import Denoiser
from .diffusion import (
    NoiseSchedule,
    SamplingProblem,
    diffusion_loss_terms,
    make_timestep_sampler,
    run_sampler,
)
from .metrics import mbr_select
from .moe import router_losses
from .probes import accuracy_table, noise_level_counts, probe_steps

log = logging.getLogger(__name__)

TOKENIZER_KEY = "moe_diffuseq_tokenizer"
RNG_KEY = "moe_diffuseq_torch_rng"


class MoEDiffuSeq(pl.LightningModule):
    """MoE-DiffuSeq: seq2seq diffusion in embedding space with sparse attention and MoE.

    Args:
        vocab_size: Vocabulary size; None takes it from the data module's tokenizer.
        max_src_len: Source token budget; None takes it from the data module.
        max_trg_len: Target token budget; None takes it from the data module.
        embed_dim: Width of the word embedding that is diffused (DiffuSeq: 128).
        hidden_size: Width of the transformer blocks.
        num_layers: Number of transformer blocks.
        num_heads: Attention heads per block.
        dropout: Dropout rate inside the denoiser.
        positions: Position embeddings: ``target_relative`` (absolute on the source, the offset
            from the target region's start on the target, so an output slot does not move with
            the source's length) or ``absolute`` (DiffuSeq's single table).
        attention: Sparse attention settings.
        moe: Mixture-of-experts settings.
        diffusion: Forward process and loss settings.
        sampling: Defaults for generation.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        lr_decay: Learning-rate decay after warm-up, to ``min_lr_ratio * lr`` at the last step.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        ema_decay: Decay of the exponential moving average of the weights used for
            validation and generation (0 disables averaging).
        max_nonfinite_steps: Stop after this many consecutive steps with a NaN/inf loss
            (each such step is skipped with a warning).
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        max_src_len: int | None = None,
        max_trg_len: int | None = None,
        embed_dim: int = 128,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        dropout: float = 0.1,
        positions: Literal["target_relative", "absolute"] = "target_relative",
        attention: AttentionConfig = AttentionConfig(),
        moe: MoEConfig = MoEConfig(),
        diffusion: DiffusionConfig = DiffusionConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 500,
        lr_decay: Literal["linear", "cosine", "constant"] = "linear",
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.9999,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__()
        self.attention_config = coerce(AttentionConfig, attention, "attention")
        self.moe_config = coerce(MoEConfig, moe, "moe")
        self.diffusion_config = coerce(DiffusionConfig, diffusion, "diffusion")
        self.sampling_config = coerce(SamplingConfig, sampling, "sampling")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay}: must be in [0, 1)")
        # Plain types only, so checkpoints load with weights_only=True and scripts rebuild
        # the model from the file alone.
        self.save_hyperparameters(ignore=["attention", "moe", "diffusion", "sampling"])
        self.hparams.update(
            attention=to_plain(self.attention_config),
            moe=to_plain(self.moe_config),
            diffusion=to_plain(self.diffusion_config),
            sampling=to_plain(self.sampling_config),
        )
        self.save_hyperparameters(dict(self.hparams))
        self.tokenizer: Tokenizer | None = None
        self.schedule = NoiseSchedule(self.diffusion_config.schedule, self.diffusion_config.steps)
        self.timestep_sampler = make_timestep_sampler(self.diffusion_config.timestep_sampler, self.diffusion_config.steps)
        self.denoiser: Denoiser | None = None
        self.ema: Denoiser | None = None
        self._nonfinite_in_a_row = 0
        self._val_sums: dict[str, torch.Tensor] = {}
        self._test_texts: list[tuple[list[str], list[str]]] = []
        self.last_expert_load: torch.Tensor | None = None
        self._sharded = False  # fully_shard applied (configure_model may run more than once)
        if self._sizes_known():
            self._build()

    # ----------------------------------------------------------------- construction
    def _sizes_known(self) -> bool:
        hp = self.hparams
        return None not in (hp.vocab_size, hp.max_src_len, hp.max_trg_len)

    @property
    def loss_on(self) -> str:
        """Positions the losses score, ``diffusion.loss_on`` with auto resolved by ``max_src_len``."""
        return resolve_loss_on(self.diffusion_config.loss_on, self.hparams.max_src_len)

    @property
    def _pad_id(self) -> int:
        """The [PAD] id, for a model trained without a tokenizer too (the benchmarks' random batches)."""
        return self._special_or_layout().pad

    def _special_or_layout(self) -> SpecialIds:
        """The tokenizer's special ids, or ``train_tokenizer``'s layout (ids 0-4) without one."""
        return SpecialIds(0, 1, 2, 3, 4) if self.tokenizer is None else SpecialIds.from_tokenizer(self.tokenizer)

    @property
    def max_length(self) -> int:
        """Longest sequence: [CLS] src [SEP] + target region (max_trg_len + 1)."""
        return self.hparams.max_src_len + self.hparams.max_trg_len + 3

    def _build(self) -> None:
        hp = self.hparams
        self.denoiser = Denoiser(
            vocab_size=hp.vocab_size,
            max_length=self.max_length,
            embed_dim=hp.embed_dim,
            hidden_size=hp.hidden_size,
            num_layers=hp.num_layers,
            num_heads=hp.num_heads,
            dropout=hp.dropout,
            attention=self.attention_config,
            moe=self.moe_config,
            soft_absorbing=self.diffusion_config.soft_absorbing,
            max_target_length=hp.max_trg_len + 1,
            positions=hp.positions,
            self_conditioning=self.diffusion_config.self_conditioning > 0,
            skip_alpha_bar=self.schedule.alpha_bar if self.diffusion_config.skip_connection else None,
        )
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False) if hp.ema_decay > 0 else None

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Attach the tokenizer (it is saved inside every checkpoint)."""
        SpecialIds.from_tokenizer(tokenizer)  # fails early if a special token is missing
        size = tokenizer.get_vocab_size()
        if self.hparams.vocab_size is not None and self.hparams.vocab_size != size:
            raise ValueError(f"model vocab_size={self.hparams.vocab_size} but the tokenizer has {size} tokens")
        self.hparams.vocab_size = size
        self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        """Take the tokenizer and length budgets from the data module when not given."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            if self.tokenizer is None or not self._sizes_known():
                raise RuntimeError("MoEDiffuSeq needs a data module with a tokenizer (or a loaded checkpoint)")
            return
        if getattr(datamodule, "tokenizer", None) is not None:
            if self.tokenizer is not None and self.tokenizer.to_str() != datamodule.tokenizer.to_str():
                raise ValueError(
                    "the data module's tokenizer differs from the model's (checkpoint) tokenizer; "
                    "point the data config at the checkpoint's tokenizer.json"
                )
            self.set_tokenizer(datamodule.tokenizer)
        for key in ("max_src_len", "max_trg_len"):
            value = getattr(datamodule, key, None)
            if self.hparams[key] is None:
                self.hparams[key] = value
            elif value is not None and value > self.hparams[key]:
                raise ValueError(f"data.{key}={value} exceeds the model's {key}={self.hparams[key]}")
        # Re-save so the logged (initial) hyperparameters carry the values just filled in.
        self.save_hyperparameters(dict(self.hparams))

    def configure_model(self) -> None:
        if self.denoiser is None:
            if not self._sizes_known():
                raise RuntimeError("vocab_size, max_src_len and max_trg_len are unknown: give them or a data module")
            self._build()
        mesh = self.device_mesh  # set by ModelParallelStrategy (FSDP2); None otherwise
        if mesh is not None and not self._sharded:
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            # The transformer block is the unit of sharding; the EMA copy is sharded alike
            # so that its update is shard-by-shard.
            for net in (self.denoiser, self.ema):
                if net is None:
                    continue
                for block in net.blocks:
                    fully_shard(block, mesh=dp_mesh)
                fully_shard(net, mesh=dp_mesh, reshard_after_forward=False)
                register_fsdp_forward_method(net, "run")
            self._sharded = True

    # ----------------------------------------------------------------- training
    def denoise_rate(self, step: int | None = None) -> float:
        """gamma at optimizer step ``step`` (None: the full rate, as validation uses), 0 without
        the soft absorbing state. It ramps up over ``denoise_warmup_steps``: early in training the
        network cannot yet fill a replaced token from its context, and each replacement only takes
        signal away (measured: a short run at the full gamma learns to output the corpus's commonest token)."""
        cfg = self.diffusion_config
        if not cfg.soft_absorbing:
            return 0.0
        if step is None or cfg.denoise_warmup_steps == 0:
            return cfg.denoise_rate
        return cfg.denoise_rate * min(1.0, step / cfg.denoise_warmup_steps)

    def _loss(self, denoiser: Denoiser, batch: Seq2SeqBatch, t: torch.Tensor, weights: torch.Tensor, generator=None,
              predict_tokens: bool = False, step: int | None = None):
        cfg = self.diffusion_config
        terms = denoiser.run(
            diffusion_loss_terms,
            self.schedule,
            batch,
            t,
            denoise_rate=self.denoise_rate(step),
            loss_on=self.loss_on,
            generator=generator,
            predict_tokens=predict_tokens,
            absorbable=None if cfg.absorb_padding else batch.input_ids != self._pad_id,
            # Evaluation always self-conditions, as sampling does; training on a share of examples.
            self_condition_rate=cfg.self_conditioning if denoiser.training else float(cfg.self_conditioning > 0),
            x0_nll_coef=cfg.x0_nll_coef,
        )
        balance, z_loss = router_losses(terms.router_stats)
        balance, z_loss = balance.to(self.device), z_loss.to(self.device)
        mask_reg = terms.mask_norm if cfg.soft_absorbing else torch.zeros((), device=self.device)
        loss = (
            (weights * terms.per_example).mean()
            + self.moe_config.load_balance_coef * balance
            + self.moe_config.z_loss_coef * z_loss
            + cfg.mask_reg_coef * mask_reg
        )
        parts = {
            "mse": terms.mse.mean(),
            "rounding": terms.rounding.mean(),
            "tT": terms.t_T.mean(),
            **({"x0_nll": terms.x0_nll.mean()} if terms.x0_nll is not None else {}),
            "load_balance": balance,
            "z_loss": z_loss,
            "mask_norm": mask_reg,
        }
        return loss, parts, terms

    def training_step(self, batch: Seq2SeqBatch, batch_idx: int):
        t, weights = self.timestep_sampler.sample(len(batch), self.device)
        loss, parts, terms = self._loss(self.denoiser, batch, t, weights, step=self.global_step)
        bad = not bool(torch.isfinite(loss))
        if self._trainer is not None:
            # Every rank must skip together: one rank skipping its backward would hang DDP.
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self._nonfinite_in_a_row += 1
            ids = batch.example_ids[:8]
            log.warning("non-finite loss %s at step %d (examples %s); step skipped", loss.item(), self.global_step, ids)
            if self._nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self._nonfinite_in_a_row} consecutive non-finite losses; last batch's examples: {batch.example_ids}"
                )
            return None
        self._nonfinite_in_a_row = 0
        self.timestep_sampler.update(t, terms.per_example.detach())
        bs = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if self.diffusion_config.soft_absorbing:
            self.log("train/denoise_rate", self.denoise_rate(self.global_step), batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        self._log_router(terms.router_stats, bs)
        return loss

    def _log_router(self, stats, batch_size: int) -> None:
        if not stats:
            return
        # (layers, experts) load of the last step, for ExpertLoadMonitor's heatmap.
        self.last_expert_load = torch.stack([s.expert_fraction.detach() for s in stats]).cpu()
        metrics = {}
        for layer, s in enumerate(stats):
            for e, frac in enumerate(s.expert_fraction.tolist()):
                metrics[f"moe/layer{layer}/load_e{e}"] = frac
        metrics["moe/entropy"] = torch.stack([s.entropy for s in stats]).mean()
        metrics["moe/dropped_fraction"] = torch.stack([s.dropped_fraction for s in stats]).mean()
        self.log_dict(metrics, batch_size=batch_size)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        # Warm-up of the decay (as in many EMA implementations) so early averages are not
        # dominated by the random initialisation.
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        for avg, cur in zip(self.ema.parameters(), self.denoiser.parameters(), strict=True):
            avg.lerp_(cur.detach(), 1.0 - decay)

    @property
    def sampling_network(self) -> Denoiser:
        """The weights used for validation and generation: the EMA when there is one."""
        return self.ema if self.ema is not None else self.denoiser

    # ----------------------------------------------------------------- validation
    def validation_step(self, batch: Seq2SeqBatch, batch_idx: int) -> None:
        self._evaluate_step(batch, batch_idx, "val")

    def test_step(self, batch: Seq2SeqBatch, batch_idx: int) -> None:
        """Loss and token accuracy as in validation, plus generation with the default
        sampler, scored at the end of the epoch (ROUGE, BLEU, dist-n, length ratio)."""
        self._evaluate_step(batch, batch_idx, "test")
        cfg = self.sampling_config
        ids = self.sample_ids(batch, sampler=cfg.sampler, steps=cfg.steps, seed=batch_idx, clamp=cfg.clamp, spacing=cfg.spacing)
        special = self._special()
        self._test_texts.append(
            (decode_targets(self.tokenizer, ids.cpu(), batch, special, cfg.decode),
             decode_targets(self.tokenizer, batch.input_ids.cpu(), batch, special, cfg.decode))
        )

    def _evaluate_step(self, batch: Seq2SeqBatch, batch_idx: int, prefix: str) -> None:
        # A fixed generator per batch: validation numbers are comparable across epochs.
        generator = torch.Generator(device=self.device).manual_seed(1234 + batch_idx)
        t = torch.randint(0, self.schedule.steps, (len(batch),), device=self.device, generator=generator)
        weights = torch.ones(len(batch), device=self.device)
        loss, parts, terms = self._loss(self.sampling_network, batch, t, weights, generator, predict_tokens=True)
        bs = len(batch)
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log_dict({f"{prefix}/{k}": v for k, v in parts.items()}, batch_size=bs, sync_dist=True)
        # Token accuracy of the rounded x0 prediction on target tokens (mean over t), beside
        # the accuracy of always predicting the most frequent target token.
        predicted = terms.predicted_ids
        scored = batch.input_mask & ~batch.padding_mask
        correct = ((predicted == batch.input_ids) & scored).sum()
        counts = torch.bincount(batch.input_ids[scored], minlength=self.hparams.vocab_size)
        sums = self._val_sums
        sums["correct"] = sums.get("correct", 0) + correct
        sums["total"] = sums.get("total", 0) + scored.sum()
        sums["counts"] = sums.get("counts", 0) + counts
        # Through run(): one forward of the root, so FSDP2 gathers the embedding table for it.
        sums["noise_levels"] = sums.get("noise_levels", 0) + self.sampling_network.run(
            noise_level_counts, self.schedule, batch, self._special_or_layout(), probe_steps(self.schedule.steps), generator,
        )

    def _log_accuracy(self, prefix: str) -> None:
        sums, self._val_sums = self._val_sums, {}
        if not sums:
            return
        keys = ("correct", "total", "counts", "noise_levels")
        correct, total, counts, levels = (self.all_gather(sums[k]).reshape(-1, *sums[k].shape).sum(0) for k in keys)
        total = total.clamp_min(1).float()
        self.log(f"{prefix}/token_acc", correct.float() / total, prog_bar=True, rank_zero_only=True)
        self.log(f"{prefix}/unigram_acc", counts.max().float() / total, rank_zero_only=True)
        # x0 accuracy on target words at fixed t beside rounding z_t: a run that only learns to
        # round shows it here (high accuracy where rounding is high, none at t = T-1).
        steps = probe_steps(self.schedule.steps)
        for step, acc in accuracy_table(steps, levels).items():
            top = step == steps[-1]
            self.log(f"{prefix}/x0_acc_t{step}", acc["denoiser"], prog_bar=top, rank_zero_only=True)
            self.log(f"{prefix}/round_acc_t{step}", acc["round_z_t"], prog_bar=top, rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        from .evaluation import score_generations

        self._log_accuracy("test")
        texts, self._test_texts = self._test_texts, []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, texts)
            texts = [pair for part in gathered for pair in part]
        hyps = [h for pair in texts for h in pair[0]]
        refs = [r for pair in texts for r in pair[1]]
        if hyps:
            scores = score_generations(hyps, refs)
            self.log_dict({f"test/{k}": float(v) for k, v in scores.items()}, rank_zero_only=True)

    def predict_step(self, batch: Seq2SeqBatch, batch_idx: int) -> list[dict[str, Any]]:
        """Sample the target region of each row with the default sampler (seed = batch index)."""
        cfg = self.sampling_config
        ids = self.sample_ids(batch, sampler=cfg.sampler, steps=cfg.steps, seed=batch_idx, clamp=cfg.clamp, spacing=cfg.spacing)
        special = self._special()
        samples = decode_targets(self.tokenizer, ids.cpu(), batch, special, cfg.decode)
        references = decode_targets(self.tokenizer, batch.input_ids.cpu(), batch, special, cfg.decode)
        sources = decode_sources(self.tokenizer, batch, special)
        ids_ = batch.example_ids or [""] * len(samples)
        return [
            {"id": i, "source": s, "sample": g, "reference": r, "sampler": cfg.sampler, "steps": cfg.steps}
            for i, s, g, r in zip(ids_, sources, samples, references, strict=True)
        ]

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.denoiser.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.dim() < 2 or "norm" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr
        )
        estimated = self.trainer.estimated_stepping_batches
        # A run bounded only by time has no known length: warm up, then keep the peak rate.
        decay = hp.lr_decay if math.isfinite(estimated) else "constant"
        total = max(1, int(estimated)) if math.isfinite(estimated) else hp.warmup_steps + 1
        warmup = min(hp.warmup_steps, max(0, total - 1))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if decay == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
            return hp.min_lr_ratio + (1.0 - hp.min_lr_ratio) * shape

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs) -> MoEDiffuSeq:  # type: ignore[override]
        """Lightning's loader, with one error naming the file when it is foreign, truncated or corrupt."""
        from .checkpoint import LOAD_ERRORS, describe_load_error

        local = isinstance(checkpoint_path, str | Path) and "://" not in str(checkpoint_path)
        if local and not Path(checkpoint_path).exists():
            raise FileNotFoundError(f"{checkpoint_path}: no such checkpoint")
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except LOAD_ERRORS as err:
            raise ValueError(describe_load_error(checkpoint_path, err)) from None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer.to_str()
        # Timesteps, noise and dropout draw from torch's global generator: saving its state
        # lets a resumed run continue with exactly the draws of an uninterrupted one.
        checkpoint[RNG_KEY] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if RNG_KEY in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(checkpoint[RNG_KEY])
        text = checkpoint.get(TOKENIZER_KEY)
        if text is None:
            return
        if self.tokenizer is not None and self.tokenizer.to_str() != text:
            raise ValueError("the checkpoint's tokenizer differs from the data module's tokenizer")
        self.set_tokenizer(Tokenizer.from_str(text))
        if self.denoiser is None and self._sizes_known():
            self._build()

    # ----------------------------------------------------------------- generation
    def _special(self) -> SpecialIds:
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached: load a checkpoint or call set_tokenizer()")
        return SpecialIds.from_tokenizer(self.tokenizer)

    def encode(self, sources: list[str], templates: list[str] | None = None) -> tuple[Seq2SeqBatch, torch.Tensor | None]:
        """Collate sources for sampling. Returns the batch and, with templates, the (B, L)
        mask of target positions whose tokens are given.

        A template is target text in which each ``[MASK]`` token marks one position to fill;
        its other tokens stay fixed, and every position after it is free (so the model still
        chooses where the output ends).
        """
        hp = self.hparams
        special = self._special()
        pairs = encode_pairs(self.tokenizer, sources, templates, hp.max_src_len, hp.max_trg_len)
        batch = collate_pairs(pairs, special, hp.max_trg_len)
        if templates is None:
            return batch, None
        fixed = torch.zeros_like(batch.input_mask)
        for row, pair in enumerate(pairs):
            start = len(pair.src_ids) + 2
            tokens = torch.tensor(pair.trg_ids, dtype=torch.long)
            fixed[row, start : start + len(tokens)] = tokens != special.mask
        # Positions after the template are free: reset them (collation put [SEP] [PAD]* there).
        batch.input_ids = torch.where(batch.input_mask & ~fixed, torch.full_like(batch.input_ids, special.pad), batch.input_ids)
        return batch, fixed

    @torch.no_grad()
    def sample_ids(
        self,
        batch: Seq2SeqBatch,
        *,
        sampler: str,
        steps: int,
        seed: int,
        clamp: bool = False,
        spacing: str = "time_uniform",
        fixed_mask: torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Sample the target region of a collated batch; returns rounded token ids (B, L).

        ``fixed_mask`` (B, L) marks target positions whose tokens in ``batch.input_ids`` are
        given (infilling): they stay anchored, like the source, at every step.
        """
        net = self.sampling_network
        was_training = net.training
        net.eval()
        batch = batch if batch.input_ids.device == self.device else batch.to(self.device)
        anchor_mask = ~batch.input_mask | batch.padding_mask
        if fixed_mask is not None:
            anchor_mask = anchor_mask | fixed_mask.to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)

        def sample(net: Denoiser) -> torch.Tensor:
            global_mask = net.global_tokens(batch.global_mask, batch.input_mask, batch.padding_mask)
            table = net.word_embedding.weight

            previous: list[torch.Tensor] = []  # the last x0 estimate, for self-conditioning

            def denoise(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                x0, _ = net(z_t, t, global_mask, batch.padding_mask, batch.input_mask, previous[-1] if previous else None)
                previous[:] = [x0]
                if clamp:  # snap to the nearest word embedding (DiffuSeq's clamping trick)
                    x0 = table[torch.cdist(x0, table[None].expand(x0.shape[0], -1, -1)).argmin(-1)]
                return x0

            problem = SamplingProblem(net.embed(batch.input_ids), anchor_mask, net.absorbing_state)
            x0 = run_sampler(sampler, denoise, problem, self.schedule, steps, spacing, generator, progress)
            # Round the free positions only: anchored ones keep their tokens, and the (N, V)
            # logits of a long source would cost more than the sampling steps themselves.
            free = ~anchor_mask
            ids = batch.input_ids.clone()
            ids[free] = net.logits(x0[free]).argmax(-1)
            return ids

        try:
            return net.run(sample)  # one "forward" of the root, so FSDP2 gathers its parameters
        finally:
            net.train(was_training)

    def generate(
        self,
        sources: list[str],
        *,
        steps: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        num_candidates: int | None = None,
        clamp: bool | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        templates: list[str] | None = None,
        spacing: str | None = None,
        decode: str | None = None,
    ) -> list[str]:
        """Generate one target per source. Defaults come from the ``sampling`` settings.

        With ``num_candidates`` > 1, each source is sampled with seeds seed, seed+1, ... and
        the candidate with the highest mean sentence-BLEU against the others is returned.
        With ``templates`` (one per source), given target tokens stay fixed and only the
        ``[MASK]`` positions and the positions after the template are sampled (infilling).
        ``spacing`` ("logsnr" or "time_uniform") places the ddim/dpm_solver++ steps; ``decode``
        ("strip" or "truncate") turns a sample into text (see ``SamplingConfig.decode``).
        """
        return [c[i] for c, i in self.generate_candidates(
            sources, steps=steps, sampler=sampler, seed=seed, num_candidates=num_candidates,
            clamp=clamp, batch_size=batch_size, progress=progress, templates=templates, spacing=spacing,
            decode=decode,
        )]

    def generate_candidates(self, sources: list[str], **overrides) -> list[tuple[list[str], int]]:
        """Per source: all candidates and the index MBR picks."""
        seed = overrides.pop("seed", None) or 0
        progress = bool(overrides.pop("progress", False))
        templates = overrides.pop("templates", None)
        if templates is not None and len(templates) != len(sources):
            raise ValueError(f"{len(templates)} templates for {len(sources)} sources")
        cfg = replace(self.sampling_config, **{k: v for k, v in overrides.items() if v is not None})
        special = self._special()
        results: list[tuple[list[str], int]] = []
        chunks = range(0, len(sources), cfg.batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="documents", unit="batch")
        for start in chunks:
            chunk = [str(s) for s in sources[start : start + cfg.batch_size]]
            chunk_templates = None if templates is None else templates[start : start + cfg.batch_size]
            batch, fixed = self.encode(chunk, chunk_templates)
            per_seed = []
            for c in range(cfg.num_candidates):
                ids = self.sample_ids(
                    batch, sampler=cfg.sampler, steps=cfg.steps, seed=seed + c, clamp=cfg.clamp,
                    spacing=cfg.spacing, fixed_mask=fixed, progress=progress,
                )
                per_seed.append(decode_targets(self.tokenizer, ids.cpu(), batch, special, cfg.decode))
            for row in range(len(chunk)):
                candidates = [texts[row] for texts in per_seed]
                results.append((candidates, mbr_select(candidates)))
        return results
