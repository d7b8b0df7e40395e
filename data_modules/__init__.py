"""LightningDataModules and corpus builders for MoE-DiffuSeq."""

from .datamodule import Seq2SeqDataModule
from .tokenization import load_tokenizer, train_tokenizer

__all__ = ["Seq2SeqDataModule", "load_tokenizer", "train_tokenizer"]
