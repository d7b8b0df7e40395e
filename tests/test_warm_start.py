"""Warm start (``model.init_from``): a run starts from another checkpoint's weights, with a longer
source budget, through the real CLI; and the errors that name what does not fit."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import data_args

from data_modules.tokenization import load_tokenizer, train_tokenizer
from moe_diffuseq.checkpoint import TOKENIZER_KEY
from moe_diffuseq.cli import main
from moe_diffuseq.warm_start import WarmStart, copy_weights, sampling_weights

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def without_tokenizer(corpus: Path, tokenizer: Path) -> list[str]:
    return [a for a in data_args(corpus, tokenizer) if "tokenizer_path" not in a]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, small_corpus, small_tokenizer_file) -> Path:
    """A tiny model trained 3 steps on sources of 24 tokens: the checkpoint the tests start from."""
    root = tmp_path_factory.mktemp("short")
    main(["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
          f"--trainer.default_root_dir={root}", "--trainer.max_steps=3"])
    (ckpt,) = root.rglob("*.ckpt")
    return ckpt


def test_fit_starts_from_a_shorter_checkpoint_and_its_tokenizer(short_run, small_corpus,
                                                                small_tokenizer_file, tmp_path,
                                                                caplog):
    # lr 0: the one step changes nothing, so the saved weights are the ones the run started from.
    data_dir = tmp_path / "work"
    main(["fit", "--config", str(TINY), *without_tokenizer(small_corpus, small_tokenizer_file),
          f"--data.init_args.data_dir={data_dir}", "--data.init_args.max_src_len=40",
          f"--model.init_from={short_run}", "--model.lr=0",
          f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
          "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
          f"--trainer.callbacks.dirpath={tmp_path / 'ck'}",
          "--trainer.callbacks.every_n_train_steps=1"])
    (ckpt,) = (tmp_path / "ck").glob("*.ckpt")
    assert f"warm start from model.init_from={short_run}: " in caplog.text
    there, here = map(int, re.search(r"position.weight (\d+) -> (\d+) rows", caplog.text).groups())
    assert here - there == 40 - 24  # the source budget's growth
    before = torch.load(short_run, map_location="cpu", weights_only=True)
    after = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert after["global_step"] == 1  # a fresh run, not a resume of the 3-step one
    assert after[TOKENIZER_KEY] == before[TOKENIZER_KEY]
    assert not list(data_dir.rglob("tokenizer-*.json"))  # no tokenizer trained for this run
    started = sampling_weights(before["state_dict"])  # the source's EMA weights
    for prefix in ("denoiser.", "ema."):
        for key, value in started.items():
            new = after["state_dict"][prefix + key]
            if key == "position.weight":  # 24 + 17 rows there, 40 + 17 here
                assert new.shape[0] > value.shape[0]
                torch.testing.assert_close(new[: len(value)], value, rtol=0, atol=0)
                assert not torch.equal(new[len(value):], torch.zeros_like(new[len(value):]))
            else:
                torch.testing.assert_close(new, value, rtol=0, atol=0, msg=key)


def test_a_warm_start_is_refused_on_a_model_already_sharded():
    """Weights copied into shards would land in the wrong places: a model that an earlier fit
    sharded (FSDP2) asks for a new MoEDiffuSeq instead. The CLI never gets here (each fit builds
    its model); a script that fits one model twice does."""
    from moe_diffuseq import MoEDiffuSeq

    model = MoEDiffuSeq(network={"vocab_size": 40, "max_src_len": 8, "max_trg_len": 6,
                                 "embed_dim": 8, "hidden_size": 16, "num_layers": 1,
                                 "num_heads": 2})
    model.configure_model()
    model._sharded = True  # what configure_model records after fully_shard
    model._warm_start = WarmStart("model.init_from=short.ckpt", {}, None, {})
    with pytest.raises(RuntimeError, match="sharded by an earlier run of the Trainer"):
        model.configure_model()


def test_position_tables_grow_or_shrink_and_nothing_else_resizes():
    from moe_diffuseq.config import NetworkConfig, to_plain
    from moe_diffuseq.denoiser import Denoiser

    def net(src: int, hidden: int = 16) -> Denoiser:
        torch.manual_seed(src + hidden)
        return Denoiser(NetworkConfig(vocab_size=40, max_src_len=src, max_trg_len=6, embed_dim=8,
                                      hidden_size=hidden, num_heads=2, num_layers=1))

    short, long = net(10), net(30)
    start = WarmStart("the short one", short.state_dict(), None, to_plain(short.config))
    init = long.position.weight.detach().clone()
    resized = copy_weights(long, start, to_plain(long.config))
    assert resized == {"position.weight": (short.max_length, long.max_length)}
    rows = short.max_length
    assert torch.equal(long.position.weight[:rows], short.position.weight)
    assert torch.equal(long.position.weight[rows:], init[rows:])  # new rows keep their init
    assert torch.equal(long.blocks[0].attn.qkv.weight, short.blocks[0].attn.qkv.weight)
    back = net(10)
    copy_weights(back, WarmStart("the long one", long.state_dict(), None, {}), {})
    assert torch.equal(back.position.weight, long.position.weight[:rows])
    wide = net(10, hidden=24)
    with pytest.raises(ValueError, match=r"the short one: .* has shape .*16.* there and .*24.* "
                                         r"here \(network settings that differ: hidden_size: "
                                         r"16 -> 24\)"):
        copy_weights(wide, start, to_plain(wide.config))


def test_init_from_faults_are_one_line_naming_the_file(short_run, small_corpus,
                                                       small_tokenizer_file, tmp_path):
    base = ["fit", "--config", str(TINY), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=1"]
    missing = tmp_path / "nowhere.ckpt"
    # Without tokenizer_path too (the README's way), before the data module reads the file.
    for data in (data_args(small_corpus, small_tokenizer_file),
                 without_tokenizer(small_corpus, small_tokenizer_file)):
        with pytest.raises(SystemExit, match=rf"model.init_from={missing}: no such checkpoint"):
            main([*base, *data, f"--model.init_from={missing}"])
        with pytest.raises(SystemExit, match=rf"model.init_from={tmp_path}: a sharded checkpoint "
                                             r"folder; merge it .*consolidate"):
            main([*base, *data, f"--model.init_from={tmp_path}"])
    with pytest.raises(SystemExit, match=rf"model.init_from={short_run}: "
                                         r"diffusion.soft_absorbing is True there and False here"):
        main([*base, *without_tokenizer(small_corpus, small_tokenizer_file),
              f"--model.init_from={short_run}", "--model.diffusion.soft_absorbing=false"])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 64)
    for data in (data_args(small_corpus, small_tokenizer_file),
                 without_tokenizer(small_corpus, small_tokenizer_file)):  # read as the tokenizer
        with pytest.raises(SystemExit, match=rf"model.init_from={garbage}: not a MoE-DiffuSeq"):
            main([*base, *data, f"--model.init_from={garbage}"])
    with pytest.raises(SystemExit, match=r"network settings that differ: .*hidden_size: 32 -> 48"):
        main([*base, *without_tokenizer(small_corpus, small_tokenizer_file),
              f"--model.init_from={short_run}", "--model.network.hidden_size=48"])
    # A tokenizer given explicitly that is not the checkpoint's: token ids would mean other words.
    texts = [line for line in (small_corpus / "train.jsonl").read_text().splitlines()[:50]]
    other = tmp_path / "other.json"
    train_tokenizer(texts, vocab_size=300).save(str(other))
    with pytest.raises(SystemExit, match=rf"its tokenizer differs from the data module's; give "
                                         rf"data.init_args.tokenizer_path={short_run}"):
        main([*base, *data_args(small_corpus, other), f"--model.init_from={short_run}"])


def test_a_checkpoint_is_a_tokenizer_path(short_run, small_tokenizer_file):
    assert load_tokenizer(short_run).to_str() == load_tokenizer(small_tokenizer_file).to_str()


@pytest.mark.parametrize("resume", ["file", "last"])
def test_a_warm_started_run_resumes_without_its_starting_checkpoint(resume, short_run,
                                                                    small_corpus,
                                                                    small_tokenizer_file,
                                                                    tmp_path):
    start = tmp_path / "start.ckpt"
    start.write_bytes(short_run.read_bytes())
    args = ["fit", "--config", str(TINY), *without_tokenizer(small_corpus, small_tokenizer_file),
            f"--data.init_args.data_dir={tmp_path / 'work'}", "--data.init_args.max_src_len=40",
            f"--model.init_from={start}", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'ck'}",
            "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.save_last=true"]
    main([*args, "--trainer.max_steps=1"])
    first = tmp_path / "ck" / "epoch=0-step=1.ckpt"
    start.unlink()  # the resume reads its own checkpoint, weights and tokenizer
    main([*args, "--trainer.max_steps=2",
          f"--ckpt_path={first if resume == 'file' else 'last'}"])
    steps = {torch.load(c, map_location="cpu", weights_only=True)["global_step"]
             for c in (tmp_path / "ck").glob("epoch=*.ckpt")}
    assert steps == {1, 2}
    assert not list((tmp_path / "work").rglob("tokenizer-*.json"))
    # The resumed run's saved config still says where its first weights came from.
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["ckpt_path"] == (str(first) if resume == "file" else "last")
    assert saved["model"]["init_from"] == str(start)


def test_a_warm_started_run_resumes_last_from_lightnings_own_folder(short_run, small_corpus,
                                                                  small_tokenizer_file, tmp_path):
    """A ModelCheckpoint without dirpath in a run without a logger writes to
    default_root_dir/checkpoints; ``last`` is found there, so init_from is not read."""
    start = tmp_path / "start.ckpt"
    start.write_bytes(short_run.read_bytes())
    args = ["fit", "--config", str(TINY), *without_tokenizer(small_corpus, small_tokenizer_file),
            f"--data.init_args.data_dir={tmp_path / 'work'}", f"--model.init_from={start}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.save_last=true"]
    main([*args, "--trainer.max_steps=1"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    start.unlink()  # read, it would fail: the resume takes last.ckpt's weights and tokenizer
    main([*args, "--trainer.max_steps=2", "--ckpt_path=last"])
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert last["global_step"] == 2


def test_a_loaded_warm_started_model_keeps_its_weights_in_a_new_fit(short_run, small_corpus,
                                                                    small_tokenizer_file,
                                                                    tmp_path):
    """A script that loads a checkpoint written by a warm-started run and fits it further trains
    the loaded weights, not init_from's again."""
    import lightning.pytorch as pl

    from data_modules import Seq2SeqDataModule
    from moe_diffuseq import MoEDiffuSeq
    from moe_diffuseq.checkpoint import load_checkpoint

    main(["fit", "--config", str(TINY), *data_args(small_corpus, small_tokenizer_file),
          f"--model.init_from={short_run}", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.max_steps=3"])
    (warm,) = tmp_path.rglob("*.ckpt")
    model = load_checkpoint(warm).train()
    assert model.hparams.init_from == str(short_run)
    loaded = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    model.hparams.lr = 0.0
    data = Seq2SeqDataModule(train_path=str(small_corpus / "train.jsonl"),
                             val_path=str(small_corpus / "validation.jsonl"),
                             tokenizer_path=str(small_tokenizer_file), max_src_len=24,
                             max_trg_len=16, batch_size=4, data_dir=str(tmp_path / "work"))
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, limit_val_batches=0).fit(model, data)
    for key, value in model.denoiser.state_dict().items():
        torch.testing.assert_close(value, loaded[key], rtol=0, atol=0, msg=key)
    # The same with the weights given by load_state_dict to a model built from the hparams.
    fresh = MoEDiffuSeq(**{**model.hparams, "lr": 0.0})
    fresh.set_tokenizer(model.tokenizer)
    fresh.load_state_dict(model.state_dict())
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, limit_val_batches=0).fit(fresh, data)
    for key, value in fresh.denoiser.state_dict().items():
        torch.testing.assert_close(value, loaded[key], rtol=0, atol=0, msg=key)


