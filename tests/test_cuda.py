"""The CUDA paths against the CPU references: the fast kernels under target globals, and the
trainer configs' bf16 / FSDP training on padded batches. Skipped where no CUDA device is present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import data_args
from test_attention import brute_force, make_inputs

from moe_diffuseq.attention import sparse_attention
from moe_diffuseq.attention.xformers_backend import xformers_available

pytestmark = pytest.mark.cuda
REPO = Path(__file__).resolve().parents[1]


def _target_region(batch: int, length: int, pad: torch.Tensor | None) -> torch.Tensor:
    """A target region at the end of each row's unpadded part, of different lengths."""
    rows = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        end = length - (int(pad[b].sum()) if pad is not None else 0)
        rows[b, end - 40 - 17 * b: end] = True
    return rows


@pytest.mark.parametrize("backend,dtype,padded", [
    ("flex", torch.float32, True), ("flex", torch.bfloat16, True),
    ("xformers", torch.bfloat16, False),  # xformers takes no key padding (auto routes it away)
])
@pytest.mark.parametrize("target_keys", [True, False])
def test_cuda_kernels_match_brute_force_under_target_globals(backend, dtype, padded, target_keys):
    if backend == "xformers" and not xformers_available():
        pytest.skip("xformers is missing or its kernels do not run with this torch")
    length, window = 300, 32
    q, k, v, glob, pad = make_inputs(2, 2, length, 32, "random", padded, seed=7)
    region = _target_region(2, length, pad)
    # target_keys: the region is global both ways (rows and columns); else its rows only.
    both = glob | region if target_keys else glob
    rows = None if target_keys else region
    ref, _ = brute_force(q, k, v, window, 1, both, pad, global_rows=rows)
    cuda = [x.cuda().to(dtype).requires_grad_(True) for x in (q, k, v)]
    out = sparse_attention(*cuda, window=window, global_mask=both.cuda(),
                           key_padding_mask=None if pad is None else pad.cuda(), backend=backend,
                           global_rows=None if rows is None else rows.cuda())
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.detach().double().cpu(), ref.detach(), atol=tol, rtol=tol)
    weight = torch.randn_like(ref)
    for t in (q, k, v):
        t.requires_grad_(True)
    ref, _ = brute_force(q, k, v, window, 1, both, pad, global_rows=rows)
    expected = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    got = torch.autograd.grad((out.float() * weight.cuda().float()).sum(), cuda)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double().cpu(), e, atol=5 * tol, rtol=5 * tol)


@pytest.mark.parametrize("trainer", [
    ["--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed"],
    ["--trainer", "lightning_configs/trainer/fsdp.yaml"],  # bf16, FSDP + checkpointing of Block
], ids=["bf16", "fsdp"])
def test_fit_on_cuda_in_bf16_with_padded_batches(trainer, small_corpus, small_tokenizer_file,
                                                  tmp_path):
    # The trainer configs' GPU settings (bf16-mixed, backend auto) on real padded batches,
    # through the CLI as users run it.
    cmd = [sys.executable, "-m", "moe_diffuseq", "fit", "--config", "tests/configs/tiny.yaml",
           *trainer, *data_args(small_corpus, small_tokenizer_file), "--trainer.max_steps=6",
           "--trainer.val_check_interval=6", f"--trainer.default_root_dir={tmp_path}",
           "--trainer.enable_checkpointing=false"]
    path = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # a NaN loss would stop it with an error


def test_every_sampler_generates_on_cuda(small_tokenizer):
    from moe_diffuseq import MoEDiffuSeq
    from moe_diffuseq.diffusion.samplers import timesteps

    network = {"vocab_size": small_tokenizer.get_vocab_size(), "max_src_len": 32,
               "max_trg_len": 16, "embed_dim": 16, "hidden_size": 32, "num_layers": 1,
               "num_heads": 2, "attention": {"window": 8}}
    model = MoEDiffuSeq(network=network, diffusion={"steps": 100})
    model.set_tokenizer(small_tokenizer)
    on_host = timesteps(model.schedule, 20, "logsnr")
    model.cuda()
    # The step grid is built on the host whatever device the schedule's buffers are on.
    assert timesteps(model.schedule, 20, "logsnr") == on_host
    for sampler in ("dpm_solver++", "ddim", "ancestral"):
        texts = model.generate(["def f(x):\n    return x", "class A:\n    pass"], sampler=sampler,
                               steps=10, spacing="logsnr")
        assert len(texts) == 2 and all(isinstance(t, str) for t in texts), sampler
