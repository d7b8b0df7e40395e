"""MoE feed-forward benchmark: fwd+bwd time of the routed MoE (sorted dispatch) against a
dense FFN of the same active parameters and against computing every expert, interleaved,
in fp32 and bf16.

    python -m bench.moe [--tokens 8192] [--repeats 5] [--quick] [--out FILE.json]

Setup (issue 4): 8 experts, top-2, d_model 512, expert hidden 1024, 8192 tokens; the dense
FFN has hidden 2048 (= top_k * expert hidden), so both do the same matmul FLOPs per token.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moe_diffuseq.moe import DenseFeedForward, MoEFeedForward

from .common import machine_info, print_table, time_call, write_json


def compute_all_experts(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with the (sparse) top-k weights."""
    routing = moe.router(x)
    dense_weights = torch.zeros_like(routing.probs).scatter(1, routing.expert_index,
                                                            routing.expert_weight)
    ex = moe.experts
    hidden = F.gelu(torch.einsum("nd,edh->enh", x, ex.w1) + ex.b1[:, None])
    out = torch.einsum("enh,ehd->end", hidden, ex.w2) + ex.b2[:, None]
    return torch.einsum("end,ne->nd", out, dense_weights.to(out.dtype))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--expert-hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2048 tokens, 2 repeats")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 2048, 2
    torch.manual_seed(0)
    moe = MoEFeedForward(args.d_model, args.expert_hidden, args.experts, args.top_k)
    dense = DenseFeedForward(args.d_model, args.expert_hidden * args.top_k)

    records, rows = [], []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(args.tokens, args.d_model)
        variants = {
            "dense_ffn": lambda: dense(x)[0],
            "moe_sorted": lambda: moe(x)[0],
            "moe_looped": lambda: _with_dispatch(moe, "looped", x),
            "all_experts": lambda: compute_all_experts(moe, x),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}

        def fwd_bwd(fn):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y = fn()
            y.float().square().mean().backward()

        for fn in variants.values():  # warm-up
            fwd_bwd(fn)
        for _ in range(args.repeats):  # interleaved: drift hits every variant alike
            for name, fn in variants.items():
                times[name].append(time_call(lambda f=fn: fwd_bwd(f), repeats=1, warmup=0))
        medians = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
        for name, seconds in medians.items():
            record = {"dtype": str(dtype).removeprefix("torch."), "variant": name,
                      "fwd_bwd_s": seconds, "tokens_per_s": args.tokens / seconds,
                      "speed_vs_dense": medians["dense_ffn"] / seconds}
            records.append(record)
            rows.append([record["dtype"], name, seconds, record["tokens_per_s"],
                         record["speed_vs_dense"]])

    targets = {"float32": 0.95, "bfloat16": 0.85}
    checks = {}
    for r in records:
        if r["variant"] == "moe_sorted":
            target = targets[r["dtype"]]
            checks[f"moe_speed_vs_dense_{r['dtype']}"] = {"target": target,
                                                          "measured": r["speed_vs_dense"],
                                                          "met": r["speed_vs_dense"] >= target}
    print_table(["dtype", "variant", "fwd+bwd s", "tokens/s", "speed vs dense"], rows)
    for name, check in checks.items():
        print(f"{name}: {check['measured']:.3f} (target {check['target']}) "
              f"{'OK' if check['met'] else 'MISSED'}")
    setup = {k: getattr(args, k)
             for k in ("tokens", "d_model", "expert_hidden", "experts", "top_k", "repeats")}
    payload = {"benchmark": "moe", "setup": setup, "machine": machine_info(), "results": records,
               "checks": checks}
    path = write_json("moe", payload, args.out)
    plot(records, path.with_suffix(".png"))
    print(f"wrote {path}")
    return payload


def _with_dispatch(moe: MoEFeedForward, dispatch: str, x: torch.Tensor) -> torch.Tensor:
    previous, moe.dispatch = moe.dispatch, dispatch
    try:
        return moe(x)[0]
    finally:
        moe.dispatch = previous


def plot(records: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in records}, reverse=True)
    variants = [r["variant"] for r in records if r["dtype"] == dtypes[0]]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(dtypes)
    for i, dtype in enumerate(dtypes):
        values = [next(r["tokens_per_s"] for r in records
                       if r["dtype"] == dtype and r["variant"] == v) for v in variants]
        ax.bar([j + i * width for j in range(len(variants))], values, width, label=dtype)
    ax.set_xticks([j + width * (len(dtypes) - 1) / 2 for j in range(len(variants))], variants)
    ax.set(ylabel="tokens/s (fwd+bwd)", title="MoE FFN vs dense FFN (same active parameters)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
