"""Schedule, forward process with the soft absorbing state, timestep samplers, samplers."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from moe_diffuseq import MoEDiffuSeq
from moe_diffuseq.batch import Seq2SeqBatch, SpecialIds, collate_pairs, encode_pairs
from moe_diffuseq.config import LONG_SOURCE_TOKENS, DiffusionConfig
from moe_diffuseq.diffusion import (
    LossSecondMomentSampler,
    NoiseSchedule,
    SamplingProblem,
    absorb,
    forward_process,
    losses,
    make_timestep_sampler,
    run_sampler,
    timesteps,
)
from moe_diffuseq.diffusion.forward_process import noised_start, q_sample
from moe_diffuseq.diffusion.losses import diffusion_loss_terms


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("sqrt", 2000)


def test_sqrt_schedule_matches_formula(schedule):
    # alpha_bar_t = prod (1 - beta) telescopes to (1 - sqrt((t+1)/T + 1e-4)) / (1 - sqrt(1e-4)).
    for t in (0, 10, 999, 1998):
        expected = (1 - ((t + 1) / 2000 + 1e-4) ** 0.5) / (1 - 1e-4**0.5)
        assert schedule.alpha_bar[t].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert torch.all(schedule.alpha_bar[1:] < schedule.alpha_bar[:-1])
    assert 0 < schedule.alpha_bar[-1] < 1e-6  # the last beta is capped at 0.999


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_other_schedules_decrease(name):
    s = NoiseSchedule(name, 100)
    assert (torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1])
            and 0 < s.alpha_bar[-1] < s.alpha_bar[0] <= 1)


def _toy(batch=64, length=40, dim=16):
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(batch, length, dim, generator=gen)
    target = torch.zeros(batch, length, dtype=torch.bool)
    target[:, length // 2 :] = True
    m = torch.randn(dim, generator=gen)
    return z0, target, m


def test_t0_is_near_x0_and_source_is_always_clean(schedule):
    z0, target, m = _toy()
    t = torch.zeros(z0.shape[0], dtype=torch.long)
    z_t, replaced = forward_process(z0, t, target, m, schedule, 0.5,
                                    torch.Generator().manual_seed(1))
    assert torch.equal(z_t[~target], z0[~target])
    kept = target & ~replaced
    assert (z_t[kept] - z0[kept]).abs().mean() < 0.15  # sqrt(1 - ab_0) ~ 0.12
    for step in (500, 1999):
        t = torch.full((z0.shape[0],), step)
        z_t, _ = forward_process(z0, t, target, m, schedule, 0.5, torch.Generator().manual_seed(2))
        assert torch.equal(z_t[~target], z0[~target])


def test_tT_is_m_plus_standard_noise(schedule):
    z0, target, m = _toy(batch=256)
    t = torch.full((z0.shape[0],), 1999)
    z_t, replaced = forward_process(z0, t, target, m, schedule, 0.5,
                                    torch.Generator().manual_seed(3))
    noise = z_t[target & ~replaced] - m  # (N, D)
    assert noise.mean(0).abs().max() < 0.05
    assert (noise.std(0) - 1).abs().max() < 0.05


@pytest.mark.parametrize("step", [100, 1000])
def test_absorbed_positions_hold_m_exactly_after_the_noise(schedule, step):
    # DiffuSeq-v2 order: noise first, then replace; an absorbed position is m itself, a
    # state the denoiser can recognise (replacing z0 before the noise would give m + noise).
    z0, target, m = _toy(batch=128)
    t = torch.full((z0.shape[0],), step)
    z_t, replaced = forward_process(z0, t, target, m, schedule, 0.5,
                                    torch.Generator().manual_seed(4))
    assert replaced.any() and not replaced[~target].any()
    assert torch.equal(z_t[replaced], m.expand(int(replaced.sum()), -1))
    kept = target & ~replaced
    assert (z_t[kept] - m).norm(dim=-1).min() > 0.1  # noised tokens are never exactly m
    # The kept positions are the continuous process itself: same draws, no replacement.
    gen = torch.Generator().manual_seed(4)
    torch.rand(z0.shape[:2], generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    torch.testing.assert_close(z_t[kept], q_sample(z0, t, noise, m, schedule)[kept])


@pytest.mark.parametrize("step", [10, 500, 1500, 1999])
def test_replacement_rate_matches_gamma_sqrt_one_minus_alpha_bar(schedule, step):
    z0, target, m = _toy(batch=400)
    t = torch.full((z0.shape[0],), step)
    uniform = torch.rand(z0.shape[:2], generator=torch.Generator().manual_seed(step))
    z_t, replaced = absorb(z0, t, target, m, schedule, 0.5, uniform)
    expected = 0.5 * (1 - schedule.alpha_bar[step]).sqrt().item()
    rate = replaced[target].float().mean().item()
    assert rate == pytest.approx(expected, abs=0.01)
    assert not replaced[~target].any()
    assert torch.equal(z_t[replaced], m.expand(int(replaced.sum()), -1))


def test_only_absorbable_positions_are_replaced(schedule):
    z0, target, m = _toy(batch=200)
    absorbable = torch.rand(target.shape, generator=torch.Generator().manual_seed(6)) < 0.5
    t = torch.full((z0.shape[0],), 1999)  # rate gamma * sqrt(1 - ab_T) ~ 1 at gamma = 1
    gen = torch.Generator().manual_seed(7)
    z_t, replaced = forward_process(z0, t, target, m, schedule, 1.0, gen, absorbable=absorbable)
    assert not replaced[~(target & absorbable)].any()
    assert replaced[target & absorbable].float().mean() > 0.99
    # The positions left out are the continuous process with the same draws, not m.
    full, _ = forward_process(z0, t, target, m, schedule, 0.0, torch.Generator().manual_seed(7))
    torch.testing.assert_close(z_t[~replaced], full[~replaced])


@pytest.mark.parametrize("absorb_padding", [False, True])
def test_training_absorbs_padding_only_when_asked(small_tokenizer, absorb_padding, monkeypatch):
    # A short target leaves [PAD] in the target region; by default m replaces text tokens (and the
    # closing [SEP]) only, so the denoiser never learns "m means the text has ended".
    model = MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 12, "embed_dim": 8,
                                 "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                 "moe": {"num_experts": 2, "top_k": 1, "expert_hidden": 16}},
                        diffusion={"denoise_rate": 1.0, "absorb_padding": absorb_padding})
    model.set_tokenizer(small_tokenizer)
    model.configure_model()
    special = SpecialIds.from_tokenizer(small_tokenizer)
    batch = collate_pairs(encode_pairs(small_tokenizer, ["the source"] * 8, ["a short target"] * 8,
                                       8, 12), special, 12)
    pad = batch.input_mask & (batch.input_ids == special.pad)
    assert pad.any() and (batch.input_mask & ~pad).any()
    t = torch.full((8,), 1999)
    absorbed: list[torch.Tensor] = []  # which positions the real forward process replaced by m

    def recording(*args, **kwargs):
        z_t, replaced = forward_process(*args, **kwargs)
        absorbed.append(replaced)
        return z_t, replaced

    monkeypatch.setattr(losses, "forward_process", recording)
    model.compute_loss(batch, t, torch.ones(8), generator=torch.Generator().manual_seed(0))
    (absorbed,) = absorbed
    text = batch.input_mask & ~pad
    assert absorbed[text].float().mean() > 0.9
    assert absorbed[pad].any() == absorb_padding
    assert not absorbed[~batch.input_mask].any()


def test_without_absorbing_state_it_is_plain_diffuseq(schedule):
    z0, target, _ = _toy()
    zeros = torch.zeros(z0.shape[-1])
    t = torch.full((z0.shape[0],), 700)
    gen = torch.Generator().manual_seed(5)
    z_t, replaced = forward_process(z0, t, target, zeros, schedule, 0.0, gen)
    gen = torch.Generator().manual_seed(5)
    torch.rand(z0.shape[:2], generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    ab = schedule.alpha_bar[700].float()
    expected = torch.where(target[..., None], ab.sqrt() * z0 + (1 - ab).sqrt() * noise, z0)
    torch.testing.assert_close(z_t, expected)
    assert not replaced.any()


def _gaussian_problem(schedule, mu=0.7, sd=0.3, anchor_count=0):
    """x0 ~ N(mu, sd^2): the exact denoiser and the exact probability-flow endpoint."""

    def denoise(z, t):
        ab = schedule.alpha_bar[t].to(z.dtype).view(-1, 1, 1)
        return mu + (ab.sqrt() * sd**2 / (ab * sd**2 + 1 - ab)) * (z - ab.sqrt() * mu)

    shape = (2, 6, 3)
    anchor_mask = torch.zeros(shape[:2], dtype=torch.bool)
    anchor_mask[:, :anchor_count] = True
    anchor = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    problem = SamplingProblem(anchor, anchor_mask, torch.zeros(3, dtype=torch.float64))
    return denoise, problem


def test_dpm_solver_converges_to_exact_ode_solution():
    # Cosine: its integer grid is fine near t = T, so the solver's error can go to zero (the
    # sqrt schedule's first step from T-1 is a large log-SNR jump at any step count).
    schedule = NoiseSchedule("cosine", 2000)
    denoise, problem = _gaussian_problem(schedule)
    y_T = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0)).double()
    mu, sd = 0.7, 0.3
    ab_T, ab_0 = schedule.alpha_bar[-1], schedule.alpha_bar[0]
    # Along the probability-flow ODE, (x_t - alpha_t mu) / sqrt(alpha_t^2 sd^2 + sigma_t^2) is
    # constant.
    x_0 = (ab_0.sqrt() * mu + (ab_0 * sd**2 + 1 - ab_0).sqrt() * (y_T - ab_T.sqrt() * mu)
           / (ab_T * sd**2 + 1 - ab_T).sqrt())
    exact = denoise(x_0, torch.zeros(2, dtype=torch.long))
    errors = []
    for steps in (50, 200, 1000):
        out = run_sampler("dpm_solver++", denoise, problem, schedule, steps, "time_uniform",
                          torch.Generator().manual_seed(0))
        errors.append((out - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 5e-4


def _flow_endpoint(schedule, denoise, mu=0.7, sd=0.3):
    """The exact sampler output from the start y_T the samplers draw with seed 0: along the
    probability-flow ODE (x_t - alpha_t mu) / sqrt(alpha_t^2 sd^2 + sigma_t^2) is constant, and
    the output is the denoiser's x0 at t = 0."""
    y_T = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0)).double()
    ab_T, ab_0 = schedule.alpha_bar[-1], schedule.alpha_bar[0]
    x_0 = (ab_0.sqrt() * mu + (ab_0 * sd**2 + 1 - ab_0).sqrt() * (y_T - ab_T.sqrt() * mu)
           / (ab_T * sd**2 + 1 - ab_T).sqrt())
    return denoise(x_0, torch.zeros(2, dtype=torch.long))


