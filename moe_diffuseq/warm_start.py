"""Warm start: a run begins from another checkpoint's weights (``model.init_from``).

Long sources are learned in stages (Longformer, too, trained in stages of growing length): a model
first learns a task on short sources, where a step is cheap, and a second run trains that model
on long ones. The second run has a longer source budget, so its position table has more rows:
the checkpoint's rows come first and the new ones start as initialised, learned from there. Every
other tensor must match in shape; the attention settings (window, globals, backend) hold no
weights and may differ. Unlike a resume (``ckpt_path``), the optimizer, the step count and the
learning-rate schedule start afresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from .checkpoint import checkpoint_tokenizer, named_load_errors, stored_tokenizer

# The position tables, whose rows are positions: the only tensors whose length may differ.
RESIZABLE = ("position.weight", "target_position.weight")
# Network fields that a checkpoint may set otherwise without changing any tensor's shape.
SHAPELESS_FIELDS = ("attention", "dropout", "max_src_len", "max_trg_len", "position_init_std",
                    "pointer_span_dropout")


@dataclass
class WarmStart:
    """What a run takes from ``init_from``: the denoiser's weights, the tokenizer, the network."""

    source: str
    """Where the weights come from, as errors name it (``model.init_from=PATH``)."""
    weights: dict[str, torch.Tensor]
    """The denoiser's tensors the checkpoint generates with (its EMA copy where it kept one)."""
    tokenizer: Tokenizer | None
    network: dict
    """The checkpoint's ``network`` hyperparameters (to say which setting a mismatch comes from)."""
    diffusion: dict = field(default_factory=dict)
    """The checkpoint's ``diffusion`` hyperparameters."""


def sampling_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The denoiser's tensors of a MoEDiffuSeq state dict, without their prefix: the EMA copy's
    where there is one (generation samples with it), else the trained ones."""
    for prefix in ("ema.", "denoiser."):
        found = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


def check_init_from(path: str | Path) -> Path:
    """``path`` as a file a warm start can read: a folder or a missing path raises an error that
    names ``model.init_from``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"model.init_from={path}: a sharded checkpoint folder; merge it into one "
                         "file first (moe-diffuseq consolidate)")
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from={path}: no such checkpoint")
    return path


def init_from_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer ``model.init_from``'s checkpoint carries; a foreign, truncated or
    tokenizer-less file raises an error that names the option (the data module would name a
    tokenizer file)."""
    try:
        return checkpoint_tokenizer(path)
    except ValueError as err:  # it names the file; say which option gave it
        raise ValueError(f"model.init_from={err}") from None


def read_warm_start(path: str | Path) -> WarmStart:
    """Read ``path`` for a warm start; a missing, foreign or truncated file raises an error that
    names it."""
    path = check_init_from(path)
    try:
        checkpoint = named_load_errors(torch.load, path, map_location="cpu", weights_only=True)
    except ValueError as err:  # it names the file; say which option gave it
        raise ValueError(f"model.init_from={err}") from None
    weights = sampling_weights(checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict)
                               else {})
    if not weights:
        raise ValueError(f"model.init_from={path}: holds no MoE-DiffuSeq weights")
    hparams = checkpoint.get("hyper_parameters", {})
    return WarmStart(f"model.init_from={path}", weights, stored_tokenizer(checkpoint),
                     dict(hparams.get("network", {})), dict(hparams.get("diffusion", {})))


def differing_settings(theirs: Mapping, ours: Mapping) -> list[str]:
    """``key: theirs -> ours`` for each network field that differs and shapes a tensor."""
    return [f"{key}: {theirs.get(key)!r} -> {ours.get(key)!r}" for key in sorted(ours)
            if key not in SHAPELESS_FIELDS and key in theirs and theirs[key] != ours[key]]


def copy_weights(denoiser: nn.Module, start: WarmStart, network: Mapping) -> dict[str, tuple]:
    """Copy ``start.weights`` into ``denoiser``; ``network`` is this run's network config (plain).
    Returns {position table: (rows there, rows here)} for each table resized. A missing, extra or
    differently shaped tensor raises an error that names the file, the tensor and the settings
    that differ."""
    own = denoiser.state_dict()
    where = start.source
    settings = differing_settings(start.network, network)
    hint = f" (network settings that differ: {'; '.join(settings)})" if settings else ""
    missing = sorted(set(own) - set(start.weights))
    extra = sorted(set(start.weights) - set(own))
    if missing or extra:
        raise ValueError(f"{where}: the networks differ in their tensors (missing there: "
                         f"{', '.join(missing) or 'none'}; not here: {', '.join(extra) or 'none'})"
                         f"{hint}")
    resized = {}
    with torch.no_grad():
        for key, value in start.weights.items():
            target = own[key]
            if target.shape == value.shape:
                target.copy_(value)
            elif key in RESIZABLE and target.shape[1:] == value.shape[1:]:
                rows = min(len(target), len(value))
                target[:rows].copy_(value[:rows])  # rows past the checkpoint's keep their init
                resized[key] = (len(value), len(target))
            else:
                raise ValueError(f"{where}: {key} has shape {tuple(value.shape)} there and "
                                 f"{tuple(target.shape)} here{hint}")
    return resized


def describe(start: WarmStart, resized: Mapping[str, tuple]) -> str:
    """One line for the run's log: where the weights came from and which tables were resized."""
    tables = "; ".join(f"{key} {there} -> {here} rows" for key, (there, here) in resized.items())
    return (f"warm start from {start.source}: {len(start.weights)} tensors"
            + (f" ({tables}; rows past the checkpoint's are learned from here)" if tables else ""))
