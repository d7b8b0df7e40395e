"""What every corpus builder shares: deterministic splits and atomic jsonl writing."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

SPLITS = ("train", "validation", "test")


def hash_bucket(name: str) -> float:
    """A number in [0, 1] fixed by the name: the same split on every machine and run."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


class SplitWriter:
    """Writes rows to {train,validation,test}.jsonl under a folder; the files appear only
    when the block ends without error (written aside, then renamed), so a reader never
    sees half a corpus.

        with SplitWriter(out) as writer:
            writer.write("train", {"src": ..., "trg": ...})
        writer.counts  # rows per split
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out = Path(out_dir)
        self.counts = dict.fromkeys(SPLITS, 0)

    def __enter__(self) -> SplitWriter:
        self.out.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(dir=self.out)
        self._handles = {s: (Path(self._tmp.name) / f"{s}.jsonl").open("w", encoding="utf-8")
                         for s in SPLITS}
        return self

    def write(self, split: str, row: dict) -> None:
        self._handles[split].write(json.dumps(row, ensure_ascii=False) + "\n")
        self.counts[split] += 1

    def __exit__(self, kind, value, traceback) -> None:
        for handle in self._handles.values():
            handle.close()
        if kind is None:
            for split in SPLITS:
                (Path(self._tmp.name) / f"{split}.jsonl").replace(self.out / f"{split}.jsonl")
        self._tmp.cleanup()
