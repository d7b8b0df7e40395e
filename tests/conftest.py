"""Shared fixtures: offline hub, deterministic torch, a small real corpus and tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from data_modules.corpora.code import build_code_corpus, stdlib_root  # noqa: E402
from data_modules.tokenization import train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The code corpus built from two real stdlib packages (json, email): seconds, not minutes.

    Both splits hold rows: validation/test fall back to a slice of train when the hash split
    leaves them empty for so few modules.
    """
    out = tmp_path_factory.mktemp("code")
    rows = []
    for package in ("json", "email"):
        part = out / package
        build_code_corpus(part, root=stdlib_root() / package)
        for split in ("train", "validation", "test"):
            rows += [json.loads(line)
                     for line in (part / f"{split}.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "function"]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-16]))
    (out / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-16:]))
    return out


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus):
    texts = []
    for line in (small_corpus / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["src"], row["trg"]]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def small_tokenizer_file(small_corpus, small_tokenizer) -> Path:
    path = small_corpus / "tokenizer.json"
    small_tokenizer.save(str(path))
    return path
