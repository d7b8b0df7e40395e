"""The learning-rate decay ends with the run, whether its step limit or its time limit ends it."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from data_modules import Seq2SeqDataModule
from moe_diffuseq import MoEDiffuSeq
from moe_diffuseq.optim import adamw_with_schedule, fused_supported, lr_factor

TINY = {"embed_dim": 16, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
        "max_src_len": 16, "max_trg_len": 8, "moe": {"num_experts": 2, "top_k": 1,
                                                      "expert_hidden": 32}}


class LearningRates(pl.Callback):
    """The learning rate each optimizer step used, and the share of the run's time limit spent
    when it began."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.spent: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None:
            self.spent.append(timer.time_elapsed() / timer._duration)


def test_lr_factor_follows_the_nearer_limit():
    # Half the steps done but 80% of the time spent: the clock decides.
    assert lr_factor(60, 10, 110, "linear", 0.0, time_fraction=0.8) == pytest.approx(0.2)
    assert lr_factor(60, 10, 110, "linear", 0.0, time_fraction=0.1) == pytest.approx(0.5)
    assert lr_factor(60, 10, 110, "cosine", 0.1, time_fraction=1.0) == pytest.approx(0.1)
    assert lr_factor(5, 10, 110, "linear", 0.0, time_fraction=0.9) == pytest.approx(6 / 11)
    assert lr_factor(60, 10, 110, "constant", 0.0, time_fraction=0.9) == 1.0


def test_fused_adamw_steps_as_the_per_parameter_loop():
    torch.manual_seed(0)
    model = MoEDiffuSeq(network={**TINY, "vocab_size": 50})
    model.configure_model()
    fused_net = model.denoiser
    loop_net = copy.deepcopy(fused_net)
    start = [p.detach().clone() for p in fused_net.parameters()]
    fused = adamw_with_schedule(fused_net, lr=1e-2, weight_decay=0.1, warmup_steps=0,
                                lr_decay="constant", min_lr_ratio=0.0,
                                estimated_steps=10)["optimizer"]
    assert fused.defaults["fused"]
    # The plain per-parameter loop, with the same groups (decay / no decay) as the fused one.
    name_of = {id(p): n for n, p in fused_net.named_parameters()}
    loop_params = dict(loop_net.named_parameters())
    loop = torch.optim.AdamW(
        [{"params": [loop_params[name_of[id(p)]] for p in group["params"]],
          "weight_decay": group["weight_decay"]} for group in fused.param_groups],
        lr=1e-2, foreach=False)
    for _ in range(5):
        for p, q in zip(fused_net.parameters(), loop_net.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q, p0 in zip(fused_net.parameters(), loop_net.parameters(), start, strict=True):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fused_adamw_only_where_its_kernel_runs():
    assert fused_supported([torch.zeros(2), torch.zeros(2, 3)])
    assert not fused_supported([torch.zeros(2, device="meta")])
    assert not fused_supported([torch.zeros(2), torch.zeros(2, device="meta")])


def _fit(small_corpus, small_tokenizer_file, tmp_path, callbacks_extra=(),
         **trainer_args) -> LearningRates:
    data = Seq2SeqDataModule(train_path=str(small_corpus / "train.jsonl"),
                             tokenizer_path=str(small_tokenizer_file), data_dir=str(tmp_path),
                             max_src_len=16, max_trg_len=8, batch_size=4)
    model = MoEDiffuSeq(network=TINY, lr=1e-3, warmup_steps=0, lr_decay="linear", ema_decay=0.0)
    rates = LearningRates()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[rates, *callbacks_extra],
                         default_root_dir=tmp_path, **trainer_args)
    trainer.fit(model, datamodule=data)
    return rates


@pytest.mark.timeout(60)
def test_a_time_limited_run_decays_its_learning_rate_by_the_clock(small_corpus,
                                                                 small_tokenizer_file, tmp_path):
    seen = _fit(small_corpus, small_tokenizer_file, tmp_path, max_epochs=-1, max_steps=-1,
                max_time={"seconds": 3})
    rates, spent = seen.rates, seen.spent
    assert len(rates) >= 2 and spent[-1] > 0.5, "the run should have reached its time limit"
    # Each step's rate is the linear decay at the share of the 3 seconds spent when the step
    # began (less a step's scheduling gap); with the step limit alone it would stay at its peak.
    for rate, share in zip(rates, spent, strict=True):
        assert rate == pytest.approx(1e-3 * (1 - share), abs=0.1e-3)
    assert rates[-1] < 0.5e-3


@pytest.mark.timeout(60)
def test_a_step_limited_run_decays_by_its_steps(small_corpus, small_tokenizer_file, tmp_path):
    rates = _fit(small_corpus, small_tokenizer_file, tmp_path, max_steps=20).rates
    assert len(rates) == 20
    assert rates[10] == pytest.approx(1e-3 * 10 / 20)


@pytest.mark.timeout(60)
def test_the_benchmarks_training_budget_ends_the_decay_as_max_time_does(small_corpus,
                                                                       small_tokenizer_file,
                                                                       tmp_path):
    from bench.learn import TrainingBudget

    budget = TrainingBudget(2.0)
    seen = _fit(small_corpus, small_tokenizer_file, tmp_path, max_epochs=-1, max_steps=-1,
                callbacks_extra=[budget])
    assert budget.trained_s >= 2.0 and len(seen.rates) >= 2
    # Its clock stands still between steps, so each rate is exactly the decay at the training
    # time spent: Lightning steps the scheduler before the step's time is added, so the rate of
    # step k is set by the time spent before step k - 1.
    assert seen.rates[0] == 1e-3
    for rate, share in zip(seen.rates[1:], seen.spent[:-1], strict=True):
        assert rate == pytest.approx(1e-3 * (1 - share), rel=1e-6, abs=1e-12)
