"""Rows from files: jsonl/json/parquet/csv/text through ``datasets``, checked line by line,
filtered into (example id, source, target) with errors that name the file and row."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


class BadRowError(ValueError):
    """A row that cannot become a training pair; the message names its file and row."""


class MissingColumnError(ValueError):
    """A file without the source or target column; the message names the file and the key."""


def _builder_for(path: str) -> str:
    suffix = Path(path.replace("*", "x")).suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: unknown file type {suffix!r}; "
                         f"expected one of {sorted(_FORMATS)}")
    return _FORMATS[suffix]


def scan_jsonl(path: str, policy: str,
               cache_dir: Path) -> tuple[str, Counter[str], list[int]]:
    """Check every line of a jsonl file: UTF-8, JSON, an object. Errors name the line.

    With policy "skip", bad lines are dropped into a cleaned copy under cache_dir (the
    returned path) and counted per reason; with "raise", the first bad line is an error.
    Also returns the line number of each row read from the returned path, in order (blank
    lines hold no row, here as in ``datasets``' reader), so later errors name lines too.
    """
    bad: Counter[str] = Counter()
    good_lines: list[bytes] = []
    numbers: list[int] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            reason = None
            try:
                value = json.loads(raw.decode("utf-8"))
                if not isinstance(value, dict):
                    reason = "not a JSON object"
            except UnicodeDecodeError as err:
                reason = f"not UTF-8 (byte {err.start})"
            except json.JSONDecodeError as err:
                reason = f"not JSON ({err.msg})"
            if reason is None:
                numbers.append(number)
                good_lines.append(raw if raw.endswith(b"\n") else raw + b"\n")
                continue
            if policy == "raise":
                raise BadRowError(f"{path}, line {number}: {reason} "
                                  "(set on_bad_row: skip to skip such lines)")
            bad[reason.split(" (")[0]] += 1
    if not numbers:
        raise ValueError(f"{path}: no rows (the file is empty or every line is bad)")
    if not bad:
        return path, bad, numbers
    log.warning("%s: skipped lines %s", path, dict(bad))
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(
        f"{Path(path).resolve()}:{os.path.getmtime(path)}".encode()).hexdigest()[:12]
    cleaned = cache_dir / f"{Path(path).stem}.{digest}.clean.jsonl"
    if not cleaned.exists():
        tmp = cleaned.with_suffix(".tmp")
        tmp.write_bytes(b"".join(good_lines))
        os.replace(tmp, cleaned)
    return str(cleaned), bad, numbers


HUB_PREFIX = "hub:"


def load_rows(path: str, streaming: bool, cache_dir: str | None):
    """A ``datasets`` table (or stream) of the rows in a local file/glob, or of a hub
    dataset named ``hub:NAME[:SPLIT]`` (e.g. ``hub:ccdv/arxiv-summarization:train``)."""
    import datasets

    if path.startswith(HUB_PREFIX):
        name, _, split = path[len(HUB_PREFIX) :].partition(":")
        try:
            return datasets.load_dataset(name, split=split or "train", streaming=streaming,
                                         cache_dir=cache_dir)
        except Exception as err:  # offline, unknown name, gated: say which dataset and why
            raise ValueError(
                f"{path}: the hub dataset {name!r} (split {split or 'train'!r}) could not be "
                f"loaded ({type(err).__name__}: {err}); local files always work"
            ) from err
    if not any(ch in path for ch in "*?[") and not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file")
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a directory; expected a data file ({sorted(_FORMATS)}) or "
                         "a glob pattern such as DIR/*.jsonl")
    try:
        return datasets.load_dataset(
            _builder_for(path), data_files=path, split="train", streaming=streaming,
            cache_dir=cache_dir,
        )
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # pyarrow / datasets parse errors do not name the file
        raise ValueError(f"{path}: could not be read as {_builder_for(path)} "
                         f"({type(err).__name__}: {err})") from err


def example_id(source: str, row: dict[str, Any], number: int) -> str:
    """``file:id`` from the row's own "id" column, else ``file:number`` (its line in a jsonl
    file, else its row number)."""
    own = row.get("id")
    return (f"{source}:{own}" if isinstance(own, (str, int)) and own != ""
            else f"{source}:{number}")


class RowFilter:
    """Checks each row and applies ``on_bad_row``; counts skipped rows per reason."""

    def __init__(self, src_key: str, trg_key: str, policy: str, source: str) -> None:
        self.src_key, self.trg_key, self.policy, self.source = src_key, trg_key, policy, source
        self.skipped: Counter[str] = Counter()

    def check_columns(self, columns: list[str] | None) -> None:
        if columns is None:
            return
        missing = [k for k in (self.src_key, self.trg_key) if k and k not in columns]
        if missing:
            raise MissingColumnError(f"{self.source}: missing column(s) {missing}; "
                                     f"the file has {sorted(columns)}")

    def __call__(self, row: dict[str, Any], number: int,
                 unit: str = "row") -> tuple[str, str] | None:
        """(source, target) of a good row; None for a bad one under ``skip``. ``number`` and
        ``unit`` say where the row is in its file (``line 7``, ``row 7``)."""
        src = row.get(self.src_key, "") if self.src_key else ""
        trg = row.get(self.trg_key)
        reason = None
        if src is None or trg is None:
            reason = "missing src/trg value"
        elif not isinstance(src, str) or not isinstance(trg, str):
            reason = "non-string src/trg"
        elif not trg.strip():
            reason = "empty target"
        elif self.src_key and not src.strip():
            reason = "empty source"
        if reason is None:
            return src, trg
        if self.policy == "raise":
            raise BadRowError(f"{self.source}, {unit} {number}: {reason} "
                              "(set on_bad_row: skip to skip such rows)")
        self.skipped[reason] += 1
        return None
