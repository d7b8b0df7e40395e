"""Tasks with exact answers, so that a quality claim rests on answers that can be checked.

Each answer is a list of items joined by ``ITEM_SEPARATOR``; every item is in the source.
  * ``code-outline``: a run of whole lines of a stdlib module -> the functions, methods and
    classes whose ``def``/``class`` line lies in the run, in source order (``def NAME`` or
    ``class NAME``). Runs with fewer than two names are skipped.
  * ``code-lookup``: a run of a module, then a line ``# signature of NAME`` -> that function's
    ``def`` line as written (``def _convert_num(node):``): question answering over a source.
    Every run defines at least two functions, so NAME decides the answer.
  * ``dialogue-cast``: a scene of a play -> its speaker tags in the order they first speak,
    exactly as the text writes them (``Ber. ; Fran. ; Hor. ; Mar.``).
``max_chars`` sets the source length (runs and scenes are cut at a line or turn boundary),
so the same task can be made with sources of a few hundred to many thousand tokens. Splits
follow the corpus each task is drawn from: a hash of the module's or the play's name, with
the dialogue test plays always in test.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections.abc import Iterator
from pathlib import Path

from .code import module_files, stdlib_root
from .code import split_of as code_split_of
from .dialogue import download_archive, play_texts, scenes
from .dialogue import split_of as play_split_of
from .splits import SplitWriter

ITEM_SEPARATOR = " ; "
VERSION = "tasks-2"  # bump when the pairs change, so that prepare_data rebuilds old copies
DEFAULT_MAX_CHARS = 1500
MIN_TASK_CHARS = 100  # a shorter run holds hardly a line of code
QUESTION = "# signature of {name}"
# A run with one function answers its question without reading NAME: a model trained on such
# runs learns to copy the run's only def line, and finds nothing in a long source of many.
LOOKUP_MIN_FUNCTIONS = 2


def _modules(root: Path | None) -> Iterator[tuple[str, str, list[ast.AST]]]:
    """(module name, source, def/class nodes) of every stdlib module that parses as UTF-8."""
    for module, path in module_files(Path(root) if root is not None else stdlib_root()):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        nodes = [n for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        yield module, source, sorted(nodes, key=lambda n: n.lineno)


def line_runs(lines: list[str], max_chars: int) -> list[tuple[int, int]]:
    """Consecutive, non-overlapping runs [start, end) of whole lines, each at most max_chars
    characters with its newlines (a longer single line is skipped)."""
    runs, start, size = [], 0, 0
    for i, line in enumerate(lines):
        cost = len(line) + 1
        if cost > max_chars:  # a line that alone exceeds the budget ends the run and is dropped
            if i > start:
                runs.append((start, i))
            start, size = i + 1, 0
            continue
        if size + cost > max_chars:
            runs.append((start, i))
            start, size = i, 0
        size += cost
    if start < len(lines):
        runs.append((start, len(lines)))
    return runs


def _defined(nodes: list[ast.AST], start: int, end: int) -> list[ast.AST]:
    """Nodes whose def/class line (1-based ``lineno``) lies in lines [start, end) (0-based)."""
    return [n for n in nodes if start < n.lineno <= end]


def _item(node: ast.AST) -> str:
    return f"{'class' if isinstance(node, ast.ClassDef) else 'def'} {node.name}"


def code_outline_rows(max_chars: int = DEFAULT_MAX_CHARS,
                      root: Path | None = None) -> Iterator[tuple[str, dict]]:
    """(split, row) of the code-outline task."""
    for module, source, nodes in _modules(root):
        lines = source.splitlines()
        for start, end in line_runs(lines, max_chars):
            names = _defined(nodes, start, end)
            if len(names) < 2:
                continue
            yield code_split_of(module), {
                "id": f"{module}:{start + 1}-{end}", "task": "code-outline", "module": module,
                "src": "\n".join(lines[start:end]),
                "trg": ITEM_SEPARATOR.join(_item(n) for n in names),
            }


def code_lookup_rows(max_chars: int = DEFAULT_MAX_CHARS,
                     root: Path | None = None) -> Iterator[tuple[str, dict]]:
    """(split, row) of the code-lookup task, from every run that defines at least two
    functions whose ``def`` line fits on one line and whose name occurs once among the run's
    definitions: each question has another function beside its answer, so the answer depends
    on NAME and not on the run alone. A training run gives one example per such function (the
    same source under different questions); a validation or test run gives one, its NAME drawn
    by a hash of the run, so that each run counts once in a score."""
    for module, source, nodes in _modules(root):
        lines = source.splitlines()
        split = code_split_of(module)
        for start, end in line_runs(lines, max_chars - len(QUESTION) - 80):
            defined = _defined(nodes, start, end)
            counts: dict[str, int] = {}
            for n in defined:
                counts[n.name] = counts.get(n.name, 0) + 1
            candidates = [
                n for n in defined
                if not isinstance(n, ast.ClassDef) and counts[n.name] == 1
                and lines[n.lineno - 1].strip().startswith(("def ", "async def "))
                and lines[n.lineno - 1].rstrip().endswith(":")
            ]
            if len(candidates) < LOOKUP_MIN_FUNCTIONS:
                continue
            if split != "train":
                # The question is fixed by the run, not by the order modules are read in.
                seed = int(hashlib.sha1(f"{module}:{start}".encode()).hexdigest()[:8], 16)
                candidates = [random.Random(seed).choice(candidates)]
            for node in candidates:
                yield split, {
                    "id": f"{module}:{start + 1}-{end}:{node.name}", "task": "code-lookup",
                    "module": module,
                    "src": "\n".join([*lines[start:end], QUESTION.format(name=node.name)]),
                    "trg": lines[node.lineno - 1].strip(),
                }


def lookup_guess_exact(src: str, trg: str) -> float:
    """The expected exact match, on one code-lookup example, of a guess that copies one of the
    source's one-line ``def`` lines at random without reading NAME: the floor a model must beat to
    show that it answers the question and not just the format."""
    candidates = one_line_defs(src)
    return candidates.count(trg) / len(candidates) if candidates else 0.0


def one_line_defs(src: str) -> list[str]:
    """The source's one-line ``def`` lines, stripped: the answers code-lookup can ask for."""
    return [line for line in (raw.strip() for raw in src.splitlines())
            if line.startswith(("def ", "async def ")) and line.endswith(":")]


