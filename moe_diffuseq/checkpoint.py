"""Loading checkpoints safely: clear errors for missing, truncated or foreign files."""

from __future__ import annotations

from pathlib import Path

import torch


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """``MoEDiffuSeq.load_from_checkpoint`` with ``weights_only=True`` and errors that name the file."""
    from .lit_module import MoEDiffuSeq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        model = MoEDiffuSeq.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a loadable MoE-DiffuSeq checkpoint (truncated or corrupt?): {err}") from err
    if model.tokenizer is None:
        raise ValueError(f"{path}: checkpoint has no tokenizer (written by another program?)")
    return model.eval()
