"""Seq2SeqDataModule: (source, target) text pairs from files through ``datasets``."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from moe_diffuseq.batch import Seq2SeqBatch, SpecialIds, collate_pairs, encode_pairs

from .corpora import build, is_built, resolve
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


def scan_jsonl(path: str, policy: str, cache_dir: Path) -> tuple[str, Counter[str]]:
    """Check every line of a jsonl file: UTF-8, JSON, an object. Errors name the line.

    With policy "skip", bad lines are dropped into a cleaned copy under cache_dir (the
    returned path) and counted per reason; with "raise", the first bad line is an error.
    """
    bad: Counter[str] = Counter()
    good_lines: list[bytes] = []
    rows = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            reason = None
            try:
                value = json.loads(raw.decode("utf-8"))
                if not isinstance(value, dict):
                    reason = "not a JSON object"
            except UnicodeDecodeError as err:
                reason = f"not UTF-8 (byte {err.start})"
            except json.JSONDecodeError as err:
                reason = f"not JSON ({err.msg})"
            if reason is None:
                rows += 1
                good_lines.append(raw if raw.endswith(b"\n") else raw + b"\n")
                continue
            if policy == "raise":
                raise BadRowError(f"{path}, line {number}: {reason} (set on_bad_row: skip to skip such lines)")
            bad[reason.split(" (")[0]] += 1
    if rows == 0:
        raise ValueError(f"{path}: no rows (the file is empty or every line is bad)")
    if not bad:
        return path, bad
    log.warning("%s: skipped lines %s", path, dict(bad))
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(f"{Path(path).resolve()}:{os.path.getmtime(path)}".encode()).hexdigest()[:12]
    cleaned = cache_dir / f"{Path(path).stem}.{digest}.clean.jsonl"
    if not cleaned.exists():
        tmp = cleaned.with_suffix(".tmp")
        tmp.write_bytes(b"".join(good_lines))
        os.replace(tmp, cleaned)
    return str(cleaned), bad


HUB_PREFIX = "hub:"


def load_rows(path: str, streaming: bool, cache_dir: str | None):
    """A ``datasets`` table (or stream) of the rows in a local file/glob, or of a hub
    dataset named ``hub:NAME[:SPLIT]`` (e.g. ``hub:ccdv/arxiv-summarization:train``)."""
    import datasets

    if path.startswith(HUB_PREFIX):
        name, _, split = path[len(HUB_PREFIX) :].partition(":")
        try:
            return datasets.load_dataset(name, split=split or "train", streaming=streaming, cache_dir=cache_dir)
        except Exception as err:  # offline, unknown name, gated: say which dataset and why
            raise ValueError(
                f"{path}: the hub dataset {name!r} (split {split or 'train'!r}) could not be loaded "
                f"({type(err).__name__}: {err}); local files always work"
            ) from err
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


def example_id(source: str, row: dict[str, Any], index: int) -> str:
    """``file:id`` from the row's own "id" column, else ``file:row number``."""
    own = row.get("id")
    return f"{source}:{own}" if isinstance(own, (str, int)) and own != "" else f"{source}:{index + 1}"


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
        if src is None or trg is None:
            reason = "missing src/trg value"
        elif not isinstance(src, str) or not isinstance(trg, str):
            reason = "non-string src/trg"
        elif not trg.strip():
            reason = "empty target"
        elif self.src_key and not src.strip():
            reason = "empty source"
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
                self.items.append((example_id(source, row, index), *pair))
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
        if shuffle_seed is not None and buffer > 0:
            stream = stream.shuffle(seed=shuffle_seed, buffer_size=buffer)
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size) if world_size > 1 else stream
        self.row_filter, self.source = row_filter, source
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def __iter__(self):
        # Positions count within this rank's and worker's part of the stream; a row's own
        # "id" column, when there is one, names it exactly.
        for index, row in enumerate(self.stream):
            pair = self.row_filter(row, index)
            if pair is not None:
                yield (example_id(self.source, row, index), *pair)