def test_the_other_verbs_read_their_checkpoint_not_init_from(short_run, small_corpus,
                                                             small_tokenizer_file, tmp_path):
    args = ["--config", str(TINY), *without_tokenizer(small_corpus, small_tokenizer_file),
            f"--data.init_args.data_dir={tmp_path / 'work'}", f"--model.init_from={short_run}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_test_batches=1"]
    with pytest.raises(SystemExit, match=rf"model.init_from={short_run} starts a fit only: give "
                                         r"--ckpt_path, the checkpoint to test"):
        main(["test", *args])
    main(["test", *args, f"--ckpt_path={short_run}"])  # its tokenizer, not one trained here
    assert not list((tmp_path / "work").rglob("tokenizer-*.json"))


def test_restored_checkpoint_resolves_a_file_last_and_hpc_never_a_folder(tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from moe_diffuseq.cli import restored_checkpoint

    folder = tmp_path / "ck"
    folder.mkdir()
    trainer = {"default_root_dir": str(tmp_path), "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(folder)}}]}
    last = folder / "last.ckpt"
    last.write_bytes(b"one file")
    sharded = folder / "last-v1.ckpt"
    sharded.mkdir()  # a sharded checkpoint is a folder: Lightning reads it, not the CLI
    os.utime(last, (2, 2))
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": "last"}) is None  # the folder
    os.utime(sharded, (1, 1))
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": "last"}) == last
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": str(last)}) == last
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": str(sharded)}) is None
    # Lightning resumes the highest number, whatever the files' times say.
    low, high = tmp_path / "hpc_ckpt_9.ckpt", tmp_path / "hpc_ckpt_10.ckpt"
    for mtime, file in enumerate((high, low), 1):
        file.write_bytes(b"hpc")
        os.utime(file, (mtime, mtime))
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": "hpc"}) == high
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": None}) is None  # not under SLURM
    monkeypatch.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": None}) == high  # a requeued job
    high.unlink()
    high.mkdir()  # the highest is sharded: Lightning reads it
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": "hpc"}) is None
    (folder / "last-v2.ckpt").symlink_to(tmp_path / "gone.ckpt")  # a dangling link is skipped
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": "last"}) == last
    # Without dirpath and without a logger, Lightning's folder; with a logger, a new version's.
    own = tmp_path / "checkpoints" / "last.ckpt"
    own.parent.mkdir()
    own.write_bytes(b"one file")
    for callbacks in ([], [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]):
        unnamed = {"default_root_dir": str(tmp_path), "logger": False, "callbacks": callbacks}
        assert restored_checkpoint({"trainer": unnamed, "ckpt_path": "last"}) == own
        logged = {**unnamed, "logger": None}
        assert restored_checkpoint({"trainer": logged, "ckpt_path": "last"}) is None


def _lightnings_restore(trainer_args: dict, given: str | None) -> Path | None:
    """What a real Trainer built from ``trainer_args`` restores in a fit given ``given``."""
    import importlib

    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn

    def build(spec: dict):
        module, name = spec["class_path"].rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))

    logger = trainer_args.get("logger", False)
    trainer = pl.Trainer(default_root_dir=trainer_args["default_root_dir"],
                         logger=build(logger) if isinstance(logger, dict) else logger,
                         callbacks=[build(c) for c in trainer_args.get("callbacks", [])],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.state.fn = TrainerFn.FITTING
    path = trainer._checkpoint_connector._parse_ckpt_path(
        TrainerFn.FITTING, given, model_provided=True, model_connected=False)
    return Path(os.path.expanduser(path)) if path is not None else None  # as fsspec reads it


@pytest.mark.filterwarnings("ignore:.*(no last checkpoint|ckpt_path=None).*")
def test_restored_checkpoint_agrees_with_lightning_on_home_and_on_exception_files(
        tmp_path, monkeypatch):
    """``~`` in dirpath and default_root_dir is the home folder; an OnExceptionCheckpoint's file
    is a ``last`` candidate, and a fit given no ckpt_path with one configured restores ``last``:
    each held against what Lightning's own Trainer resolves."""
    from moe_diffuseq.cli import check_checkpoint_dirs, restored_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    saved, crashed = tmp_path / "ck" / "last.ckpt", tmp_path / "crash" / "failed.ckpt"
    for file, mtime in ((saved, 1), (crashed, 2)):
        file.parent.mkdir()
        file.write_bytes(b"one file")
        os.utime(file, (mtime, mtime))
    model_checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"dirpath": "~/ck"}}
    on_exception = {"class_path": "lightning.pytorch.callbacks.OnExceptionCheckpoint",
                    "init_args": {"dirpath": "~/crash", "filename": "failed"}}
    cases = [([model_checkpoint], "last", saved), ([model_checkpoint], None, None),
             ([model_checkpoint, on_exception], "last", crashed),
             ([model_checkpoint, on_exception], None, crashed)]
    for callbacks, given, expected in cases:
        trainer = {"default_root_dir": "~/root", "logger": False, "callbacks": callbacks}
        assert _lightnings_restore(trainer, given) == expected, (callbacks, given)
        assert restored_checkpoint({"trainer": trainer, "ckpt_path": given}) == expected
    # A fit only: the other verbs given no ckpt_path test the model they were given.
    trainer = {"default_root_dir": "~/root", "callbacks": [model_checkpoint, on_exception]}
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": None}, "validate") is None
    os.utime(saved, (3, 3))
    assert restored_checkpoint({"trainer": trainer, "ckpt_path": None}) == saved
    check_checkpoint_dirs({"trainer": trainer})
    assert (tmp_path / "root").is_dir() and not (tmp_path / "cwd" / "~").exists()


@pytest.mark.filterwarnings("ignore:.*no last checkpoint.*")
def test_restored_checkpoint_agrees_with_lightning_on_a_logger_version_folder(tmp_path,
                                                                              monkeypatch):
    """A ModelCheckpoint without dirpath writes into its logger's version folder: ``last`` is
    found there when the config fixes the version, and not in a logger's new version."""
    from moe_diffuseq.cli import restored_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    unnamed = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True}}]
    loggers = [("lightning.pytorch.loggers.TensorBoardLogger", {"name": "logs", "version": "run1"},
                "logs/run1"),
               ("lightning.pytorch.loggers.CSVLogger", {"name": "", "version": 3}, "version_3"),
               ("lightning.pytorch.loggers.CSVLogger", {"name": "home", "version": 1,
                                                        "save_dir": "~/logs_root"},
                "home/version_1"),
               ("lightning.pytorch.loggers.TensorBoardLogger", {}, None)]  # a new version
    for class_path, init_args, folder in loggers:
        if folder is not None:
            last = tmp_path / "logs_root" / folder / "checkpoints" / "last.ckpt"
            last.parent.mkdir(parents=True)
            last.write_bytes(b"one file")
        logger = {"class_path": class_path,
                  "init_args": {"save_dir": "logs_root", **init_args}}
        trainer = {"default_root_dir": str(tmp_path), "logger": logger, "callbacks": unnamed}
        expected = tmp_path / "logs_root" / folder / "checkpoints" / "last.ckpt" if folder else None
        assert _lightnings_restore(trainer, "last") == expected, logger
        ours = restored_checkpoint({"trainer": trainer, "ckpt_path": "last"})
        assert (ours.resolve() if ours else None) == expected, logger


