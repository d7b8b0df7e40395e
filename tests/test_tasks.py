"""The exact-answer tasks, built from real stdlib modules and the committed play excerpts."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
from test_corpora import _archive

from data_modules.corpora.code import stdlib_root
from data_modules.corpora.tasks import (
    QUESTION,
    build_task,
    code_lookup_rows,
    code_outline_rows,
    line_runs,
    lookup_guess_exact,
    lookup_swapped,
)
from moe_diffuseq.cli import main

JSON_PACKAGE = stdlib_root() / "json"


def test_line_runs_are_whole_lines_within_the_budget():
    lines = ["a" * 30, "b" * 50, "c" * 500, "d" * 10, "e" * 60, "f" * 45]
    runs = line_runs(lines, 100)
    assert runs == [(0, 2), (3, 5), (5, 6)]  # the 500-character line is dropped, not cut
    assert all(sum(len(line) + 1 for line in lines[a:b]) <= 100 for a, b in runs)


def test_code_outline_lists_the_run_definitions_in_source_order():
    rows = [row for _, row in code_outline_rows(max_chars=1500, root=JSON_PACKAGE)]
    assert rows and all(len(r["src"]) <= 1500 for r in rows)
    for row in rows:
        items = row["trg"].split(" ; ")
        assert len(items) >= 2
        # Every item's def/class line is in the source, and in that order (searched after the
        # previous item's line: a run may define two methods of one name).
        lines, after = row["src"].splitlines(), -1
        for item in items:
            kind, name = item.split(" ")
            starts = (f"{kind} {name}(", f"{kind} {name}:", f"async {kind} {name}(")
            after = next(i for i in range(after + 1, len(lines))
                         if lines[i].lstrip().startswith(starts))
    decoder = next(r for r in rows if r["id"].startswith("json.decoder:1-"))
    assert decoder["trg"] == ("class JSONDecodeError ; def __init__ ; def __reduce__ ; "
                              "def _decode_uXXXX")


def test_code_lookup_answers_with_the_def_line_as_written():
    pairs = list(code_lookup_rows(max_chars=1500, root=JSON_PACKAGE))
    assert pairs
    questions_per_run: dict[tuple[str, str], set[str]] = {}
    for split, row in pairs:
        *body, question = row["src"].splitlines()
        name = question.removeprefix(QUESTION.format(name=""))
        assert question == QUESTION.format(name=name)
        assert row["trg"] in (line.strip() for line in body)
        assert ast.parse(row["trg"] + " ...").body[0].name == name  # a one-line def of that name
        # Another function beside the answer: NAME, not the run, decides it.
        assert sum(line.lstrip().startswith(("def ", "async def ")) for line in body) >= 2
        questions_per_run.setdefault((split, "\n".join(body)), set()).add(name)
    counts: dict[str, list[int]] = {}
    for (split, _), names in questions_per_run.items():
        counts.setdefault(split, []).append(len(names))
    assert min(counts["train"]) >= 2  # every function of a training run is asked about
    assert all(n == 1 for split, c in counts.items() if split != "train" for n in c)


def test_lookup_guess_floor_is_one_over_the_source_def_lines():
    src = ("def a(x):\n    return x\n\n    async def b(y):\n        pass\n"
           "def c(\n        z):\n# signature of b")  # c's def line is not one line: not a guess
    assert lookup_guess_exact(src, "async def b(y):") == pytest.approx(0.5)
    assert lookup_guess_exact(src, "def c(z):") == 0.0
    assert lookup_guess_exact("x = 1", "def a():") == 0.0  # no def line: nothing to copy
    rows = [row for _, row in code_lookup_rows(max_chars=1500, root=JSON_PACKAGE)]
    # Every answer is one of two or more def lines of its source (a docstring's example may
    # repeat the answer's line, so a guess can beat one half).
    assert all(0.0 < lookup_guess_exact(r["src"], r["trg"]) < 1.0 for r in rows)


def test_lookup_swapped_asks_the_same_source_about_another_function():
    src = "def a(x):\n    pass\nasync def b(y):\n    pass\ndef a(z):\n# signature of b"
    swapped = lookup_swapped({"src": src, "trg": "async def b(y):"})
    assert swapped is None  # `a` names two lines: no single answer
    src = src.replace("def a(z):", "def c(z):")
    swapped = lookup_swapped({"src": src, "trg": "async def b(y):"})
    assert swapped == {"src": src.replace("# signature of b", "# signature of a"),
                       "trg": "def a(x):"}
    for _, row in code_lookup_rows(max_chars=1500, root=JSON_PACKAGE):
        if (other := lookup_swapped(row)) is not None:
            assert other["trg"] != row["trg"] and other["src"].splitlines()[:-1] == \
                row["src"].splitlines()[:-1]


def test_dialogue_cast_keeps_tags_as_written_in_first_speech_order(tmp_path):
    counts = build_task("dialogue-cast", tmp_path / "cast", max_chars=2000,
                        archive=_archive(tmp_path))
    rows = {s: [json.loads(x) for x in (tmp_path / "cast" / f"{s}.jsonl").read_text().splitlines()]
            for s in counts}
    assert {r["play"] for r in rows["test"]} == {"macbeth"}
    first = rows["test"][0]
    assert first["trg"].startswith("FIRST WITCH. ; SECOND WITCH.")  # the tag with its period
    assert all(len(r["src"]) <= 2000 for split in rows.values() for r in split)
    for split in rows.values():
        for row in split:
            tags = row["trg"].split(" ; ")
            assert len(tags) == len(set(tags)) >= 2
            found = [row["src"].index(f"{tag}\n") for tag in tags]
            assert found == sorted(found)


def test_prepare_data_builds_a_task_with_max_chars(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["moe-diffuseq"])
    main(["prepare-data", "code-outline", "--data_dir", str(tmp_path), "--max-chars", "4000"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    folder = Path(out["dir"])
    assert folder == tmp_path / "code-outline-4000" and out["rows"]["train"] > 0
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()[:200]]
    assert max(len(r["src"]) for r in rows) <= 4000 < 1500 * 2 + max(len(r["src"]) for r in rows)
    with pytest.raises(SystemExit, match="max-chars applies to the tasks"):
        main(["prepare-data", "code", "--data_dir", str(tmp_path), "--max-chars", "4000"])


def test_prepare_data_faults_are_one_line_naming_the_argument(tmp_path):
    with pytest.raises(SystemExit, match="unknown corpus 'code-outlines'"):
        main(["prepare-data", "code-outlines", "--data_dir", str(tmp_path)])
    for chars in ("-5", "99"):
        with pytest.raises(SystemExit, match=f"--max-chars {chars}: must be >= 100"):
            main(["prepare-data", "code-outline", "--data_dir", str(tmp_path),
                  "--max-chars", chars])
    blocked = tmp_path / "a file"
    blocked.write_text("where the data folder should be")
    with pytest.raises(SystemExit, match=f"prepare-data code-outline: {blocked}.*Not a directory"):
        main(["prepare-data", "code-outline", "--data_dir", str(blocked)])
