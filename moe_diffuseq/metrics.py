"""Text metrics for evaluation and MBR.

BLEU comes from torchmetrics; ROUGE-1/2/L/Lsum from rouge-score (torchmetrics' rougeLsum
needs nltk data that cannot be fetched offline). Sentences for ROUGE-Lsum split on newlines.
"""

from __future__ import annotations

import itertools
from collections import Counter
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


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_per_document(hypotheses: Sequence[str],
                       references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L/Lsum F1 in [0, 100] of each hypothesis against its reference, Porter stemming
    (per document, for intervals over documents)."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    return [{key: 100.0 * score.fmeasure for key, score in scorer.score(ref, hyp).items()}
            for hyp, ref in zip(hypotheses, references, strict=True)]


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 in [0, 100], with Porter stemming."""
    per_document = rouge_per_document(hypotheses, references)
    n = max(1, len(per_document))
    return {key: sum(doc[key] for doc in per_document) / n for key in ROUGE_KEYS}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams in the texts (whitespace tokens)."""
    grams = [tuple(tokens[i : i + n]) for tokens in (t.split() for t in texts)
             for i in range(len(tokens) - n + 1)]
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
        sum(sentence_bleu(c, other) for j, other in enumerate(candidates) if j != i)
        / (len(candidates) - 1)
        for i, c in enumerate(candidates)
    ]
    return max(range(len(candidates)), key=lambda i: scores[i])


def paired_bootstrap_interval(
    scores_a: Sequence[float], scores_b: Sequence[float], confidence: float = 0.95,
    resamples: int = 2000, seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of mean(a - b) over documents resampled with replacement.

    Paired: both systems are scored on the same documents, so a document that is hard for both
    does not widen the interval. Deterministic for a given seed."""
    import torch

    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"need two equal, non-empty score lists, got {len(scores_a)} and "
                         f"{len(scores_b)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    diff = torch.tensor(scores_a, dtype=torch.float64) - torch.tensor(scores_b, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diff), (resamples, len(diff)), generator=generator)
    means = diff[picks].mean(dim=1)
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(means,
                               torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return low, high


def interval_verdict(interval: Sequence[float]) -> str:
    """A paired difference's verdict: "better" when its interval lies above 0, "worse" when
    below, else "tie" (whatever the point estimate says)."""
    low, high = interval
    return "better" if low > 0 else "worse" if high < 0 else "tie"


ITEM_SEPARATOR = " ; "


def split_items(text: str) -> list[str]:
    """The ``ITEM_SEPARATOR``-separated items of an answer, whitespace-normalised, empties
    dropped."""
    return [" ".join(item.split()) for item in text.split(ITEM_SEPARATOR.strip()) if item.strip()]


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def item_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """Exact match, item precision/recall/F1 (multiset overlap) and order accuracy (LCS over the
    longer list) of one answer, each in [0, 1]."""
    hyp, ref = split_items(hypothesis), split_items(reference)
    if not hyp and not ref:
        return dict.fromkeys(("exact_match", "item_precision", "item_recall", "item_f1",
                              "order_accuracy"), 1.0)
    common = sum((Counter(hyp) & Counter(ref)).values())
    precision = common / len(hyp) if hyp else 0.0
    recall = common / len(ref) if ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if common else 0.0
    return {
        "exact_match": float(hyp == ref),
        "item_precision": precision,
        "item_recall": recall,
        "item_f1": f1,
        "order_accuracy": _lcs(hyp, ref) / max(len(hyp), len(ref)),
    }


ITEM_ERRORS = ("repeated", "cut", "invented", "missed")


def item_errors(hypothesis: str, reference: str) -> dict[str, int]:
    """Where an answer's items go wrong, counted after the multiset match of ``item_scores``: each
    unmatched answer item is ``repeated`` (it equals another of the answer's items: written more
    often than the reference has it), else ``cut`` (a strict prefix of a reference item: a name
    stopped short), else ``invented``; ``missed`` counts the unmatched reference
    items. ``items`` and ``reference_items`` are the two lists' lengths."""
    hyp, ref = split_items(hypothesis), split_items(reference)
    written, wanted = Counter(hyp), Counter(ref)
    extra = written - wanted  # answer items beyond what the reference holds
    missing = wanted - written
    counts = dict.fromkeys(ITEM_ERRORS, 0)
    for item, n in extra.items():
        kind = ("repeated" if written[item] > 1
                else "cut" if any(o != item and o.startswith(item) for o in ref) else "invented")
        counts[kind] += n
    counts["missed"] = sum(missing.values())
    return {**counts, "items": len(hyp), "reference_items": len(ref)}


def mean_item_errors(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``item_errors`` summed over documents, each kind per reference item (so a model's rates
    compare across corpora), beside the answer items per reference item."""
    totals = dict.fromkeys((*ITEM_ERRORS, "items", "reference_items"), 0)
    for h, r in zip(hypotheses, references, strict=True):
        for key, value in item_errors(h, r).items():
            totals[key] += value
    per = max(1, totals.pop("reference_items"))
    return {key: value / per for key, value in totals.items()}


def mean_item_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``item_scores`` averaged over documents."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    per_doc = [item_scores(h, r) for h, r in zip(hypotheses, references, strict=True)]
    return {key: sum(d[key] for d in per_doc) / max(1, len(per_doc))
            for key in (per_doc[0] if per_doc else {})}
