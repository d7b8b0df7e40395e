"""network.positions: which table row each position reads, for sources of different lengths in
one padded batch."""

from __future__ import annotations

import pytest
import torch

from moe_diffuseq.config import NetworkConfig
from moe_diffuseq.denoiser import Denoiser

TARGET = 4


def _denoiser(positions: str) -> Denoiser:
    torch.manual_seed(0)
    config = NetworkConfig(vocab_size=32, max_src_len=12, max_trg_len=TARGET - 1, embed_dim=8,
                           hidden_size=16, num_layers=1, num_heads=2, dropout=0.0, moe=None,
                           ffn_hidden=16, positions=positions)
    return Denoiser(config, soft_absorbing=False)


def _target_mask(sources: list[int]) -> torch.Tensor:
    """Rows laid out as the collator does: ``source`` rows, the target region, then padding."""
    length = max(sources) + TARGET
    mask = torch.zeros(len(sources), length, dtype=torch.bool)
    for row, source in enumerate(sources):
        mask[row, source : source + TARGET] = True
    return mask


def test_target_anchored_source_rows_count_back_from_the_target():
    net = _denoiser("target_anchored")
    with torch.no_grad():
        emb = net.position_embedding(_target_mask([5, 11]))  # (2, 15, H)
        table, target_table = net.position.weight, net.target_position.weight
    for row, source in enumerate([5, 11]):
        # The last source row ([SEP]) is row 1 of the table, the first ([CLS]) row `source`.
        assert torch.equal(emb[row, :source], table[torch.arange(source, 0, -1)])
        assert torch.equal(emb[row, source : source + TARGET], target_table[:TARGET])
    # So a source's end and its target look the same at any source length.
    assert torch.equal(emb[0, : 5 + TARGET], emb[1, 6 : 11 + TARGET])


def test_target_relative_source_rows_are_absolute():
    net = _denoiser("target_relative")
    with torch.no_grad():
        emb = net.position_embedding(_target_mask([5, 11]))
    assert torch.equal(emb[0, :5], net.position.weight[:5].detach())
    assert torch.equal(emb[1, :11], net.position.weight[:11].detach())
    assert torch.equal(emb[0, 5 : 5 + TARGET], emb[1, 11 : 11 + TARGET])


def test_an_unknown_position_mode_names_the_key():
    with pytest.raises(ValueError, match="network.positions.*target_anchored"):
        NetworkConfig(positions="rotary")