class ResumableRandomSampler(torch.utils.data.Sampler[int]):
    """A random permutation per epoch (seed + epoch) that can start part-way through, so a
    run resumed mid-epoch reads exactly the examples an uninterrupted run would read next."""

    def __init__(self, size: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1, pool: int = 50) -> None:
        self.size, self.seed = size, seed
        # Length bucketing: within pools of pool * batch_size examples, sort by length so that
        # each batch holds similar lengths (less padding), then shuffle the batches' order.
        self.lengths, self.batch_size, self.pool = lengths, batch_size, pool
        self.epoch = 0
        self.start = 0
        self._epoch_set = True  # whether set_epoch came since the last pass
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a new epoch starts from its beginning
        self.epoch = epoch
        self._epoch_set = True

    def __iter__(self):
        # Under DDP Lightning wraps this sampler and calls set_epoch on the wrapper only:
        # then each new pass is the next epoch.
        if self._passes and not self._epoch_set:
            self.epoch += 1
            self.start = 0
        self._passes += 1
        self._epoch_set = False
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is not None:
            order = self._bucketed(order, generator)
        start, self.start = self.start, 0
        return iter(order[start:])

    def _bucketed(self, order: list[int], generator: torch.Generator) -> list[int]:
        span = self.pool * self.batch_size
        out: list[int] = []
        for begin in range(0, len(order), span):
            pool = sorted(order[begin : begin + span], key=lambda i: self.lengths[i])
            batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                out += batches[b]
        return out

    def __len__(self) -> int:
        return self.size - self.start


