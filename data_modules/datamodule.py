"""Seq2SeqDataModule: (source, target) text pairs from files through ``datasets``."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from moe_diffuseq.batch import Seq2SeqBatch, SpecialIds, collate_pairs, encode_pairs

from .corpora import BUILDERS
from .tokenization import load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


class BadRowError(ValueError):
    """A row that cannot become a training pair; the message names its file and row."""


def _builder_for(path: str) -> str:
    suffix = Path(path.replace("*", "x")).suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: unknown file type {suffix!r}; expected one of {sorted(_FORMATS)}")
    return _FORMATS[suffix]


def load_rows(path: str, streaming: bool, cache_dir: str | None):
    """A ``datasets`` table (or stream) of the rows in a local file/glob."""
    import datasets

    if not any(ch in path for ch in "*?[") and not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return datasets.load_dataset(
            _builder_for(path), data_files=path, split="train", streaming=streaming, cache_dir=cache_dir
        )
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # pyarrow / datasets parse errors do not name the file
        raise ValueError(f"{path}: could not be read as {_builder_for(path)} ({type(err).__name__}: {err})") from err


class RowFilter:
    """Checks each row and applies ``on_bad_row``; counts skipped rows per reason."""

    def __init__(self, src_key: str, trg_key: str, policy: str, source: str) -> None:
        self.src_key, self.trg_key, self.policy, self.source = src_key, trg_key, policy, source
        self.skipped: Counter[str] = Counter()

    def check_columns(self, columns: list[str] | None) -> None:
        if columns is None:
            return
        missing = [k for k in (self.src_key, self.trg_key) if k and k not in columns]
        if missing:
            raise KeyError(f"{self.source}: missing column(s) {missing}; the file has {sorted(columns)}")

    def __call__(self, row: dict[str, Any], index: int) -> tuple[str, str] | None:
        src = row.get(self.src_key, "") if self.src_key else ""
        trg = row.get(self.trg_key)
        reason = None
        if not isinstance(src, str) or not isinstance(trg, str):
            reason = "non-string src/trg"
        elif not trg.strip():
            reason = "empty target"
        if reason is None:
            return src, trg
        if self.policy == "raise":
            raise BadRowError(f"{self.source}, row {index + 1}: {reason} (set on_bad_row: skip to skip such rows)")
        self.skipped[reason] += 1
        return None


class PairDataset(Dataset):
    """Map-style view of a table: the valid (index, src, trg) rows."""

    def __init__(self, table, row_filter: RowFilter, source: str) -> None:
        row_filter.check_columns(table.column_names)
        self.items = []
        for index, row in enumerate(table):
            pair = row_filter(row, index)
            if pair is not None:
                self.items.append((f"{source}:{index + 1}", *pair))
        if row_filter.skipped:
            log.warning("%s: skipped rows %s", source, dict(row_filter.skipped))
        if not self.items:
            raise ValueError(f"{source}: no usable rows")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class StreamingPairs(IterableDataset):
    """Iterable view of a ``datasets`` stream, sharded by rank (split_dataset_by_node)."""

    def __init__(self, stream, row_filter: RowFilter, source: str, rank: int, world_size: int, shuffle_seed: int | None, buffer: int) -> None:
        from datasets.distributed import split_dataset_by_node

        row_filter.check_columns(list(stream.column_names) if stream.column_names else None)
        if shuffle_seed is not None:
            stream = stream.shuffle(seed=shuffle_seed, buffer_size=buffer)
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size) if world_size > 1 else stream
        self.row_filter, self.source = row_filter, source
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def __iter__(self):
        for index, row in enumerate(self.stream):
            pair = self.row_filter(row, index)
            if pair is not None:
                yield (f"{self.source}:{index + 1}", *pair)


class Seq2SeqDataModule(pl.LightningDataModule):
    """Pairs of (source, target) texts from jsonl/json/parquet/csv/text files.

    Args:
        train_path: Training file or glob. None with ``corpus`` set: ``data_dir/<corpus>/train.jsonl``.
        val_path: Validation file or glob (same default rule, ``validation.jsonl``).
        test_path: Test file or glob (same default rule, ``test.jsonl``).
        corpus: Name of a built-in corpus (code, dialogue) that ``prepare_data`` builds when missing.
        data_dir: Where built corpora, the tokenizer and caches live.
        src_key: Column with the source text ("" for unconditional modelling: empty source).
        trg_key: Column with the target text.
        max_src_len: Source token budget (longer sources are truncated).
        max_trg_len: Target token budget (longer targets are truncated).
        batch_size: Examples per batch on each device.
        num_workers: DataLoader workers.
        streaming: Stream the files instead of loading them into memory.
        shuffle_buffer: Buffer size of the streaming shuffle.
        tokenizer_path: A tokenizer.json to use; None trains one on the training split
            and caches it as ``data_dir/<corpus or 'custom'>/tokenizer-<tokenizer_vocab_size>.json``.
        tokenizer_vocab_size: Vocabulary size when training a tokenizer (a given tokenizer_path keeps its own).
        tokenizer_train_rows: Training rows the tokenizer is trained on (None: all).
        on_bad_row: "raise" names the file and row of a bad row; "skip" counts and logs them.
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
        on_bad_row: Literal["raise", "skip"] = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if corpus is not None and corpus not in BUILDERS:
            raise ValueError(f"data.corpus={corpus!r}: expected one of {sorted(BUILDERS)}")
        if corpus is None and train_path is None and tokenizer_path is None:
            raise ValueError("data: give train_path (or corpus) so a tokenizer can be trained, or tokenizer_path")
        for key, value in (("max_src_len", max_src_len), ("max_trg_len", max_trg_len), ("batch_size", batch_size)):
            if value < 1 and not (key == "max_src_len" and value == 0):
                raise ValueError(f"data.{key}={value}: must be >= 1")
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"data.on_bad_row={on_bad_row!r}: expected raise or skip")
        self.save_hyperparameters()
        corpus_dir = Path(data_dir) / (corpus or "custom")
        self.corpus_dir = corpus_dir
        self.paths = {
            "train": train_path or (str(corpus_dir / "train.jsonl") if corpus else None),
            "validation": val_path or (str(corpus_dir / "validation.jsonl") if corpus else None),
            "test": test_path or (str(corpus_dir / "test.jsonl") if corpus else None),
        }
        self.tokenizer_file = Path(tokenizer_path) if tokenizer_path else corpus_dir / f"tokenizer-{tokenizer_vocab_size}.json"
        self.max_src_len = max_src_len
        self.max_trg_len = max_trg_len
        self.tokenizer = None
        self.datasets: dict[str, Dataset] = {}
        self.truncated: Counter[str] = Counter()

    # --------------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        """Build the corpus and train the tokenizer if missing (rank 0 only)."""
        hp = self.hparams
        if hp.corpus is not None and not Path(self.paths["train"]).exists():
            log.info("building the %s corpus in %s", hp.corpus, self.corpus_dir)
            counts = BUILDERS[hp.corpus](self.corpus_dir)
            log.info("built %s", counts)
        if not self.tokenizer_file.exists():
            if hp.tokenizer_path:
                raise FileNotFoundError(f"data.tokenizer_path={hp.tokenizer_path}: no such file")
            self._train_tokenizer()

    def _train_tokenizer(self) -> None:
        hp = self.hparams
        table = load_rows(self.paths["train"], streaming=True, cache_dir=None)
        limit = hp.tokenizer_train_rows

        def texts():
            for i, row in enumerate(table):
                if limit is not None and i >= limit:
                    break
                for key in (hp.src_key, hp.trg_key):
                    value = row.get(key) if key else None
                    if isinstance(value, str) and value:
                        yield value

        tokenizer = train_tokenizer(texts(), hp.tokenizer_vocab_size)
        self.tokenizer_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tokenizer_file.with_suffix(".tmp")
        tokenizer.save(str(tmp))
        os.replace(tmp, self.tokenizer_file)  # atomic: other ranks never read half a file

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            if not self.tokenizer_file.exists():
                self.prepare_data()  # e.g. setup() called by a script without a Trainer
            self.tokenizer = load_tokenizer(self.tokenizer_file)
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}.get(
            stage or "fit", ("train", "validation", "test")
        )
        for split in wanted:
            if split not in self.datasets and self.paths.get(split):
                self.datasets[split] = self._dataset(split)

    def _dataset(self, split: str) -> Dataset:
        hp = self.hparams
        path = self.paths[split]
        row_filter = RowFilter(hp.src_key, hp.trg_key, hp.on_bad_row, path)
        cache = str(Path(hp.data_dir) / ".hf_cache")
        if hp.streaming:
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            seed = hp.seed if split == "train" else None
            return StreamingPairs(load_rows(path, True, cache), row_filter, path, rank, world, seed, hp.shuffle_buffer)
        return PairDataset(load_rows(path, False, cache), row_filter, path)

    # --------------------------------------------------------------- loading
    def collate(self, items: list[tuple[str, str, str]]) -> Seq2SeqBatch:
        ids, sources, targets = zip(*items, strict=True)
        pairs = encode_pairs(self.tokenizer, sources, targets, self.max_src_len, self.max_trg_len)
        for pair in pairs:
            self.truncated["source"] += pair.src_truncated > 0
            self.truncated["target"] += pair.trg_truncated > 0
        return collate_pairs(pairs, SpecialIds.from_tokenizer(self.tokenizer), self.max_trg_len, ids)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"no {split} data: set data.{ {'train': 'train_path', 'validation': 'val_path', 'test': 'test_path'}[split] }")
        dataset = self.datasets[split]
        iterable = isinstance(dataset, IterableDataset)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle and not iterable,
            generator=None if iterable else generator,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