def _flow_errors(sampler: str, schedule, step_counts, spacing: str = "logsnr") -> list[float]:
    denoise, problem = _gaussian_problem(schedule)
    exact = _flow_endpoint(schedule, denoise)
    return [(run_sampler(sampler, denoise, problem, schedule, n, spacing,
                         torch.Generator().manual_seed(0)) - exact)
            .abs().max().item() for n in step_counts]


def test_dpm_solver_is_second_order_on_the_sqrt_schedule_with_logsnr_steps():
    # On the default schedule and spacing. The first step, from T-1 (whose beta is capped), is a
    # log-SNR jump of 3.5 at any step count, so the error floors near 1e-3 past ~40 steps: the
    # order shows between 10, 20 and 40 steps, where the rest of the path dominates.
    schedule = NoiseSchedule("sqrt", 2000)
    e10, e20, e40 = _flow_errors("dpm_solver++", schedule, (10, 20, 40))
    d10, d20, d40 = _flow_errors("ddim", schedule, (10, 20, 40))
    assert e20 < 0.01 and e10 < 0.2  # DDIM: 0.13 and 0.29
    # second order: ~3 here; a first-order solver halves its error (DDIM: 2.1)
    assert e20 / e40 > 2.7
    assert 1.8 < d20 / d40 < 2.4 and 1.8 < d10 / d20 < 2.6  # DDIM is first order


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++"])
def test_a_sampler_started_on_the_flow_at_t_reaches_the_flow_endpoint(sampler):
    # A restart begins at step t from a given state: started at t = 1000 on the probability-flow
    # path through the seed-0 start y_T, it must reach that path's exact endpoint, and its first
    # call must be at t.
    schedule = NoiseSchedule("cosine", 2000)
    denoise, problem = _gaussian_problem(schedule)
    exact = _flow_endpoint(schedule, denoise)
    mu, sd, t = 0.7, 0.3, 1000
    y_T = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0)).double()
    ab_T, ab_t = schedule.alpha_bar[-1], schedule.alpha_bar[t]
    y_t = (ab_t.sqrt() * mu + (ab_t * sd**2 + 1 - ab_t).sqrt() * (y_T - ab_T.sqrt() * mu)
           / (ab_T * sd**2 + 1 - ab_T).sqrt())
    calls = []

    def spy(z, steps):
        calls.append(int(steps[0]))
        return denoise(z, steps)

    out = run_sampler(sampler, spy, problem, schedule, 400, "time_uniform",
                      torch.Generator().manual_seed(1), start=(y_t, t))
    assert calls[0] == t and calls[-1] == 0 and len(calls) == 400
    assert (out - exact).abs().max().item() < 2e-3
    # From the wrong state (pure noise at t) it lands elsewhere: the start is used.
    wrong = run_sampler(sampler, denoise, problem, schedule, 400, "time_uniform",
                        torch.Generator().manual_seed(1), start=(y_T, t))
    assert (wrong - exact).abs().max().item() > 0.05


