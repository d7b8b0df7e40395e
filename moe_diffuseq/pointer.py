"""A pointer from the target into the source (pointer-generator, See et al. 2017).

Writing a source token through the network means carrying its identity through the up
projection, every block and the down projection, back to the exact embedding. A pointer
gives that a direct path: each target position attends once more over the source, reads the
source's own input embeddings, and a learned gate mixes what it read with the network's x0.
Attention weights that settle on one source token write that token's embedding exactly.

With ``neighbours``, a target slot also matches its neighbours' noisy inputs against each source
token's neighbours: a slot whose left neighbour holds "cancel" points at the source token that
follows a "cancel". Once sampling has settled one slot of a span, the next slot can continue the
span, the step an autoregressive copy takes, without learning where the span lies by position.

With ``span`` d, slot k's score for source token j also adds the learned-weighted scores of slots
k - i at j - i and k + i at j + i (i = 1..d): the pointer's scores along a diagonal of the
(slots, source) matrix. A copied span lies on such a diagonal, so slots that each match their
token weakly (at high noise, or a common token) agree on the one place where all of them match.

With ``coverage`` (the coverage of See et al., over token identities instead of positions), the
pointer points twice: the first pass drafts every slot's x0, and the second adds to slot k's score
for source token j how closely any slot before k, and any slot after it, drafted j's embedding,
each weighted by a learned function of slot k's hidden state. A list of distinct source tokens (a
scene's speakers in the order they first speak) can then tell a token it already wrote from one
still missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention.mask import marked_first


def _rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, L, F) at the positions ``order`` (B, R) -> (B, R, F)."""
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))


