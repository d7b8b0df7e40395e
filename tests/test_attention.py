"""Every backend against an independent float64 brute-force softmax, forward and backward."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_diffuseq.attention import BACKENDS, KERNELS, resolve_backend, sparse_attention, sparse_mask
from moe_diffuseq.attention.xformers_backend import xformers_available


def brute_force(q, k, v, window, dilation, global_mask, key_padding_mask, global_rows=None):
    """Loop over (b, i, j) to build the mask from the definition, then a plain softmax."""
    batch, heads, length, dim = q.shape
    half = window // 2
    allowed = torch.zeros(batch, length, length, dtype=torch.bool)
    for b, i, j in itertools.product(range(batch), range(length), range(length)):
        rel = j - i
        local = abs(rel) <= dilation * half and rel % dilation == 0
        glob = global_mask is not None and bool(global_mask[b, i] or global_mask[b, j])
        row = global_rows is not None and bool(global_rows[b, i])  # reads all, read by its band
        padded = key_padding_mask is not None and bool(key_padding_mask[b, j])
        allowed[b, i, j] = (local or glob or row) and not padded
    scores = (q @ k.transpose(-1, -2)) / dim**0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key outputs zeros
    return weights @ v, allowed


def make_inputs(batch, heads, length, dim, globals_, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64)
               for _ in range(3))
    if globals_ == "none":
        glob = None
    elif globals_ == "all":
        glob = torch.ones(batch, length, dtype=torch.bool)
    else:
        glob = torch.rand(batch, length, generator=gen) < 0.15
        glob[:, 0] = True
    pad = None
    if padded:
        pad = torch.zeros(batch, length, dtype=torch.bool)
        pad[-1, length - max(1, length // 3) :] = True
    return q, k, v, glob, pad


GRID = [
    # (length, window, dilation, globals, padded, block)
    (13, 1, 1, "none", False, 4),
    (13, 1, 1, "none", True, 4),  # padded rows see no key at all: zeros, no NaN
    (13, 3, 1, "random", True, 4),
    (21, 5, 2, "random", True, 8),
    (21, 7, 3, "none", True, 8),
    (17, 64, 1, "random", False, 4),  # window larger than the sequence
    (19, 4, 1, "all", True, 5),
    (33, 8, 3, "random", False, 16),
    (30, 6, 2, "none", False, 7),  # length not a multiple of the block
]


def test_mask_matches_definition():
    q, k, v, glob, pad = make_inputs(2, 1, 15, 4, "random", True, 0)
    _, allowed = brute_force(q, k, v, 5, 2, glob, pad)
    assert torch.equal(sparse_mask(15, window=5, dilation=2, global_mask=glob, key_padding_mask=pad,
                                   batch=2), allowed)


@pytest.mark.parametrize("backend", ["dense", "banded"])
@pytest.mark.parametrize("length,window,dilation,globals_,padded,block", GRID)
def test_backend_matches_brute_force(backend, length, window, dilation, globals_, padded, block):
    q, k, v, glob, pad = make_inputs(2, 3, length, 8, globals_, padded, seed=length + window)
    for t in (q, k, v):
        t.requires_grad_(True)
    ref, _ = brute_force(q, k, v, window, dilation, glob, pad)
    out = sparse_attention(
        q, k, v, window=window, dilation=dilation, global_mask=glob, key_padding_mask=pad,
        backend=backend, block_size=block,
    )
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    upstream = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (q, k, v))
    grads_out = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads_out, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=f"grad {name}")


@pytest.mark.parametrize("length,window,dilation,globals_,padded,block",
                         [GRID[1], GRID[3], GRID[6], GRID[7]])
def test_banded_chunked_ops_in_one_block_chunks_match_brute_force(length, window, dilation,
                                                                  globals_, padded, block):
    """The chunked forward (off CPU) and the backward run long inputs in many chunks; force one
    block per chunk, and the chunked forward on CPU, so the chunk seams are tested."""
    from moe_diffuseq.attention import banded

    q, k, v, glob, pad = make_inputs(2, 2, length, 4, globals_, padded, seed=7)
    for t in (q, k, v):
        t.requires_grad_(True)
    ref, _ = brute_force(q, k, v, window, dilation, glob, pad)
    out = banded.banded_attention(
        q, k, v, window=window, dilation=dilation, global_mask=glob, key_padding_mask=pad,
        block_size=block, fused_cpu_forward=False, chunk_elements=1,
    )
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    upstream = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad((out * upstream).sum(), (q, k, v)),
        torch.autograd.grad((ref * upstream).sum(), (q, k, v)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_banded_block_attention_passes_gradcheck():
    from moe_diffuseq.attention.banded import banded_attention

    q, k, v, glob, pad = make_inputs(1, 2, 11, 3, "random", True, seed=5)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: banded_attention(q, k, v, window=4, global_mask=glob, key_padding_mask=pad,
                                         block_size=3), inputs
    )


@pytest.mark.parametrize("length,window,dilation,globals_,padded,block", GRID[2:5])
def test_flex_forward_matches_brute_force_on_cpu(length, window, dilation, globals_, padded, block):
    from moe_diffuseq.attention.flex import flex_sparse_attention

    q, k, v, glob, pad = make_inputs(2, 2, length, 8, globals_, padded, seed=3)
    ref, _ = brute_force(q, k, v, window, dilation, glob, pad)
    with torch.no_grad():
        out = flex_sparse_attention(
            q.float(), k.float(), v.float(), window=window, dilation=dilation, global_mask=glob,
            key_padding_mask=pad, compile=False,
        )
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_flex_forward_matches_brute_force_on_cpu():
    # As production runs it: through torch.compile (inductor's CPU backend), not the eager fallback.
    from torch._dynamo.utils import counters

    from moe_diffuseq.attention.flex import flex_sparse_attention

    _, window, dilation, globals_, padded, _ = GRID[3]
    graphs = []
    for length in (21, 40):  # one length bucket (128): one compiled graph serves both
        q, k, v, glob, pad = make_inputs(2, 2, length, 8, globals_, padded, seed=3)
        ref, _ = brute_force(q, k, v, window, dilation, glob, pad)
        with torch.no_grad():
            out = flex_sparse_attention(q.float(), k.float(), v.float(), window=window,
                                        dilation=dilation, global_mask=glob, key_padding_mask=pad)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]


@pytest.mark.parametrize("length,padded", [(21, True), (130, False), (300, True)])
def test_flex_length_buckets_leave_the_output_unchanged(length, padded):
    from moe_diffuseq.attention.flex import bucket_length, flex_sparse_attention

    assert bucket_length(length) > length  # the padded path runs
    q, k, v, glob, pad = make_inputs(2, 2, length, 8, "random", padded, seed=length)
    ref, _ = brute_force(q, k, v, 6, 1, glob, pad)
    with torch.no_grad():
        out = flex_sparse_attention(q.float(), k.float(), v.float(), window=6, global_mask=glob,
                                    key_padding_mask=pad, compile=False, bucket=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_flex_length_buckets_are_few_and_tight():
    from moe_diffuseq.attention.flex import bucket_length

    sizes = {bucket_length(n) for n in range(1, 16385)}
    assert len(sizes) == 14 and all(s % 128 == 0 for s in sizes)
    assert all(n <= bucket_length(n) < 1.5 * n for n in range(257, 16385))


def test_flex_refuses_backward_on_cpu_with_clear_error():
    q, k, v, glob, pad = make_inputs(1, 1, 8, 4, "none", False, 0)
    q = q.float().requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        sparse_attention(q, k.float(), v.float(), window=3, backend="flex")


def test_auto_on_cpu_picks_dense_for_short_and_banded_for_long_sequences():
    from moe_diffuseq.attention import DENSE_CPU_LENGTH

    # window 8, block 4: a banded block reads 12 keys, so the length floor decides the switch.
    pick = {n: resolve_backend("auto", torch.zeros(1, 1, n, 2), window=8, block_size=4)
            for n in (5, DENSE_CPU_LENGTH, DENSE_CPU_LENGTH + 1, 2000)}
    assert list(pick.values()) == ["dense", "dense", "banded", "banded"]
    n_long = DENSE_CPU_LENGTH + 8
    q, k, v, glob, pad = make_inputs(2, 2, n_long, 4, "random", True, seed=1)
    # Both sides of the switch give the dense reference's output (held to the brute-force
    # definition by the tests above).
    for n in (DENSE_CPU_LENGTH, n_long):
        kwargs = dict(window=8, global_mask=glob[:, :n], key_padding_mask=pad[:, :n],
                      block_size=4)
        out = sparse_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], backend="auto", **kwargs)
        ref = sparse_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], backend="dense", **kwargs)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_auto_on_cuda_sends_padded_batches_away_from_xformers():
    from moe_diffuseq.attention import pick_backend

    facts = dict(window=8, xformers=True, flex=True)
    assert pick_backend("cuda", torch.bfloat16, 512, key_padding=False, **facts) == "xformers"
    # xformers refuses padding
    assert pick_backend("cuda", torch.bfloat16, 512, key_padding=True, **facts) == "flex"
    # xformers' kernels are fp16/bf16 only
    assert pick_backend("cuda", torch.float32, 512, **facts) == "flex"
    assert pick_backend("cuda", torch.bfloat16, 512, key_padding=True, window=8, xformers=True,
                        flex=False) == "banded"


@pytest.mark.cuda
def test_auto_on_cuda_trains_on_a_padded_bf16_batch():
    q, k, v, glob, pad = make_inputs(2, 2, 300, 16, "random", True, seed=3)
    q, k, v = (x.cuda().bfloat16().requires_grad_(True) for x in (q, k, v))
    assert bool(pad.any())
    out = sparse_attention(q, k, v, window=32, global_mask=glob.cuda(), key_padding_mask=pad.cuda(),
                           backend="auto")
    ref, _ = brute_force(q.detach().double().cpu(), k.detach().double().cpu(),
                         v.detach().double().cpu(), 32, 1, glob, pad)
    torch.testing.assert_close(out.detach().double().cpu(), ref, atol=3e-2, rtol=3e-2)
    out.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_bad_arguments_name_the_argument():
    q = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="global_mask"):
        sparse_attention(q, q, q, window=3, global_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="not one of"):
        sparse_attention(q, q, q, window=3, backend="nope")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flex", "xformers"])
def test_cuda_backends_match_dense_in_bf16(backend):
    if backend == "xformers" and not xformers_available():
        pytest.skip("xformers is missing or its kernels do not run with this torch")
    q, k, v, glob, _ = make_inputs(2, 4, 300, 64, "random", False, 0)
    q, k, v = (t.cuda().bfloat16().requires_grad_(True) for t in (q, k, v))
    glob = glob.cuda()
    ref = sparse_attention(q, k, v, window=32, global_mask=glob, backend="dense")
    out = sparse_attention(q, k, v, window=32, global_mask=glob, backend=backend)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    g_ref = torch.autograd.grad(ref.float().sum(), (q, k, v))
    g_out = torch.autograd.grad(out.float().sum(), (q, k, v))
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["full_sdpa", "full_eager"])
@pytest.mark.parametrize("padded", [False, True])
def test_full_attention_baselines_match_brute_force_with_unbounded_window(backend, padded):
    q, k, v, _, pad = make_inputs(2, 2, 19, 8, "none", padded, seed=11)
    for t in (q, k, v):
        t.requires_grad_(True)
    ref, _ = brute_force(q, k, v, 2 * 19 + 1, 1, None, pad)
    # window ignored
    out = sparse_attention(q, k, v, window=3, key_padding_mask=pad, backend=backend)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    grads_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads_out, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_every_configurable_backend_has_one_kernel():
    # One registry: the config's choices are auto plus exactly the registered kernels.
    assert BACKENDS[0] == "auto" and set(BACKENDS[1:]) == set(KERNELS)
    with pytest.raises(ValueError, match="not one of"):
        sparse_attention(*(torch.zeros(1, 1, 4, 2),) * 3, window=2, backend="sliding")


@pytest.mark.parametrize("backend", ["dense", "banded"])
@pytest.mark.parametrize("padded", [False, True])
def test_global_rows_read_every_key_without_being_read_forward_and_backward(backend, padded):
    # A target region at the end of each row (of different lengths): its queries read every key,
    # while the other queries keep their band, the symmetric globals, and no more.
    length, window = 29, 4
    q, k, v, glob, pad = make_inputs(2, 2, length, 8, "random", padded, seed=5)
    rows = torch.zeros(2, length, dtype=torch.bool)
    rows[0, 20:] = True
    rows[1, 12:18] = True
    if pad is not None:
        rows &= ~pad
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    ref, allowed = brute_force(q, k, v, window, 1, glob, pad, global_rows=rows)
    assert allowed[rows].float().mean() > 0.7 and allowed[~rows].float().mean() < 0.7
    out = sparse_attention(q, k, v, window=window, global_mask=glob, key_padding_mask=pad,
                           backend=backend, block_size=8, global_rows=rows)
    torch.testing.assert_close(out, ref, atol=1e-7, rtol=1e-7)
    weight = torch.randn_like(ref)
    expected = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    got = torch.autograd.grad((out * weight).sum(), (q, k, v))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-7, rtol=1e-7)


def test_auto_on_cpu_keeps_short_sequences_dense_whatever_the_window():
    from moe_diffuseq.attention import DENSE_CPU_LENGTH, pick_backend

    # A narrow band: dense up to DENSE_CPU_LENGTH, banded past it.
    assert pick_backend("cpu", torch.float32, DENSE_CPU_LENGTH, window=64) == "dense"
    assert pick_backend("cpu", torch.float32, DENSE_CPU_LENGTH + 1, window=64) == "banded"
    # A wide band: dense up to twice a block's key span (64 + 2 * 128 keys).
    assert pick_backend("cpu", torch.float32, 640, window=256) == "dense"
    assert pick_backend("cpu", torch.float32, 641, window=256) == "banded"