def test_ddim_reaches_the_exact_flow_endpoint_as_steps_grow():
    schedule = NoiseSchedule("cosine", 2000)  # a fine integer grid near T: no floor
    errors = _flow_errors("ddim", schedule, (50, 100, 200, 1000), "time_uniform")
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 2e-3 and 1.7 < errors[1] / errors[2] < 2.3


@pytest.mark.parametrize("variance", ["posterior", "fixed_large"])
def test_ancestral_final_mean_and_variance_match_the_chain_in_closed_form(variance):
    # x0 ~ N(mu, sd^2) per coordinate: the exact denoiser is affine in z_t, so each reverse step
    # z_{t-1} = c_x0 x0_hat(z_t) + c_xt z_t + sigma_t eps is affine plus Gaussian noise, and the
    # chain's final mean and variance follow in closed form. Over 8,192 draws the sampler's
    # outputs must match them (a wrong coefficient or variance moves them by far more).
    mu, sd = 0.7, 0.3
    schedule = NoiseSchedule("sqrt", 200)
    denoise, _ = _gaussian_problem(schedule, mu=mu, sd=sd)
    shape = (64, 64, 2)
    problem = SamplingProblem(torch.zeros(shape, dtype=torch.float64),
                              torch.zeros(shape[:2], dtype=torch.bool),
                              torch.zeros(2, dtype=torch.float64))
    ab = schedule.alpha_bar

    def gain(t: int) -> torch.Tensor:  # x0_hat = mu + gain * (z_t - sqrt(ab_t) mu)
        return ab[t].sqrt() * sd**2 / (ab[t] * sd**2 + 1 - ab[t])

    mean, var = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for t in range(schedule.steps - 1, 0, -1):
        c0, ct = schedule.posterior_coef_x0[t], schedule.posterior_coef_xt[t]
        a = c0 * gain(t) + ct
        mean = a * mean + c0 * (mu - gain(t) * ab[t].sqrt() * mu)
        step_var = (schedule.posterior_log_var[t].exp() if variance == "posterior"
                    else schedule.betas[t])
        var = a**2 * var + step_var
    final_mean = mu + gain(0) * (mean - ab[0].sqrt() * mu)
    final_var = gain(0) ** 2 * var
    out = run_sampler("ancestral", denoise, problem, schedule,
                      generator=torch.Generator().manual_seed(0), variance=variance)
    assert abs(out.mean().item() - final_mean.item()) < 0.01
    assert abs(out.var().item() / final_var.item() - 1) < 0.05
    # DDPM with the posterior variance under-disperses a little: not the data's own spread; the
    # fixed-large variance (beta_t >= the posterior's) spreads more.
    data_var = (gain(0) ** 2 * (ab[0] * sd**2 + 1 - ab[0])).item()
    assert (final_var.item() < data_var) == (variance == "posterior")


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpm_solver++", "sde_dpm_solver++"])
def test_anchored_positions_never_change(sampler):
    schedule = NoiseSchedule("sqrt", 50)
    denoise, problem = _gaussian_problem(schedule, anchor_count=2)
    seen = []

    def spy(z, t):
        seen.append(z[:, :2].clone())
        return denoise(z, t)

    out = run_sampler(sampler, spy, problem, schedule, 10, "time_uniform",
                      torch.Generator().manual_seed(0))
    for z in seen:
        torch.testing.assert_close(z, problem.anchor[:, :2])
    torch.testing.assert_close(out[:, :2], problem.anchor[:, :2])


