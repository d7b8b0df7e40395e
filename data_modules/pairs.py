"""Datasets of (example id, source, target) pairs, the resumable sampler, and collation into a
``LoadedBatch``: the model's ``Seq2SeqBatch`` plus what the loader counts (truncated and skipped
examples, the stream's epoch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset, DistributedSampler, IterableDataset

from moe_diffuseq.batch import Seq2SeqBatch, SpecialIds, collate_pairs, encode_pairs

from .rows import BadRowError, RowFilter, example_id

log = logging.getLogger(__name__)


class PairDataset(Dataset):
    """Map-style view of a table: the valid (example id, src, trg) rows. ``lines``: the line
    number of each row in ``source`` (a jsonl file), so that errors and ids name lines."""

    def __init__(self, table, row_filter: RowFilter, source: str,
                 lines: list[int] | None = None) -> None:
        row_filter.check_columns(table.column_names)
        self.items = []
        if lines is not None and len(lines) != len(table):  # never seen; ids would be wrong
            log.warning("%s: %d rows read but %d lines checked; naming rows, not lines", source,
                        len(table), len(lines))
            lines = None
        unit = "row" if lines is None else "line"
        for index, row in enumerate(table):
            number = index + 1 if lines is None else lines[index]
            pair = row_filter(row, number, unit)
            if pair is not None:
                self.items.append((example_id(source, row, number), *pair))
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

    def __init__(self, stream, row_filter: RowFilter, source: str, rank: int, world_size: int,
                 shuffle_seed: int | None, buffer: int) -> None:
        from datasets.distributed import split_dataset_by_node

        row_filter.check_columns(list(stream.column_names) if stream.column_names else None)
        if shuffle_seed is not None and buffer > 0:
            stream = stream.shuffle(seed=shuffle_seed, buffer_size=buffer)
        self.stream = (split_dataset_by_node(stream, rank=rank, world_size=world_size)
                       if world_size > 1 else stream)
        self.row_filter, self.source = row_filter, source
        self.epoch = 0
        self._passes = 0  # passes begun since set_epoch / resume
        self._skip = 0  # pairs the next pass leaves out (a resumed epoch's consumed part)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass; later passes count on from it."""
        self.epoch, self._passes = epoch, 0

    def resume(self, epoch: int, consumed: int) -> None:
        """Continue epoch ``epoch`` after its first ``consumed`` pairs. The pass replays the epoch's
        stream and skips them: the shuffle buffer's content is then exactly the uninterrupted run's
        (``datasets``' own stream state refills the buffer with other rows)."""
        self.set_epoch(epoch)
        self._skip = consumed

    def __iter__(self):
        # Lightning calls set_epoch on samplers only, never on an iterable dataset: each pass after
        # the first is the next epoch, and the stream's shuffle is seeded by seed + epoch.
        if self._passes:
            self.epoch += 1
        self._passes += 1
        self.stream.set_epoch(self.epoch)
        skip, self._skip = self._skip, 0
        # Positions count within this rank's and worker's part of the stream; a row's own
        # "id" column, when there is one, names it exactly.
        for index, row in enumerate(self.stream):
            pair = self.row_filter(row, index + 1, "streamed row")
            if pair is None:
                continue
            if skip:
                skip -= 1
                continue
            yield (example_id(self.source, row, index + 1), *pair)


