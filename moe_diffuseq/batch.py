"""The batch schema shared by the data modules and the model.

Beside ``checkpoint`` (for the tokenizer a checkpoint carries), this is the only module of
``moe_diffuseq`` that ``data_modules`` imports: it says how a (source, target) pair becomes token
ids and how examples are collated into a batch.

Layout of one example::

    [CLS] src ... [SEP] | trg ... [SEP] [PAD] ... [PAD]
    <---- source span -->|<---- target region: max_trg_len + 1 ---->

The target region has a fixed size so that the model learns the output length by
predicting the [PAD] tokens inside it. Examples in a batch are right-padded to the longest
source; that *batch padding* is never attended and never scored (``padding_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from tokenizers import Tokenizer

from .config import DECODE_MODES

PAD, CLS, SEP, MASK, UNK = "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, CLS, SEP, MASK, UNK)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens in one tokenizer."""

    pad: int
    cls: int
    sep: int
    mask: int
    unk: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> SpecialIds:
        ids = {name: tokenizer.token_to_id(name) for name in SPECIAL_TOKENS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; "
                             f"expected {list(SPECIAL_TOKENS)}")
        return cls(ids[PAD], ids[CLS], ids[SEP], ids[MASK], ids[UNK])


@dataclass
class Seq2SeqBatch:
    """A collated batch; every tensor is (batch, length) unless noted."""

    input_ids: torch.Tensor  # long
    input_mask: torch.Tensor  # bool: True on the target region (diffused), False on the source span
    padding_mask: torch.Tensor  # bool: True on batch padding (never attended, never scored)
    # bool: [CLS] and the source's [SEP] (the model may add source tokens)
    global_mask: torch.Tensor
    src_len: torch.Tensor  # (batch,) long: source tokens kept after truncation
    example_ids: list[str] = field(default_factory=list)  # where each row came from, for errors

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, n: int) -> Seq2SeqBatch:
        """The first n examples."""
        return replace(self, **{k: getattr(self, k)[:n] for k in _ROW_TENSORS},
                       example_ids=self.example_ids[:n])

    def to(self, device: torch.device | str) -> Seq2SeqBatch:
        return replace(self, **{k: getattr(self, k).to(device) for k in _ROW_TENSORS})


_ROW_TENSORS = ("input_ids", "input_mask", "padding_mask", "global_mask", "src_len")


@dataclass
class EncodedPair:
    """Token ids of one pair after truncation, with how much was cut."""

    src_ids: list[int]
    trg_ids: list[int]
    src_truncated: int = 0
    trg_truncated: int = 0


def encode_pairs(
    tokenizer: Tokenizer,
    sources: Sequence[str],
    targets: Sequence[str] | None,
    max_src_len: int,
    max_trg_len: int,
) -> list[EncodedPair]:
    """Tokenize pairs with separate budgets: truncation never steals from the other side."""
    src_enc = tokenizer.encode_batch(list(sources), add_special_tokens=False)
    trg_enc = (
        tokenizer.encode_batch(list(targets), add_special_tokens=False)
        if targets is not None
        else [None] * len(src_enc)
    )
    pairs = []
    for s, t in zip(src_enc, trg_enc, strict=True):
        s_ids = s.ids
        t_ids = t.ids if t is not None else []
        pairs.append(
            EncodedPair(
                src_ids=s_ids[:max_src_len],
                trg_ids=t_ids[:max_trg_len],
                src_truncated=max(0, len(s_ids) - max_src_len),
                trg_truncated=max(0, len(t_ids) - max_trg_len),
            )
        )
    return pairs


def collate_pairs(
    pairs: Sequence[EncodedPair],
    special: SpecialIds,
    max_trg_len: int,
    example_ids: Sequence[str] | None = None,
) -> Seq2SeqBatch:
    """Lay out each pair as [CLS] src [SEP] trg [SEP] [PAD]* and right-pad the batch."""
    region = max_trg_len + 1  # target tokens plus their closing [SEP]
    lengths = [len(p.src_ids) + 2 + region for p in pairs]
    length = max(lengths)
    batch = len(pairs)
    input_ids = torch.full((batch, length), special.pad, dtype=torch.long)
    input_mask = torch.zeros(batch, length, dtype=torch.bool)
    padding_mask = torch.ones(batch, length, dtype=torch.bool)
    for row, pair in enumerate(pairs):
        if len(pair.trg_ids) > max_trg_len:
            raise ValueError(f"target of {len(pair.trg_ids)} tokens exceeds "
                             f"max_trg_len={max_trg_len}")
        src = [special.cls, *pair.src_ids, special.sep]
        trg = [*pair.trg_ids, special.sep]
        start = len(src)
        input_ids[row, :start] = torch.tensor(src)
        input_ids[row, start : start + len(trg)] = torch.tensor(trg)
        input_mask[row, start : start + region] = True
        padding_mask[row, : start + region] = False
    # Only the [CLS] and the source's [SEP] are global: the target's [SEP] is not known at
    # sampling time, so marking it would make training and generation see different masks.
    global_mask = (((input_ids == special.cls) | (input_ids == special.sep))
                   & ~input_mask & ~padding_mask)
    return Seq2SeqBatch(
        input_ids=input_ids,
        input_mask=input_mask,
        padding_mask=padding_mask,
        global_mask=global_mask,
        src_len=torch.tensor([len(p.src_ids) for p in pairs], dtype=torch.long),
        example_ids=list(example_ids) if example_ids is not None else [],
    )


def decode_targets(
    tokenizer: Tokenizer, ids: torch.Tensor, batch: Seq2SeqBatch, special: SpecialIds,
    mode: str = "strip",
) -> list[str]:
    """Text of each row's target region.

    mode "strip" drops every [SEP] and [PAD] wherever it stands and keeps the other tokens in
    order (DiffuSeq's evaluation: a non-autoregressive sample can put a [PAD] mid-sentence, and
    the words after it are still its output); "truncate" stops at the first [SEP] or [PAD].
    The two agree on a sample whose padding all comes after its words.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"sampling.decode={mode!r}: expected one of {DECODE_MODES}")
    ends = (special.sep, special.pad)
    texts = []
    for row in range(ids.shape[0]):
        region = ids[row][batch.input_mask[row]].tolist()
        if mode == "truncate":
            stop = next((i for i, tok in enumerate(region) if tok in ends), len(region))
            region = region[:stop]
        texts.append(tokenizer.decode([tok for tok in region if tok not in ends],
                                      skip_special_tokens=True))
    return texts


def decode_sources(tokenizer: Tokenizer, batch: Seq2SeqBatch, special: SpecialIds) -> list[str]:
    """Source text of each row: the tokens between [CLS] and the first [SEP]."""
    texts = []
    for row in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[row, 1 : 1 + int(batch.src_len[row])].tolist()
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts
