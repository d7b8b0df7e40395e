"""Banded backend: pure PyTorch, linear in length. The CPU default beyond short inputs.

Queries are cut into blocks of ``block_size``. Every block sees one contiguous key span
(the block widened by the band's reach on each side), and all rows see the global keys.
The local and global scores are concatenated and normalised by one softmax, with a key
that is both local and global counted only in the global part. Global query rows are then
recomputed against every key. On CPU the forward runs PyTorch's fused attention kernel on
strided views of the key spans; elsewhere, and in the backward, blocks are processed in
chunks so that no tensor grows with length squared. Like FlashAttention, the block part
keeps only its inputs, its output and one log-sum-exp per row for the backward, which
recomputes the scores chunk by chunk: the saved state is O(length * head_dim), not
O(length * span) (the probabilities and the materialised key/value spans).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .mask import band_reach, local_band

# Score elements per chunk (batch * heads * rows * keys); bounds the transient working set. Small
# transients stay in cache and in the allocator's free lists, where large ones are mmapped and
# page-faulted afresh each time (bench/attention.py times the choice).
_CHUNK_ELEMENTS = 1 << 18


# Score of the "sink" key: far below any real score, yet finite (see _softmax_with_sink).
_SINK = -1e30


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that gives exact zeros (and zero gradients) on empty rows.

    One extra column with a finite, hugely negative score takes all the weight of a row that
    sees no key (and none of any other row's); it is dropped after the softmax. This keeps
    torch.softmax, which saves only its output for the backward.
    """
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = scores.new_full((*scores.shape[:-1], 1), _SINK)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