def test_timesteps_are_decreasing_and_end_at_zero():
    schedule = NoiseSchedule("sqrt", 2000)
    for spacing in ("time_uniform", "logsnr"):
        grid = timesteps(schedule, 20, spacing)
        assert grid[0] == 1999 and grid[-1] == 0 and len(grid) == 20
        assert all(a > b for a, b in zip(grid, grid[1:], strict=False))


def test_loss_aware_sampler_prefers_high_loss_steps():
    sampler = LossSecondMomentSampler(4, history=2, uniform_prob=0.0)
    assert torch.allclose(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    for _ in range(2):
        sampler.update(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 1.0, 1.0, 5.0]))
    probs = sampler.probabilities()
    assert probs[3] == pytest.approx(5 / 8)
    t, w = sampler.sample(1000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert (t == 3).float().mean() > 0.5
    torch.testing.assert_close(w[t == 3][0], torch.tensor(1 / (4 * 5 / 8), dtype=torch.float32))
    assert "loss_history" in sampler.state_dict()


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_high_noise_sampler_draws_t_in_proportion_to_a_power_of_t(power):
    sampler = make_timestep_sampler("high_noise", 2000, power)
    t, w = sampler.sample(200_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    # p_t ~ (t + 1)^k: mean (k + 1) T / (k + 2); the top quarter holds 1 - (3/4)^(k + 1) of draws.
    assert t.float().mean().item() == pytest.approx((power + 1) / (power + 2) * 2000, rel=0.01)
    assert (t >= 1500).float().mean().item() == pytest.approx(1 - 0.75 ** (power + 1), abs=0.005)
    assert int(t.min()) >= 0 and int(t.max()) <= 1999
    assert torch.equal(w, torch.ones_like(w))  # unweighted: the objective moves with the draws


def test_timestep_power_is_refused_where_no_sampler_reads_it():
    with pytest.raises(ValueError, match=r"diffusion.timestep_power=2.0: applies to .*high_noise"):
        DiffusionConfig(timestep_sampler="uniform", timestep_power=2.0)
    with pytest.raises(ValueError, match=r"diffusion.timestep_power=0.0: must be > 0"):
        DiffusionConfig(timestep_sampler="high_noise", timestep_power=0.0)
    assert DiffusionConfig(timestep_sampler="high_noise", timestep_power=2.0).timestep_power == 2.0


def _tiny_model(**diffusion) -> MoEDiffuSeq:
    """A one-layer model of the _tiny_batch shape (source 6, target 5, vocabulary 40)."""
    return MoEDiffuSeq(network={"vocab_size": 40, "max_src_len": 6, "max_trg_len": 5,
                                "embed_dim": 8, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                "moe": {"num_experts": 2, "top_k": 1, "expert_hidden": 16}},
                       diffusion=diffusion)


def _tiny_batch(src_len: int, trg_len: int, vocab: int) -> Seq2SeqBatch:
    length = src_len + trg_len + 3
    ids = torch.randint(5, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, src_len + 1] = 1, 2  # [CLS], the source's [SEP]
    input_mask = torch.zeros(2, length, dtype=torch.bool)
    input_mask[:, src_len + 2 :] = True
    padding = torch.zeros(2, length, dtype=torch.bool)
    padding[1, -2:] = True  # the second row is shorter
    return Seq2SeqBatch(input_ids=ids, input_mask=input_mask, padding_mask=padding,
                        global_mask=(ids == 1) | (ids == 2),
                        src_len=torch.tensor([src_len, src_len]))


@pytest.mark.parametrize("loss_on", ["all", "target"])
def test_loss_on_scores_only_its_positions(schedule, loss_on):
    model = _tiny_model()
    batch = _tiny_batch(6, 5, 40)
    t = torch.tensor([3, 1500])
    denoise = model.denoiser.forward
    outputs: list[torch.Tensor] = []  # what the denoiser wrote (x0_hat), recorded as it runs
    model.denoiser.forward = lambda *args: outputs.append(denoise(*args)[0]) or (outputs[-1], [])
    terms = diffusion_loss_terms(model.denoiser, schedule, batch, t, denoise_rate=0.5,
                                 loss_on=loss_on, generator=torch.Generator().manual_seed(0))
    expected = ~batch.padding_mask & (batch.input_mask if loss_on == "target" else True)
    (x0_hat,) = outputs
    # Rebuild the mse from x0_hat by hand: the scored positions only, the same noise draw.
    emb = model.denoiser.embed(batch.input_ids)
    noise = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    z0 = noised_start(emb, schedule, noise)
    target = torch.where((t == 0)[:, None, None], emb, z0)
    per_position = (x0_hat - target).square().mean(-1)
    for row in range(2):
        assert terms.mse[row].item() == pytest.approx(
            per_position[row][expected[row]].mean().item(), rel=1e-5)


def test_loss_on_auto_scores_the_source_up_to_512_tokens():
    assert DiffusionConfig().loss_on == "auto"
    short = MoEDiffuSeq(network={"max_src_len": LONG_SOURCE_TOKENS, "max_trg_len": 8})
    long = MoEDiffuSeq(network={"max_src_len": LONG_SOURCE_TOKENS + 1, "max_trg_len": 8})
    assert (short.loss_on, long.loss_on) == ("all", "target")
    pinned = MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 8},
                         diffusion={"loss_on": "target"})
    assert pinned.loss_on == "target"
    with pytest.raises(ValueError, match="diffusion.loss_on"):
        MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 8}, diffusion={"loss_on": "source"})


