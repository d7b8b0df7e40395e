"""Byte-level BPE tokenizer, trained with ``tokenizers`` on the training split."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from moe_diffuseq.batch import SPECIAL_TOKENS, UNK, SpecialIds
from moe_diffuseq.checkpoint import checkpoint_tokenizer


def word_start_normalizer() -> normalizers.Normalizer:
    """A space before every line and before the text, so that a word is one token sequence
    wherever it stands.

    Byte-level BPE glues a word to the space before it: ``SUFFOLK`` at the start of a line and
    ``SUFFOLK`` after ``; `` are different tokens (``SUFFOLK`` and ``ĠS U FFOLK``). An answer that
    lists the source's words then holds tokens the source lacks, and a model that copies from its
    source cannot write them. With one space added after each newline and at the start, every
    word carries its ``Ġ``. ``word_start_decoder`` takes exactly those spaces out again.
    """
    return normalizers.Sequence([normalizers.Replace("\n", "\n "), normalizers.Prepend(" ")])


def word_start_decoder() -> decoders.Decoder:
    """The inverse of ``word_start_normalizer`` after the byte-level decoding: the tokens fused
    into one string, the space after each newline and the leading space removed."""
    return decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(),
                              decoders.Replace("\n ", "\n"), decoders.Strip(" ", 1, 0)])


def has_word_starts(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` adds the word-start spaces (tokenizers trained before it did not)."""
    normalizer = tokenizer.normalizer
    return normalizer is not None and normalizer.normalize_str("a\nb") == " a\n b"


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    word_starts: bool = True) -> Tokenizer:
    """Train a byte-level BPE with the special tokens [PAD] [CLS] [SEP] [MASK] [UNK] (ids 0-4)
    and, unless ``word_starts`` is False (plain byte-level BPE, as GPT-2's), word-start spaces
    (``word_start_normalizer``)."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    if word_starts:
        tokenizer.normalizer = word_start_normalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = word_start_decoder() if word_starts else decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, or the tokenizer inside a MoE-DiffuSeq checkpoint, and check that
    it has our special tokens."""
    path = Path(path)
    if zipfile.is_zipfile(path):  # torch.save writes zip archives; a tokenizer.json is text
        tokenizer = checkpoint_tokenizer(path)
    else:
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception subclasses
            raise ValueError(f"{path}: not a readable tokenizer.json ({err})") from err
    try:
        SpecialIds.from_tokenizer(tokenizer)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return tokenizer
