"""Seq2SeqDataModule: (source, target) text pairs from files through ``datasets``."""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, IterableDataset

from moe_diffuseq.batch import SPECIAL_TOKENS

from .corpora import build, is_built, resolve
from .pairs import LoadedBatch, PairDataset, ResumableRandomSampler, StreamingPairs, collate_rows
from .rows import RowFilter, load_rows, scan_jsonl
from .tokenization import has_word_starts, load_tokenizer, train_tokenizer

# A byte-level BPE holds every byte and the special tokens before any merge.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

log = logging.getLogger(__name__)

class Seq2SeqDataModule(pl.LightningDataModule):
    """Pairs of (source, target) texts from jsonl/json/parquet/csv/text files.

    Args:
        train_path: Training file, glob or hub dataset ``hub:NAME[:SPLIT]``. None with ``corpus``
            set: ``data_dir/<corpus>/train.jsonl``.
        val_path: Validation file or glob (same default rule, ``validation.jsonl``).
        test_path: Test file or glob (same default rule, ``test.jsonl``).
        corpus: Name of a built-in corpus (code, dialogue, scientific) or exact-answer task
            (code-outline, code-lookup, dialogue-cast; ``code-outline-4000`` for sources of up to
            4000 characters) that ``prepare_data`` builds when missing.
        data_dir: Where built corpora, the tokenizer and caches live.
        src_key: Column with the source text ("" for unconditional modelling: empty source).
        trg_key: Column with the target text.
        max_src_len: Source token budget (longer sources are truncated).
        max_trg_len: Target token budget (longer targets are truncated).
        batch_size: Examples per batch on each device.
        num_workers: DataLoader workers.
        streaming: Stream the files instead of loading them into memory.
        shuffle_buffer: Buffer size of the streaming shuffle (0: read in file order).
        tokenizer_path: A tokenizer.json, or a checkpoint whose tokenizer to use; None trains one
            on the training split and caches it as
            ``data_dir/<corpus or 'custom'>/tokenizer-<tokenizer_vocab_size>.json``.
        tokenizer_vocab_size: Vocabulary size when training a tokenizer (a given tokenizer_path
            keeps its own).
        tokenizer_train_rows: Training rows the tokenizer is trained on (None: all).
        tokenizer_word_starts: Train the tokenizer with a space before every line, so that a word
            is the same token at a line's start and after a space and answers can copy source
            tokens. False trains plain byte-level BPE (cached as ``tokenizer-plain-<vocab>.json``).
        on_bad_row: "raise" names the file and row of a bad row; "skip" counts and logs them.
        on_too_long: A pair longer than a budget is truncated (and counted), skipped (and
            counted) or an error naming the example.
        length_bucketing: Batch training examples of similar length together (map-style
            data), which cuts padding; the order stays random across batches.
        seed: Seed of the shuffling.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        corpus: str | None = None,
        data_dir: str = "data",
        src_key: str = "src",
        trg_key: str = "trg",
        max_src_len: int = 256,
        max_trg_len: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        tokenizer_path: str | None = None,
        tokenizer_vocab_size: int = 8192,
        tokenizer_train_rows: int | None = 20000,
        tokenizer_word_starts: bool = True,
        on_bad_row: Literal["raise", "skip"] = "raise",
        on_too_long: Literal["truncate", "skip", "raise"] = "truncate",
        length_bucketing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if corpus is not None:
            try:
                resolve(corpus)
            except ValueError as err:
                raise ValueError(f"data.corpus: {err}") from None
        if corpus is None and train_path is None and tokenizer_path is None:
            raise ValueError("data: give train_path (or corpus) so a tokenizer can be trained, "
                             "or tokenizer_path")
        for key, value in (("max_src_len", max_src_len), ("max_trg_len", max_trg_len),
                           ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"data.{key}={value}: must be >= 1")
        for key, value in (("num_workers", num_workers), ("shuffle_buffer", shuffle_buffer)):
            if value < 0:
                raise ValueError(f"data.{key}={value}: must be >= 0")
        if tokenizer_vocab_size < MIN_VOCAB:
            raise ValueError(f"data.tokenizer_vocab_size={tokenizer_vocab_size}: must be >= "
                             f"{MIN_VOCAB} (256 bytes, {len(SPECIAL_TOKENS)} special tokens)")
        if tokenizer_train_rows is not None and tokenizer_train_rows < 1:
            raise ValueError(f"data.tokenizer_train_rows={tokenizer_train_rows}: must be >= 1, "
                             "or null for every row")
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"data.on_bad_row={on_bad_row!r}: expected raise or skip")
        if on_too_long not in ("truncate", "skip", "raise"):
            raise ValueError(f"data.on_too_long={on_too_long!r}: expected truncate, skip or raise")
        self.save_hyperparameters()
        corpus_dir = Path(data_dir) / (corpus or "custom")
        self.corpus_dir = corpus_dir
        self.paths = {
            "train": train_path or (str(corpus_dir / "train.jsonl") if corpus else None),
            "validation": val_path or (str(corpus_dir / "validation.jsonl") if corpus else None),
            "test": test_path or (str(corpus_dir / "test.jsonl") if corpus else None),
        }
        kind = "" if tokenizer_word_starts else "plain-"
        cache_name = f"tokenizer-{kind}{tokenizer_vocab_size}.json"
        self.tokenizer_file = Path(tokenizer_path) if tokenizer_path else corpus_dir / cache_name
        self.max_src_len = max_src_len
        self.max_trg_len = max_trg_len
        self.tokenizer = None
        self.datasets: dict[str, Dataset] = {}
        self._resume: dict[str, Any] = {}  # data position restored from a checkpoint
        # the trainer's own reload_dataloaders_every_n_epochs
        self._reload_setting: int | None = None
        # (epoch, batches consumed) of a stream
        self._stream_position: tuple[int, int] | None = None
        self._train_sampler: ResumableRandomSampler | None = None
        self._consumed = 0  # training examples read in the current epoch (this rank)
        self._consumed_epoch = 0  # the epoch that _consumed counts
        self.skipped: Counter[str] = Counter()  # rows/lines left out, per reason
        self.truncated: Counter[str] = Counter()  # examples cut or dropped by the budgets

    # --------------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        """Build the corpus and train the tokenizer if missing (rank 0 only)."""
        hp = self.hparams
        if hp.corpus is not None and not is_built(hp.corpus, self.corpus_dir):
            log.info("building the %s corpus in %s", hp.corpus, self.corpus_dir)
            counts = build(hp.corpus, self.corpus_dir)
            # build() removed the tokenizers cached from the old corpus
            log.info("built %s", counts)
        if not self.tokenizer_file.exists():
            if hp.tokenizer_path:
                raise FileNotFoundError(f"data.tokenizer_path={hp.tokenizer_path}: no such file")
            self._train_tokenizer()
        elif self._is_stale_cache(load_tokenizer(self.tokenizer_file)):
            log.info("retraining %s: cached before word-start spaces", self.tokenizer_file)
            self._train_tokenizer()

    def _is_stale_cache(self, tokenizer: Tokenizer) -> bool:
        """Whether ``tokenizer`` is our own word-start cache written before word-start spaces
        existed (a given ``tokenizer_path`` is used as it is)."""
        hp = self.hparams
        return not hp.tokenizer_path and hp.tokenizer_word_starts and not has_word_starts(tokenizer)

    def _train_tokenizer(self) -> None:
        hp = self.hparams
        # A local jsonl is checked line by line first, as setup() reads it (errors name lines).
        readable, _ = self._checked(self.paths["train"])
        table = load_rows(readable, streaming=True, cache_dir=None)
        limit = hp.tokenizer_train_rows

        def texts():
            for i, row in enumerate(table):
                if limit is not None and i >= limit:
                    break
                for key in (hp.src_key, hp.trg_key):
                    value = row.get(key) if key else None
                    if isinstance(value, str) and value:
                        yield value

        tokenizer = train_tokenizer(texts(), hp.tokenizer_vocab_size,
                                    word_starts=hp.tokenizer_word_starts)
        self.tokenizer_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tokenizer_file.with_suffix(".tmp")
        tokenizer.save(str(tmp))
        os.replace(tmp, self.tokenizer_file)  # atomic: other ranks never read half a file

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            exists = self.tokenizer_file.exists()
            tokenizer = load_tokenizer(self.tokenizer_file) if exists else None
            if tokenizer is None or self._is_stale_cache(tokenizer):
                self.prepare_data()  # e.g. setup() called by a script without a Trainer
                tokenizer = load_tokenizer(self.tokenizer_file)
            self.tokenizer = tokenizer
        wanted = {"fit": ("train", "validation"), "validate": ("validation",),
                  "test": ("test",)}.get(stage or "fit", ("train", "validation", "test"))
        for split in wanted:
            if split not in self.datasets and self.paths.get(split):
                self.datasets[split] = self._dataset(split)

    def _dataset(self, split: str) -> Dataset:
        hp = self.hparams
        path = self.paths[split]
        row_filter = RowFilter(hp.src_key, hp.trg_key, hp.on_bad_row, path)
        cache = str(Path(hp.data_dir) / ".hf_cache")
        if hp.streaming:
            rank, world = ((self.trainer.global_rank, self.trainer.world_size) if self.trainer
                           else (0, 1))
            seed = hp.seed if split == "train" else None
            return StreamingPairs(load_rows(path, True, cache), row_filter, path, rank, world, seed,
                                  hp.shuffle_buffer)
        readable, lines = self._checked(path, count=True)
        dataset = PairDataset(load_rows(readable, False, cache), row_filter, path, lines)
        self.skipped.update(row_filter.skipped)
        return dataset

    def _checked(self, path: str, count: bool = False) -> tuple[str, list[int] | None]:
        """A local jsonl file checked line by line (``rows.scan_jsonl``): the path to read (a
        cleaned copy when lines were skipped) and each row's line number; other paths as they
        are. ``count``: add the skipped lines to ``self.skipped``."""
        if not (path.lower().endswith(".jsonl") and Path(path).is_file()) or self.hparams.streaming:
            return path, None
        cache = Path(self.hparams.data_dir) / ".hf_cache" / "clean"
        readable, bad_lines, lines = scan_jsonl(path, self.hparams.on_bad_row, cache)
        if count:
            self.skipped.update(bad_lines)
        return readable, lines

    # --------------------------------------------------------------- loading
    def collate(self, items: list[tuple[str, str, str]],
                stream: StreamingPairs | None = None) -> LoadedBatch:
        """Tokenize and collate (example id, source, target) items under this module's budgets.
        A stream's rows skipped since the last batch ride along, to be counted in this process."""
        batch = collate_rows(items, self.tokenizer, self.max_src_len, self.max_trg_len,
                             self.hparams.on_too_long, stream)
        worker = torch.utils.data.get_worker_info()
        reader = stream if worker is None else worker.dataset  # a worker filters its own copy
        if isinstance(reader, StreamingPairs) and reader.row_filter.skipped:
            batch.skipped_rows = dict(reader.row_filter.skipped)
            reader.row_filter.skipped.clear()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the current epoch, for mid-epoch resume: the sampler's
        position (map-style data) or the stream's epoch and batches consumed (streaming,
        num_workers=0; every rank consumes as many batches, each of batch_size pairs read)."""
        if self._stream_position is not None:
            epoch, batches = self._stream_position
            return {"stream_epoch": epoch, "stream_batches": batches}
        sampler = self._train_sampler
        if sampler is None:
            return {}
        world = self.trainer.world_size if self.trainer is not None else 1
        return {"epoch": sampler.epoch, "consumed": self._consumed * world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def on_after_batch_transfer(self, batch: LoadedBatch, dataloader_idx: int) -> LoadedBatch:
        # Runs in the main process (collation may run in workers), so the counts add up here.
        if self.trainer is not None and self.trainer.training:
            if batch.stream_epoch is not None:
                epoch, batches = self._stream_position or (batch.stream_epoch, 0)
                self._stream_position = (batch.stream_epoch,
                                         batches + 1 if epoch == batch.stream_epoch else 1)
            sampler = self._train_sampler
            if sampler is not None:
                if sampler.epoch != self._consumed_epoch:  # a new epoch: count from its start
                    self._consumed, self._consumed_epoch = 0, sampler.epoch
                self._consumed += len(batch) + int(batch.dropped.sum())
            self.truncated["source truncated"] += int(batch.src_truncated.sum())
            self.truncated["target truncated"] += int(batch.trg_truncated.sum())
            self.truncated["too long, skipped"] += int(batch.dropped.sum())
            self.skipped.update(batch.skipped_rows)
        return batch

    def report(self) -> dict[str, int]:
        """Counts of rows skipped (per reason) and of examples cut by the budgets: of every
        split as loaded (map-style data), of this process's training batches (a stream, read as
        it trains: this rank's part, its rows skipped after the last batch counted with the next
        epoch's first)."""
        return {**{f"skipped: {k}": v for k, v in self.skipped.items()},
                **{k: v for k, v in self.truncated.items() if v}}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(
                f"no {split} data: set data."
                f"{ {'train': 'train_path', 'validation': 'val_path', 'test': 'test_path'}[split]}")
        dataset = self.datasets[split]
        if split == "train" and isinstance(dataset, StreamingPairs):
            if "stream_epoch" in self._resume:
                self._stream_position = (self._resume.pop("stream_epoch"),
                                         self._resume.pop("stream_batches"))
                dataset.resume(self._stream_position[0],
                               self._stream_position[1] * self.hparams.batch_size)
            else:
                dataset.set_epoch(getattr(self.trainer, "current_epoch", 0))
        # The training stream's position is tracked where collation sees it: in this process.
        tracked = (dataset if split == "train" and isinstance(dataset, StreamingPairs)
                   and self.hparams.num_workers == 0 else None)
        sampler = None
        if shuffle and not isinstance(dataset, IterableDataset):
            # The target region has a fixed size: only the source length varies the padding.
            lengths = ([len(src) for _, src, _ in dataset.items] if self.hparams.length_bucketing
                       else None)
            rank, world = ((self.trainer.global_rank, self.trainer.world_size)
                           if self.trainer is not None else (0, 1))
            sampler = self._train_sampler = ResumableRandomSampler(
                len(dataset), self.hparams.seed, lengths=lengths,
                batch_size=self.hparams.batch_size, rank=rank, world=world,
            )
            current = self.trainer.current_epoch if self.trainer is not None else 0
            sampler.epoch, sampler.start = (self._resume.get("epoch", current),
                                            self._resume.get("consumed", 0))
            # _consumed counts this rank's examples; the saved position counts every rank's.
            self._consumed, self._consumed_epoch = sampler.start // world, sampler.epoch
            self._resume = {}
            self._reload_after_partial_epoch(sampler.start > 0)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            # DataLoader workers are seeded from this generator, not from the global one
            generator=torch.Generator().manual_seed(self.hparams.seed),
            num_workers=self.hparams.num_workers,
            collate_fn=functools.partial(self.collate, stream=tracked),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _reload_after_partial_epoch(self, partial: bool) -> None:
        """Lightning fixes an epoch's length from the loader's ``len`` when it is built. A loader
        resumed mid-epoch is shorter, so ask for a new one at the next epoch (its full length),
        then put the trainer's setting back."""
        if self.trainer is None:
            return
        if partial:
            self._reload_setting = self.trainer.reload_dataloaders_every_n_epochs
            self.trainer.reload_dataloaders_every_n_epochs = 1
        elif self._reload_setting is not None:
            self.trainer.reload_dataloaders_every_n_epochs, self._reload_setting = (
                self._reload_setting, None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
