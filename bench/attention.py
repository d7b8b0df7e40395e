"""Sparse attention benchmark: banded versus dense (fwd+bwd time, peak memory) and flex
forward, at lengths 1k-16k, interleaved in one run; then short batched inputs, where `auto`
switches from banded to dense on CPU: both timed, forward and fwd+bwd, against auto's pick.

    python -m bench.attention [--lengths 1024 2048 ...] [--quick] [--out FILE.json]

Time: the backends alternate at each length (dense, banded, dense, banded, ...) so that
drift of the machine's speed hits both alike. Memory: each figure is the peak RSS of a
fresh process that runs one fwd+bwd, minus that process's RSS before the call.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moe_diffuseq.attention import resolve_backend, sparse_attention

from .common import (
    current_rss_mb,
    machine_info,
    measure_in_subprocess,
    peak_rss_mb,
    print_table,
    reset_peak_rss,
    time_call,
    write_json,
)

SETUP = {"batch": 1, "heads": 2, "head_dim": 64, "window": 256, "dilation": 1, "globals": 2,
         "block_size": 64}


def inputs(length: int, requires_grad: bool = True, seed: int = 0, batch: int = SETUP["batch"]):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, SETUP["heads"], length, SETUP["head_dim"])
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_(requires_grad) for _ in range(3))
    glob = torch.zeros(batch, length, dtype=torch.bool)
    glob[:, 0] = True  # [CLS]
    glob[:, length // 2] = True  # a [SEP] in the middle
    return q, k, v, glob


def run_once(backend: str, length: int, backward: bool = True) -> None:
    q, k, v, glob = inputs(length, requires_grad=backward)
    with torch.set_grad_enabled(backward):
        out = sparse_attention(
            q, k, v, window=SETUP["window"], dilation=SETUP["dilation"], global_mask=glob,
            backend=backend, block_size=SETUP["block_size"],
        )
        if backward:
            out.sum().backward()


# (batch, length): the quality run's shape (16 x 387), and around auto's switch (2 x 640).
SHORT_SHAPES = [(16, 387), (4, 640), (4, 768), (2, 1283)]


def short_sequences(repeats: int) -> list[dict]:
    """Dense against banded on short batched inputs with padding; which one `auto` picks."""
    records = []
    for batch, length in SHORT_SHAPES:
        q, k, v, glob = inputs(length, requires_grad=False, batch=batch)
        pad = torch.zeros(batch, length, dtype=torch.bool)
        pad[1:, length - length // 5 :] = True  # rows of different lengths, as in a real batch
        kwargs = dict(window=SETUP["window"], dilation=SETUP["dilation"], global_mask=glob,
                      key_padding_mask=pad, block_size=SETUP["block_size"])

        def run(backend: str, backward: bool) -> None:
            qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
            with torch.set_grad_enabled(backward):
                out = sparse_attention(qq, kk, vv, backend=backend, **kwargs)
                if backward:
                    out.sum().backward()

        record = {"batch": batch, "length": length,
                  "auto": resolve_backend("auto", q, window=SETUP["window"],
                                          dilation=SETUP["dilation"],
                                          block_size=SETUP["block_size"])}
        for backend in ("dense", "banded"):
            record[f"{backend}_fwd_s"] = time_call(lambda b=backend: run(b, False), repeats=repeats)
            record[f"{backend}_fwd_bwd_s"] = time_call(lambda b=backend: run(b, True),
                                                       repeats=repeats)
        record["fwd_bwd_faster"] = min(("dense", "banded"), key=lambda b: record[f"{b}_fwd_bwd_s"])
        records.append(record)
    return records


def memory_child(backend: str, length: int) -> None:
    """Entry point of the per-figure process: prints {"peak_mb": ...} as JSON."""
    inputs(length)  # allocate the inputs' pages once, so they count as the baseline
    reset_peak_rss()
    before = current_rss_mb()
    run_once(backend, length, backward=backend != "flex")
    print(json.dumps({"peak_mb": peak_rss_mb() - before}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="lengths 1k-4k, one repeat")
    parser.add_argument("--no-flex", action="store_true",
                        help="skip the flex forward (it compiles first)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        memory_child(args.child[0], int(args.child[1]))
        return {}
    if args.quick:
        args.lengths, args.repeats = [1024, 2048, 4096], 1

    rows, records = [], []
    for length in args.lengths:
        repeats = 1 if length >= 8192 else args.repeats
        times = {"dense": [], "banded": []}
        for _ in range(repeats):  # interleaved
            for backend in times:
                times[backend].append(time_call(lambda b=backend: run_once(b, length),
                                                repeats=1, warmup=0))
        dense_s, banded_s = (sorted(v)[len(v) // 2] for v in times.values())
        flex_s = None
        if not args.no_flex:
            run_once("flex", length, backward=False)  # compile + block mask for this length
            flex_s = time_call(lambda: run_once("flex", length, backward=False), repeats=repeats,
                               warmup=0)
        dense_fwd = time_call(lambda: run_once("dense", length, backward=False), repeats=repeats,
                              warmup=0)
        mem = {b: measure_in_subprocess("bench.attention", ["--child", b, str(length)])
               for b in ("dense", "banded")}
        record = {
            "length": length,
            "dense_fwd_bwd_s": dense_s,
            "banded_fwd_bwd_s": banded_s,
            "speedup": dense_s / banded_s,
            "dense_fwd_s": dense_fwd,
            "flex_fwd_s": flex_s,
            "dense_peak_mb": mem["dense"].get("peak_mb"),
            "banded_peak_mb": mem["banded"].get("peak_mb"),
        }
        if record["dense_peak_mb"] and record["banded_peak_mb"]:
            record["memory_ratio"] = record["banded_peak_mb"] / record["dense_peak_mb"]
        records.append(record)
        rows.append([length, dense_s, banded_s, record["speedup"], dense_fwd, flex_s,
                     record["dense_peak_mb"], record["banded_peak_mb"], record.get("memory_ratio")])
        print(f"  measured length {length}", file=sys.stderr)

    short = short_sequences(max(3, args.repeats))
    targets = {2048: 1.5, 4096: 3.0, 8192: 6.0, 16384: 12.0}
    checks = {f"speedup_{n}": {"target": t, "measured": r["speedup"], "met": r["speedup"] >= t}
              for r in records for n, t in targets.items() if r["length"] == n}
    by_len = {r["length"]: r for r in records}
    if 8192 in by_len and by_len[8192].get("memory_ratio") is not None:
        checks["memory_ratio_8192"] = {"target": 1.0, "measured": by_len[8192]["memory_ratio"],
                                       "met": by_len[8192]["memory_ratio"] <= 1.0}
    if 8192 in by_len and 16384 in by_len and by_len[8192].get("banded_peak_mb"):
        growth = by_len[16384]["banded_peak_mb"] / by_len[8192]["banded_peak_mb"]
        checks["banded_memory_growth_8k_to_16k"] = {"target": 2.0, "measured": growth,
                                                    "met": growth <= 2.2}

    print_table(["length", "dense s", "banded s", "speedup", "dense fwd s", "flex fwd s",
                 "dense MB", "banded MB", "mem ratio"], rows)
    print_table(["batch", "length", "dense fwd s", "banded fwd s", "dense fwd+bwd s",
                 "banded fwd+bwd s", "auto picks"],
                [[r["batch"], r["length"], r["dense_fwd_s"], r["banded_fwd_s"],
                  r["dense_fwd_bwd_s"], r["banded_fwd_bwd_s"], r["auto"]]
                 for r in short])
    for name, check in checks.items():
        print(f"{name}: {check['measured']:.3g} (target {check['target']}) "
              f"{'OK' if check['met'] else 'MISSED'}")
    payload = {"benchmark": "attention", "setup": SETUP, "machine": machine_info(),
               "results": records, "checks": checks, "short": short}
    path = write_json("attention", payload, args.out)
    plot(records, path.with_suffix(".png"))
    print(f"wrote {path}")
    return payload


def plot(records: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in records]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    ax_t.loglog(lengths, [r["dense_fwd_bwd_s"] for r in records], "o-", label="dense fwd+bwd")
    ax_t.loglog(lengths, [r["banded_fwd_bwd_s"] for r in records], "o-", label="banded fwd+bwd")
    if all(r["flex_fwd_s"] for r in records):
        ax_t.loglog(lengths, [r["flex_fwd_s"] for r in records], "o--", label="flex fwd")
    ax_t.set(xlabel="length", ylabel="seconds", title="time")
    ax_t.legend()
    for key, label in (("dense_peak_mb", "dense"), ("banded_peak_mb", "banded")):
        if all(r.get(key) for r in records):
            ax_m.loglog(lengths, [r[key] for r in records], "o-", label=label)
    ax_m.set(xlabel="length", ylabel="peak MB (fwd+bwd)", title="memory")
    ax_m.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
