"""A pointer from the target into the source (pointer-generator, See et al. 2017).

Writing a source token through the network means carrying its identity through the up
projection, every block and the down projection, back to the exact embedding. A pointer
gives that a direct path: each target position attends once more over the source, reads the
source's own input embeddings, and a learned gate mixes what it read with the network's x0.
Attention weights that settle on one source token write that token's embedding exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention.mask import marked_first


class SourcePointer(nn.Module):
    """x0 at the target positions = g * (attention over the source's input embeddings)
    + (1 - g) * the network's x0, with g a learned per-position gate.

    Only the target rows are computed: (B, R, L) scores, R the target length, so the cost stays
    linear in the source length.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor, z_t: torch.Tensor, x0: torch.Tensor,
                target_mask: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """h: (B, L, H) final hidden states; z_t: (B, L, E) the denoiser's input (the source
        positions hold the source's embeddings); x0: (B, L, E) the network's estimate. Returns
        x0 with its target rows mixed with what they point at."""
        rows = target_mask & ~padding_mask
        sources = ~target_mask & ~padding_mask
        if not bool(rows.any()) or not bool(sources.any()):
            return x0
        order, valid = marked_first(rows)  # (B, R)
        h_rows = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))  # (B, R, H)
        read = F.scaled_dot_product_attention(
            self.query(h_rows)[:, None], self.key(h)[:, None], z_t[:, None],
            attn_mask=sources[:, None, None, :],
        )[:, 0]  # (B, R, E)
        index = order[..., None].expand(-1, -1, x0.shape[-1])
        own = x0.gather(1, index)
        gate = torch.sigmoid(self.gate(h_rows)).to(x0.dtype)
        mixed = gate * read.to(x0.dtype) + (1.0 - gate) * own
        return x0.scatter(1, index, torch.where(valid[..., None], mixed, own))
