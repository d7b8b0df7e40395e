"""Builders for the real corpora, each writing {train,validation,test}.jsonl."""

import re
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
SIZED_TASK = re.compile(r"^(?P<task>[a-z-]+?)-(?P<chars>\d+)$")


def resolve(name: str) -> tuple[str, dict]:
    """The builder and its options for a corpus name: a corpus or task (``code-outline``), or a task
    with its source length in characters (``code-outline-4000``, what ``--max-chars`` builds)."""
    if name in BUILDERS:
        return name, {}
    sized = SIZED_TASK.match(name)
    if sized and sized["task"] in tasks.TASKS:
        return sized["task"], {"max_chars": int(sized["chars"])}
    raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(BUILDERS)}, or a task "
                     f"with its source length in characters ({sorted(tasks.TASKS)[0]}-4000)")


def is_built(name: str, out_dir: str | Path) -> bool:
    """Whether out_dir holds this builder's current version of the corpus."""
    marker = Path(out_dir) / MARKER
    return marker.exists() and marker.read_text().strip() == VERSIONS[resolve(name)[0]]


def build(name: str, out_dir: str | Path, **kwargs) -> dict[str, int]:
    """Build the named corpus and mark the folder with the builder's version.

    Tokenizers cached beside the old files (``tokenizer-<vocab>.json``, the data module's cache) are
    removed: trained on the old pairs, they would be read as if they were this corpus's.
    """
    builder, options = resolve(name)
    counts = BUILDERS[builder](out_dir, **options, **kwargs)
    for stale in Path(out_dir).glob("tokenizer-*.json"):
        stale.unlink()
    (Path(out_dir) / MARKER).write_text(VERSIONS[builder] + "\n")
    return counts

__all__ = ["BUILDERS", "VERSIONS", "build", "build_code_corpus", "build_dialogue_corpus",
           "build_scientific_corpus", "is_built", "resolve"]
