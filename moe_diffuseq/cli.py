"""The ``moe-diffuseq`` command: one table of verbs.

``fit | validate | test | predict`` are LightningCLI verbs (configs in lightning_configs/);
``generate``, ``evaluate``, ``consolidate`` and ``prepare-data`` are functions of ``commands``,
whose signatures and docstrings make their ``--help``. The sampling options of ``generate`` and
``evaluate`` are ``SamplingConfig``'s fields, declared once there.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Verb:
    """One verb of the command: its one-line help, and the function that runs it (None:
    LightningCLI)."""

    help: str
    function: str | None = None
    """Name of the function in ``moe_diffuseq.commands``."""
    positional: str | None = None
    """The option a bare first argument stands for (``prepare-data code`` is ``--task code``)."""
    samples: bool = False
    """Whether it takes the sampling options."""


VERBS: dict[str, Verb] = {
    "fit": Verb("train a model            "
                "(moe-diffuseq fit --config lightning_configs/quickstart.yaml)"),
    "validate": Verb("run the validation loop  (LightningCLI; --help for its options)"),
    "test": Verb("run the test loop"),
    "predict": Verb("run the predict loop"),
    "generate": Verb("sample targets for sources from a checkpoint "
                     "(jsonl or text lines in, jsonl out)", "generate", samples=True),
    "evaluate": Verb("generate for a jsonl of (src, trg) pairs and score: "
                     "ROUGE, BLEU, dist-n, item F1", "evaluate", samples=True),
    "consolidate": Verb("merge a sharded (FSDP/DCP) checkpoint folder into one loadable file",
                        "consolidate", positional="--checkpoint"),
    "prepare-data": Verb("build a corpus (code, dialogue, scientific) or an exact-answer task "
                         "(code-outline, code-lookup, dialogue-cast)", "prepare_data",
                         positional="--task"),
}


def usage() -> str:
    lines = "".join(f"  {name:<13} {verb.help}\n" for name, verb in VERBS.items())
    return ("usage: moe-diffuseq VERB [options]    (python -m moe_diffuseq VERB ...)\n\n"
            "MoE-DiffuSeq: long-document seq2seq text diffusion.\n\n"
            f"verbs:\n{lines}\nEach verb has --help.\n")


def _callbacks(config, class_name: str) -> list[tuple[int, Mapping]]:
    """(index in trainer.callbacks, init_args) of each ``class_name`` callback the config gives."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    found = []
    for i, callback in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
        path = str(callback.get("class_path", "")) if hasattr(callback, "get") else ""
        if path.endswith(class_name):  # a subclass named after it, too
            found.append((i, callback.get("init_args") or {}))
    return found


def _model_checkpoints(config) -> list[tuple[int, Mapping]]:
    """(index in trainer.callbacks, init_args) of each ModelCheckpoint callback the config gives."""
    return _callbacks(config, "ModelCheckpoint")


def _local(path) -> Path:
    """A configured folder as Lightning reads it: ``~`` expanded."""
    return Path(os.path.expanduser(str(path)))


def _model_checkpoint_dirs(config) -> list[tuple[str, Path]]:
    """(config key, folder) of every ModelCheckpoint callback that names its folder."""
    return [(f"trainer.callbacks[{i}].init_args.dirpath", _local(init_args["dirpath"]))
            for i, init_args in _model_checkpoints(config) if init_args.get("dirpath")]


def _root_dir(config) -> Path:
    """The run's root: ``trainer.default_root_dir``, else the working folder (as Lightning)."""
    return _local((config.get("trainer") or {}).get("default_root_dir") or os.getcwd())


def _checkpoint_dirs(config) -> list[tuple[str, Path]]:
    """(config key, folder) of every place fit will write checkpoints."""
    trainer = config.get("trainer") or {}
    found = _model_checkpoint_dirs(config)
    if trainer.get("default_root_dir"):
        found.append(("trainer.default_root_dir", _local(trainer["default_root_dir"])))
    return found


