"""Expert MLPs and the ways to dispatch tokens to them.

All experts' weights live in stacked tensors (E, ...) so that every dispatch reads the
same parameters: ``looped`` is the plain reference, ``sorted`` groups the routed slots by
expert and runs one contiguous matmul per expert: in fp32/fp64 through ``_RoutedExperts``
(one fused autograd Function, expert by expert), under autocast op by op, and on CUDA bf16
with ``torch._grouped_mm``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """E two-layer GELU MLPs d_model -> d_hidden -> d_model, weights stacked."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, d_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model))
        # Same init as nn.Linear (kaiming uniform with a=sqrt(5)) per expert.
        for w, fan_in in ((self.w1, d_model), (self.w2, d_hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert e on x: (n, d_model)."""
        return F.gelu(x @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]

    def run_groups(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run expert e on groups[e] for every e, with fused bias matmuls.

        The stacked weights are unbound once: indexing w1[e] per expert would make autograd
        allocate and fill a full (E, ...) zero gradient for every expert in the backward.
        """
        w1, b1, w2, b2 = (p.unbind(0) for p in (self.w1, self.b1, self.w2, self.b2))
        return [
            torch.addmm(b2[e], F.gelu(torch.addmm(b1[e], x, w1[e])), w2[e]) if x.shape[0] else x
            for e, x in enumerate(groups)
        ]


def looped_dispatch(
    experts: Experts,
    x: torch.Tensor,
    slot_token: torch.Tensor,
    slot_expert: torch.Tensor,
    slot_weight: torch.Tensor,
) -> torch.Tensor:
    """Reference: for each expert, pick its slots with a boolean mask, run, scatter back.

    x: (N, d). Each routed slot s sends token slot_token[s] to expert slot_expert[s] with
    weight slot_weight[s]; a token's output is the weighted sum over its slots.
    """
    out = None
    for e in range(experts.num_experts):
        chosen = slot_expert == e
        if not bool(chosen.any()):
            continue
        token = slot_token[chosen]
        y = experts.expert(e, x[token])  # under autocast: in the autocast dtype
        y = y * slot_weight[chosen, None].to(y.dtype)
        out = (x.new_zeros(x.shape, dtype=y.dtype) if out is None else out).index_add(0, token, y)
    return out if out is not None else torch.zeros_like(x)


def _use_grouped_mm(x: torch.Tensor) -> bool:
    # On CPU torch._grouped_mm is no faster than the loop over contiguous slices, and its
    # backward rejects stride-0 gradients; on CUDA (bf16) it is the fast path.
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


class _RoutedExperts(torch.autograd.Function):
    """sum over slots s of token n: weight[s] * expert_e(s)(x[n]), one expert at a time.

    Written for the memory traffic of a bandwidth-bound CPU: every gather, expert output
    and gradient is one expert's slice (a few MB, which the allocator recycles), where the
    autograd version allocates several (k*N, d) buffers per step; fresh buffers that large
    are mmapped and page-faulted on every step, which cost more than the scatters.
    The expert inputs are gathered again and the GELU recomputed in the backward instead
    of being saved: two fewer (slots x width) tensors per layer for a few cheap passes.
    """

    @staticmethod
    def forward(ctx, x, token_sorted, weight_sorted, sizes, w1, b1, w2, b2):  # noqa: D102 (autograd API)
        out = torch.zeros_like(x)
        saved, start = [], 0
        for e, n in enumerate(sizes):
            tokens = token_sorted[start : start + n]
            weight = weight_sorted[start : start + n, None]
            start += n
            if n == 0:
                continue
            pre = torch.addmm(b1[e], x.index_select(0, tokens), w1[e])
            hidden = F.gelu(pre)
            y = torch.addmm(b2[e], hidden, w2[e])
            out.index_add_(0, tokens, y * weight)
            saved += [pre, y]
        ctx.sizes = sizes
        ctx.save_for_backward(x, token_sorted, weight_sorted, w1, w2, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 (autograd API)
        x, token_sorted, weight_sorted, w1, w2, *saved = ctx.saved_tensors
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight_sorted)
        gw1, gb1, gw2, gb2 = (torch.empty_like(w) for w in (w1, w1[:, 0], w2, w2[:, 0]))
        start, i = 0, 0
        for e, n in enumerate(ctx.sizes):
            rows = slice(start, start + n)
            start += n
            if n == 0:  # an expert without tokens gets a zero gradient (DDP-safe)
                for grad in (gw1, gb1, gw2, gb2):
                    grad[e].zero_()
                continue
            pre, y = saved[i : i + 2]
            i += 2
            hidden = F.gelu(pre)
            tokens = token_sorted[rows]
            g_y = grad_out.index_select(0, tokens)
            torch.linalg.vecdot(g_y, y, out=grad_weight[rows])
            g_y.mul_(weight_sorted[rows, None])
            torch.mm(hidden.t(), g_y, out=gw2[e])
            torch.sum(g_y, 0, out=gb2[e])
            g_pre = torch.ops.aten.gelu_backward(g_y @ w2[e].t(), pre)
            torch.mm(x.index_select(0, tokens).t(), g_pre, out=gw1[e])
            torch.sum(g_pre, 0, out=gb1[e])
            if grad_x is not None:
                grad_x.index_add_(0, tokens, g_pre @ w1[e].t())
        return grad_x, None, grad_weight, None, gw1, gb1, gw2, gb2


def sorted_dispatch(
    experts: Experts, x: torch.Tensor, slot_token: torch.Tensor, slot_expert: torch.Tensor,
    slot_weight: torch.Tensor,
) -> torch.Tensor:
    """Sort-based dispatch: group the slots by expert, then one contiguous matmul per expert."""
    order = torch.argsort(slot_expert, stable=True)
    token_sorted = slot_token[order]
    weight_sorted = slot_weight[order]
    counts = torch.bincount(slot_expert, minlength=experts.num_experts)
    if _use_grouped_mm(x):
        grouped = x.index_select(0, token_sorted)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        size, dtype = grouped.shape[0], x.dtype
        hidden = torch._grouped_mm(grouped, experts.w1.to(dtype), offs=offsets)
        hidden = F.gelu(hidden + experts.b1.to(dtype).repeat_interleave(counts, 0,
                                                                        output_size=size))
        y = torch._grouped_mm(hidden, experts.w2.to(dtype), offs=offsets)
        y = y + experts.b2.to(dtype).repeat_interleave(counts, 0, output_size=size)
    elif torch.is_autocast_enabled(x.device.type):
        # Under autocast each op picks its own dtype; the per-op path keeps those rules.
        grouped = x.index_select(0, token_sorted)
        y = torch.cat(experts.run_groups(list(grouped.split(counts.tolist()))))
    else:
        weights = (experts.w1, experts.b1, experts.w2, experts.b2)
        return _RoutedExperts.apply(x, token_sorted, weight_sorted.to(x.dtype), counts.tolist(),
                                    *weights)
    y = y * weight_sorted[:, None].to(y.dtype)
    return x.new_zeros(x.shape, dtype=y.dtype).index_add(0, token_sorted, y)


DISPATCH = {"looped": looped_dispatch, "sorted": sorted_dispatch}
