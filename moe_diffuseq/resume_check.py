"""A resumed run may not silently change the model it resumes.

LightningCLI puts a checkpoint's model arguments in place of the command line's when
``--ckpt_path`` is given, so ``--model.network.hidden_size 256`` on resume would train the
checkpoint's 128 without a word. ``ResumeCheckingCLI`` compares the two before anything is
built: keys that may change on resume (optimisation and sampling settings) pass with a
warning; any other difference is an error that names each key, old and new value.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from .config import DiffusionConfig, NetworkConfig, SamplingConfig

log = logging.getLogger(__name__)

# Model arguments a resumed run may change: how it is optimised and how it samples, and where its
# first weights came from (a resume restores its own over them).
MAY_CHANGE = ("lr", "weight_decay", "warmup_steps", "lr_decay", "min_lr_ratio",
              "max_nonfinite_steps", "flush_denormal", "sampling.", "init_from")
# Learned from the tokenizer when left unset: None on the command line is no change.
LEARNED_LATE = ("network.vocab_size",)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": 1}`` from nested dicts, namespaces and dataclasses."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if not isinstance(value, dict):
        return {prefix.rstrip("."): value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}{key}."))
    return out


def _config_defaults() -> dict[str, Any]:
    """Every model config key's default, flattened (``network.pointer_span``: 0, ...)."""
    return flatten({"network": NetworkConfig(), "diffusion": DiffusionConfig(),
                    "sampling": SamplingConfig()})


def changed_settings(saved: dict[str, Any], given: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(forbidden, allowed) differences, each ``key: old -> new``, between a checkpoint's model
    hyperparameters and the ones given for the resumed run. A config key the checkpoint lacks (it
    was made before the key existed) holds its default there: that is how it loads."""
    saved, given = flatten(saved), flatten(given)
    defaults = _config_defaults()
    saved |= {key: defaults[key] for key in set(given) - set(saved) if key in defaults}
    forbidden, allowed = [], []
    for key in sorted(set(saved) & set(given)):
        old, new = saved[key], given[key]
        if isinstance(old, tuple | list) and isinstance(new, tuple | list):
            old, new = list(old), list(new)
        if old == new or (key in LEARNED_LATE and new is None):
            continue
        line = f"{key}: {old!r} -> {new!r}"
        (allowed if key.startswith(MAY_CHANGE) else forbidden).append(line)
    return forbidden, allowed


class ResumeCheckingCLI(LightningCLI):
    """LightningCLI that refuses to resume with changed model settings (see the module doc)."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        self._given_model = flatten(self.config[sub]["model"]) if sub else None
        self._saved_hparams = None
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and Path(ckpt_path).is_file():
            from .checkpoint import named_load_errors

            # Read here, before Lightning reads it and before any training: a foreign or corrupt
            # file is a one-line error naming it, not torch's unpickling advice.
            state = named_load_errors(torch.load, ckpt_path, weights_only=True,
                                      map_location="cpu")
            if not isinstance(state, dict) or "pytorch-lightning_version" not in state:
                raise ValueError(f"{ckpt_path}: not a MoE-DiffuSeq checkpoint (no Lightning "
                                 "state)")
            self._saved_hparams = state.get("hyper_parameters", {})

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if sub != "fit" or self._saved_hparams is None or self._given_model is None:
            return
        saved = self._saved_hparams
        forbidden, allowed = changed_settings(saved, self._given_model)
        for line in allowed:
            log.warning("resuming %s with a changed setting: model.%s", ckpt_path, line)
        if forbidden:
            raise ValueError(
                f"{ckpt_path}: resuming with changed model settings, which the checkpoint's would "
                "silently replace: " + "; ".join(f"model.{line}" for line in forbidden)
                + ". Resume with the checkpoint's values, or start a new run without --ckpt_path."
            )
