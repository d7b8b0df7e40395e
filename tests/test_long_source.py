"""A long source reaches the target: with ``attention.target_global`` every target position reads
every source position in every layer, so even one layer carries a token 4k positions away."""

from __future__ import annotations

import pytest
import torch

from moe_diffuseq.config import NetworkConfig
from moe_diffuseq.denoiser import Denoiser

SOURCE, TARGET = 4096, 16


def _x0(net: Denoiser, position: int, token: int) -> torch.Tensor:
    """x0_hat (L, E) of a fixed random input, [CLS] src [SEP] target, with ``token`` at
    ``position``."""
    length = SOURCE + TARGET + 3
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (1, length), generator=gen)
    ids[0, 0], ids[0, SOURCE + 1], ids[0, position] = 1, 2, token
    target = torch.zeros(1, length, dtype=torch.bool)
    target[0, SOURCE + 2 :] = True
    padding = torch.zeros_like(target)
    noise = torch.randn(1, length, net.embed_dim, generator=gen)
    z_t = torch.where(target[..., None], noise, net.embed(ids))
    global_mask = net.global_tokens((ids == 1) | (ids == 2), target, padding)
    with torch.no_grad():
        x0, _ = net(z_t, torch.tensor([1000]), global_mask, padding, target)
    return x0[0]


def _target_prediction(net: Denoiser, first_source_token: int) -> torch.Tensor:
    """x0_hat on the target region when the source starts with the token."""
    return _x0(net, 1, first_source_token)[SOURCE + 2 :]


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


def _source_prediction(net: Denoiser, question_token: int) -> torch.Tensor:
    """x0_hat at the source's first tokens when the source ends with the token (the question
    line just before the source [SEP])."""
    return _x0(net, SOURCE, question_token)[1:9]


@pytest.mark.parametrize("num_global_last", [0, 4])
def test_trailing_globals_carry_a_question_to_the_whole_source_in_one_layer(num_global_last):
    torch.manual_seed(0)
    config = NetworkConfig(vocab_size=64, max_src_len=SOURCE, max_trg_len=TARGET, embed_dim=16,
                           hidden_size=32, num_layers=1, num_heads=2, dropout=0.0,
                           attention={"window": 64, "num_global_last": num_global_last,
                                      "backend": "banded"},
                           moe={"num_experts": 2, "top_k": 1, "expert_hidden": 32})
    net = Denoiser(config, soft_absorbing=False).eval()
    change = (_source_prediction(net, 7) - _source_prediction(net, 8)).abs().max().item()
    if num_global_last:
        assert change > 1e-6  # the source's first tokens read the question 4k positions on
    else:
        assert change == 0.0


def test_trailing_globals_are_the_tokens_before_each_rows_source_sep():
    config = NetworkConfig(vocab_size=64, max_src_len=32, max_trg_len=4, embed_dim=8,
                           hidden_size=16, num_layers=1, num_heads=2,
                           attention={"window": 4, "num_global": 1, "num_global_last": 2},
                           moe=None, ffn_hidden=16)
    net = Denoiser(config, soft_absorbing=False)
    # Row 0: [CLS] s1..s5 [SEP] | target x5 | pad x2; row 1: [CLS] s1 s2 [SEP] | target x5 | pad x5.
    target = torch.zeros(2, 14, dtype=torch.bool)
    target[0, 7:12], target[1, 4:9] = True, True
    padding = torch.zeros_like(target)
    padding[0, 12:], padding[1, 9:] = True, True
    structural = torch.zeros_like(target)
    structural[0, [0, 6]], structural[1, [0, 3]] = True, True
    marked = net.global_tokens(structural, target, padding)
    assert marked[0].nonzero().flatten().tolist() == [0, 1, 4, 5, 6]
    assert marked[1].nonzero().flatten().tolist() == [0, 1, 2, 3]
