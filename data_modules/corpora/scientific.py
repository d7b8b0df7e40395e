"""Scientific corpus: JSS-style R package vignettes with abstracts, from Debian packages.

Each package is fetched with ``apt-get download`` (no install) and unpacked with
``dpkg-deb -x``; every ``.Rnw``/``.Rmd`` vignette under ``usr/lib/R/site-library/*/doc`` with an
abstract becomes one pair: body (the abstract removed) -> abstract. Bodies under
``min_words`` words are skipped. The split is decided by a hash of ``package/vignette``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from .errors import CorpusUnavailable
from .splits import SplitWriter, hash_bucket

log = logging.getLogger(__name__)

VERSION = "scientific-3"  # bump when the pairs change, so that prepare_data rebuilds old copies
# Every r-cran-* package of Debian bookworm with at least one vignette that has an abstract and a
# body of min_words, found by downloading and scanning every r-cran-* package once.
PACKAGES = (
    "r-cran-aer", "r-cran-bradleyterry2", "r-cran-brobdingnag", "r-cran-car", "r-cran-clue",
    "r-cran-coin", "r-cran-colorspace", "r-cran-cvar", "r-cran-dbi", "r-cran-dbscan",
    "r-cran-desolve", "r-cran-diptest", "r-cran-distr", "r-cran-effects", "r-cran-elliptic",
    "r-cran-erm", "r-cran-filehash", "r-cran-fitdistrplus", "r-cran-flexmix", "r-cran-forecast",
    "r-cran-formula", "r-cran-g.data", "r-cran-ggbeeswarm", "r-cran-googlevis", "r-cran-gsl",
    "r-cran-gsubfn", "r-cran-hdf5r", "r-cran-hypergeo", "r-cran-interp", "r-cran-iso",
    "r-cran-kernlab", "r-cran-kutils", "r-cran-laeken", "r-cran-lme4", "r-cran-logcondens",
    "r-cran-magic", "r-cran-maldiquant", "r-cran-maldiquantforeign", "r-cran-markovchain",
    "r-cran-mixtools", "r-cran-mlmrev", "r-cran-mnp", "r-cran-multcomp", "r-cran-mutoss",
    "r-cran-network", "r-cran-nmf", "r-cran-ordinal", "r-cran-partitions", "r-cran-party",
    "r-cran-partykit", "r-cran-plm", "r-cran-pls", "r-cran-powerlaw", "r-cran-proto", "r-cran-pscl",
    "r-cran-psychotools", "r-cran-psychotree", "r-cran-rcppeigen", "r-cran-rdpack",
    "r-cran-registry", "r-cran-rgenoud", "r-cran-rmpfr", "r-cran-rockchalk", "r-cran-rocr",
    "r-cran-rrcov", "r-cran-sandwich", "r-cran-seriation", "r-cran-sets", "r-cran-shape",
    "r-cran-sp", "r-cran-spacetime", "r-cran-sparsem", "r-cran-spatstat", "r-cran-strucchange",
    "r-cran-surveillance", "r-cran-systemfit", "r-cran-tgp", "r-cran-tsp", "r-cran-vcd",
    "r-cran-vegan", "r-cran-vipor", "r-cran-zoo",
)


def _balanced(text: str, open_at: int) -> int:
    """Index just past the brace group that opens at text[open_at] == '{'."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{" and text[i - 1] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError("unbalanced braces")


def _in_comment(text: str, at: int) -> bool:
    """Whether text[at] is inside a LaTeX comment (after an unescaped % on its line)."""
    line = text[text.rfind("\n", 0, at) + 1 : at]
    return re.search(r"(?<!\\)%", line) is not None


def split_rnw(text: str) -> tuple[str, str] | None:
    """(body without the abstract, abstract) of a Sweave/LaTeX vignette, or None."""
    match = next((m for m in re.finditer(r"\\Abstract\s*\{", text)
                  if not _in_comment(text, m.start())), None)
    if match:
        end = _balanced(text, match.end() - 1)
        abstract = text[match.end() : end - 1]
        rest = text[: match.start()] + text[end:]
    else:
        env = re.search(r"\\begin\{abstract\}(.*?)\\end\{abstract\}", text, flags=re.S)
        if not env:
            return None
        abstract, rest = env.group(1), text[: env.start()] + text[env.end() :]
    begin = rest.find("\\begin{document}")
    body = rest[begin + len("\\begin{document}") :] if begin >= 0 else rest
    body = body.split("\\end{document}")[0]
    return body.strip(), " ".join(abstract.split())


