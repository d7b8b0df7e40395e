"""What reading a long source costs: MoE-DiffuSeq as configured by default (every target position
reads the whole source in every layer: global target rows, ``target_keys: false``), the same
global both ways (``target_keys: true``: every source position also reads the target), with the
window only, and the DiffuSeq baseline (full attention through PyTorch's sdpa, a dense FFN of the
same active width), at long sources.

For each (model, source length), in a fresh process: one layer's attention forward+backward
(seconds), one whole-model training step (seconds, tokens/s) and the step's peak memory. The
summary holds the ratios the long-document targets are stated in (tokens/s of the window-only
model over target-global, and of target-global over the baseline).

    python -m bench.long_cost --quick            # 2k and 8k, one repeat
    python -m bench.long_cost                    # 2k, 8k and 16k (make bench-long-cost)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .common import (
    QUICKSTART_EXPERTS,
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

WIDTH, EXPERTS = QUICKSTART_WIDTH, QUICKSTART_EXPERTS
MODELS = {
    # Every setting spelled out, so that a changed default cannot change what a name measures.
    "target_global": {"attention": {"backend": "auto", "target_global": True,
                                    "target_keys": False}, "moe": EXPERTS},
    "target_both_ways": {"attention": {"backend": "auto", "target_global": True,
                                       "target_keys": True}, "moe": EXPERTS},
    "window_only": {"attention": {"backend": "auto", "target_global": False}, "moe": EXPERTS},
    "sdpa_baseline": {"attention": {"backend": "full_sdpa", "target_global": False}, "moe": None,
                      "ffn_hidden": EXPERTS["top_k"] * EXPERTS["expert_hidden"]},
}
TARGETS = {"target_global_cost_8k": 1.3, "speedup_vs_sdpa_8k": 2.0}


def build(model: str, src_len: int, trg_len: int, window: int, vocab: int = 4096):
    from moe_diffuseq import MoEDiffuSeq
    from moe_diffuseq.config import NetworkConfig

    spec = dict(MODELS[model])
    spec["attention"] = {**spec["attention"], "window": window}
    network = NetworkConfig(vocab_size=vocab, max_src_len=src_len, max_trg_len=trg_len, **WIDTH,
                            **spec)
    torch.manual_seed(0)
    return MoEDiffuSeq(network=network, ema_decay=0.0)


def attention_seconds(model, batch, repeats: int) -> float:
    """Median fwd+bwd seconds of the first block's attention on the batch's layout."""
    net = model.denoiser
    block = net.blocks[0].attn
    globals_ = net.global_tokens(batch.global_mask, batch.input_mask, batch.padding_mask)
    attention = net.config.attention
    rows = (batch.input_mask & ~batch.padding_mask
            if attention.target_global and not attention.target_keys else None)
    x = torch.randn(len(batch), batch.input_ids.shape[1], WIDTH["hidden_size"], requires_grad=True)
    times = []
    for i in range(repeats + 1):  # the first is warm-up
        start = time.perf_counter()
        block(x, globals_, batch.padding_mask, rows).sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def child(model_name: str, src_len: int, trg_len: int, window: int, repeats: int) -> dict:
    model = build(model_name, src_len, trg_len, window)
    batch = random_batch(src_len, trg_len)
    attention = attention_seconds(model, batch, repeats)
    step = train_step_fn(model, batch)
    reset_peak_rss()
    before = current_rss_mb()
    step()  # warm-up: the optimizer's state appears here
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    tokens = batch.input_ids.numel()
    return {"attention_fwd_bwd_s": attention, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "peak_mb": peak_rss_mb() - before}


def summarize(results: dict) -> dict:
    def ratio(a: str, b: str, length: str) -> float | None:
        x, y = results.get(a, {}).get(length, {}), results.get(b, {}).get(length, {})
        if "tokens_per_s" not in x or "tokens_per_s" not in y:
            return None
        return x["tokens_per_s"] / y["tokens_per_s"]

    summary = {"target_global_cost_8k": ratio("window_only", "target_global", "8192"),
               "speedup_vs_sdpa_8k": ratio("target_global", "sdpa_baseline", "8192"),
               "target_both_ways_cost_8k": ratio("window_only", "target_both_ways", "8192")}
    checks = {
        "target_global_cost_8k": summary["target_global_cost_8k"] is not None
        and summary["target_global_cost_8k"] <= TARGETS["target_global_cost_8k"],
        "speedup_vs_sdpa_8k": summary["speedup_vs_sdpa_8k"] is not None
        and summary["speedup_vs_sdpa_8k"] >= TARGETS["speedup_vs_sdpa_8k"],
    }
    return {**summary, "checks": checks, "targets": TARGETS}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2k and 8k, one repeat")
    parser.add_argument("--lengths", nargs="+", type=int, default=None)
    parser.add_argument("--trg-len", type=int, default=256)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats (default 5; quick 1)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--src-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    if args.child:
        print(json.dumps(child(args.child, args.src_len, args.trg_len, args.window, repeats)))
        return {}
    lengths = args.lengths or ([2048, 8192] if args.quick else [2048, 8192, 16384])
    results: dict[str, dict[str, dict]] = {m: {} for m in args.models}
    rows = []
    for length in lengths:
        for name in args.models:  # interleaved, so a slow spell of the machine hits every model
            r = measure_in_subprocess(
                "bench.long_cost", ["--child", name, "--src-len", str(length), "--trg-len",
                                    str(args.trg_len), "--window", str(args.window),
                                    "--repeats", str(repeats)], timeout=3600)
            results[name][str(length)] = r
            rows.append([name, length, r.get("attention_fwd_bwd_s"), r.get("step_s"),
                         r.get("tokens_per_s"), r.get("peak_mb"), r.get("error")])
            print_table(["model", "source", "attn fwd+bwd s", "step s", "tokens/s", "peak MB",
                         "error"], rows[-1:])
    print()
    print_table(["model", "source", "attn fwd+bwd s", "step s", "tokens/s", "peak MB", "error"],
                rows)
    summary = summarize(results)
    print(json.dumps(summary, indent=2))
    payload = {"benchmark": "long_cost", "quick": args.quick,
               "setup": {**WIDTH, "experts": EXPERTS, "trg_len": args.trg_len,
                         "window": args.window, "repeats": repeats, "lengths": lengths},
               "machine": machine_info(), "results": results, "summary": summary}
    path = write_json("long_cost", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