class ResumableRandomSampler(DistributedSampler):
    """A random permutation per epoch (seed + epoch) that can start part-way through, so a
    run resumed mid-epoch reads exactly the examples an uninterrupted run would read next.

    It splits the epoch's order between ``world`` processes itself (rank r reads positions r,
    r + world, ...; the order is padded with its head to a multiple of ``world``, as
    DistributedSampler pads). Being a DistributedSampler, Lightning uses it as it is: its own
    wrapper would shuffle this order again by a permutation of the remaining length, which
    differs between a resumed run and an uninterrupted one."""

    def __init__(self, size: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1,
                 pool: int = 50, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        # DistributedSampler's own __init__ would ask for a dataset and a process group.
        self.size, self.seed, self.rank, self.num_replicas = size, seed, rank, world
        self.shuffle, self.drop_last = True, False
        # Length bucketing: within pools of pool * batch_size examples, sort by length so that
        # each batch holds similar lengths (less padding), then shuffle the batches' order.
        self.lengths, self.batch_size, self.pool = lengths, batch_size, pool
        self.epoch = 0
        self.start = 0
        self._epoch_set = True  # whether set_epoch came since the last pass
        self._passes = 0

    @property
    def total_size(self) -> int:
        """The epoch's order padded to a multiple of the processes."""
        return -(-self.size // self.num_replicas) * self.num_replicas

    @property
    def num_samples(self) -> int:
        return len(self)

    @property
    def start(self) -> int:
        """Where the next pass starts in its epoch's order (a run resumed mid-epoch), counted in
        examples of every process; a multiple of ``world`` when every process read as many."""
        return self._start

    @start.setter
    def start(self, value: int) -> None:
        self._start, self._pass_start = value, None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a new epoch starts from its beginning
        self.epoch = epoch
        self._epoch_set = True

    def __iter__(self):
        # A loop that never calls set_epoch: then each new pass is the next epoch.
        if self._passes and not self._epoch_set:
            self.epoch += 1
            self._start = 0
        self._passes += 1
        self._epoch_set = False
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is not None:
            order = self._bucketed(order, generator)
        order += order[: self.total_size - self.size]
        # The pass's start holds ``len`` for the whole pass: a loader may read the length after
        # drawing the order, and must see this pass's, not the next one's.
        self._pass_start, self._start = self._start, 0
        return iter(order[self._pass_start + self.rank :: self.num_replicas])

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
        start = self._start if self._pass_start is None else self._pass_start
        return len(range(start + self.rank, self.total_size, self.num_replicas))


def _count() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.long)


@dataclass
class LoadedBatch(Seq2SeqBatch):
    """A ``Seq2SeqBatch`` and the loader's bookkeeping, which the model never reads: counts over
    the examples collated into it (each (1,) long), and the epoch of the streaming pass it came
    from."""

    src_truncated: torch.Tensor = field(default_factory=_count)
    trg_truncated: torch.Tensor = field(default_factory=_count)
    dropped: torch.Tensor = field(default_factory=_count)
    stream_epoch: int | None = None  # the streaming pass this batch came from (num_workers=0)
    # Rows a stream left out (on_bad_row: skip) since its previous batch, per reason.
    skipped_rows: dict[str, int] = field(default_factory=dict)


def collate_rows(
    items: list[tuple[str, str, str]],
    tokenizer: Tokenizer,
    max_src_len: int,
    max_trg_len: int,
    on_too_long: str,
    stream: StreamingPairs | None = None,
) -> LoadedBatch:
    """Tokenize (example id, source, target) items and collate them. A pair over a budget is cut
    (``on_too_long: truncate``), left out (``skip``; never every one) or an error naming it
    (``raise``)."""
    ids, sources, targets = zip(*items, strict=True)
    pairs = encode_pairs(tokenizer, sources, targets, max_src_len, max_trg_len)
    keep = []
    for example, pair in zip(ids, pairs, strict=True):
        cut = pair.src_truncated > 0 or pair.trg_truncated > 0
        if cut and on_too_long == "raise":
            raise BadRowError(
                f"{example}: longer than the budget (source +{pair.src_truncated}, target "
                f"+{pair.trg_truncated} tokens over max_src_len={max_src_len}, "
                f"max_trg_len={max_trg_len})"
            )
        keep.append(not (cut and on_too_long == "skip"))
    if not any(keep):
        keep[0] = True  # never an empty batch: keep one, truncated
    kept = [(p, i) for p, i, k in zip(pairs, ids, keep, strict=True) if k]
    batch = collate_pairs([p for p, _ in kept], SpecialIds.from_tokenizer(tokenizer), max_trg_len,
                          [i for _, i in kept])
    return LoadedBatch(
        **{name: getattr(batch, name) for name in Seq2SeqBatch.__dataclass_fields__},
        src_truncated=torch.tensor([p.src_truncated > 0 for p in pairs]).sum().view(1),
        trg_truncated=torch.tensor([p.trg_truncated > 0 for p in pairs]).sum().view(1),
        dropped=torch.tensor([not k for k in keep]).sum().view(1),
        stream_epoch=None if stream is None else stream.epoch,
    )
