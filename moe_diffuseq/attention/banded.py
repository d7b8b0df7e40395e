"""Banded backend: pure PyTorch, linear in length. The CPU training default.

Queries are cut into blocks of ``block_size``. Every block sees one contiguous key span
(the block widened by the band's reach on each side), and all rows see the global keys.
The local and global scores are concatenated and normalised by one softmax, with a key
that is both local and global counted only in the global part. Global query rows are then
recomputed against every key. Blocks are processed in chunks so that no tensor grows with
length squared; autograd keeps O(length * (span + globals)) for the backward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .mask import band_reach, local_band

# Score elements per chunk (batch * heads * rows * keys); bounds the transient working set.
_CHUNK_ELEMENTS = 1 << 24


# Score of the "sink" column: far below any real score, yet finite (see _masked_softmax).
_SINK = -1e30


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that gives exact zeros (and zero gradients) on empty rows.

    One extra column with a finite, hugely negative score takes all the weight of a row that
    sees no key (and none of any other row's); it is dropped after the softmax. This keeps
    torch.softmax, which saves only its output for the backward: the manual max/exp/sum
    version kept several (rows x keys) tensors alive.
    """
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = scores.new_full((*scores.shape[:-1], 1), _SINK)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def _global_index(global_mask: torch.Tensor | None, batch: int, device: torch.device):
    """(B, G) indices of the global tokens, padded with 0, and (B, G) validity."""
    if global_mask is None or not bool(global_mask.any()):
        empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return empty, empty.bool()
    counts = global_mask.sum(dim=1)
    width = int(counts.max())
    # Stable sort puts the global positions first, in order.
    order = torch.sort((~global_mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    dilation: int = 1,
    global_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    block_size: int = 64,
) -> torch.Tensor:
    """q, k, v: (B, H, L, D). Returns (B, H, L, D); same result as the dense backend."""
    batch, heads, length, dim = q.shape
    device = q.device
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = 1.0 / math.sqrt(dim)
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))

    key_ok = (
        ~key_padding_mask
        if key_padding_mask is not None
        else torch.ones(batch, length, dtype=torch.bool, device=device)
    )
    is_global = (
        global_mask if global_mask is not None else torch.zeros(batch, length, dtype=torch.bool, device=device)
    )
    gidx, gvalid = _global_index(global_mask, batch, device)  # (B, G)
    gvisible = gvalid & torch.gather(key_ok, 1, gidx)  # a padded global key is still padding
    k_glob = torch.gather(kf, 2, gidx[:, None, :, None].expand(batch, heads, -1, dim))  # (B, H, G, D)
    v_glob = torch.gather(vf, 2, gidx[:, None, :, None].expand(batch, heads, -1, dim))

    block = max(1, min(block_size, length))
    reach = min(band_reach(window, dilation), length)  # beyond the length nothing changes
    n_blocks = -(-length // block)
    padded = n_blocks * block
    span = block + 2 * reach

    # Keys padded by the reach on both sides, then viewed as one span per block.
    pad = (reach, reach + padded - length)
    k_spans = F.pad(kf, (0, 0, *pad)).unfold(2, span, block)  # (B, H, nb, D, S)
    v_spans = F.pad(vf, (0, 0, *pad)).unfold(2, span, block)
    # A local key is visible when it is real, not padding, and not global (global keys are
    # scored in the global part, so counting them here too would double their weight).
    local_ok = F.pad(key_ok & ~is_global, pad, value=False).unfold(1, span, block)  # (B, nb, S)
    rows = torch.arange(block, device=device)
    band = local_band(rows[:, None] + reach, torch.arange(span, device=device)[None, :], window, dilation)
    q_blocks = F.pad(qf, (0, 0, 0, padded - length)).view(batch, heads, n_blocks, block, dim)

    per_block = batch * heads * block * (span + gidx.shape[1])
    chunk = max(1, _CHUNK_ELEMENTS // max(1, per_block))
    outputs = []
    for start in range(0, n_blocks, chunk):
        stop = min(n_blocks, start + chunk)
        qc = q_blocks[:, :, start:stop]  # (B, H, c, bq, D)
        local_scores = torch.matmul(qc, k_spans[:, :, start:stop]) * scale  # (B, H, c, bq, S)
        local_vis = band & local_ok[:, None, start:stop, None, :]  # (B, 1, c, bq, S)
        glob_scores = torch.einsum("bhcqd,bhgd->bhcqg", qc, k_glob) * scale  # (B, H, c, bq, G)
        glob_vis = gvisible[:, None, None, None, :].expand(-1, 1, stop - start, block, -1)
        probs = _masked_softmax(
            torch.cat([local_scores, glob_scores], dim=-1),
            torch.cat([local_vis.expand(-1, 1, -1, -1, -1), glob_vis], dim=-1),
        )
        p_local, p_glob = probs.split([span, gidx.shape[1]], dim=-1)
        out = torch.matmul(p_local, v_spans[:, :, start:stop].transpose(-1, -2))
        out = out + torch.einsum("bhcqg,bhgd->bhcqd", p_glob, v_glob)
        outputs.append(out)
    out = torch.cat(outputs, dim=2).reshape(batch, heads, padded, dim)[:, :, :length]

    if gidx.shape[1] > 0:
        # Global rows attend to every (non-padding) key: a small dense pass, scattered in.
        q_glob = torch.gather(qf, 2, gidx[:, None, :, None].expand(batch, heads, -1, dim))
        scores = torch.matmul(q_glob, kf.transpose(-1, -2)) * scale  # (B, H, G, L)
        probs = _masked_softmax(scores, key_ok[:, None, None, :])
        out_glob = torch.matmul(probs, vf) * gvalid[:, None, :, None]
        rows_glob = torch.zeros_like(out).scatter_add(
            2, gidx[:, None, :, None].expand(batch, heads, -1, dim), out_glob
        )
        out = torch.where(is_global[:, None, :, None], rows_glob, out)
    return out.to(q.dtype)
