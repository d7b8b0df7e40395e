"""Loading checkpoints safely: clear errors for missing, truncated or foreign files."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


def describe_load_error(path: str | Path, err: BaseException) -> str:
    """One line naming the file. torch's unpickling message is not repeated: it suggests
    ``weights_only=False``, the unsafe workaround, for exactly the file that should not be trusted."""
    if isinstance(err, pickle.UnpicklingError):
        return f"{path}: not a MoE-DiffuSeq checkpoint (not a torch file, or it holds objects other than tensors)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{path}: not a MoE-DiffuSeq checkpoint, or truncated ({type(err).__name__}: {first})"


LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """``MoEDiffuSeq.load_from_checkpoint`` with ``weights_only=True`` and errors that name the file."""
    from .lit_module import MoEDiffuSeq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    model = MoEDiffuSeq.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    if model.tokenizer is None:
        raise ValueError(f"{path}: checkpoint has no tokenizer (written by another program?)")
    return model.eval()