def test_denoise_rate_ramps_over_its_warmup_and_validation_uses_the_full_rate():
    model = MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 8},
                        diffusion={"denoise_rate": 0.4, "denoise_warmup_steps": 100})
    assert ([model.denoise_rate(s) for s in (0, 25, 100, 5000)]
            == pytest.approx([0.0, 0.1, 0.4, 0.4]))
    assert model.denoise_rate(None) == 0.4
    assert MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 8},
                       diffusion={"denoise_rate": 0.4}).denoise_rate(0) == 0.4
    off = MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 8},
                      diffusion={"soft_absorbing": False, "denoise_warmup_steps": 100})
    assert off.denoise_rate(50) == off.denoise_rate(None) == 0.0
    with pytest.raises(ValueError, match="diffusion.denoise_warmup_steps"):
        MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 8},
                    diffusion={"denoise_warmup_steps": -1})


def test_forward_process_at_intermediate_t_with_an_absorbing_vector_matches_the_formula(schedule):
    z0, target, m = _toy(batch=4)
    t = torch.tensor([0, 300, 1200, 1999])
    gamma = 0.7
    z_t, replaced = forward_process(z0, t, target, m, schedule, gamma,
                                    torch.Generator().manual_seed(5))
    # The same draws, in forward_process's order: one uniform per position, then the noise.
    gen = torch.Generator().manual_seed(5)
    uniform = torch.rand(z0.shape[:2], generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    ab = schedule.alpha_bar.double()[t][:, None, None]
    continuous = (ab.sqrt() * (z0.double() - m.double()) + (1 - ab).sqrt() * noise.double()
                  + m.double())
    expected_replaced = target & (uniform.double() < gamma * (1 - ab[:, :, 0]).sqrt())
    expected = torch.where(expected_replaced[..., None], m.double(), continuous)
    expected = torch.where(target[..., None], expected, z0.double())
    assert torch.equal(replaced, expected_replaced)
    # t = 300 and 1200 absorb some, not all
    assert 0 < int(replaced[1:3].sum()) < int(target[1:3].sum())
    torch.testing.assert_close(z_t.double(), expected, rtol=1e-5, atol=1e-5)


def test_rounding_and_tT_losses_match_their_formulas(schedule):
    model = _tiny_model(soft_absorbing=True)
    with torch.no_grad():
        model.denoiser.absorbing_state.add_(0.5)  # m far from 0: the tT term must measure z0 - m
    batch = _tiny_batch(6, 5, 40)
    t = torch.tensor([3, 1500])
    terms = diffusion_loss_terms(model.denoiser, schedule, batch, t, denoise_rate=0.0,
                                 loss_on="all", generator=torch.Generator().manual_seed(0))
    table = model.denoiser.word_embedding.weight.double()
    m = model.denoiser.absorbing_state.double()
    noise = torch.randn((2, batch.input_ids.shape[1], 8),
                        generator=torch.Generator().manual_seed(0)).double()
    z0 = table[batch.input_ids] + (1 - schedule.alpha_bar.double()[0]).sqrt() * noise
    logits = z0 @ table.T  # the rounding head is the tied embedding
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, batch.input_ids[..., None])[..., 0]
    t_T = (schedule.alpha_bar.double()[-1] * (z0 - m).square()).mean(-1)
    for row in range(2):
        scored = ~batch.padding_mask[row]
        assert terms.rounding[row].item() == pytest.approx(nll[row][scored].mean().item(), rel=1e-5)
        assert terms.t_T[row].item() == pytest.approx(t_T[row][scored].mean().item(), rel=1e-5)


