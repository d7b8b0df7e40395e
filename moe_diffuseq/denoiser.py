"""The x0-predicting network, readable top to bottom.

    tokens/z_t (B, L, E) -> up-projection (B, L, H) + positions + timestep embedding
    [-> + a short depthwise convolution over the neighbours (short_conv)]
    -> N x [sparse self-attention -> residual + norm -> MoE FFN -> residual + norm]
    -> down-projection (B, L, E) = x0_hat
    [-> source pointer: on target rows, gate * attention over the source's embeddings
        + (1 - gate) * x0_hat]

The word embedding (width E = embed_dim) is tied to the rounding head ``lm_head``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import sparse_attention
from .config import AttentionConfig, NetworkConfig
from .moe import DenseFeedForward, MoEFeedForward, RouterStats
from .pointer import SourcePointer


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention through ``sparse_attention`` (window, dilation, globals)."""

    def __init__(self, hidden: int, heads: int, config: AttentionConfig, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size={hidden} is not divisible by num_heads={heads}")
        self.heads = heads
        self.config = config
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, global_mask: torch.Tensor, padding_mask: torch.Tensor,
                global_rows: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads,
                                   hidden // self.heads).permute(2, 0, 3, 1, 4)
        y = sparse_attention(
            q, k, v,  # (B, heads, L, head_dim)
            window=self.config.window,
            dilation=self.config.dilation,
            global_mask=global_mask,
            key_padding_mask=padding_mask,
            backend=self.config.backend,
            block_size=self.config.block_size,
            global_rows=global_rows,
        )
        return self.dropout(self.out(y.transpose(1, 2).reshape(batch, length, hidden)))


class Block(nn.Module):
    """Post-norm transformer block (BERT-style, as DiffuSeq): attention, then (MoE) FFN."""

    def __init__(self, hidden: int, heads: int, attention: AttentionConfig, ffn: nn.Module,
                 dropout: float) -> None:
        super().__init__()
        self.attn = SparseSelfAttention(hidden, heads, attention, dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn = ffn
        self.norm2 = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, global_mask, padding_mask,
                global_rows=None) -> tuple[torch.Tensor, RouterStats | None]:
        x = self.norm1(x + self.attn(x, global_mask, padding_mask, global_rows))
        y, stats = self.ffn(x, padding_mask)
        return self.norm2(x + self.dropout(y)), stats


class Denoiser(nn.Module):
    """Predicts the clean embedding sequence x0 from z_t and t.

    Args:
        config: The network's shape; its vocabulary and length budgets must be set.
        soft_absorbing: Learn DiffuSeq-v2's absorbing state m (else m is a fixed zero vector).
        self_conditioning: Read the previous x0 estimate as a second input.
        skip_alpha_bar: The schedule's alpha_bar (T,) for the EDM-style skip connection; None: off.
    """

    def __init__(
        self,
        config: NetworkConfig,
        *,
        soft_absorbing: bool = True,
        self_conditioning: bool = False,
        skip_alpha_bar: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not config.sizes_known:
            raise ValueError("network.vocab_size, max_src_len and max_trg_len must be set "
                             "to build the denoiser")
        self.config = config
        embed_dim, hidden = config.embed_dim, config.hidden_size
        self.max_length = config.max_length
        self.word_embedding = nn.Embedding(config.vocab_size, embed_dim)
        self.lm_head = nn.Linear(embed_dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.word_embedding.weight  # tied: rounding reads the same table
        self.up = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.time_mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                      nn.Linear(4 * embed_dim, hidden))
        self.position = nn.Embedding(config.max_length, hidden)
        # The target region's own table, indexed by the offset from its first position: a target
        # token knows which output slot it is wherever a source of varying length ends.
        relative = config.positions in ("target_relative", "target_anchored")
        self.target_position = nn.Embedding(config.max_trg_len + 1, hidden) if relative else None
        for table in (self.position, self.target_position):
            if table is not None:
                nn.init.normal_(table.weight, std=config.position_init_std)
        # Self-conditioning (Analog Bits): the previous x0 estimate is a second input, so a step
        # refines the last answer instead of starting again from z_t alone.
        self.self_condition = nn.Linear(embed_dim, hidden) if self_conditioning else None
        self.input_norm = nn.LayerNorm(hidden)
        width = config.short_conv
        self.short_conv = (nn.Conv1d(hidden, hidden, width, padding=width // 2, groups=hidden)
                           if width else None)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(hidden, config.num_heads, config.attention, self._ffn(config, i), config.dropout)
            for i in range(config.num_layers)
        )
        self.down = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(),
                                  nn.Linear(hidden, embed_dim))
        self.embed_dim = embed_dim
        self.pointer = (SourcePointer(hidden, embed_dim if config.pointer_neighbours else None,
                                      config.pointer_span, config.pointer_span_dropout,
                                      config.pointer_neighbour_gate, config.pointer_coverage)
                        if config.source_pointer else None)
        # Skip connection (EDM-style preconditioning for a variance-preserving process): low noise
        # is solved by the skip, and the network's capacity goes to high noise.
        if skip_alpha_bar is not None:
            self.register_buffer("skip_alpha_bar", skip_alpha_bar.float().clone(), persistent=False)
        else:
            self.skip_alpha_bar = None
        # The soft absorbing state m (DiffuSeq-v2), learned; a fixed zero vector without it.
        if soft_absorbing:
            self.absorbing_state = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        else:
            self.register_buffer("absorbing_state", torch.zeros(embed_dim))

    @staticmethod
    def _ffn(config: NetworkConfig, layer: int) -> nn.Module:
        if config.routed(layer):
            return MoEFeedForward.from_config(config.hidden_size, config.moe)
        return DenseFeedForward(config.hidden_size, config.dense_hidden)

    def fully_shard(self, mesh) -> None:
        """Shard for FSDP2 over ``mesh``'s data-parallel dimension: each block is a unit, the root
        holds the rest, and ``run`` is registered as a forward method (see ``run``)."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        for block in self.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(self, mesh=dp_mesh, reshard_after_forward=False)
        register_fsdp_forward_method(self, "run")

    def run(self, fn, *args, **kwargs):
        """Call ``fn(self, *args, **kwargs)`` as one forward pass of this module.

        Code that reads the embedding, the rounding head or the absorbing state outside
        ``forward`` (the loss, the samplers) goes through here: under FSDP2 this method is
        registered as a forward method, so the root's parameters are gathered for it.
        """
        return fn(self, *args, **kwargs)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (B, L, E)."""
        return self.word_embedding(input_ids)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Rounding head: (B, L, E) -> (B, L, V)."""
        return self.lm_head(z)

    def global_tokens(self, global_mask: torch.Tensor, target_mask: torch.Tensor,
                      padding_mask: torch.Tensor) -> torch.Tensor:
        """Structural globals, the first ``num_global`` source tokens (positions 1..n), the last
        ``num_global_last`` ones (before the source [SEP]) and, with ``target_global`` (and
        ``target_keys``), the whole target region."""
        attention = self.config.attention
        if attention.target_global and attention.target_keys:
            global_mask = global_mask | (target_mask & ~padding_mask)
        if attention.num_global == 0 and attention.num_global_last == 0:
            return global_mask
        pos = torch.arange(global_mask.shape[1], device=global_mask.device)[None]  # (1, L)
        # The source [SEP] sits just before the target region's first row.
        sep = (target_mask.long().cumsum(1) == 0).long().sum(1, keepdim=True) - 1  # (B, 1)
        source = (pos >= 1) & (pos < sep)  # (B, L) the source's own tokens
        leading = pos <= attention.num_global
        trailing = pos >= sep - attention.num_global_last
        return global_mask | (source & (leading | trailing) & ~padding_mask)

    def position_embedding(self, target_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H): absolute positions, or (target_relative) absolute ones on the source and
        the offset from the target region's start on the target, or (target_anchored) that offset
        on the target and the distance back from the target's start on the source."""
        pos = torch.arange(target_mask.shape[1], device=target_mask.device)
        if self.config.positions == "target_anchored":
            # Rows before the first target row are the source; padding follows the target.
            start = (target_mask.long().cumsum(1) == 0).long().sum(1, keepdim=True)  # (B, 1)
            back = (start - pos[None]).clamp(0, self.position.num_embeddings - 1)  # (B, L)
            source = self.position(back)  # (B, L, H)
        else:
            source = self.position(pos)[None]  # (1, L, H)
        if self.target_position is None:
            return source
        offset = (target_mask.long().cumsum(1) - 1).clamp(
            0, self.target_position.num_embeddings - 1)  # (B, L)
        return torch.where(target_mask[..., None], self.target_position(offset), source)

    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        global_mask: torch.Tensor,
        padding_mask: torch.Tensor,
        target_mask: torch.Tensor,
        x0_prev: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[RouterStats]]:
        """z_t: (B, L, E); t: (B,); masks (B, L); x0_prev: (B, L, E) the previous x0 estimate
        (self-conditioning; None: zeros). Returns x0_hat (B, L, E) and one RouterStats per MoE
        layer."""
        length = z_t.shape[1]
        if length > self.max_length:
            raise ValueError(f"sequence of {length} positions exceeds the model's "
                             f"max_length={self.max_length}")
        h = (self.up(z_t) + self.position_embedding(target_mask)
             + self.time_mlp(timestep_embedding(t, self.embed_dim))[:, None])
        if self.self_condition is not None:
            x0_prev = (torch.zeros_like(z_t) if x0_prev is None
                       else torch.where(target_mask[..., None], x0_prev, 0.0))
            h = h + self.self_condition(x0_prev)
        h = self.input_norm(h)
        if self.short_conv is not None:
            # Padding is zeroed first: a row's output must not depend on the batch's padding.
            kept = h.masked_fill(padding_mask[..., None], 0.0)
            h = h + self.short_conv(kept.transpose(1, 2)).transpose(1, 2)
        h = self.dropout(h)  # (B, L, H)
        stats: list[RouterStats] = []
        attention = self.config.attention
        # Global rows only: the target reads every source position; see AttentionConfig.target_keys.
        rows = (target_mask & ~padding_mask
                if attention.target_global and not attention.target_keys else None)
        for block in self.blocks:
            h, layer_stats = block(h, global_mask, padding_mask, rows)
            if layer_stats is not None:
                stats.append(layer_stats)
        out = self.down(h)
        if self.skip_alpha_bar is not None:
            ab = self.skip_alpha_bar[t].to(out.dtype)[:, None, None]  # (B, 1, 1)
            m = self.absorbing_state.to(out.dtype)
            out = m + ab.sqrt() * (z_t - m) + (1.0 - ab).sqrt() * out
        if self.pointer is not None:
            out = self.pointer(h, z_t, out, target_mask, padding_mask)
        return out, stats
