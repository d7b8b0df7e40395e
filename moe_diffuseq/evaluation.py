"""Evaluation of generated text against references: one function, used by the
``evaluate`` command, the test loop and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from .metrics import (
    ITEM_ERRORS,
    corpus_bleu,
    distinct_n,
    mean_item_errors,
    mean_item_scores,
    rouge,
    self_bleu,
    sentence_bleu,
)


def score_generations(
    hypotheses: Sequence[str],
    references: Sequence[str],
    candidates: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum, sacreBLEU, mean sentence-BLEU, dist-1/2, length ratio and, with
    several candidates per source, self-BLEU across them (all 0-100 except ratios), and the
    item metrics of answers that are lists (exact_match, item_precision/recall/f1,
    order_accuracy: fractions in [0, 1]) with where their items go wrong (repeated_items,
    cut_items, invented_items, missed_items: per reference item; see ``metrics.item_errors``)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scores = rouge(hypotheses, references)
    scores["bleu"] = corpus_bleu(hypotheses, references)
    scores["sentence_bleu"] = 100.0 * sum(
        sentence_bleu(h, r) for h, r in zip(hypotheses, references, strict=True)
    ) / max(1, len(hypotheses))
    scores["dist1"] = distinct_n(hypotheses, 1)
    scores["dist2"] = distinct_n(hypotheses, 2)
    ref_words = sum(len(r.split()) for r in references)
    scores["length_ratio"] = sum(len(h.split()) for h in hypotheses) / max(1, ref_words)
    scores.update(mean_item_scores(hypotheses, references))
    errors = mean_item_errors(hypotheses, references)
    scores.update({f"{kind}_items": errors[kind] for kind in ITEM_ERRORS})
    if candidates and all(len(c) > 1 for c in candidates):
        scores["self_bleu"] = 100.0 * sum(self_bleu(c) for c in candidates) / len(candidates)
    return scores


def markdown_report(title: str, settings: dict, scores: dict[str, float]) -> str:
    lines = [f"# {title}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in scores.items()]
    return "\n".join(lines) + "\n"


def gather_objects(items: list) -> list:
    """Every rank's ``items``, concatenated in rank order (the list itself without a process
    group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
