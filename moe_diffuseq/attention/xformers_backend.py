"""xformers backend (CUDA only, optional extra ``cuda``).

The band goes through xformers' two-sided local attention bias; the global columns are a
second, small attention over the gathered global keys; the two partial results are merged
by their log-sum-exp. Global rows are then recomputed against every key. Importing this
module never imports xformers.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _ops():
    try:
        import xformers.ops as xops
        from xformers.ops import fmha
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return xops, fmha


def xformers_available() -> bool:
    """True where xformers imports and its kernels run on this machine's CUDA device."""
    return torch.cuda.is_available() and _ops() is not None and _kernels_fail() is None


@functools.cache
def _kernels_fail() -> str | None:
    """Why xformers' band kernel cannot run here, or None. An xformers wheel built for another
    torch imports fine but has no CUDA kernels; one tiny call finds that out before training."""
    xops, fmha = _ops()
    probe = torch.zeros(1, 8, 1, 32, device="cuda", dtype=torch.bfloat16)
    bias = fmha.attn_bias.LocalAttentionFromBottomRightMask(window_left=2, window_right=2)
    try:
        fmha.memory_efficient_attention_partial(probe, probe, probe, attn_bias=bias)
    except Exception as error:  # NotImplementedError with a page of reasons, or a CUDA error
        return str(error).strip().splitlines()[0]
    return None


def _merge(out_a, lse_a, out_b, lse_b):
    """Combine two softmax-normalised partial attentions given their log-sum-exps."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).unsqueeze(-1)
    wb = torch.exp(lse_b - lse).unsqueeze(-1)
    return wa * out_a + wb * out_b


def xformers_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    dilation: int = 1,
    global_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k, v: (B, H, L, D) on CUDA in fp16/bf16. Returns (B, H, L, D)."""
    ops = _ops()
    if ops is None or q.device.type != "cuda":
        raise RuntimeError(
            "backend='xformers' needs a CUDA device and `pip install moe-diffuseq[cuda]`; "
            "use backend='banded' or 'auto' elsewhere"
        )
    if _kernels_fail() is not None:
        raise RuntimeError(f"backend='xformers': its kernels do not run here ({_kernels_fail()}); "
                           "install an xformers built for this torch, or use backend='flex'")
    if dilation != 1:
        raise ValueError("backend='xformers' supports dilation=1 only; "
                         "use 'flex' or 'banded' for dilation")
    if key_padding_mask is not None and bool(key_padding_mask.any()):
        raise ValueError("backend='xformers' takes no key padding; bucket by length or use 'flex'")
    xops, fmha = ops
    batch, heads, length, dim = q.shape
    half = window // 2
    scale = dim**-0.5
    band_bias = fmha.attn_bias.LocalAttentionFromBottomRightMask(window_left=half,
                                                                 window_right=half)
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, D) for xformers
    if global_mask is None or not bool(global_mask.any()):
        return xops.memory_efficient_attention(qx, kx, vx, attn_bias=band_bias,
                                               scale=scale).transpose(1, 2)

    # Band pass over every key in the window (global ones included) ...
    out_band, lse_band = fmha.memory_efficient_attention_partial(qx, kx, vx, attn_bias=band_bias,
                                                                 scale=scale)
    out_band = out_band.transpose(1, 2).float()  # (B, H, L, D)
    # ... plus the global keys outside each query's window, so no key is counted twice.
    counts = global_mask.sum(1)
    width = int(counts.max())
    # (B, G)
    order = torch.sort((~global_mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=q.device)[None] < counts[:, None]
    gather = order[:, None, :, None].expand(batch, heads, width, dim)
    kg, vg = torch.gather(k, 2, gather).float(), torch.gather(v, 2, gather).float()
    pos = torch.arange(length, device=q.device)
    outside = (pos[None, :, None] - order[:, None, :]).abs() > half  # (B, L, G)
    scores = torch.matmul(q.float(), kg.transpose(-1, -2)) * scale  # (B, H, L, G)
    scores = scores.masked_fill(~(outside & valid[:, None, :])[:, None], float("-inf"))
    lse_glob = torch.logsumexp(scores, dim=-1)
    out_glob = torch.matmul(torch.softmax(scores, -1).nan_to_num(0.0), vg)
    out = _merge(out_band, lse_band.float(), out_glob, lse_glob)
    # Global rows see every key: a small dense pass, scattered over the merged result.
    qg = torch.gather(q, 2, gather).float()
    rows = torch.softmax(torch.matmul(qg, k.float().transpose(-1, -2)) * scale, -1)
    out_rows = torch.matmul(rows, v.float()) * valid[:, None, :, None]
    full = torch.zeros_like(out).scatter_add(2, gather, out_rows)
    out = torch.where(global_mask[:, None, :, None], full, out)
    return out.to(q.dtype)