class _BlockAttention(torch.autograd.Function):
    """Softmax attention of query blocks over their key spans plus the global keys.

    q, k, v: (B, H, L, D), saved as they come (views of the projection's output: no copy);
    the block-padded layout is rebuilt in the forward and again in the backward.
    k_glob, v_glob: (B, H, G, D). local_ok: (B, nb, span) and band: (bq, span) say which
    span keys a row sees; glob_ok: (B, G). The span is block + 2 * reach with reach a whole
    number of blocks (see banded_attention). Returns (B, H, nb * bq, D).
    """

    @staticmethod
    def forward(ctx, q, k, v, k_glob, v_glob, local_ok, band, glob_ok, scale, chunk, fused_cpu):  # noqa: D102
        with torch.autocast(q.device.type, enabled=False):
            q_blocks, k_pad, v_pad = _block_layout(q, k, v, band)
            if q.device.type == "cpu" and fused_cpu:
                out, lse = _fused_forward(q_blocks, k_pad, v_pad, k_glob, v_glob, local_ok, band,
                                          glob_ok, scale)
            else:
                out, lse = _chunked_forward(q_blocks, k_pad, v_pad, k_glob, v_glob, local_ok, band,
                                            glob_ok, scale, chunk)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.save_for_backward(q, k, v, k_glob, v_glob, local_ok, band, glob_ok, out, lse)
        return out.view(*q.shape[:2], -1, q.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 (autograd API)
        q, k, v, k_glob, v_glob, local_ok, band, glob_ok, out, lse = ctx.saved_tensors
        scale, length = ctx.scale, q.shape[2]
        with torch.autocast(q.device.type, enabled=False):
            q_blocks, k_pad, v_pad = _block_layout(q, k, v, band)
            block, span, n_glob = q_blocks.shape[3], band.shape[1], k_glob.shape[2]
            reach = (span - block) // 2
            grad_out = grad_out.contiguous().view_as(out)
            delta = (grad_out * out).sum(-1, keepdim=True)  # rowsum(P * dP), FlashAttention's D
            grad_q = torch.empty_like(q_blocks)
            grad_k, grad_v = torch.zeros_like(k_pad), torch.zeros_like(v_pad)
            grad_kg, grad_vg = torch.zeros_like(k_glob), torch.zeros_like(v_glob)
            for c in _chunks(q_blocks.shape[2], ctx.chunk):
                q_c, g_c = q_blocks[:, :, c], grad_out[:, :, c]
                scores = _block_scores(q_blocks, k_pad, k_glob, local_ok, band, glob_ok, scale, c)
                probs = scores.sub_(lse[:, :, c, :, None]).exp_()  # masked scores are -inf: exact 0
                p_local, p_glob = probs.split([span, n_glob], dim=-1)
                # (B,H,c,S,D)
                k_span, v_span = _spans(k_pad, c, block, span), _spans(v_pad, c, block, span)
                _fold_spans(grad_v, p_local.transpose(-1, -2) @ g_c, c, block)
                if n_glob:
                    grad_vg += torch.einsum("bhcqg,bhcqd->bhgd", p_glob, g_c)
                grad_p = torch.cat([g_c @ v_span.transpose(-1, -2),
                                    g_c @ v_glob[:, :, None].transpose(-1, -2)], -1)
                # in place: probs is spent
                grad_s = probs.mul_(grad_p.sub_(delta[:, :, c])).mul_(scale)
                ds_local, ds_glob = grad_s.split([span, n_glob], dim=-1)
                grad_q[:, :, c] = ds_local @ k_span + ds_glob @ k_glob[:, :, None]
                _fold_spans(grad_k, ds_local.transpose(-1, -2) @ q_c, c, block)
                if n_glob:
                    grad_kg += torch.einsum("bhcqg,bhcqd->bhgd", ds_glob, q_c)
        grad_q = grad_q.view(*q.shape[:2], -1, q.shape[-1])[:, :, :length]
        rows = slice(reach, reach + length)
        return (grad_q, grad_k[:, :, rows], grad_v[:, :, rows], grad_kg, grad_vg,
                None, None, None, None, None, None)


def _chunked_forward(q_blocks, k_pad, v_pad, k_glob, v_glob, local_ok, band, glob_ok, scale, chunk):
    """(out, lse) in plain PyTorch ops, chunk by chunk: any device, and the backward's own
    arithmetic."""
    out = torch.empty_like(q_blocks)
    lse = q_blocks.new_empty(q_blocks.shape[:-1])
    for c in _chunks(q_blocks.shape[2], chunk):
        scores = _block_scores(q_blocks, k_pad, k_glob, local_ok, band, glob_ok, scale, c)
        probs, lse[:, :, c] = _softmax_with_sink(scores)
        out[:, :, c] = _block_values(probs, v_pad, v_glob, c, q_blocks.shape[3])
    return out, lse


def _fused_forward(q_blocks, k_pad, v_pad, k_glob, v_glob, local_ok, band, glob_ok, scale):
    """(out, lse) from PyTorch's fused CPU attention kernel, which returns the log-sum-exp too.

    The blocks become the kernel's batch: block j's queries against its key span, a strided
    view of the padded keys (no copy), under an additive mask of the band and the visible
    keys; one call per batch row, since the mask differs per row but not per head. The
    global keys are a second call, merged with the local part through the log-sum-exps.
    """
    batch, heads, n_blocks, block, dim = q_blocks.shape
    span = band.shape[1]
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    visible = band & local_ok[:, :, None, :]  # (B, nb, bq, S)
    bias = q_blocks.new_zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    out, lse = torch.empty_like(q_blocks), q_blocks.new_empty(q_blocks.shape[:-1])
    every_block = slice(0, n_blocks)
    for b in range(batch):  # blocks as the kernel's batch, heads as its heads
        row = slice(b, b + 1)
        k_span = _spans(k_pad[row], every_block, block, span)[0].transpose(0, 1)  # (nb, H, S, D)
        v_span = _spans(v_pad[row], every_block, block, span)[0].transpose(0, 1)
        out_b, lse_b = fused(q_blocks[b].transpose(0, 1), k_span, v_span,
                             attn_mask=bias[b][:, None], scale=scale)
        out[b], lse[b] = out_b.transpose(0, 1), lse_b.transpose(0, 1)
    # The kernel's log-sum-exp of a row that sees no key is not -inf: make it the sink's.
    # (Visible keys per row as a small matmul: a bool any() over the mask is slower.)
    seen = local_ok.to(q_blocks.dtype) @ band.to(q_blocks.dtype).t()  # (B, nb, bq)
    lse.masked_fill_((seen == 0)[:, None], _SINK)
    if k_glob.shape[2] == 0:
        return out, lse
    q_rows = q_blocks.view(batch, heads, n_blocks * block, dim)
    glob_bias = q_blocks.new_zeros(glob_ok.shape).masked_fill_(
        ~glob_ok, float("-inf"))[:, None, None, :]
    out_glob, lse_glob = fused(q_rows, k_glob, v_glob, attn_mask=glob_bias, scale=scale)
    lse_glob = lse_glob.masked_fill_(~glob_ok.any(-1)[:, None, None], _SINK).view_as(lse)
    # Softmax over the union of the two key sets = the parts weighted by their shares of it.
    local_share = torch.sigmoid(lse - lse_glob)
    out = torch.lerp(out_glob.view_as(out), out, local_share[..., None])
    return out, torch.logaddexp(lse, lse_glob)


def _block_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: torch.Tensor):
    """Queries padded to whole blocks (B, H, nb, bq, D); keys and values padded by the reach
    on both sides (and to whole blocks), so that block j's span is rows [j*bq, j*bq + span)."""
    block, span = band.shape
    batch, heads, length, dim = q.shape
    tail = -length % block  # query rows added to fill the last block
    reach = (span - block) // 2
    q_blocks = F.pad(q, (0, 0, 0, tail)).view(batch, heads, -1, block, dim)
    pad = (0, 0, reach, reach + tail)
    return q_blocks, F.pad(k, pad), F.pad(v, pad)


