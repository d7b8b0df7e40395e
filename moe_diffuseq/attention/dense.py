"""Reference backend: PyTorch SDPA with the full boolean mask. Exact, O(n^2) memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mask import sparse_mask


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    dilation: int = 1,
    global_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    global_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k, v: (B, H, L, D). Returns (B, H, L, D). ``global_rows`` go into the one mask, so
    they cost no second call."""
    batch, _, length, _ = q.shape
    mask = sparse_mask(
        length,
        window=window,
        dilation=dilation,
        global_mask=global_mask,
        key_padding_mask=key_padding_mask,
        batch=batch,
        device=q.device,
        global_rows=global_rows,
    )
    # A row with no visible key would make softmax NaN (and its gradient NaN). Let it see
    # itself, then zero its output: the definition says such a query outputs zeros.
    empty = ~mask.any(dim=-1)  # (B, L)
    if empty.any():
        eye = torch.eye(length, dtype=torch.bool, device=q.device)
        mask = mask | (empty[:, :, None] & eye)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    if empty.any():
        out = out.masked_fill(empty[:, None, :, None], 0.0)
    return out
