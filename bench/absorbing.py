"""Soft absorbing state on versus off: two trainings of the quickstart model with the same
seed, data and steps, in one run; validation loss curves in one plot.

    python -m bench.absorbing [--steps 1000] [--out FILE.json]

Each training runs ``moe-diffuseq fit`` on lightning_configs/quickstart.yaml in its own
process (runs/absorbing/{on,off}); the curves are read back from TensorBoard. The "on"
checkpoint is the one bench.sampling then uses with --ckpt runs/absorbing/on/checkpoints/last.ckpt.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .common import ROOT, machine_info, print_table, write_json


def finished(run: Path, steps: int) -> bool:
    """Whether run/ already holds a completed training of this many steps (--reuse)."""
    import torch

    last = run / "checkpoints" / "last.ckpt"
    if not last.exists():
        return False
    return torch.load(last, map_location="cpu", weights_only=True)["global_step"] == steps


def train(name: str, soft_absorbing: bool, steps: int, out: Path) -> float:
    import shutil

    import yaml

    shutil.rmtree(out / name, ignore_errors=True)  # one run per folder: no stale logs

    every = max(1, steps // 5)
    config = yaml.safe_load((ROOT / "lightning_configs" / "quickstart.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(out / name / "checkpoints")
    (out / name).mkdir(parents=True, exist_ok=True)
    config_path = out / name / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable, "-m", "moe_diffuseq", "fit", "--config", str(config_path),
        f"--model.diffusion.soft_absorbing={str(soft_absorbing).lower()}",
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={every}",
        f"--trainer.default_root_dir={out / name}",
        f"--trainer.logger.init_args.save_dir={out / name}",
        "--trainer.enable_progress_bar=false",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def curve(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runs", default="runs/absorbing")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a finished run of the same steps instead of retraining")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    runs = ROOT / args.runs
    results = {}
    for name, flag in (("on", True), ("off", False)):
        reused = args.reuse and finished(runs / name, args.steps)
        seconds = None if reused else train(name, flag, args.steps, runs)
        logdirs = {p.parent for p in (runs / name).rglob("events.out.tfevents.*")}
        logdir = max(logdirs, key=lambda d: d.stat().st_mtime)
        results[name] = {
            "soft_absorbing": flag,
            "train_seconds": seconds,
            "val_loss": curve(logdir, "val/loss"),
            "val_mse": curve(logdir, "val/mse"),
            "val_token_acc": curve(logdir, "val/token_acc"),
        }
    rows = [[n, r["train_seconds"], r["val_loss"][-1][1] if r["val_loss"] else None,
             r["val_token_acc"][-1][1] if r["val_token_acc"] else None] for n, r in results.items()]
    print_table(["soft absorbing", "train s", "final val loss", "final val token acc"], rows)
    setup = {"steps": args.steps, "config": "lightning_configs/quickstart.yaml"}
    payload = {"benchmark": "absorbing", "setup": setup, "machine": machine_info(),
               "results": results}
    path = write_json("absorbing", payload, args.out)
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path}")
    return payload


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        if r["val_loss"]:
            ax_l.plot(*zip(*r["val_loss"], strict=True), "o-", label=f"soft absorbing {name}")
        if r["val_token_acc"]:
            ax_a.plot(*zip(*r["val_token_acc"], strict=True), "o-", label=f"soft absorbing {name}")
    ax_l.set(xlabel="step", ylabel="validation loss", title="validation loss")
    ax_a.set(xlabel="step", ylabel="token accuracy (x0, mean over t)",
             title="validation token accuracy")
    ax_l.legend()
    ax_a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