class SourcePointer(nn.Module):
    """x0 at the target positions = g * (attention over the source's input embeddings)
    + (1 - g) * the network's x0, with g a learned per-position gate.

    Only the target rows are computed: (B, R, L) scores, R the target length, so the cost stays
    linear in the source length.
    """

    def __init__(self, hidden: int, embed_dim: int | None = None, span: int = 0,
                 span_dropout: float = 0.0, neighbour_gate: bool = False,
                 coverage: bool = False) -> None:
        """``embed_dim``: match neighbours too (their embeddings have this width); None: off.
        ``span``: how many slots to each side add their scores along the diagonal; 0: off.
        ``span_dropout``: in training, the fraction of examples that point without the spans.
        ``neighbour_gate``: scale each side's neighbour query by a learned gate of the slot's
        hidden state. ``coverage``: point a second time, with what the other slots drafted in the
        first pass."""
        super().__init__()
        self.span_dropout = span_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, 1)
        # Left and right neighbours, each with its own query and key projections.
        self.neighbour_query = (nn.ModuleList(nn.Linear(embed_dim, embed_dim) for _ in range(2))
                                if embed_dim else None)
        self.neighbour_key = (nn.ModuleList(nn.Linear(embed_dim, embed_dim) for _ in range(2))
                              if embed_dim else None)
        # The neighbour projections see z_t alone, not t: at high noise a neighbour is noise, and
        # only the hidden state (which reads t) can tell its match to count for less.
        self.neighbour_gate = (nn.Linear(hidden, 2) if embed_dim and neighbour_gate else None)
        # Weights of the slots before (row 0) and after (row 1) at distance 1..span. At 0.5, not 0,
        # the diagonal counts from the first step instead of waiting for its gradient.
        self.span_weight = nn.Parameter(torch.full((2, span), 0.5)) if span else None
        # Weights of the coverage before and after a slot, read from its hidden state (which
        # knows t and its role: a name's slot, or a separator's that repeats by design). Zero at
        # first, so the second pass starts as the first.
        self.coverage = nn.Linear(hidden, 2) if coverage else None
        if self.coverage is not None:
            nn.init.zeros_(self.coverage.weight), nn.init.zeros_(self.coverage.bias)

    def queries_and_keys(self, h: torch.Tensor, z_t: torch.Tensor, order: torch.Tensor,
                         h_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, R, D) of the positions in ``order`` (B, R), whose hidden states are
        ``h_rows``, and keys (B, L, D) of every position; their dot product is the sum of the
        hidden states' match and (with neighbours) each side's neighbour match. The scale
        1/sqrt(D) is sdpa's."""
        q, k = [self.query(h_rows)], [self.key(h)]
        if self.neighbour_query is not None:
            zeros = torch.zeros_like(z_t[:, :1])
            left = torch.cat([zeros, z_t[:, :-1]], 1)  # what the position before holds
            right = torch.cat([z_t[:, 1:], zeros], 1)
            gate = (torch.sigmoid(self.neighbour_gate(h_rows))
                    if self.neighbour_gate is not None else None)
            for side, neighbour in enumerate((left, right)):
                query = self.neighbour_query[side](_rows(neighbour, order)).to(h.dtype)
                q.append(query if gate is None else gate[..., side : side + 1] * query)
                k.append(self.neighbour_key[side](neighbour).to(h.dtype))
        return torch.cat(q, -1), torch.cat(k, -1)

    def along_spans(self, scores: torch.Tensor, valid: torch.Tensor, sources: torch.Tensor,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
        """scores (B, R, L) of R slots (``valid`` (B, R): which are real) against every position
        (``sources`` (B, L): which are source tokens), plus each slot's diagonal neighbours'
        scores: [b, r, j] += w[0, i-1] * scores[b, r-i, j-i] + w[1, i-1] * scores[b, r+i, j+i]
        for i = 1..span, counting only real slots against source positions (anything else adds
        0). ``keep`` (B,): which examples add the spans; None: all. Autograd keeps each shifted
        copy for w's gradient: about 2 * span + 1 times the (B, R, L) scores in memory."""
        kept = scores.masked_fill(~(valid[:, :, None] & sources[:, None, :]), 0.0)
        rows, length = scores.shape[1:]
        weight = self.span_weight.to(scores.dtype)
        total = scores
        for i in range(1, weight.shape[1] + 1):
            before = F.pad(kept, (i, 0, i, 0))[:, :rows, :length]
            after = F.pad(kept, (0, i, 0, i))[:, i:, i:]
            total = total + weight[0, i - 1] * before + weight[1, i - 1] * after
        return total if keep is None else torch.where(keep[:, None, None], total, scores)

    @staticmethod
    def covered(draft: torch.Tensor, z_t: torch.Tensor, valid: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        """(B, R, L): for slot k and position j, a * (max over the real slots before k of the
        cosine of their ``draft`` (B, R, E) with z_t[j]) + b * (the same over the slots after k),
        with (a, b) = ``weight`` (B, R, 2) of slot k; a max over no slot is -1."""
        cosine = F.normalize(draft, dim=-1) @ F.normalize(z_t, dim=-1).transpose(1, 2)
        cosine = cosine.masked_fill(~valid[..., None], -1.0)
        edge = torch.full_like(cosine[:, :1], -1.0)
        before = torch.cat([edge, cosine[:, :-1]], 1).cummax(1).values
        after = torch.cat([cosine[:, 1:], edge], 1).flip(1).cummax(1).values.flip(1)
        return weight[..., :1] * before + weight[..., 1:] * after

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
        h_rows = _rows(h, order)  # (B, R, H)
        query, key = self.queries_and_keys(h, z_t, order, h_rows)  # (B, R, D), (B, L, D)
        index = order[..., None].expand(-1, -1, x0.shape[-1])
        own = x0.gather(1, index)
        gate = torch.sigmoid(self.gate(h_rows)).to(x0.dtype)

        def blend(read: torch.Tensor) -> torch.Tensor:
            """What a slot writes: its gate's mix of what it read and the network's x0."""
            return gate * read.to(x0.dtype) + (1.0 - gate) * own

        coverage = self.coverage(h_rows) if self.coverage is not None else None  # (B, R, 2)
        if self.span_weight is None and coverage is None:
            read = F.scaled_dot_product_attention(
                query[:, None], key[:, None], z_t[:, None],
                attn_mask=sources[:, None, None, :],
            )[:, 0]  # (B, R, E)
            mixed = blend(read)
        else:
            # At least float32 whatever the autocast: up to 2 * span + 1 scores add per entry.
            wide = torch.promote_types(query.dtype, torch.float32)
            with torch.autocast(h.device.type, enabled=False):
                scores = query.to(wide) @ key.to(wide).transpose(1, 2) / query.shape[-1] ** 0.5
                if self.span_weight is not None:
                    keep = None
                    if self.training and self.span_dropout > 0:
                        # Examples without the spans: each slot must also find its token on its
                        # own (a question's NAME), not only agree with its neighbours on a shape.
                        draw = torch.rand(scores.shape[0], device=scores.device)
                        keep = draw >= self.span_dropout
                    scores = self.along_spans(scores, valid, sources, keep)
                scores = scores.masked_fill(~sources[:, None, :], float("-inf"))
                inputs = z_t.to(wide)  # the source's embeddings where the scores are finite
                read = scores.softmax(-1) @ inputs
                mixed = blend(read)
                if coverage is not None:
                    scores = scores + self.covered(mixed.to(wide), inputs, valid,
                                                   coverage.to(wide))
                    read = scores.softmax(-1) @ inputs
                    mixed = blend(read)
        return x0.scatter(1, index, torch.where(valid[..., None], mixed, own))