def test_loss_with_bf16_parameters_under_autocast(small_tokenizer):
    # FSDP's bf16-mixed keeps bf16 parameters and runs under autocast, where the cross-entropy
    # comes back in float32: every loss term must take the dtype it is given.
    model = MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 12, "embed_dim": 8,
                                 "hidden_size": 16, "num_layers": 1, "num_heads": 2},
                        # cosine: in bf16, 1 - alpha_bar is 0 at its first steps (the unrolled step)
                        diffusion={"x0_nll_coef": 0.5, "unroll": 1.0, "schedule": "cosine"})
    model.set_tokenizer(small_tokenizer)
    model.configure_model()
    model.to(torch.bfloat16)
    special = SpecialIds.from_tokenizer(small_tokenizer)
    batch = collate_pairs(encode_pairs(small_tokenizer, ["the source"] * 4, ["a target"] * 4,
                                       8, 12), special, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts, _ = model.compute_loss(batch, torch.tensor([0, 10, 500, 1999]),
                                            torch.ones(4), predict_tokens=True)
    assert torch.isfinite(loss.float()) and all(torch.isfinite(v.float()) for v in parts.values())


class _Call(NamedTuple):
    """One denoiser call: its input, steps, self-conditioning input and output."""

    z: torch.Tensor
    t: torch.Tensor
    x0_prev: torch.Tensor | None
    x0: torch.Tensor


def _recording(model: MoEDiffuSeq) -> list[_Call]:
    """Record every denoiser call; the list fills as the model runs."""
    denoise = model.denoiser.forward
    calls: list[_Call] = []

    def recorded(*args):
        x0, stats = denoise(*args)
        calls.append(_Call(args[0].detach(), args[1], args[5] if len(args) > 5 else None,
                           x0.detach()))
        return x0, stats

    model.denoiser.forward = recorded
    return calls


def test_unrolled_input_is_one_deterministic_step_from_the_denoisers_own_estimate(schedule):
    model = _tiny_model(soft_absorbing=True)
    with torch.no_grad():
        model.denoiser.absorbing_state.add_(0.5)  # the step must work in z - m coordinates
    batch = _tiny_batch(6, 5, 40)
    t = torch.tensor([3, 1500])
    calls = _recording(model)
    target, source = batch.input_mask, ~batch.input_mask
    m = model.denoiser.absorbing_state.detach().double()
    kinds = set()
    for seed in range(8):
        calls.clear()  # off: one pass on the true z_t (the same draw: it comes first)
        diffusion_loss_terms(model.denoiser, schedule, batch, t, denoise_rate=0.5, loss_on="all",
                             generator=torch.Generator().manual_seed(seed))
        ((true_z, *_),) = calls
        calls.clear()
        diffusion_loss_terms(model.denoiser, schedule, batch, t, denoise_rate=0.5, loss_on="all",
                             generator=torch.Generator().manual_seed(seed), unroll_rate=0.5)
        (z_s, s, _, x0_s), (z_in, t_in, _, _) = calls
        assert torch.equal(t_in, t) and bool((s >= t).all()) and bool((s < schedule.steps).all())
        assert torch.equal(z_in[source], true_z[source])  # the source stays clean
        assert not bool((z_s[target] == m.float()).all(-1).any())  # nothing absorbed at s
        ab_s = schedule.alpha_bar.double()[s][:, None, None]
        ab_t = schedule.alpha_bar.double()[t][:, None, None]
        eps = (z_s.double() - m - ab_s.sqrt() * (x0_s.double() - m)) / (1 - ab_s).sqrt()
        stepped = m + ab_t.sqrt() * (x0_s.double() - m) + (1 - ab_t).sqrt() * eps
        for row in range(2):  # each row is either stepped or left as the forward process made it
            got = z_in.double()[row][target[row]]
            if torch.allclose(got, stepped[row][target[row]], rtol=1e-5, atol=1e-5):
                kinds.add("stepped")
            else:
                torch.testing.assert_close(got, true_z.double()[row][target[row]])
                kinds.add("true")
    assert kinds == {"stepped", "true"}
    with pytest.raises(ValueError, match="diffusion.unroll"):
        MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 8}, diffusion={"unroll": 1.5})