def lookup_swapped(row: dict) -> dict | None:
    """The same code-lookup source asked about another of its functions: the first one-line def
    whose name differs from the question's and names one line only; None where there is none.
    A model that reads NAME answers each question with its own line."""
    *body, question = row["src"].splitlines()
    asked = question.removeprefix(QUESTION.format(name=""))
    lines = one_line_defs("\n".join(body))
    names = [re.match(r"(?:async\s+)?def\s+(\w+)", line).group(1) for line in lines]
    for line, name in zip(lines, names, strict=True):
        if name != asked and names.count(name) == 1:
            return {"src": "\n".join([*body, QUESTION.format(name=name)]), "trg": line}
    return None


def _scene_text(turns: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"{tag}\n{speech}" for tag, speech in turns)


def dialogue_cast_rows(max_chars: int = DEFAULT_MAX_CHARS, archive: Path | None = None,
                       cache_dir: Path | None = None) -> Iterator[tuple[str, dict]]:
    """(split, row) of the dialogue-cast task: each scene, cut at a turn boundary to at most
    max_chars (longer scenes give several consecutive parts), with at least two speakers."""
    if archive is None:
        archive = download_archive(cache_dir or Path("data") / "dialogue" / "_download")
    for play, text in sorted(play_texts(Path(archive)).items()):
        for s, turns in enumerate(scenes(text, keep_tags=True)):
            part, size, parts = [], 0, []
            for tag, speech in turns:
                cost = len(tag) + len(speech) + 2
                if part and size + cost > max_chars:
                    parts.append(part)
                    part, size = [], 0
                if cost <= max_chars:
                    part.append((tag, speech))
                    size += cost
            parts.append(part)
            for p, part in enumerate(parts):
                cast = list(dict.fromkeys(tag for tag, _ in part))
                if len(cast) < 2:
                    continue
                yield play_split_of(play), {
                    "id": f"{play}:{s}:{p}", "task": "dialogue-cast", "play": play,
                    "src": _scene_text(part), "trg": ITEM_SEPARATOR.join(cast),
                }


TASKS = {"code-outline": code_outline_rows, "code-lookup": code_lookup_rows,
         "dialogue-cast": dialogue_cast_rows}


def build_task(name: str, out_dir: str | Path, max_chars: int = DEFAULT_MAX_CHARS,
               **kwargs) -> dict[str, int]:
    """Write {train,validation,test}.jsonl of the named task under out_dir; returns row counts."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    if max_chars < MIN_TASK_CHARS:
        raise ValueError(f"max_chars={max_chars}: must be >= {MIN_TASK_CHARS}")
    if name == "dialogue-cast" and "archive" not in kwargs:
        kwargs.setdefault("cache_dir", Path(out_dir).parent / "dialogue" / "_download")
    with SplitWriter(out_dir) as writer:
        for split, row in TASKS[name](max_chars=max_chars, **kwargs):
            writer.write(split, row)
    return writer.counts
