"""bench.compare's plots: throughput and memory against source length; training loss against
wall-clock seconds for the quality part."""

from __future__ import annotations

from .common import MODEL_NAMES, VARIANTS


def plot(payload: dict, path) -> None:
    """compare.png from the payload; beside it compare_quality.png when it has a quality part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(int(n) for n in payload["throughput_tokens_per_s"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for v in VARIANTS:
        ax_t.plot(lengths, [payload["throughput_tokens_per_s"][n][v] for n in lengths], "o-",
                  label=v)
        ax_m.plot(lengths, [payload["peak_memory_mb"][n][v] or float("nan") for n in lengths],
                  "o-", label=v)
    ax_t.set(xscale="log", xlabel="source length", ylabel="training tokens/s", title="throughput")
    ax_m.set(xscale="log", yscale="log", xlabel="source length", ylabel="peak MB (one step)",
             title="memory")
    ax_t.legend()
    ax_m.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    if payload["quality"]:
        plot_quality(payload["quality"], path.with_name(path.stem + "_quality.png"))


def plot_quality(qualities: dict, path) -> None:
    """Training loss against wall-clock seconds, one panel per task, every model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(qualities), figsize=(5 * len(qualities), 4), squeeze=False)
    for ax, (task, per_model) in zip(axes[0], qualities.items(), strict=True):
        for v, q in per_model.items():
            points = q["train_loss_vs_seconds"]
            if not points:
                continue
            seconds, losses = zip(*points, strict=True)
            window = max(1, len(losses) // 20)  # running mean: single-batch losses are noisy
            windows = [losses[max(0, i - window + 1) : i + 1] for i in range(len(losses))]
            smooth = [sum(w) / len(w) for w in windows]
            ax.plot(seconds, smooth, label=f"{MODEL_NAMES.get(v, v)}: val loss {q['val_loss']:.3g}")
        ax.set(xlabel="training wall-clock s", ylabel="training loss (running mean)", title=task)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
