"""MoE layer: dense equivalence, dispatch parity, router losses, capacity, balancing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_diffuseq.moe import (
    MoEFeedForward,
    capacity_keep,
    load_balancing_loss,
    router_z_loss,
)


def test_one_expert_equals_dense_ffn_forward_and_backward():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, num_experts=1, top_k=1)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    with torch.no_grad():
        dense[0].weight.copy_(moe.experts.w1[0].t())
        dense[0].bias.copy_(moe.experts.b1[0])
        dense[2].weight.copy_(moe.experts.w2[0].t())
        dense[2].bias.copy_(moe.experts.b2[0])
    x = torch.randn(3, 5, 8, requires_grad=True)
    y_moe, _ = moe(x)
    y_dense = dense(x)
    torch.testing.assert_close(y_moe, y_dense)
    g_moe = torch.autograd.grad(y_moe.square().sum(), (x, moe.experts.w1))
    g_dense = torch.autograd.grad(y_dense.square().sum(), (x, dense[0].weight))
    torch.testing.assert_close(g_moe[0], g_dense[0])
    torch.testing.assert_close(g_moe[1][0], g_dense[1].t())


def test_routed_scale_top_k_makes_equal_experts_one_wide_ffn():
    # A uniform router over all experts: with routed_scale = top_k the experts add up as one FFN
    # of their joint width; without it they average to 1 / top_k of it.
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, num_experts=2, top_k=2, routed_scale=2.0)
    torch.nn.init.zeros_(moe.router.proj.weight)
    wide = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        wide[0].weight.copy_(torch.cat([moe.experts.w1[0], moe.experts.w1[1]], 1).t())
        wide[0].bias.copy_(torch.cat([moe.experts.b1[0], moe.experts.b1[1]]))
        wide[2].weight.copy_(torch.cat([moe.experts.w2[0], moe.experts.w2[1]], 0).t())
        wide[2].bias.copy_(moe.experts.b2[0] + moe.experts.b2[1])
    x = torch.randn(3, 5, 8)
    for dispatch in ("looped", "sorted"):
        moe.dispatch = dispatch
        torch.testing.assert_close(moe(x)[0], wide(x))
    moe.routed_scale = 1.0
    torch.testing.assert_close(moe(x)[0], wide(x) / 2)


def _dispatch_outputs_and_grads(moe: MoEFeedForward, x: torch.Tensor, padding: torch.Tensor | None):
    outs, grads = [], []
    for dispatch in ("looped", "sorted"):
        moe.dispatch = dispatch
        y, _ = moe(x, padding)
        outs.append(y)
        probe = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)
        grads.append(torch.autograd.grad((y * probe).sum(), [x, *moe.parameters()]))
    return outs, grads


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_sorted_dispatch_equals_looped_reference(top_k, capacity_factor):
    torch.manual_seed(top_k)
    moe = MoEFeedForward(12, 20, num_experts=5, top_k=top_k,
                         capacity_factor=capacity_factor).double()
    torch.nn.init.normal_(moe.router.proj.weight, std=1.0)  # random, uneven routing
    x = torch.randn(4, 9, 12, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(4, 9, dtype=torch.bool)
    padding[1, 6:] = True
    padding[3, 2:] = True
    outs, grads = _dispatch_outputs_and_grads(moe, x, padding)
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b)
    assert torch.all(outs[0][padding] == 0)


def test_sorted_dispatch_with_an_idle_expert_gives_it_a_zero_gradient():
    torch.manual_seed(0)
    moe = MoEFeedForward(6, 10, num_experts=4, top_k=2).double()
    with torch.no_grad():
        moe.router.proj.weight[3] = -100.0  # expert 3 is never chosen
    x = torch.randn(7, 6, dtype=torch.float64).abs().requires_grad_()
    outs, grads = _dispatch_outputs_and_grads(moe, x, None)
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b)
    w1_grad = grads[1][2]  # (x, router, w1, ...)
    assert w1_grad.shape == moe.experts.w1.shape and torch.all(w1_grad[3] == 0)


def test_load_balancing_loss_is_one_at_perfect_balance():
    probs = torch.full((8, 4), 0.25)
    index = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(probs, index, 4).item() == pytest.approx(1.0)


def test_router_losses_on_hand_computed_case():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    index = torch.tensor([[0], [0]])
    # f = (1, 0, 0); P = (0.65, 0.25, 0.1); E * sum f P = 3 * 0.65
    assert load_balancing_loss(probs, index, 3).item() == pytest.approx(1.95)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_padding_is_excluded_from_router_statistics():
    torch.manual_seed(0)
    moe = MoEFeedForward(6, 8, num_experts=3, top_k=1)
    x = torch.randn(1, 6, 6)
    padding = torch.tensor([[False, False, False, True, True, True]])
    _, stats = moe(x, padding)
    _, ref = moe(x[:, :3])
    torch.testing.assert_close(stats.load_balancing_loss, ref.load_balancing_loss)
    torch.testing.assert_close(stats.expert_fraction, ref.expert_fraction)


def test_capacity_drops_exactly_the_overflow():
    # Expert 0 is every token's first choice; capacity 2 keeps the first two tokens' slots.
    index = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 2]])
    keep = capacity_keep(index, num_experts=3, capacity=2)
    expected = torch.tensor([[True, True], [True, True], [False, False], [False, False]])
    # Second choices: expert 1 gets tokens 0 and 2 (both fit), expert 2 tokens 1 and 3 (fit).
    expected[2, 1] = True
    expected[3, 1] = True
    assert torch.equal(keep, expected)

    moe = MoEFeedForward(4, 8, num_experts=3, top_k=2, capacity_factor=0.75)  # ceil(.75*4*2/3)=2
    with torch.no_grad():
        moe.router.proj.weight.zero_()
        moe.router.proj.weight[0, 0] = 10.0  # expert 0 always first
        moe.router.proj.weight[1, 1] = 5.0  # tokens 0, 2 second-choose expert 1
        moe.router.proj.weight[2, 2] = 5.0  # tokens 1, 3 second-choose expert 2
    x = torch.zeros(4, 4)
    x[:, 0] = 1.0
    x[[0, 2], 1] = 1.0
    x[[1, 3], 2] = 1.0
    _, stats = moe(x)
    assert stats.dropped_fraction.item() == pytest.approx(2 / 8)


def test_dropped_tokens_output_zero_so_only_the_residual_passes():
    moe = MoEFeedForward(4, 8, num_experts=2, top_k=1, capacity_factor=0.5)  # capacity 1 of 4
    with torch.no_grad():
        moe.router.proj.weight.zero_()
        moe.router.proj.weight[0, 0] = 10.0
    x = torch.zeros(4, 4)
    x[:, 0] = 1.0
    y, stats = moe(x)
    assert torch.all(y[1:] == 0) and not torch.all(y[0] == 0)
    assert stats.dropped_fraction.item() == pytest.approx(0.75)


def test_router_runs_in_fp32_under_autocast():
    moe = MoEFeedForward(8, 16, num_experts=4, top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = moe.router(torch.randn(5, 8))
    assert routing.logits.dtype == torch.float32
    torch.testing.assert_close(routing.expert_weight.sum(-1), torch.ones(5))


def test_training_on_skewed_data_lowers_load_balance_loss():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 16, num_experts=4, top_k=2)
    with torch.no_grad():
        moe.router.proj.weight.normal_(std=0.02)
        moe.router.proj.weight[0] += 1.0  # start heavily skewed towards expert 0
    data = torch.randn(512, 16).abs()  # positive features: the skew routes all to expert 0
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    first = None
    for _ in range(50):
        y, stats = moe(data)
        loss = F.mse_loss(y, data) + 1.0 * stats.load_balancing_loss
        first = first if first is not None else stats.load_balancing_loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stats.load_balancing_loss.item() < first - 0.2


def test_bad_top_k_is_a_clear_error():
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(4, 4, num_experts=2, top_k=3)


def test_autocast_bf16_forward_and_backward_run_in_both_dispatches():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 16, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    weight = torch.randn(2, 5, 16)  # a loss whose gradient differs per position

    def run(dispatch: str, bf16: bool):
        moe.dispatch = dispatch
        moe.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y, _ = moe(inputs, padding)
        (y.float() * weight).sum().backward()
        grads = {"input": inputs.grad, **{n: p.grad.clone() for n, p in moe.named_parameters()
                                          if p.grad is not None}}
        return y.float(), grads

    reference_out, reference_grads = run("looped", bf16=False)
    for dispatch in ("looped", "sorted"):
        out, grads = run(dispatch, bf16=True)
        torch.testing.assert_close(out, reference_out, atol=3e-2, rtol=3e-2)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], atol=5e-2, rtol=5e-2,
                                       msg=f"{dispatch} {name}")


def test_routed_scale_must_be_positive_and_is_named_when_not():
    from moe_diffuseq.config import MoEConfig

    with pytest.raises(ValueError, match=r"network.moe.routed_scale=0.0: must be > 0"):
        MoEConfig(routed_scale=0.0)
    assert MoEFeedForward.from_config(8, MoEConfig(routed_scale=2.0)).routed_scale == 2.0