def test_checkpoint_sources_without_init_from_and_with_a_sharded_checkpoint(tmp_path):
    from moe_diffuseq.cli import settle_checkpoint_sources

    resumed = tmp_path / "resumed.ckpt"
    resumed.write_bytes(b"one file")
    plain = {"model": {"init_from": None}, "ckpt_path": str(resumed),
             "data": {"init_args": {"tokenizer_path": None}}}
    assert settle_checkpoint_sources(plain, "fit")  # a plain resume reads its own tokenizer
    assert plain["data"]["init_args"]["tokenizer_path"] == str(resumed)
    given = {"model": {"init_from": None}, "ckpt_path": str(resumed),
             "data": {"init_args": {"tokenizer_path": "mine.json"}}}
    assert settle_checkpoint_sources(given, "validate")
    assert given["data"]["init_args"]["tokenizer_path"] == "mine.json"
    sharded = {"model": {"init_from": "short.ckpt"}, "ckpt_path": str(tmp_path),
               "data": {"init_args": {"tokenizer_path": None}}}
    # Loads the folder: init_from is neither asked for nor read, and the config keeps it.
    assert settle_checkpoint_sources(sharded, "test")
    assert sharded["model"]["init_from"] == "short.ckpt"
    assert sharded["data"]["init_args"]["tokenizer_path"] is None
