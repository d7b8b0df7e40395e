"""Expert MLPs and the ways to dispatch tokens to them.

All experts' weights live in stacked tensors (E, ...) so that every dispatch reads the
same parameters: ``looped`` is the plain reference, ``sorted`` groups the routed slots by
expert and runs one contiguous matmul per expert (``torch._grouped_mm`` where it helps).
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
    experts: Experts, x: torch.Tensor, slot_token: torch.Tensor, slot_expert: torch.Tensor, slot_weight: torch.Tensor
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
    # Measured on CPU: no faster than the loop over contiguous slices (DESIGN.md), and its
    # backward rejects stride-0 gradients; on CUDA (bf16) it is the fast path.
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def sorted_dispatch(
    experts: Experts, x: torch.Tensor, slot_token: torch.Tensor, slot_expert: torch.Tensor, slot_weight: torch.Tensor
) -> torch.Tensor:
    """Sort-based dispatch: group the slots by expert, then one contiguous matmul per expert."""
    order = torch.argsort(slot_expert, stable=True)
    token_sorted = slot_token[order]
    grouped = x.index_select(0, token_sorted)  # (S, d): tokens sorted by expert
    counts = torch.bincount(slot_expert, minlength=experts.num_experts)
    if _use_grouped_mm(x):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        size = grouped.shape[0]
        hidden = torch._grouped_mm(grouped, experts.w1.to(x.dtype), offs=offsets)
        hidden = F.gelu(hidden + experts.b1.to(x.dtype).repeat_interleave(counts, 0, output_size=size))
        y = torch._grouped_mm(hidden, experts.w2.to(x.dtype), offs=offsets)
        y = y + experts.b2.to(x.dtype).repeat_interleave(counts, 0, output_size=size)
    else:
        y = torch.cat(experts.run_groups(list(grouped.split(counts.tolist()))))
    y = y * slot_weight[order, None].to(y.dtype)
    return x.new_zeros(x.shape, dtype=y.dtype).index_add(0, token_sorted, y)


DISPATCH = {"looped": looped_dispatch, "sorted": sorted_dispatch}