def _self_conditioned_unrolled(small_tokenizer, unroll: float, rows: int):
    """A one-layer model that self-conditions every row and unrolls ``unroll`` of them, and a
    batch of ``rows`` identical pairs."""
    model = MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 12, "embed_dim": 8,
                                 "hidden_size": 16, "num_layers": 1, "num_heads": 2},
                        diffusion={"unroll": unroll, "self_conditioning": 1.0})
    model.set_tokenizer(small_tokenizer)
    model.configure_model()
    special = SpecialIds.from_tokenizer(small_tokenizer)
    batch = collate_pairs(encode_pairs(small_tokenizer, ["the source"] * rows,
                                       ["a target"] * rows, 8, 12), special, 12)
    return model, batch


def test_unroll_runs_in_training_only_and_hands_self_conditioning_its_estimate(small_tokenizer):
    model, batch = _self_conditioned_unrolled(small_tokenizer, 1.0, 2)
    calls = _recording(model)
    t = torch.tensor([10, 1500])
    model.train()
    model.compute_loss(batch, t, torch.ones(2), generator=torch.Generator().manual_seed(0))
    # The step from s, self-conditioning's first pass, the scored pass; the scored pass reads
    # x0_s, the estimate its (unrolled) input was stepped with, as a sampling step would.
    assert len(calls) == 3 and calls[0].x0_prev is None
    torch.testing.assert_close(calls[2].x0_prev, calls[0].x0)
    calls.clear()
    model.eval()
    model.compute_loss(batch, t, torch.ones(2), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2  # evaluation: self-conditioning's two passes, no step from s
    torch.testing.assert_close(calls[1].x0_prev, calls[0].x0)


def test_unrolled_rows_read_their_step_and_the_others_their_first_pass(small_tokenizer):
    model, batch = _self_conditioned_unrolled(small_tokenizer, 0.5, 6)
    calls = _recording(model)
    t = torch.tensor([10, 1500, 700, 1999, 3, 1000])
    model.train()
    kinds = set()
    for seed in range(6):
        calls.clear()
        model.compute_loss(batch, t, torch.ones(6), generator=torch.Generator().manual_seed(seed))
        step, first, scored = calls  # the step from s, the first pass, the scored pass
        assert len(step.t) == 6 and 1 <= len(first.t) <= 6 and first.x0_prev is None
        firsts = iter(range(len(first.t)))
        for row in range(6):
            if torch.equal(scored.x0_prev[row], step.x0[row]):
                kinds.add("unrolled")  # read the estimate its input was stepped with
            else:  # not unrolled: chosen at rate 1, so it read its own first-pass estimate
                torch.testing.assert_close(scored.x0_prev[row], first.x0[next(firsts)])
                kinds.add("first pass")
    assert kinds == {"unrolled", "first pass"}


def test_self_conditioning_first_pass_on_chosen_rows_matches_the_whole_batch_pass(
        small_tokenizer):
    model = MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 12, "embed_dim": 8,
                                 "hidden_size": 16, "num_layers": 1, "num_heads": 2},
                        diffusion={"self_conditioning": 0.5})
    model.set_tokenizer(small_tokenizer)
    model.configure_model()
    special = SpecialIds.from_tokenizer(small_tokenizer)
    batch = collate_pairs(encode_pairs(small_tokenizer, ["the source", "a much longer source",
                                                         "x", "the source"],
                                       ["a target", "b", "a longer target here", "c d"], 8, 12),
                          special, 12)
    net = model.denoiser.eval()  # no dropout: both passes must see the same network
    z_t = torch.randn(*batch.input_ids.shape, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1999, 10, 700, 1500])
    global_mask = net.global_tokens(batch.global_mask, batch.input_mask, batch.padding_mask)
    with torch.no_grad():  # the plain reference: one pass over the whole batch
        whole, _ = net(z_t, t, global_mask, batch.padding_mask, batch.input_mask)
    calls = []

    def counted(*args):
        calls.append(len(args[0]))
        return net(*args)

    given = torch.full_like(z_t, 7.0).requires_grad_()
    rows = torch.tensor([True, False, True, False])
    got = losses.first_estimates(counted, z_t, t, global_mask, batch, rows, given)
    torch.testing.assert_close(got[rows], whole[rows], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[~rows], given[~rows]) and bool((given == 7.0).all())
    assert calls == [2] and not got.requires_grad  # the chosen rows only, without gradient
    none = torch.zeros(4, dtype=torch.bool)  # one call all the same (FSDP), its answer unread
    assert torch.equal(losses.first_estimates(counted, z_t, t, global_mask, batch, none, given),
                       given)
    assert calls == [2, 1]


