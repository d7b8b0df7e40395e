"""Sparse self-attention: one mask definition (``mask.py``), several kernels.

``sparse_attention(q, k, v, *, window, dilation=1, global_mask=None, key_padding_mask=None,
backend="dense")`` with q, k, v of shape (batch, heads, length, head_dim) and the masks of
shape (batch, length), bool, True on global tokens / padding keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import torch
import torch.nn.functional as F

from ..config import AttentionBackend
from .banded import banded_attention
from .dense import dense_attention
from .flex import flex_available, flex_sparse_attention
from .full import full_eager_attention, full_sdpa_attention
from .mask import band_reach, marked_first, sparse_mask
from .xformers_backend import xformers_attention, xformers_available

# The kernels by name; ``auto`` stands for one of them (``pick_backend``). ``full_sdpa`` and
# ``full_eager`` ignore the window and globals: they are the full-attention baseline.
KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "dense": dense_attention,
    "banded": banded_attention,
    "flex": flex_sparse_attention,
    "xformers": xformers_attention,
    "full_sdpa": full_sdpa_attention,
    "full_eager": full_eager_attention,
}
# The names a config may give (the CLI's choices come from the same Literal).
BACKENDS: tuple[str, ...] = get_args(AttentionBackend)


# Longest sequence that `auto` sends to the dense kernel on CPU whatever the window.
DENSE_CPU_LENGTH = 512


def pick_backend(device_type: str, dtype: torch.dtype, length: int, *, window: int,
                 dilation: int = 1, block_size: int = 64, key_padding: bool = False,
                 xformers: bool = False, flex: bool = False) -> str:
    """What ``auto`` stands for, from plain facts (so the choice is testable on any machine)."""
    if device_type == "cuda":
        # xformers' local-window bias has no key padding; padded batches (every batch but one of
        # equal-length sources) go to flex, which masks padding keys.
        if xformers and dtype in (torch.float16, torch.bfloat16) and not key_padding:
            return "xformers"
        return "flex" if flex else "banded"
    # On CPU: banded trains and is linear in memory; flex has no CPU backward. A sequence at most
    # twice the key span of one banded block is mostly inside the band anyway, and up to
    # DENSE_CPU_LENGTH the banded kernel's per-block work costs more than the whole fused product
    # even with a narrow band: there the fused kernel on the full mask is faster, and the mask is
    # small.
    span = block_size + 2 * band_reach(window, dilation)
    return "dense" if length <= max(2 * span, DENSE_CPU_LENGTH) else "banded"


def resolve_backend(backend: str, q: torch.Tensor, *, window: int, dilation: int = 1,
                    block_size: int = 64, key_padding: bool = False) -> str:
    """The concrete backend that ``auto`` stands for on this device, dtype, length and padding."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    cuda = q.device.type == "cuda"
    return pick_backend(q.device.type, q.dtype, q.shape[2], window=window, dilation=dilation,
                        block_size=block_size, key_padding=key_padding,
                        xformers=cuda and xformers_available(), flex=cuda and flex_available())


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    dilation: int = 1,
    global_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "dense",
    block_size: int = 64,
    global_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Longformer-style attention (sliding window, dilation, global tokens). Returns (B, H, L, D).

    ``global_rows`` (B, L) bool: queries that read every key without being read by every query
    (global rows only; ``global_mask`` marks tokens global both ways). ``full_sdpa`` and
    ``full_eager`` ignore the window: they are the full-attention baseline.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be (B, H, L, D) of one shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    masks = (("global_mask", global_mask), ("key_padding_mask", key_padding_mask),
             ("global_rows", global_rows))
    for name, mask in masks:
        if mask is not None and (mask.dtype != torch.bool
                                 or tuple(mask.shape) != (q.shape[0], q.shape[2])):
            raise ValueError(f"{name} must be a bool tensor of shape (batch, length)="
                             f"{(q.shape[0], q.shape[2])}, got {mask.dtype} {tuple(mask.shape)}")
    if window < 1 or dilation < 1:
        raise ValueError(f"window={window} and dilation={dilation} must both be >= 1")
    kwargs = dict(window=window, dilation=dilation, global_mask=global_mask,
                  key_padding_mask=key_padding_mask)
    padded = key_padding_mask is not None and bool(key_padding_mask.any())
    name = resolve_backend(backend, q, window=window, dilation=dilation, block_size=block_size,
                           key_padding=padded)
    if name == "banded":  # the one kernel that blocks its queries
        kwargs["block_size"] = block_size
    if name == "dense":  # its mask holds the rows: no second call
        return dense_attention(q, k, v, global_rows=global_rows, **kwargs)
    out = KERNELS[name](q, k, v, **kwargs)
    if global_rows is None or name in ("full_sdpa", "full_eager") or not bool(global_rows.any()):
        return out
    return with_global_rows(q, k, v, out, global_rows, key_padding_mask)


def with_global_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     rows: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``out`` with the ``rows`` (B, L) queries recomputed against every unpadded key: one fused
    attention call over (B, H, R, L), R the most rows of any batch row, so the cost is linear in
    the length."""
    batch, heads, length, dim = q.shape
    # Each row's marked positions first (in order), then filler positions masked out below.
    order, valid = marked_first(rows)  # (B, R)
    most = order.shape[1]
    index = order[:, None, :, None].expand(batch, heads, most, dim)
    keys = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        keys = ~key_padding_mask
    read = F.scaled_dot_product_attention(q.gather(2, index), k, v,
                                          attn_mask=keys[:, None, None, :])
    kept = torch.where(valid[:, None, :, None], read.to(out.dtype), out.gather(2, index))
    return out.scatter(2, index, kept)


__all__ = ["BACKENDS", "KERNELS", "pick_backend", "resolve_backend", "sparse_attention",
           "sparse_mask"]
