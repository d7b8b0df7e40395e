"""Metrics on tiny strings, against values computed by hand."""

from __future__ import annotations

import pytest

from moe_diffuseq.metrics import (
    corpus_bleu,
    distinct_n,
    mbr_select,
    rouge,
    self_bleu,
    sentence_bleu,
)


def test_identical_strings_score_perfectly():
    assert sentence_bleu("a b c d e", "a b c d e") == pytest.approx(1.0)
    assert corpus_bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)
    assert rouge(["the cat sat"], ["the cat sat"])["rougeL"] == pytest.approx(100.0)


def test_rouge_by_hand():
    # hyp "the cat" vs ref "the cat sat": P = 1, R = 2/3, F1 = 0.8 for ROUGE-1; bigrams P=1, R=1/2
    scores = rouge(["the cat"], ["the cat sat"])
    assert scores["rouge1"] == pytest.approx(80.0)
    assert scores["rouge2"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)


def test_distinct_by_hand():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)


def test_mbr_picks_the_consensus_candidate():
    candidates = ["x y z w v", "the cat sat on the mat", "the cat sat on a mat", "a cat sat on the mat"]
    assert mbr_select(candidates) in (1, 2)
    assert self_bleu(["a b c d", "a b c d"]) == pytest.approx(1.0)
    assert mbr_select(["only"]) == 0
