"""Builders for the real corpora, each writing {train,validation,test}.jsonl."""

from .code import build_code_corpus
from .dialogue import build_dialogue_corpus

BUILDERS = {"code": build_code_corpus, "dialogue": build_dialogue_corpus}

__all__ = ["BUILDERS", "build_code_corpus", "build_dialogue_corpus"]
