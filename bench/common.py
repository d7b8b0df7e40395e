"""Helpers shared by the benchmarks: timing, per-process peak memory, machine info, output."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moe_diffuseq.metrics import interval_verdict, paired_bootstrap_interval

from . import MALLOC_TUNED

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "malloc_tuned": MALLOC_TUNED,  # moe_diffuseq/allocator.py
    }


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of fn() over repeats, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM from /proc (reset by
    ``reset_peak_rss``). Not ru_maxrss: Linux carries that over from the parent across
    fork and exec, so a child of a big process would report the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is this phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def measure_in_subprocess(module: str, args: list[str], timeout: int = 900) -> dict:
    """Run ``python -m module args`` and parse the JSON object on its last stdout line.

    Each memory figure comes from its own process, so allocator caches and earlier
    peaks of other measurements cannot leak into it.
    """
    done = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_json(name: str, payload: dict, out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def layout_tokenizer(vocab: int):
    """A word-level tokenizer of ``vocab`` ids with the special tokens at 0-4, as
    ``train_tokenizer`` lays them out: what a model needs to score ``random_batch``'s ids without
    a trained tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from moe_diffuseq.batch import SPECIAL_TOKENS, UNK

    words = list(SPECIAL_TOKENS) + [f"w{i}" for i in range(len(SPECIAL_TOKENS), vocab)]
    return Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))


def random_batch(src_len: int, trg_len: int, vocab: int = 4096, batch: int = 1):
    """`batch` examples of random tokens laid out as [CLS] src [SEP] target-region (no padding)."""
    from moe_diffuseq.batch import Seq2SeqBatch

    length = src_len + trg_len + 3
    ids = torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, src_len + 1] = 1, 2  # [CLS], the source's [SEP]
    input_mask = torch.zeros(batch, length, dtype=torch.bool)
    input_mask[:, src_len + 2 :] = True
    return Seq2SeqBatch(
        input_ids=ids, input_mask=input_mask,
        padding_mask=torch.zeros(batch, length, dtype=torch.bool),
        global_mask=(ids == 1) | (ids == 2), src_len=torch.full((batch,), src_len),
    )


def train_step_fn(model, batch) -> Callable[[], torch.Tensor]:
    """One training step of a MoEDiffuSeq on one batch (loss, backward, AdamW), as a callable.

    The optimizer is created here, so its state appears on the first call: time from the
    second call on, or count the first one's memory as part of a real step.
    """
    if model.tokenizer is None:
        model.set_tokenizer(layout_tokenizer(model.network_config.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> torch.Tensor:
        t, w = model.timestep_sampler.sample(batch.input_ids.shape[0], torch.device("cpu"))
        loss, _, _ = model.compute_loss(batch, t, w)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# A fixed random sample, not the head: the splits are in corpus order, so their head is one place.
# The quickstart model's shape (lightning_configs/quickstart.yaml), shared by the long-source
# benchmarks.
QUICKSTART_WIDTH = {"embed_dim": 64, "hidden_size": 128, "num_layers": 2, "num_heads": 4}
QUICKSTART_EXPERTS = {"num_experts": 4, "top_k": 2, "expert_hidden": 128}

DOCUMENT_SAMPLE_SEED = 0
DOCUMENT_SAMPLE = f"random sample, seed {DOCUMENT_SAMPLE_SEED}"  # how the JSON names the rule


def scored_documents(path: Path, docs: int) -> list[dict]:
    """`docs` rows of the jsonl file at `path`, drawn at random (seed DOCUMENT_SAMPLE_SEED) and kept
    in file order; all of them when the file has no more than `docs`."""
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if len(lines) > docs:
        chosen = sorted(random.Random(DOCUMENT_SAMPLE_SEED).sample(range(len(lines)), docs))
        lines = [lines[i] for i in chosen]
    return [json.loads(x) for x in lines]


# bench.compare's models, by variant: the config each is built from (lightning_configs/model/).
VARIANTS = {"moe": "moe_diffuseq", "sdpa": "diffuseq_baseline", "eager": "diffuseq_baseline"}
# MoE-DiffuSeq with the soft absorbing state off: tells whether a quality gap comes from that state.
ABLATION = "moe_no_absorbing"
MODEL_NAMES = {"moe": "MoE-DiffuSeq", "sdpa": "baseline (sdpa)", "eager": "baseline (eager)",
               ABLATION: "MoE-DiffuSeq, absorbing off"}
# The quality runs' shape: short, so that a training budget holds many optimizer steps.
QUALITY_SRC_LEN, QUALITY_TRG_LEN, QUALITY_BATCH = 256, 128, 16
# Samples become text as in DiffuSeq's evaluation: every [SEP] and [PAD] dropped, the rest kept.
DECODE = "strip"


def dpm_against_ancestral(sampling: dict) -> dict | None:
    """DPM-Solver++ 20 against ancestral sampling on one checkpoint, over ancestral's documents
    (the first of the run's, so like is compared with like): both mean item F1s, their ratio and
    the paired interval of the difference. None when the run sampled no ancestral."""
    if "ancestral" not in sampling:
        return None
    ancestral = sampling["ancestral"]["per_doc_f1"]
    dpm = sampling["dpm20"]["per_doc_f1"][: len(ancestral)]
    return {"documents": len(ancestral), "dpm20_f1": sum(dpm) / len(dpm),
            "ancestral_f1": sum(ancestral) / len(ancestral),
            "ratio": sum(dpm) / sum(ancestral) if sum(ancestral) else None,
            "interval": paired_bootstrap_interval(dpm, ancestral)}


def format_interval(ci) -> str:
    """A paired bootstrap interval and its verdict: ``[-0.020, +0.080] tie``."""
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}] {interval_verdict(ci)}"
