"""bench.compare's profiles: for a missed target, a torch.profiler table of the slowest part."""

from __future__ import annotations

from dataclasses import replace

from moe_diffuseq.generation import sample_ids

from .common import (
    MODEL_NAMES,
    QUALITY_BATCH,
    QUALITY_SRC_LEN,
    QUALITY_TRG_LEN,
    random_batch,
    train_step_fn,
)
from .compare_models import build


def profile_table(name: str, summary: dict, args) -> str:
    """torch.profiler table of the slowest part behind a missed target: MoE-DiffuSeq's side, and
    for a quality target the baseline's too, at the quality runs' shape (so the two tables show
    where the per-step gap goes)."""
    from torch.profiler import ProfilerActivity, profile

    if name.startswith("quality_"):
        length, trg_len, batch_size = QUALITY_SRC_LEN, QUALITY_TRG_LEN, QUALITY_BATCH
        variants: tuple[str, ...] = ("moe", "sdpa")
    else:
        trg_len, batch_size, variants = args.trg_len, 1, ("moe",)
        if name == "sampling_speedup":
            by_length = summary["sampling_speedup_by_length"]
            length = min(by_length, key=by_length.get)
        else:
            length = 4096 if name.endswith("4k") else 8192
    memory = name.startswith("memory")
    tables = []
    for variant in variants:
        model = build(variant, args.hidden, args.layers, length, trg_len)
        batch = random_batch(length, trg_len, batch=batch_size)
        if name == "sampling_speedup":
            model.eval()
            sample_ids(model, batch, replace(model.sampling_config, steps=2), seed=0)  # warm-up

            def work(model=model, batch=batch):
                sample_ids(model, batch, replace(model.sampling_config, steps=5), seed=0)
        else:
            work = train_step_fn(model, batch)
            work()  # warm-up (optimizer state)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=memory) as prof:
            work()
        sort = "self_cpu_memory_usage" if memory else "self_cpu_time_total"
        what = "5 sampling steps" if name == "sampling_speedup" else "one training step"
        table = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40)
        tables.append(f"{MODEL_NAMES[variant]}, source {length}, target {trg_len}, "
                      f"batch {batch_size}, {what}:\n" + table)
    return "\n".join(tables)