def split_rmd(text: str) -> tuple[str, str] | None:
    """(body, abstract) of an R Markdown vignette whose YAML header has ``abstract:``."""
    header = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    if not header:
        return None
    lines = header.group(1).splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"abstract:\s*(.*)$", line)
        if not found:
            continue
        value = found.group(1).strip()
        if value in ("|", ">", "|-", ">-", ""):
            block = []
            for more in lines[i + 1 :]:
                if more and not more.startswith((" ", "\t")):
                    break
                block.append(more.strip())
            value = " ".join(x for x in block if x)
        abstract = value.strip().strip("\"'")
        return text[header.end() :].strip(), abstract
    return None


def vignette_pairs(root: Path, min_words: int = 200) -> tuple[list[dict], Counter[str]]:
    rows, skipped = [], Counter()
    for path in sorted(root.glob("usr/lib/R/site-library/*/doc/*")):
        if path.suffix not in (".Rnw", ".Rmd"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts = split_rnw(text) if path.suffix == ".Rnw" else split_rmd(text)
        if parts is None:
            skipped["no abstract"] += 1
            continue
        body, abstract = parts
        if not abstract.strip():
            skipped["empty abstract"] += 1
            continue
        if len(body.split()) < min_words:
            skipped["body under min_words"] += 1
            continue
        name = f"{path.parent.parent.name}/{path.name}"
        rows.append({"id": name, "package": path.parent.parent.name, "src": body, "trg": abstract})
    return rows, skipped


def split_of(name: str) -> str:
    bucket = hash_bucket(name)
    return "train" if bucket < 0.8 else "validation" if bucket < 0.9 else "test"


def download_packages(folder: Path,
                      packages: tuple[str, ...] = PACKAGES) -> tuple[list[Path], list[str]]:
    """``apt-get download`` each package into folder; returns the .deb files and failures."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusUnavailable(
            "the scientific corpus needs apt-get and dpkg-deb (a Debian/Ubuntu machine) to fetch "
            f"{len(PACKAGES)} R packages (data_modules.corpora.scientific.PACKAGES); "
            "build it there and copy data/scientific/ here"
        )
    folder.mkdir(parents=True, exist_ok=True)

    def fetched(package: str) -> list[Path]:
        return sorted(folder.glob(f"{package}_*.deb"))

    missing = [p for p in packages if not fetched(p)]
    if missing:
        log.info("apt-get download: %d R packages into %s", len(missing), folder)
        done = subprocess.run(["apt-get", "download", *missing], cwd=folder, capture_output=True,
                              text=True)
        # one unknown package fails the whole call: retry one by one to name it
        if done.returncode != 0:
            for package in missing:
                one = subprocess.run(["apt-get", "download", package], cwd=folder,
                                     capture_output=True, text=True)
                if one.returncode != 0:
                    log.warning("apt-get download %s failed: %s", package,
                                one.stderr.strip()[-300:])
    # Only the listed packages' files (the newest of each): a stale .deb left in the folder is
    # not read.
    found = {p: fetched(p) for p in packages}
    return ([files[-1] for files in found.values() if files],
            [p for p, files in found.items() if not files])


def build_scientific_corpus(out_dir: str | Path, debs: list[Path] | None = None,
                            min_words: int = 200) -> dict[str, int]:
    """Write {train,validation,test}.jsonl under out_dir; returns row counts per split."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if debs is None:
        debs, failed = download_packages(out / "_download")
        if not debs:
            raise CorpusUnavailable(f"apt-get could not download any of {failed} "
                                    "(run `apt-get update` first?)")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        unpacked = Path(tmp) / "root"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        rows, skipped = vignette_pairs(unpacked, min_words)
    if skipped:
        log.warning("scientific corpus: skipped vignettes %s", dict(skipped))
    with SplitWriter(out) as writer:
        for row in rows:
            writer.write(split_of(row["id"]), row)
    return writer.counts
