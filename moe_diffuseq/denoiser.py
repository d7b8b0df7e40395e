"""The x0-predicting network, readable top to bottom.

    tokens/z_t (B, L, E) -> up-projection (B, L, H) + positions + timestep embedding
    -> N x [sparse self-attention -> residual + norm -> MoE FFN -> residual + norm]
    -> down-projection (B, L, E) = x0_hat

The word embedding (width E = embed_dim) is tied to the rounding head ``lm_head``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import sparse_attention
from .config import AttentionConfig, MoEConfig
from .moe import DenseFeedForward, MoEFeedForward, RouterStats


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
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

    def forward(self, x: torch.Tensor, global_mask: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        y = sparse_attention(
            q, k, v,  # (B, heads, L, head_dim)
            window=self.config.window,
            dilation=self.config.dilation,
            global_mask=global_mask,
            key_padding_mask=padding_mask,
            backend=self.config.backend,
            block_size=self.config.block_size,
        )
        return self.dropout(self.out(y.transpose(1, 2).reshape(batch, length, hidden)))


class Block(nn.Module):
    """Post-norm transformer block (BERT-style, as DiffuSeq): attention, then (MoE) FFN."""

    def __init__(self, hidden: int, heads: int, attention: AttentionConfig, ffn: nn.Module, dropout: float) -> None:
        super().__init__()
        self.attn = SparseSelfAttention(hidden, heads, attention, dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn = ffn
        self.norm2 = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, global_mask, padding_mask) -> tuple[torch.Tensor, RouterStats | None]:
        x = self.norm1(x + self.attn(x, global_mask, padding_mask))
        y, stats = self.ffn(x, padding_mask)
        return self.norm2(x + self.dropout(y)), stats


POSITION_MODES = ("target_relative", "absolute")


class Denoiser(nn.Module):
    """Predicts the clean embedding sequence x0 from z_t and t."""

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        embed_dim: int = 128,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        dropout: float = 0.1,
        attention: AttentionConfig | None = None,
        moe: MoEConfig | None = None,
        soft_absorbing: bool = True,
        max_target_length: int | None = None,
        positions: str = "target_relative",
        self_conditioning: bool = False,
        skip_alpha_bar: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if positions not in POSITION_MODES:
            raise ValueError(f"positions={positions!r}: expected one of {POSITION_MODES}")
        attention = attention or AttentionConfig()
        moe = moe or MoEConfig()
        self.max_length = max_length
        self.word_embedding = nn.Embedding(vocab_size, embed_dim)
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)
        self.lm_head.weight = self.word_embedding.weight  # tied: rounding reads the same table
        self.up = nn.Sequential(nn.Linear(embed_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, hidden_size))
        self.time_mlp = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, hidden_size)
        )
        self.position = nn.Embedding(max_length, hidden_size)
        self.positions = positions
        # The target region's own table, indexed by the offset from its first position: a target
        # token knows which output slot it is wherever a source of varying length ends.
        self.target_position = (
            nn.Embedding(max_target_length or max_length, hidden_size) if positions == "target_relative" else None
        )
        # Self-conditioning (Analog Bits): the previous x0 estimate is a second input, so a step
        # refines the last answer instead of starting again from z_t alone.
        self.self_condition = nn.Linear(embed_dim, hidden_size) if self_conditioning else None
        self.input_norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        moe_layers = set(range(num_layers) if moe.moe_layers is None else moe.moe_layers)
        bad = sorted(i for i in moe_layers if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"moe.moe_layers has {bad}, outside [0, num_layers={num_layers})")
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, attention, self._ffn(hidden_size, moe, i in moe_layers), dropout)
            for i in range(num_layers)
        )
        self.down = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, embed_dim))
        self.embed_dim = embed_dim
        # Skip connection (EDM-style preconditioning for a variance-preserving process): with the
        # schedule's alpha_bar, x0_hat = m + sqrt(ab_t) (z_t - m) + sqrt(1 - ab_t) F, the best linear
        # guess plus a learned residual. Low noise is then solved by the skip, and the network's
        # capacity goes to high noise, where it must write from the source.
        if skip_alpha_bar is not None:
            self.register_buffer("skip_alpha_bar", skip_alpha_bar.float().clone(), persistent=False)
        else:
            self.skip_alpha_bar = None
        self.num_global = attention.num_global
        self.target_global = attention.target_global
        # The soft absorbing state m (DiffuSeq-v2), learned; a fixed zero vector without it.
        if soft_absorbing:
            self.absorbing_state = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        else:
            self.register_buffer("absorbing_state", torch.zeros(embed_dim))

    @staticmethod
    def _ffn(hidden: int, moe: MoEConfig, routed: bool) -> nn.Module:
        if not routed:
            return DenseFeedForward(hidden, moe.expert_hidden * moe.top_k)
        return MoEFeedForward(
            hidden,
            moe.expert_hidden,
            moe.num_experts,
            moe.top_k,
            capacity_factor=moe.capacity_factor,
            jitter=moe.jitter,
            dispatch=moe.dispatch,
            shared_expert=moe.shared_expert,
        )

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

    def global_tokens(self, global_mask: torch.Tensor, target_mask: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Structural globals, the first ``num_global`` source tokens (positions 1..n) and, with
        ``target_global``, the whole target region."""
        if self.target_global:
            global_mask = global_mask | (target_mask & ~padding_mask)
        if self.num_global == 0:
            return global_mask
        pos = torch.arange(global_mask.shape[1], device=global_mask.device)
        leading = (pos >= 1) & (pos <= self.num_global)
        return global_mask | (leading[None] & ~target_mask & ~padding_mask)

    def position_embedding(self, target_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H): absolute positions, or (target_relative) absolute ones on the source and
        the offset from the target region's start on the target."""
        pos = torch.arange(target_mask.shape[1], device=target_mask.device)
        absolute = self.position(pos)[None]  # (1, L, H)
        if self.target_position is None:
            return absolute
        offset = (target_mask.long().cumsum(1) - 1).clamp(0, self.target_position.num_embeddings - 1)  # (B, L)
        return torch.where(target_mask[..., None], self.target_position(offset), absolute)

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
        (self-conditioning; None: zeros). Returns x0_hat (B, L, E) and one RouterStats per MoE layer."""
        length = z_t.shape[1]
        if length > self.max_length:
            raise ValueError(f"sequence of {length} positions exceeds the model's max_length={self.max_length}")
        h = self.up(z_t) + self.position_embedding(target_mask) + self.time_mlp(timestep_embedding(t, self.embed_dim))[:, None]
        if self.self_condition is not None:
            x0_prev = torch.zeros_like(z_t) if x0_prev is None else torch.where(target_mask[..., None], x0_prev, 0.0)
            h = h + self.self_condition(x0_prev)
        h = self.dropout(self.input_norm(h))  # (B, L, H)
        stats: list[RouterStats] = []
        for block in self.blocks:
            h, layer_stats = block(h, global_mask, padding_mask)
            if layer_stats is not None:
                stats.append(layer_stats)
        out = self.down(h)
        if self.skip_alpha_bar is not None:
            ab = self.skip_alpha_bar[t].to(out.dtype)[:, None, None]  # (B, 1, 1)
            m = self.absorbing_state.to(out.dtype)
            out = m + ab.sqrt() * (z_t - m) + (1.0 - ab).sqrt() * out
        return out, stats
