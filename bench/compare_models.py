"""bench.compare's models: MoE-DiffuSeq and the DiffuSeq baseline from their configs, at one
bench width (the same hidden size and layer count for both)."""

from __future__ import annotations

import torch
import yaml

from .common import ABLATION, ROOT, VARIANTS


def model_args(variant: str, hidden: int, layers: int, src_len: int, trg_len: int,
               vocab: int | None) -> dict:
    """MoEDiffuSeq's arguments for `variant` (a VARIANTS key or ABLATION) at the bench width."""
    config_name = VARIANTS["moe" if variant == ABLATION else variant]
    config_path = ROOT / "lightning_configs" / "model" / f"{config_name}.yaml"
    cfg = yaml.safe_load(config_path.read_text())
    if variant == ABLATION:
        cfg["diffusion"]["soft_absorbing"] = False
    net = cfg["network"]
    net.update(hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
               embed_dim=min(net["embed_dim"], hidden), max_src_len=src_len, max_trg_len=trg_len,
               vocab_size=vocab)
    # Same active FFN: MoE 8 experts of h, top-2; baseline one dense 2h.
    if net.get("moe") is not None:
        net["moe"]["expert_hidden"] = hidden
    else:
        net["ffn_hidden"] = 2 * hidden
    if variant == "eager":
        net["attention"]["backend"] = "full_eager"
    cfg["ema_decay"] = 0.0
    return cfg


def build(variant, hidden, layers, src_len, trg_len, vocab=4096):
    from moe_diffuseq import MoEDiffuSeq

    torch.manual_seed(0)
    return MoEDiffuSeq(**model_args(variant, hidden, layers, src_len, trg_len, vocab))
