"""Metrics on tiny strings, against values computed by hand."""

from __future__ import annotations

import pytest

from moe_diffuseq.metrics import (
    corpus_bleu,
    distinct_n,
    mbr_select,
    paired_bootstrap_interval,
    rouge,
    rouge_per_document,
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


def test_rouge_per_document_scores_each_pair_and_averages_to_rouge():
    hyps, refs = ["the cat", "a dog ran"], ["the cat sat", "a dog ran"]
    per_document = rouge_per_document(hyps, refs)
    assert [d["rouge1"] for d in per_document] == pytest.approx([80.0, 100.0])
    assert rouge(hyps, refs)["rougeL"] == pytest.approx(
        (per_document[0]["rougeL"] + per_document[1]["rougeL"]) / 2)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        rouge_per_document(hyps, refs[:1])


def test_paired_bootstrap_interval():
    a = [10.0, 20.0, 30.0, 40.0]
    assert paired_bootstrap_interval(a, a) == (0.0, 0.0)
    # a constant gap: no spread
    assert paired_bootstrap_interval([x + 3 for x in a], a) == pytest.approx((3.0, 3.0))
    # A gap on one document of four: the interval holds the mean gap (2.5) and reaches 0 (a
    # resample without it).
    low, high = paired_bootstrap_interval([20.0, 20.0, 30.0, 40.0], a)
    assert low == 0.0 and 2.5 < high <= 10.0
    assert (paired_bootstrap_interval([20.0, 20.0, 30.0, 40.0], a, seed=1)
            == paired_bootstrap_interval([20.0, 20.0, 30.0, 40.0], a, seed=1))
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap_interval([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_interval(a, a, confidence=1.5)


def test_distinct_by_hand():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)


def test_mbr_picks_the_consensus_candidate():
    candidates = ["x y z w v", "the cat sat on the mat", "the cat sat on a mat",
                  "a cat sat on the mat"]
    assert mbr_select(candidates) in (1, 2)
    assert self_bleu(["a b c d", "a b c d"]) == pytest.approx(1.0)
    assert mbr_select(["only"]) == 0


def test_item_scores_by_hand():
    from moe_diffuseq.metrics import item_scores, mean_item_scores

    ref = "def a ; def b ; class C"
    assert item_scores(ref, ref) == {"exact_match": 1.0, "item_precision": 1.0, "item_recall": 1.0,
                                     "item_f1": 1.0, "order_accuracy": 1.0}
    scores = item_scores("def b ; def a ; def x", ref)  # 2 of 3 right, order swapped
    assert scores["exact_match"] == 0.0
    assert (scores["item_precision"] == pytest.approx(2 / 3)
            and scores["item_recall"] == pytest.approx(2 / 3))
    assert scores["item_f1"] == pytest.approx(2 / 3)
    assert scores["order_accuracy"] == pytest.approx(1 / 3)  # LCS 1 over the longer list, 3
    assert item_scores("def  a;def b", "def a ; def b")["exact_match"] == 1.0  # spacing normalised
    assert item_scores("", ref)["item_f1"] == 0.0
    # a repeated item counts once
    assert item_scores("def a ; def a", "def a")["item_precision"] == 0.5
    assert mean_item_scores(["def a", ""], ["def a", "def b"])["item_f1"] == pytest.approx(0.5)


def test_item_errors_by_hand():
    from moe_diffuseq.metrics import item_errors, mean_item_errors

    ref = "def start ; def start_tls ; class Foo ; def __init__ ; def __init__"
    assert item_errors(ref, ref) == {"repeated": 0, "cut": 0, "invented": 0, "missed": 0,
                                     "items": 5, "reference_items": 5}
    # start_tls written twice (repeated), Fo cut short, bar made up, both __init__ missed.
    errors = item_errors("def start ; def start_tls ; def start_tls ; class Fo ; def bar", ref)
    assert errors == {"repeated": 1, "cut": 1, "invented": 1, "missed": 3, "items": 5,
                      "reference_items": 5}
    # A prefix of a matched item is cut too; a reference duplicate answered once is only missed.
    assert item_errors("def start_tls ; def start_t ; def __init__",
                       "def start_tls ; def __init__ ; def __init__") == {
        "repeated": 0, "cut": 1, "invented": 0, "missed": 1, "items": 3, "reference_items": 3}
    rates = mean_item_errors(["def a ; def a", "def b"], ["def a", "def b ; def c"])
    assert rates == {"repeated": pytest.approx(1 / 3), "cut": 0.0, "invented": 0.0,
                     "missed": pytest.approx(1 / 3), "items": 1.0}


def test_interval_verdict_calls_an_interval_holding_zero_a_tie():
    from moe_diffuseq.metrics import interval_verdict

    assert interval_verdict((0.01, 0.2)) == "better"
    assert interval_verdict((-0.2, -0.01)) == "worse"
    assert interval_verdict((-0.05, 0.3)) == "tie"  # a positive point estimate inside: a tie
    assert interval_verdict((0.0, 0.3)) == "tie"