def check_checkpoint_dirs(config) -> None:
    """Before fit trains: every checkpoint folder can be created and written (else the first
    checkpoint, minutes or hours in, would fail)."""
    for key, folder in _checkpoint_dirs(config):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{key}={folder}: cannot create the checkpoint folder "
                             f"({err.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{key}={folder}: the checkpoint folder is not writable")


def _single_file(path: Path | None) -> Path | None:
    """``path`` if it is one local file; None for a folder (a sharded checkpoint) or nothing."""
    return path if path is not None and path.is_file() else None


def _fixed_version_dir(logger) -> Path | None:
    """The checkpoint folder of a run whose first logger, TensorBoard's or CSV's, fixes its
    version: ``save_dir/name/version/checkpoints``, as Lightning joins it (``~`` is expanded by
    the file system layer it reads through)."""
    first = logger[0] if isinstance(logger, list) and logger else logger
    if not hasattr(first, "get") or not str(first.get("class_path", "")).endswith(
            ("TensorBoardLogger", "CSVLogger")):
        return None
    init_args = first.get("init_args") or {}
    version, save_dir = init_args.get("version"), init_args.get("save_dir")
    if version is None or not save_dir:
        return None
    name = init_args.get("name", "lightning_logs") or ""
    version = version if isinstance(version, str) else f"version_{version}"
    return _local(save_dir) / str(name) / version / "checkpoints"


def _unnamed_checkpoint_dir(config) -> Path | None:
    """Where a ModelCheckpoint without ``dirpath`` (Lightning's default one included) keeps its
    files: ``default_root_dir/checkpoints`` in a run without a logger, the version's folder in
    a run whose logger fixes its version (``_fixed_version_dir``). None in a run whose logger
    starts a new version, whose folder holds no checkpoint yet."""
    trainer = config.get("trainer") or {}
    checkpointers = [init_args for _, init_args in _model_checkpoints(config)]
    unnamed = any(not init_args.get("dirpath") for init_args in checkpointers) or (
        not checkpointers and trainer.get("enable_checkpointing") is not False)
    if not unnamed:
        return None
    logger = trainer.get("logger")
    if logger is False or logger == []:
        return _root_dir(config) / "checkpoints"
    return _fixed_version_dir(logger)


def _on_exception_files(config) -> list[Path]:
    """The files the config's OnExceptionCheckpoint callbacks write when a fit fails."""
    return [_local(init_args["dirpath"]) / f"{init_args.get('filename') or 'on_exception'}.ckpt"
            for _, init_args in _callbacks(config, "OnExceptionCheckpoint")
            if init_args.get("dirpath")]


def _newest_last(config) -> Path | None:
    """What Lightning restores for ``last``: the newest of the ``last*.ckpt``, file or folder,
    in the checkpoint folders (those the config names, and ``_unnamed_checkpoint_dir``) and of
    the OnExceptionCheckpoint files."""
    folders = [folder for _, folder in _model_checkpoint_dirs(config)]
    if (unnamed := _unnamed_checkpoint_dir(config)) is not None:
        folders.append(unnamed)
    candidates = [*(path for folder in folders for path in folder.glob("last*.ckpt")),
                  *_on_exception_files(config)]
    found = [path for path in candidates if path.exists()]  # not a dangling link
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def _highest_hpc(config) -> Path | None:
    """What Lightning restores for ``hpc`` (its checkpoint connector's ``_hpc_resume_path``):
    ``hpc_ckpt_N.ckpt`` with the highest N among the root folder's names holding hpc_ckpt_."""
    root = _root_dir(config)
    numbers = [int(digits) for path in root.glob("*hpc_ckpt_*")
               if (digits := re.sub("[^0-9]", "", path.name.split("hpc_ckpt_")[-1]))]
    return root / f"hpc_ckpt_{max(numbers)}.ckpt" if numbers else None