def _chunks(n_blocks: int, chunk: int) -> list[slice]:
    return [slice(start, min(n_blocks, start + chunk)) for start in range(0, n_blocks, chunk)]


def _spans(keys: torch.Tensor, c: slice, block: int, span: int) -> torch.Tensor:
    """(B, H, c, span, D): the key span of every block in chunk c (overlapping views)."""
    return keys[:, :, c.start * block : (c.stop - 1) * block + span].unfold(
        2, span, block).transpose(-1, -2)


def _fold_spans(grad_keys: torch.Tensor, grad_spans: torch.Tensor, c: slice, block: int) -> None:
    """Add the (B, H, c, span, D) span gradients of chunk c back onto the keys they came from.

    The span is a whole number of blocks, so block j's r-th sub-block is key block j + r:
    one strided add per sub-block instead of a scatter.
    """
    batch, heads, n, span, dim = grad_spans.shape
    key_blocks = grad_keys.view(batch, heads, -1, block, dim)
    for r in range(span // block):
        key_blocks[:, :, c.start + r : c.start + r + n] += (
            grad_spans[:, :, :, r * block : (r + 1) * block])


def _softmax_with_sink(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim (in place) and its log-sum-exp, as if one more key scored _SINK.

    The sink is finite and hugely negative: it takes no weight from a row that sees a key,
    and a row that sees none gets probabilities exactly 0 and log-sum-exp _SINK, where a
    plain softmax gives NaN. One exp pass, no concatenated copy.
    """
    top = scores.amax(dim=-1, keepdim=True).clamp_min_(_SINK)
    probs = scores.sub_(top).exp_()
    total = probs.sum(dim=-1, keepdim=True).add_(torch.exp(_SINK - top))
    return probs.div_(total), (top + total.log()).squeeze(-1)


def _block_scores(q_blocks, k_pad, k_glob, local_ok, band, glob_ok, scale,
                  c: slice) -> torch.Tensor:
    """(B, H, c, bq, span + G) scaled scores of chunk c, -inf where a key is not visible."""
    block, span = q_blocks.shape[3], band.shape[1]
    q_c = q_blocks[:, :, c]
    local = q_c @ _spans(k_pad, c, block, span).transpose(-1, -2)
    glob = q_c @ k_glob[:, :, None].transpose(-1, -2)
    scores = torch.cat([local, glob.expand(-1, -1, q_c.shape[2], -1, -1)], dim=-1).mul_(scale)
    visible = torch.cat(
        [band & local_ok[:, None, c, None, :],
         glob_ok[:, None, None, None, :].expand(-1, 1, q_c.shape[2], block, -1)],
        dim=-1,
    )
    return scores.masked_fill_(~visible, float("-inf"))


def _block_values(probs, v_pad, v_glob, c: slice, block: int) -> torch.Tensor:
    span = probs.shape[-1] - v_glob.shape[2]
    p_local, p_glob = probs.split([span, v_glob.shape[2]], dim=-1)
    return p_local @ _spans(v_pad, c, block, span) + p_glob @ v_glob[:, :, None]


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
    fused_cpu_forward: bool = True,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> torch.Tensor:
    """q, k, v: (B, H, L, D). Returns (B, H, L, D); same result as the dense backend.

    ``fused_cpu_forward``: on CPU, run the forward through PyTorch's fused attention kernel
    (False: the chunked ops, as on other devices). ``chunk_elements`` bounds the score elements
    of one chunk.
    """
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
        global_mask if global_mask is not None
        else torch.zeros(batch, length, dtype=torch.bool, device=device)
    )
    gidx, gvalid = _global_index(global_mask, batch, device)  # (B, G)
    gvisible = gvalid & torch.gather(key_ok, 1, gidx)  # a padded global key is still padding
    # (B, H, G, D)
    k_glob = torch.gather(kf, 2, gidx[:, None, :, None].expand(batch, heads, -1, dim))
    v_glob = torch.gather(vf, 2, gidx[:, None, :, None].expand(batch, heads, -1, dim))

    block = max(1, min(block_size, length))
    # The band's reach rounded up to whole blocks (the extra keys are masked): spans then
    # tile exactly, which lets the backward fold span gradients with strided adds.
    reach = -(-min(band_reach(window, dilation), length) // block) * block
    span = block + 2 * reach

    pad = (reach, reach + -length % block)  # as the keys in _block_layout
    # A local key is visible when it is real, not padding, and not global (global keys are
    # scored in the global part, so counting them here too would double their weight).
    local_ok = F.pad(key_ok & ~is_global, pad, value=False).unfold(1, span, block)  # (B, nb, S)
    rows = torch.arange(block, device=device)
    band = local_band(rows[:, None] + reach, torch.arange(span, device=device)[None, :], window,
                      dilation)

    per_block = batch * heads * block * (span + gidx.shape[1])
    chunk = max(1, chunk_elements // max(1, per_block))
    out = _BlockAttention.apply(qf, kf, vf, k_glob, v_glob, local_ok.contiguous(), band, gvisible,
                                scale, chunk, fused_cpu_forward)
    out = out[:, :, :length]

    if gidx.shape[1] > 0:
        # Global rows attend to every (non-padding) key: a small dense pass, scattered in.
        q_glob = torch.gather(qf, 2, gidx[:, None, :, None].expand(batch, heads, -1, dim))
        scores = torch.matmul(q_glob, kf.transpose(-1, -2)) * scale  # (B, H, G, L)
        probs = _masked_softmax(scores, key_ok[:, None, None, :])
        out_glob = torch.matmul(probs, vf)  # (B, H, G, D)
        # Written over the global rows in one indexed copy: a scatter into zeros and a where()
        # over the whole output would touch every row.
        row, slot = gvalid.nonzero(as_tuple=True)
        position = gidx[row, slot]
        out = out.transpose(1, 2).index_put(
            (row, position), out_glob.transpose(1, 2)[row, slot]).transpose(1, 2)
    return out.to(q.dtype)
