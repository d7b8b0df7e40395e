"""Loading checkpoints safely: clear errors for missing, truncated or foreign files."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .config import NetworkConfig, config_error_behind, to_plain

log = logging.getLogger(__name__)


def describe_load_error(path: str | Path, err: BaseException) -> str:
    """One line naming the file. torch's unpickling message is not repeated: it suggests
    ``weights_only=False``, the unsafe workaround, for exactly the file that should not be
    trusted."""
    if isinstance(err, pickle.UnpicklingError):
        return (f"{path}: not a MoE-DiffuSeq checkpoint "
                "(not a torch file, or it holds objects other than tensors)")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{path}: not a MoE-DiffuSeq checkpoint, or truncated ({type(err).__name__}: {first})"


# What torch.load raises on random, truncated or foreign bytes (the weights-only unpickler may also
# index past its stack, an IndexError).
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, LookupError,
               TypeError, AttributeError)


TOKENIZER_KEY = "moe_diffuseq_tokenizer"
NO_TOKENIZER = "checkpoint has no tokenizer (written by another program?)"
RNG_KEY = "moe_diffuseq_torch_rng"


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch generators: the CPU one, and the current CUDA device's once used."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def write_extras(checkpoint: dict, tokenizer: Tokenizer | None, network: NetworkConfig,
                 rng_states: list[dict[str, torch.Tensor]]) -> None:
    """What a checkpoint holds beyond Lightning's state: the tokenizer, every rank's RNG state
    (``rng_states[rank]``, from ``rng_state``) and the network as built (the vocabulary size
    filled in), so a script rebuilds the model from the file."""
    if tokenizer is not None:
        checkpoint[TOKENIZER_KEY] = tokenizer.to_str()
    # Timesteps, noise and dropout draw from torch's global generators, one stream per rank:
    # saving each lets a resumed run continue with exactly the draws of an uninterrupted one.
    checkpoint[RNG_KEY] = rng_states
    checkpoint["hyper_parameters"] = {**checkpoint.get("hyper_parameters", {}),
                                      "network": to_plain(network)}


def read_extras(checkpoint: dict, restore_rng: bool, rank: int = 0,
                world_size: int = 1) -> Tokenizer | None:
    """The checkpoint's tokenizer (None when it has none); this rank's RNG state restored when
    asked. Resuming on another number of processes cannot replay the draws: then each rank
    keeps rank 0's state, offset by its rank so that the ranks still draw different noise."""
    saved = checkpoint.get(RNG_KEY)
    if restore_rng and saved is not None:
        states = [{"cpu": saved}] if isinstance(saved, torch.Tensor) else saved  # one-process form
        exact = len(states) == world_size
        state = states[rank] if exact else states[0]
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        if not exact:
            log.warning("the checkpoint holds the RNG state of %d process(es), this run has %d: "
                        "the resumed run's noise differs from an uninterrupted one",
                        len(states), world_size)
            torch.manual_seed(int(torch.randint(2**62, ()).item()) + rank)
    return stored_tokenizer(checkpoint)


def stored_tokenizer(checkpoint) -> Tokenizer | None:
    """The tokenizer a loaded checkpoint carries; None when it carries none."""
    text = checkpoint.get(TOKENIZER_KEY) if isinstance(checkpoint, dict) else None
    return None if text is None else Tokenizer.from_str(text)


def checkpoint_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a checkpoint carries; a missing, foreign or tokenizer-less file raises an
    error that names it."""
    # mmap: the weights are not read, only the tokenizer's string.
    checkpoint = named_load_errors(torch.load, path, map_location="cpu", weights_only=True,
                                   mmap=True)
    tokenizer = stored_tokenizer(checkpoint)
    if tokenizer is None:
        raise ValueError(f"{path}: {NO_TOKENIZER}")
    return tokenizer


def named_load_errors(load, path, *args, **kwargs):
    """``load(path, ...)`` (Lightning's ``load_from_checkpoint``); a missing, foreign, truncated or
    corrupt file raises one error that names it."""
    local = isinstance(path, str | Path) and "://" not in str(path)
    if local and not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return load(path, *args, **kwargs)
    except LOAD_ERRORS as err:
        if local and load is not torch.load and _whole_checkpoint(path):
            # The file is ours and whole: the fault is in what was asked (a device, a config).
            cause = config_error_behind(err)
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            raise ValueError(f"{path}: cannot be loaded ({type(cause).__name__}: {first})") from err
        raise ValueError(describe_load_error(path, err)) from None


def _whole_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` reads as a Lightning checkpoint of ours: weights, hyperparameters and a
    tokenizer (mmap: the weights are not read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except LOAD_ERRORS:
        return False
    return isinstance(checkpoint, dict) and {"state_dict", "hyper_parameters",
                                              TOKENIZER_KEY} <= checkpoint.keys()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """``MoEDiffuSeq.load_from_checkpoint`` with ``weights_only=True`` and errors that name the
    file."""
    from .lit_module import MoEDiffuSeq

    path = Path(path)
    if (path / ".metadata").is_file():
        raise ValueError(f"{path}: a sharded checkpoint folder; merge it into one file first "
                         f"(moe-diffuseq consolidate {path})")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected a checkpoint file (.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    model = MoEDiffuSeq.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    if model.tokenizer is None:
        raise ValueError(f"{path}: {NO_TOKENIZER}")
    return model.eval()