def test_restarts_renoise_the_rounded_sample_and_sample_again(small_tokenizer):
    from moe_diffuseq.generation import sample_ids, sampling_settings

    # Cosine: at t = 1 the noise is ~3e-3, so the restart's first input is the rounded sample's
    # embeddings themselves, visibly unlike the continuous x0 the first run ended on.
    model = MoEDiffuSeq(network={"max_src_len": 8, "max_trg_len": 6, "embed_dim": 8,
                                 "hidden_size": 16, "num_layers": 1, "num_heads": 2},
                        diffusion={"schedule": "cosine"}, ema_decay=0.0)
    model.set_tokenizer(small_tokenizer)
    model.configure_model()
    model.eval()
    special = SpecialIds.from_tokenizer(small_tokenizer)
    batch = collate_pairs(encode_pairs(small_tokenizer, ["the source", "another one"], None, 8, 6),
                          special, 6)
    calls = _recording(model)
    settings = sampling_settings(model.sampling_config, steps=5, restarts=2, restart_steps=2,
                                 restart_noise=0.0005)
    ids = sample_ids(model, batch, settings, seed=0)
    assert len(calls) == 5 + 2 * 2
    assert [int(c.t[0]) for c in calls[5:]] == [1, 0, 1, 0]
    net = model.denoiser
    free = ~(~batch.input_mask | batch.padding_mask)
    for first_of_restart, end_of_previous in ((5, 4), (7, 6)):
        rounded = net.logits(calls[end_of_previous].x0).argmax(-1)
        z = calls[first_of_restart].z
        torch.testing.assert_close(z[free], net.embed(rounded)[free], atol=0.05, rtol=0)
        assert (calls[end_of_previous].x0[free] - z[free]).abs().max() > 0.1
    assert torch.equal(ids[free], net.logits(calls[-1].x0).argmax(-1)[free])
    # Without restarts the first run's answer is the output.
    calls.clear()
    plain = sample_ids(model, batch, sampling_settings(model.sampling_config, steps=5), seed=0)
    assert len(calls) == 5
    assert torch.equal(plain[free], net.logits(calls[-1].x0).argmax(-1)[free])
    with pytest.raises(ValueError, match="sampling.restart_noise"):
        sampling_settings(model.sampling_config, restart_noise=1.0)


def test_sde_dpm_solver_on_every_step_is_the_ancestral_posterior_chain():
    # With an x0 estimate that does not move, the 2M correction vanishes and each step is the
    # first-order SDE step, which is DDPM's posterior step: on all T steps and the same noise
    # draws, both samplers must feed the denoiser the very same states.
    schedule = NoiseSchedule("sqrt", 40)
    _, problem = _gaussian_problem(schedule, anchor_count=2)
    x0 = torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    seen: dict[str, list] = {"ancestral": [], "sde_dpm_solver++": []}
    for name, states in seen.items():
        def constant(z, t, states=states):
            states.append((int(t[0]), z.clone()))
            return x0
        run_sampler(name, constant, problem, schedule, 40, "time_uniform",
                    torch.Generator().manual_seed(0))
    assert [t for t, _ in seen["sde_dpm_solver++"]] == list(range(39, -1, -1))
    for (t_a, z_a), (t_s, z_s) in zip(seen["ancestral"], seen["sde_dpm_solver++"], strict=True):
        assert t_a == t_s
        torch.testing.assert_close(z_s, z_a, rtol=1e-6, atol=1e-6)


def test_sde_dpm_solver_samples_the_data_distribution():
    # x0 ~ N(mu, sd^2) with its exact denoiser: the reverse SDE's endpoint has the data's mean,
    # and its path is not the ODE's from the same start.
    schedule = NoiseSchedule("sqrt", 200)
    denoise, problem = _gaussian_problem(schedule)
    problem = SamplingProblem(torch.zeros(4000, 6, 3, dtype=torch.float64),
                              torch.zeros(4000, 6, dtype=torch.bool), problem.mask_vector)
    out = run_sampler("sde_dpm_solver++", denoise, problem, schedule, 50, "logsnr",
                      torch.Generator().manual_seed(0))
    ode = run_sampler("dpm_solver++", denoise, problem, schedule, 50, "logsnr",
                      torch.Generator().manual_seed(0))
    assert abs(out.mean().item() - 0.7) < 0.01
    assert not torch.allclose(out, ode)  # the noise changed the path
