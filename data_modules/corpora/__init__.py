"""Builders for the real corpora, each writing {train,validation,test}.jsonl."""

from .code import build_code_corpus

BUILDERS = {"code": build_code_corpus}

__all__ = ["BUILDERS", "build_code_corpus"]
