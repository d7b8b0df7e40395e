"""bench.compare's training cost: tokens/s of a training step, its peak memory (each figure in
a child process: ``python -m bench.compare --child VARIANT LENGTH``), and how close the linear
layers come to bare GEMMs of the same shapes."""

from __future__ import annotations

import time

import torch

from .common import (
    VARIANTS,
    current_rss_mb,
    measure_in_subprocess,
    peak_rss_mb,
    random_batch,
    reset_peak_rss,
    time_call,
    train_step_fn,
)
from .compare_models import build


def training_throughput(length: int, trg_len: int, hidden: int, layers: int,
                        repeats: int) -> dict[str, float]:
    """Training tokens/s of every variant at one source length: median fwd+bwd+AdamW step,
    batch 1, the variants' steps interleaved so a slow spell of the machine slows them alike."""
    steps = {v: train_step_fn(build(v, hidden, layers, length, trg_len),
                              random_batch(length, trg_len)) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(repeats):
        for v, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[v].append(time.perf_counter() - start)
    tokens = length + trg_len + 3
    return {v: tokens / sorted(t)[len(t) // 2] for v, t in times.items()}


def peak_memory(length: int, trg_len: int, hidden: int, layers: int) -> dict[str, float | None]:
    """Peak MB of one training step of every variant, each in its own process (see memory_child)."""
    width = ["--trg-len", str(trg_len), "--hidden", str(hidden), "--layers", str(layers)]
    figures = {v: measure_in_subprocess("bench.compare", ["--child", v, str(length), *width])
               for v in VARIANTS}
    return {v: figure.get("peak_mb") for v, figure in figures.items()}


def memory_child(variant: str, src_len: int, trg_len: int, hidden: int, layers: int) -> dict:
    """What a `--child` process prints: the RSS one training step adds at its peak."""
    model = build(variant, hidden, layers, src_len, trg_len)
    step = train_step_fn(model, random_batch(src_len, trg_len))
    reset_peak_rss()
    before = current_rss_mb()
    step()
    return {"peak_mb": peak_rss_mb() - before}


def gemm_seconds(shapes: list[tuple[int, int, int]], repeats: int) -> float:
    """fwd+bwd of bare matmuls, one linear layer per (rows, in, out):
    y = x @ w, dx = dy @ w.T, dw = x.T @ dy."""
    operands = [(torch.randn(m, k), torch.randn(k, n), torch.randn(m, n))
                for m, k, n in shapes if m > 0]

    def run():
        for x, w, dy in operands:
            x @ w, dy @ w.t(), x.t() @ dy

    return time_call(run, repeats=repeats)


def layer_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    """fwd+bwd of fn(x) (parameter and input gradients), median of repeats."""
    x = x.detach().requires_grad_(True)

    def run():
        y = fn(x)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(torch.ones_like(y))

    return time_call(run, repeats=repeats)


def linear_efficiency(variant: str, hidden: int, layers: int, length: int, trg_len: int,
                      repeats: int) -> dict:
    """Fraction of a same-shape GEMM's speed that the FFN/MoE and the attention projections
    reach (the experts' GEMMs get the token counts the router gives them)."""
    model = build(variant, hidden, layers, length, trg_len)
    block = model.denoiser.blocks[0]
    tokens = length + trg_len + 3
    x = torch.randn(1, tokens, hidden)
    ffn = block.ffn
    if hasattr(ffn, "experts"):
        with torch.no_grad():
            index = ffn.router(x.reshape(-1, hidden)).expert_index
        counts = torch.bincount(index.reshape(-1), minlength=ffn.num_experts).tolist()
        width = ffn.experts.w1.shape[-1]
        ffn_shapes = [s for n in counts for s in ((n, hidden, width), (n, width, hidden))]
    else:
        inner = ffn.fc1.out_features
        ffn_shapes = [(tokens, hidden, inner), (tokens, inner, hidden)]
    attn = block.attn
    proj_shapes = [(tokens, hidden, attn.qkv.out_features), (tokens, hidden, attn.out.out_features)]
    ffn_gemm, ffn_layer = gemm_seconds(ffn_shapes, repeats), layer_seconds(ffn, x, repeats)
    proj_gemm = gemm_seconds(proj_shapes, repeats)
    proj_layer = layer_seconds(lambda h: attn.out(attn.qkv(h)[..., :hidden]), x, repeats)
    return {"ffn": ffn_gemm / ffn_layer, "projections": proj_gemm / proj_layer,
            "ffn_layer_s": ffn_layer, "ffn_gemm_s": ffn_gemm,
            "projections_layer_s": proj_layer, "projections_gemm_s": proj_gemm}
