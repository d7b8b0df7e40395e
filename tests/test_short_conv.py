"""network.short_conv: how far it carries a token, that padding never leaks through it, and
its config check."""

from __future__ import annotations

import pytest
import torch

from moe_diffuseq.config import NetworkConfig
from moe_diffuseq.denoiser import Denoiser


def _denoiser(short_conv: int) -> Denoiser:
    """One layer whose attention sees each position alone (window 1, no globals): any reach
    beyond a position is the convolution's."""
    torch.manual_seed(0)
    config = NetworkConfig(vocab_size=32, max_src_len=16, max_trg_len=8, embed_dim=8,
                           hidden_size=16, num_layers=1, num_heads=2, dropout=0.0, moe=None,
                           ffn_hidden=16, short_conv=short_conv,
                           attention={"window": 1, "target_global": False})
    return Denoiser(config, soft_absorbing=False).eval()


def _masks(source: int, target: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target_mask, padding_mask) of one row, padded to ``length``."""
    target_mask = torch.zeros(1, length, dtype=torch.bool)
    target_mask[0, source : source + target] = True
    padding = torch.ones(1, length, dtype=torch.bool)
    padding[0, : source + target] = False
    return target_mask, padding


@pytest.mark.parametrize("width", [0, 3, 5])
def test_a_position_reads_exactly_its_width_of_neighbours(width):
    net = _denoiser(width)
    target, padding = _masks(12, 8, 20)
    z_t = torch.randn(1, 20, 8)
    t = torch.tensor([1500])
    glob = torch.zeros_like(target)
    with torch.no_grad():
        before, _ = net(z_t, t, glob, padding, target)
        for offset in range(1, 4):
            moved = z_t.clone()
            moved[0, 10 - offset] += 1.0
            after, _ = net(moved, t, glob, padding, target)
            reached = float((after - before)[0, 10].abs().max()) > 1e-6
            assert reached == (offset <= width // 2), (width, offset)


def test_batch_padding_does_not_reach_a_row_through_the_convolution():
    net = _denoiser(5)
    target, padding = _masks(6, 4, 10)
    z_t = torch.randn(1, 10, 8)
    t = torch.tensor([700])
    long_target, long_padding = _masks(6, 4, 14)
    padded = torch.cat([z_t, 5.0 * torch.randn(1, 4, 8)], 1)  # large junk in the padding
    with torch.no_grad():
        alone, _ = net(z_t, t, torch.zeros_like(target), padding, target)
        batched, _ = net(padded, t, torch.zeros_like(long_target), long_padding, long_target)
    torch.testing.assert_close(batched[:, :10], alone)


@pytest.mark.parametrize("width", [2, -1])
def test_an_even_or_negative_width_is_refused_by_name(width):
    with pytest.raises(ValueError, match="network.short_conv"):
        NetworkConfig(short_conv=width)
