"""One training step of the whole model (quickstart width) on a long source, per attention
backend, each in its own process: wall time and peak memory.

    python -m bench.long_document [--src-len 16384] [--backends banded dense] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .common import (
    QUICKSTART_WIDTH,
    current_rss_mb,
    machine_info,
    measure_in_subprocess,
    peak_rss_mb,
    print_table,
    random_batch,
    reset_peak_rss,
    train_step_fn,
    write_json,
)

WIDTH = QUICKSTART_WIDTH


def one_step(backend: str, src_len: int, trg_len: int, window: int, vocab: int = 4096) -> dict:
    from moe_diffuseq import MoEDiffuSeq
    from moe_diffuseq.config import AttentionConfig, MoEConfig, NetworkConfig

    torch.manual_seed(0)
    network = NetworkConfig(
        vocab_size=vocab, max_src_len=src_len, max_trg_len=trg_len, **WIDTH,
        attention=AttentionConfig(window=window, backend=backend),
        moe=MoEConfig(num_experts=4, expert_hidden=128),
    )
    model = MoEDiffuSeq(network=network, ema_decay=0.0)
    step = train_step_fn(model, random_batch(src_len, trg_len, vocab))
    reset_peak_rss()
    before = current_rss_mb()
    start = time.perf_counter()
    loss = step()
    return {"seconds": time.perf_counter() - start, "peak_mb": peak_rss_mb() - before,
            "loss": float(loss)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src-len", type=int, default=16384)
    parser.add_argument("--trg-len", type=int, default=128)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--backends", nargs="+", default=["banded", "dense"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_step(args.child, args.src_len, args.trg_len, args.window)))
        return {}
    results = {}
    for backend in args.backends:
        results[backend] = measure_in_subprocess(
            "bench.long_document",
            ["--child", backend, "--src-len", str(args.src_len), "--trg-len", str(args.trg_len),
             "--window", str(args.window)],
        )
    rows = [[b, r.get("seconds"), r.get("peak_mb"), r.get("loss"), r.get("error")]
            for b, r in results.items()]
    print_table(["backend", "step s", "peak MB", "loss", "error"], rows)
    payload = {"benchmark": "long_document",
               "setup": {**WIDTH, "src_len": args.src_len, "trg_len": args.trg_len,
                         "window": args.window}, "machine": machine_info(), "results": results}
    path = write_json("long_document", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
