"""Text metrics for evaluation and MBR (METHOD.md section 7).

BLEU comes from torchmetrics; ROUGE-1/2/L/Lsum from rouge-score (torchmetrics' rougeLsum
needs nltk data that cannot be fetched offline). Sentences for ROUGE-Lsum split on newlines.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torchmetrics.functional.text import bleu_score, sacre_bleu_score


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Smoothed sentence-level BLEU-4 in [0, 1] (whitespace tokens)."""
    if not hypothesis.strip() or not reference.strip():
        return float(hypothesis.strip() == reference.strip())
    return float(bleu_score([hypothesis], [[reference]], n_gram=4, smooth=True))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU (13a tokenisation) in [0, 100]."""
    if not hypotheses:
        return 0.0
    return 100.0 * float(sacre_bleu_score(list(hypotheses), [[r] for r in references]))


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 in [0, 100], with Porter stemming."""
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(ref, hyp)
        for key in keys:
            totals[key] += scores[key].fmeasure
    n = max(1, len(hypotheses))
    return {key: 100.0 * value / n for key, value in totals.items()}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams in the texts (whitespace tokens)."""
    grams = [tuple(tokens[i : i + n]) for tokens in (t.split() for t in texts) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(candidates: Sequence[str]) -> float:
    """Mean sentence-BLEU of each candidate against each other one (lower: more diverse)."""
    pairs = list(itertools.permutations(range(len(candidates)), 2))
    if not pairs:
        return 0.0
    return sum(sentence_bleu(candidates[i], candidates[j]) for i, j in pairs) / len(pairs)


def mbr_select(candidates: Sequence[str]) -> int:
    """Index of the candidate with the highest mean sentence-BLEU against the others."""
    if len(candidates) <= 1:
        return 0
    scores = [
        sum(sentence_bleu(c, other) for j, other in enumerate(candidates) if j != i) / (len(candidates) - 1)
        for i, c in enumerate(candidates)
    ]
    return max(range(len(candidates)), key=lambda i: scores[i])
