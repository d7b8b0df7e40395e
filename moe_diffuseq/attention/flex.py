"""FlexAttention backend: one mask_mod, a cached BlockMask, and torch.compile.

On CUDA it trains. On CPU torch 2.13 has no FlexAttention backward, so this backend serves
inference there and refuses gradients with a clear error.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch

try:  # FlexAttention exists since torch 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    flex_attention = None

from .mask import band_reach

_BLOCK_MASKS: OrderedDict[tuple, BlockMask] = OrderedDict()
_CACHE_SIZE = 16


def flex_available() -> bool:
    return flex_attention is not None


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def bucket_length(length: int) -> int:
    """The padded length a compiled call runs at: 128-token blocks in counts of 2^k or 3 * 2^k
    (1, 2, 3, 4, 6, 8, 12, ...): under 1.5x the tokens past 256, and 14 shapes up to 16k.

    A static compile specialises on the length; every new one recompiles, and past dynamo's
    recompile limit flex falls back to an unfused kernel that materialises the scores matrix.
    Dynamic shapes are no way out: inductor's CPU flex template fails to build with them.
    """
    blocks = -(-length // 128)
    size = 1
    while size < blocks:  # 1, 2, 3, 4, 6, 8, 12, ...: a power of two x1.5, the others x4/3
        size = size + 1 if size < 2 else size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return 128 * size


def _padded(mask: torch.Tensor | None, extra: int, value: bool, batch: int,
            length: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        mask = torch.full((batch, length), not value, dtype=torch.bool, device=device)
    return torch.nn.functional.pad(mask, (0, extra), value=value)


def _fingerprint(mask: torch.Tensor | None) -> tuple:
    """Cache key of a (batch, length) bool mask: its shape and the positions it marks."""
    if mask is None:
        return ()
    return (tuple(mask.shape), hash(mask.detach().cpu().numpy().tobytes()))


def block_mask_for(
    length: int,
    window: int,
    dilation: int,
    global_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    device: torch.device,
) -> BlockMask:
    """The BlockMask of the sparse pattern, cached per (length, window, dilation, globals,
    padding)."""
    key = (length, window, dilation, str(device), batch, _fingerprint(global_mask),
           _fingerprint(key_padding_mask))
    cached = _BLOCK_MASKS.get(key)
    if cached is not None:
        _BLOCK_MASKS.move_to_end(key)
        return cached
    reach = band_reach(window, dilation)
    glob = (global_mask if global_mask is not None
            else torch.zeros(batch, length, dtype=torch.bool, device=device))
    keep = ~key_padding_mask if key_padding_mask is not None else torch.ones_like(glob)

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - q_idx
        local = (rel.abs() <= reach) & (rel.remainder(dilation) == 0)
        return (local | glob[b, q_idx] | glob[b, kv_idx]) & keep[b, kv_idx]

    block_mask = create_block_mask(mask_mod, batch, None, length, length, device=device)
    _BLOCK_MASKS[key] = block_mask
    if len(_BLOCK_MASKS) > _CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return block_mask


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    dilation: int = 1,
    global_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    compile: bool = True,
    bucket: bool | None = None,
) -> torch.Tensor:
    """q, k, v: (B, H, L, D). Returns (B, H, L, D). ``bucket`` (default: when compiling) pads
    the length to ``bucket_length`` so that a run compiles a few shapes, not one per length."""
    if flex_attention is None:
        raise RuntimeError("backend='flex' needs torch>=2.5 (torch.nn.attention.flex_attention)")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and needs_grad:
        raise RuntimeError(
            "backend='flex' has no backward on CPU in this torch version; train with "
            "backend='banded' (or 'auto') on CPU and use 'flex' for CPU inference or on CUDA"
        )
    batch, _, length, _ = q.shape
    if bucket is None:
        bucket = compile
    extra = bucket_length(length) - length if bucket else 0
    if extra:  # padded keys are masked out, padded queries dropped below
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
        global_mask = (None if global_mask is None
                       else _padded(global_mask, extra, False, batch, length, q.device))
        key_padding_mask = _padded(key_padding_mask, extra, True, batch, length, q.device)
    block_mask = block_mask_for(length + extra, window, dilation, global_mask, key_padding_mask,
                                batch, q.device)
    if not compile:
        return flex_attention(q, k, v, block_mask=block_mask)[:, :, :length]
    # Room for each bucket and batch size of a run: the default limit (8) is below that.
    with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
        return _compiled_flex()(q, k, v, block_mask=block_mask)[:, :, :length]