class Seq2SeqDataModule(pl.LightningDataModule):
    """Pairs of (source, target) texts from jsonl/json/parquet/csv/text files.

    Args:
        train_path: Training file, glob or hub dataset ``hub:NAME[:SPLIT]``. None with ``corpus``
            set: ``data_dir/<corpus>/train.jsonl``.
        val_path: Validation file or glob (same default rule, ``validation.jsonl``).
        test_path: Test file or glob (same default rule, ``test.jsonl``).
        corpus: Name of a built-in corpus (code, dialogue, scientific) or exact-answer task (code-outline,
            code-lookup, dialogue-cast; ``code-outline-4000`` for sources of up to 4000 characters) that
            ``prepare_data`` builds when missing.
        data_dir: Where built corpora, the tokenizer and caches live.
        src_key: Column with the source text ("" for unconditional modelling: empty source).
        trg_key: Column with the target text.
        max_src_len: Source token budget (longer sources are truncated).
        max_trg_len: Target token budget (longer targets are truncated).
        batch_size: Examples per batch on each device.
        num_workers: DataLoader workers.
        streaming: Stream the files instead of loading them into memory.
        shuffle_buffer: Buffer size of the streaming shuffle (0: read in file order).
        tokenizer_path: A tokenizer.json to use; None trains one on the training split
            and caches it as ``data_dir/<corpus or 'custom'>/tokenizer-<tokenizer_vocab_size>.json``.
        tokenizer_vocab_size: Vocabulary size when training a tokenizer (a given tokenizer_path keeps its own).
        tokenizer_train_rows: Training rows the tokenizer is trained on (None: all).
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
            raise ValueError("data: give train_path (or corpus) so a tokenizer can be trained, or tokenizer_path")
        for key, value in (("max_src_len", max_src_len), ("max_trg_len", max_trg_len), ("batch_size", batch_size)):
            if value < 1 and not (key == "max_src_len" and value == 0):
                raise ValueError(f"data.{key}={value}: must be >= 1")
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
        self.tokenizer_file = Path(tokenizer_path) if tokenizer_path else corpus_dir / f"tokenizer-{tokenizer_vocab_size}.json"
        self.max_src_len = max_src_len
        self.max_trg_len = max_trg_len
        self.tokenizer = None
        self.datasets: dict[str, Dataset] = {}
        self._resume: dict[str, Any] = {}  # data position restored from a checkpoint
        self._reload_setting: int | None = None  # the trainer's own reload_dataloaders_every_n_epochs
        self._stream_state: dict | None = None  # stream position after the last consumed batch
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
            log.info("built %s", counts)  # build() removed the tokenizers cached from the old corpus
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
        readable = path
        if path.endswith(".jsonl") and Path(path).is_file():
            readable, bad_lines = scan_jsonl(path, hp.on_bad_row, Path(cache) / "clean")
            self.skipped.update(bad_lines)
        dataset = PairDataset(load_rows(readable, False, cache), row_filter, path)
        self.skipped.update(row_filter.skipped)
        return dataset

    # --------------------------------------------------------------- loading
    def collate(self, items: list[tuple[str, str, str]], stream: StreamingPairs | None = None) -> Seq2SeqBatch:
        ids, sources, targets = zip(*items, strict=True)
        pairs = encode_pairs(self.tokenizer, sources, targets, self.max_src_len, self.max_trg_len)
        policy = self.hparams.on_too_long
        keep = []
        for example, pair in zip(ids, pairs, strict=True):
            cut = pair.src_truncated > 0 or pair.trg_truncated > 0
            if cut and policy == "raise":
                raise BadRowError(
                    f"{example}: longer than the budget (source +{pair.src_truncated}, target "
                    f"+{pair.trg_truncated} tokens over max_src_len={self.max_src_len}, max_trg_len={self.max_trg_len})"
                )
            keep.append(not (cut and policy == "skip"))
        if not any(keep):
            keep[0] = True  # never an empty batch: keep one, truncated
        batch = collate_pairs(
            [p for p, k in zip(pairs, keep, strict=True) if k],
            SpecialIds.from_tokenizer(self.tokenizer),
            self.max_trg_len,
            [i for i, k in zip(ids, keep, strict=True) if k],
        )
        if stream is not None:
            # Collation runs right after this batch's rows were read (num_workers=0), so the
            # stream's state now is "just after this batch": where a resumed run continues.
            batch.stream_state = stream.stream.state_dict()
        batch.src_truncated = torch.tensor([p.src_truncated > 0 for p in pairs]).sum().view(1)
        batch.trg_truncated = torch.tensor([p.trg_truncated > 0 for p in pairs]).sum().view(1)
        batch.dropped = torch.tensor([not k for k in keep]).sum().view(1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the current epoch, for mid-epoch resume: the sampler's
        position (map-style data) or the stream's state (streaming, num_workers=0)."""
        if self._stream_state is not None:
            return {"stream": self._stream_state}
        sampler = self._train_sampler
        if sampler is None:
            return {}
        world = self.trainer.world_size if self.trainer is not None else 1
        return {"epoch": sampler.epoch, "consumed": self._consumed * world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def on_after_batch_transfer(self, batch: Seq2SeqBatch, dataloader_idx: int) -> Seq2SeqBatch:
        # Runs in the main process (collation may run in workers), so the counts add up here.
        if self.trainer is not None and self.trainer.training:
            if batch.stream_state is not None:
                self._stream_state = batch.stream_state
            sampler = self._train_sampler
            if sampler is not None:
                if sampler.epoch != self._consumed_epoch:  # a new epoch: count from its start
                    self._consumed, self._consumed_epoch = 0, sampler.epoch
                self._consumed += len(batch) + int(batch.dropped.sum())
            self.truncated["source truncated"] += int(batch.src_truncated.sum())
            self.truncated["target truncated"] += int(batch.trg_truncated.sum())
            self.truncated["too long, skipped"] += int(batch.dropped.sum())
        return batch

    def report(self) -> dict[str, int]:
        """Counts of rows skipped (per reason) and of examples cut by the budgets."""
        return {**{f"skipped: {k}": v for k, v in self.skipped.items()}, **{k: v for k, v in self.truncated.items() if v}}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"no {split} data: set data.{ {'train': 'train_path', 'validation': 'val_path', 'test': 'test_path'}[split] }")
        dataset = self.datasets[split]
        if split == "train" and isinstance(dataset, StreamingPairs) and "stream" in self._resume:
            dataset.stream.load_state_dict(self._resume.pop("stream"))
        # The training stream's position is tracked where collation sees it: in this process.
        tracked = dataset if split == "train" and isinstance(dataset, StreamingPairs) and self.hparams.num_workers == 0 else None
        sampler = None
        if shuffle and not isinstance(dataset, IterableDataset):
            # The target region has a fixed size: only the source length varies the padding.
            lengths = [len(src) for _, src, _ in dataset.items] if self.hparams.length_bucketing else None
            sampler = self._train_sampler = ResumableRandomSampler(
                len(dataset), self.hparams.seed, lengths=lengths, batch_size=self.hparams.batch_size
            )
            current = self.trainer.current_epoch if self.trainer is not None else 0
            sampler.epoch, sampler.start = self._resume.get("epoch", current), self._resume.get("consumed", 0)
            self._consumed, self._consumed_epoch, self._resume = sampler.start, sampler.epoch, {}
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
            self.trainer.reload_dataloaders_every_n_epochs, self._reload_setting = self._reload_setting, None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
