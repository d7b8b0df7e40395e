"""Full (non-sparse) attention, the DiffuSeq baseline, in two forms:

* ``full_eager``: scores materialised as a (L, L) matrix, as DiffuSeq's BERT encoder does;
* ``full_sdpa``: PyTorch's fused kernel, which keeps memory linear in length when no mask
  is needed (a key-padding mask makes it fall back to a materialised mask).

Window, dilation and global tokens do not apply: every query sees every non-padding key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _padding_bias(key_padding_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if key_padding_mask is None or not bool(key_padding_mask.any()):
        return None
    return torch.zeros(key_padding_mask.shape, dtype=dtype,
                       device=key_padding_mask.device).masked_fill(
        key_padding_mask, float("-inf")
    )[:, None, None, :]  # (B, 1, 1, L)


def full_sdpa_attention(q, k, v, *, key_padding_mask=None, **_) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v,
                                          attn_mask=_padding_bias(key_padding_mask, q.dtype))


def full_eager_attention(q, k, v, *, key_padding_mask=None, **_) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, L, L)
    bias = _padding_bias(key_padding_mask, scores.dtype)
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ v
