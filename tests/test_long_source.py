"""A long source reaches the target: with ``attention.target_global`` every target position reads
every source position in every layer, so even one layer carries a token 4k positions away."""

from __future__ import annotations

import pytest
import torch

from moe_diffuseq.config import NetworkConfig
from moe_diffuseq.denoiser import Denoiser

SOURCE, TARGET = 4096, 16


def _target_prediction(net: Denoiser, first_source_token: int) -> torch.Tensor:
    """x0_hat on the target region of a fixed random input whose source starts with the token."""
    length = SOURCE + TARGET + 3
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (1, length), generator=gen)
    ids[0, 0], ids[0, SOURCE + 1], ids[0, 1] = 1, 2, first_source_token  # [CLS] src [SEP] target
    target = torch.zeros(1, length, dtype=torch.bool)
    target[0, SOURCE + 2 :] = True
    padding = torch.zeros_like(target)
    noise = torch.randn(1, length, net.embed_dim, generator=gen)
    z_t = torch.where(target[..., None], noise, net.embed(ids))
    global_mask = net.global_tokens((ids == 1) | (ids == 2), target, padding)
    with torch.no_grad():
        x0, _ = net(z_t, torch.tensor([1000]), global_mask, padding, target)
    return x0[target]


@pytest.mark.parametrize("target_global,target_keys", [(True, True), (True, False), (False, True)])
def test_a_source_token_4k_positions_back_reaches_the_target_in_one_layer(target_global,
                                                                           target_keys):
    torch.manual_seed(0)
    config = NetworkConfig(vocab_size=64, max_src_len=SOURCE, max_trg_len=TARGET, embed_dim=16,
                           hidden_size=32, num_layers=1, num_heads=2, dropout=0.0,
                           attention={"window": 64, "target_global": target_global,
                                      "target_keys": target_keys, "backend": "banded"},
                           moe={"num_experts": 2, "top_k": 1, "expert_hidden": 32})
    net = Denoiser(config, soft_absorbing=False).eval()
    change = (_target_prediction(net, 7) - _target_prediction(net, 8)).abs().max().item()
    if target_global:
        assert change > 1e-6  # the target read the far token (one key of 4k: a small weight)
    else:
        assert change == 0.0  # the band reaches 32 positions; [CLS]/[SEP] carry it only in layer 2