def restored_checkpoint(config, verb: str = "fit") -> Path | None:
    """The single-file checkpoint ``ckpt_path`` names: a file; ``last``: the newest
    ``last*.ckpt`` in the ModelCheckpoint folders the config names, or OnExceptionCheckpoint
    file; ``hpc`` (or none given, under SLURM): the highest-numbered ``hpc_ckpt_N.ckpt`` in the
    run's root folder; none given to a fit with an OnExceptionCheckpoint: ``last``. None when
    nothing is restored, or when it is not one local file (a sharded folder, a URL): Lightning
    resolves those itself, in the same order."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    given = config.get("ckpt_path")
    if given not in (None, "last", "hpc"):
        return _single_file(Path(given))
    if given == "hpc" or (given is None and SLURMEnvironment.detect()):
        # Under SLURM with none given, Lightning turns to hpc only when such a file exists.
        if (hpc := _highest_hpc(config)) is not None or given == "hpc":
            return _single_file(hpc)
    if given == "last" or (given is None and verb == "fit"
                           and _callbacks(config, "OnExceptionCheckpoint")):
        return _single_file(_newest_last(config))
    return None


def settle_checkpoint_sources(config, verb: str) -> bool:
    """Where the weights and the tokenizer come from, before anything is built. A checkpoint
    that is resumed (fit) or loaded (the other verbs) gives both: the data module reads a
    single-file checkpoint's tokenizer unless ``data.init_args.tokenizer_path`` is set, and
    ``model.init_from`` is not read (its file may be gone; a fit resumed from a sharded folder
    or a URL still reads it), though the saved config keeps it. Else ``model.init_from`` gives
    them to a fit (a tokenizer trained on the long corpus would give other token ids), and the
    other verbs refuse to run from ``init_from`` alone. Returns whether ``init_from`` is to be
    skipped (``MoEDiffuSeq.skip_init_from``)."""
    from .warm_start import check_init_from, init_from_tokenizer

    model = config.get("model")
    init_from = model.get("init_from") if model is not None else None
    restored = restored_checkpoint(config, verb)
    skips_init_from = restored is not None or bool(verb != "fit" and config.get("ckpt_path"))
    if restored is not None:
        tokenizer_source = str(restored)
    elif not init_from or skips_init_from:
        return skips_init_from
    elif verb != "fit":
        raise ValueError(f"model.init_from={init_from} starts a fit only: give --ckpt_path, the "
                         f"checkpoint to {verb}")
    else:
        # Named as model.init_from here, before the data module reads it as a tokenizer.
        tokenizer_source = str(check_init_from(init_from))
    init_args = (config.get("data") or {}).get("init_args")
    if init_args is not None and "tokenizer_path" in init_args \
            and not init_args["tokenizer_path"]:
        if restored is None:  # a bad init_from is named as the option, not as a tokenizer file
            init_from_tokenizer(tokenizer_source)
        init_args["tokenizer_path"] = tokenizer_source
    return skips_init_from


LINKED_BUDGETS = ("max_src_len", "max_trg_len")
"""The data module's length budgets, which the CLI gives the model's network too."""


def check_linked_budgets(config) -> None:
    """A budget given under data is checked there: the model, built first, would name its own
    copy (``network.max_src_len``), a key the config does not set."""
    init_args = (config.get("data") or {}).get("init_args") or {}
    for key in LINKED_BUDGETS:
        value = init_args.get(key)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"data.{key}={value}: must be >= 1")


def _lightning_cli(args: list[str]):
    import jsonargparse

    import data_modules  # noqa: F401  (the CLI is where model and data meet; registers subclasses)
    from moe_diffuseq import MoEDiffuSeq
    from moe_diffuseq.resume_check import ResumeCheckingCLI

    # Attribute docstrings of the config dataclasses become --help text.
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    import lightning.pytorch as pl

    # LightningCLI warns when args are given explicitly and sys.argv also holds arguments;
    # from the console script they are the same list, so let it read sys.argv itself.
    args = None if args == sys.argv[1:] else args
    class CLI(ResumeCheckingCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The data module's budgets are the model's: given once, under data.
            for key in LINKED_BUDGETS:
                parser.link_arguments(f"data.init_args.{key}", f"model.network.{key}")

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            verb = self.config.get("subcommand")
            if verb:
                check_linked_budgets(self.config[verb])
            if verb == "fit":
                check_checkpoint_dirs(self.config["fit"])
            self.skips_init_from = bool(verb) and settle_checkpoint_sources(
                self.config[verb], verb)

        def after_instantiate_classes(self) -> None:
            super().after_instantiate_classes()
            if self.skips_init_from:
                self.model.skip_init_from()

    return CLI(
        MoEDiffuSeq,
        pl.LightningDataModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        # A bad option raises one error (main prints it in a line) instead of a usage dump.
        parser_kwargs={"default_env": False, "exit_on_error": False},
        auto_configure_optimizers=False,
        seed_everything_default=0,
    )


def _own_verb(name: str, args: list[str]) -> None:
    import jsonargparse

    from moe_diffuseq import commands
    from moe_diffuseq.config import SamplingConfig

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    verb = VERBS[name]
    function: Callable = getattr(commands, verb.function)
    if verb.positional and args and not args[0].startswith("-"):
        args = [verb.positional, *args]
    # --max-chars reads as the docs write it; jsonargparse names the option after the argument.
    args = [a.replace("--max-chars", "--max_chars", 1) if a.startswith("--max-chars") else a
            for a in args]
    parser = jsonargparse.ArgumentParser(prog=f"moe-diffuseq {name}",
                                         description=function.__doc__.split("\n")[0],
                                         default_env=False, exit_on_error=False)
    parser.add_function_arguments(function, nested_key=None, skip={"sampling"})
    sampling = [f.name for f in fields(SamplingConfig)]
    if verb.samples:
        # Unset (None) means the checkpoint's own setting; the help text is SamplingConfig's.
        parser.add_class_arguments(SamplingConfig, nested_key=None, as_group=True)
        parser.set_defaults({key: None for key in sampling})
    try:
        given = parser.parse_args(args).as_dict()
    except jsonargparse.ArgumentError as err:  # one line, not the usage dump before it
        raise SystemExit(f"error: moe-diffuseq {name}: {' '.join(str(err).split())} "
                         "(see --help)") from None
    if verb.samples:
        # Unset ones are None: generation.sampling_settings keeps the checkpoint's value for them.
        given["sampling"] = {key: given.pop(key) for key in sampling}
    function(**given)


def main(args: list[str] | None = None) -> None:
    from jsonargparse import ArgumentError

    from .allocator import tune_cpu_allocator
    from .config import config_error_behind

    tune_cpu_allocator()  # recycled pages instead of page faults every step (see allocator.py)
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    name = args[0]
    if name not in VERBS:
        raise SystemExit(f"error: unknown verb {name!r}; run moe-diffuseq --help")
    from data_modules.corpora.errors import CorpusUnavailable  # after --help, which needs none

    try:
        if VERBS[name].function is None:
            _lightning_cli(args)
        else:
            _own_verb(name, args[1:])
    except (ValueError, FileNotFoundError, FloatingPointError, ArgumentError,
            CorpusUnavailable) as err:
        # Expected faults (a bad value, row, file or checkpoint; a run of non-finite losses; a
        # corpus that cannot be fetched) name what is at fault in their message: one line, not
        # a traceback. MOE_DIFFUSEQ_DEBUG=1 shows the traceback.
        if os.environ.get("MOE_DIFFUSEQ_DEBUG") == "1":
            raise
        raise SystemExit(f"error: {' '.join(str(config_error_behind(err)).split())}") from None

