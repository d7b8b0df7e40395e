"""Builders for the real corpora, each writing {train,validation,test}.jsonl."""

from functools import partial
from pathlib import Path

from . import code, dialogue, scientific, tasks
from .code import build_code_corpus
from .dialogue import build_dialogue_corpus
from .scientific import build_scientific_corpus

BUILDERS = {
    "code": build_code_corpus,
    "dialogue": build_dialogue_corpus,
    "scientific": build_scientific_corpus,
    **{name: partial(tasks.build_task, name) for name in tasks.TASKS},
}
VERSIONS = {
    "code": code.VERSION,
    "dialogue": dialogue.VERSION,
    "scientific": scientific.VERSION,
    **dict.fromkeys(tasks.TASKS, tasks.VERSION),
}
MARKER = ".built"


def is_built(name: str, out_dir: str | Path) -> bool:
    """Whether out_dir holds this builder's current version of the corpus."""
    marker = Path(out_dir) / MARKER
    return marker.exists() and marker.read_text().strip() == VERSIONS[name]


def build(name: str, out_dir: str | Path, **kwargs) -> dict[str, int]:
    """Build the named corpus and mark the folder with the builder's version.

    Tokenizers cached beside the old files (``tokenizer-<vocab>.json``, the data module's cache) are
    removed: trained on the old pairs, they would be read as if they were this corpus's.
    """
    counts = BUILDERS[name](out_dir, **kwargs)
    for stale in Path(out_dir).glob("tokenizer-*.json"):
        stale.unlink()
    (Path(out_dir) / MARKER).write_text(VERSIONS[name] + "\n")
    return counts

__all__ = ["BUILDERS", "VERSIONS", "build", "build_code_corpus", "build_dialogue_corpus", "build_scientific_corpus", "is_built"]
