"""The source pointer: the fast target-rows path against a plain (B, L, L) reference, forward
and backward, and what a saturated gate writes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from moe_diffuseq.attention.mask import marked_first
from moe_diffuseq.config import NetworkConfig
from moe_diffuseq.denoiser import Denoiser
from moe_diffuseq.pointer import SourcePointer


def _masks(lengths: list[tuple[int, int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target_mask, padding_mask) for rows of (source, target) lengths, padded to ``length``."""
    target = torch.zeros(len(lengths), length, dtype=torch.bool)
    padding = torch.ones(len(lengths), length, dtype=torch.bool)
    for row, (src, trg) in enumerate(lengths):
        target[row, src : src + trg] = True
        padding[row, : src + trg] = False
    return target, padding


def _reference(pointer: SourcePointer, h, z_t, x0, target, padding) -> torch.Tensor:
    """Every row against every key, masked to source keys, kept on target rows only; with
    neighbours, each side's match of position i-1 (or i+1) against j-1 (or j+1) added; with a
    span, the scores of target row i -/+ d against source key j -/+ d, one entry at a time."""
    q, k = pointer.query(h), pointer.key(h)
    scores = q @ k.transpose(1, 2)
    width = h.shape[-1]
    if pointer.neighbour_query is not None:
        length = z_t.shape[1]
        for side, shift in enumerate((-1, 1)):
            held = torch.stack([z_t[:, i + shift] if 0 <= i + shift < length
                                else torch.zeros_like(z_t[:, 0]) for i in range(length)], 1)
            qn, kn = pointer.neighbour_query[side](held), pointer.neighbour_key[side](held)
            if pointer.neighbour_gate is not None:
                qn = torch.sigmoid(pointer.neighbour_gate(h))[..., side : side + 1] * qn
            scores = scores + qn @ kn.transpose(1, 2)
            width += z_t.shape[-1]
    scores = scores / math.sqrt(width)
    sources = ~target & ~padding
    rows = target & ~padding
    batch, length = target.shape
    if pointer.span_weight is not None:
        inside = range(length)
        total = scores.clone()
        for b, i, j in itertools.product(range(batch), inside, inside):
            for d in range(1, pointer.span_weight.shape[1] + 1):
                for side, (a, c) in enumerate(((i - d, j - d), (i + d, j + d))):
                    if a in inside and c in inside and rows[b, a] and sources[b, c]:
                        weight = pointer.span_weight[side, d - 1]
                        total[b, i, j] = total[b, i, j] + weight * scores[b, a, c]
        scores = total
    read = scores.masked_fill(~sources[:, None, :], float("-inf")).softmax(-1) @ z_t
    gate = torch.sigmoid(pointer.gate(h))
    if pointer.coverage is not None:
        # Second pass: each target row adds, per source key, the best cosine of an earlier (and,
        # weighted apart, of a later) target row's first-pass draft with that key's embedding.
        draft = gate * read + (1 - gate) * x0
        cosine = F.cosine_similarity(draft[:, :, None], z_t[:, None], dim=-1)  # (B, L, L)
        weight = pointer.coverage(h)
        extra = torch.zeros_like(scores)
        for b, i in itertools.product(range(batch), range(length)):
            if not rows[b, i]:
                continue
            for side, others in enumerate((range(i), range(i + 1, length))):
                held = [a for a in others if rows[b, a]]
                best = (cosine[b, held].max(0).values if held
                        else torch.full_like(cosine[b, i], -1.0))
                extra[b, i] = extra[b, i] + weight[b, i, side] * best
        read = (scores + extra).masked_fill(~sources[:, None, :], float("-inf")).softmax(-1) @ z_t
    return torch.where(rows[..., None], gate * read + (1 - gate) * x0, x0)


def test_marked_first_orders_each_rows_marks_then_filler():
    rows = torch.tensor([[False, True, False, True], [True, False, False, False]])
    order, valid = marked_first(rows)
    assert order.tolist()[0] == [1, 3] and order.tolist()[1][0] == 0
    assert valid.tolist() == [[True, True], [True, False]]


# Span 8 reaches past every row's target (2 to 6 slots): the shifts run off the edges.
@pytest.mark.parametrize(("neighbours", "span", "neighbour_gate", "coverage"),
                         [(False, 0, False, False), (True, 0, False, False),
                          (False, 2, False, False), (True, 1, False, False),
                          (False, 8, False, False), (True, 2, True, False),
                          (False, 0, False, True), (True, 2, False, True)])
def test_pointer_matches_the_dense_reference_forward_and_backward(neighbours, span,
                                                                  neighbour_gate, coverage):
    torch.manual_seed(0)
    pointer = SourcePointer(16, 8 if neighbours else None, span,
                            neighbour_gate=neighbour_gate, coverage=coverage).double()
    with torch.no_grad():  # distinct weights, so a swapped side or distance shows
        if span:
            pointer.span_weight.copy_(torch.randn_like(pointer.span_weight))
        if coverage:  # zero at init; large enough here that the second pass moves the read
            pointer.coverage.weight.copy_(torch.randn_like(pointer.coverage.weight))
            pointer.coverage.bias.copy_(3.0 * torch.randn_like(pointer.coverage.bias))
    target, padding = _masks([(7, 4), (3, 6), (10, 2)], 13)
    h = torch.randn(3, 13, 16, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(3, 13, 8, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(3, 13, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 13, 8, dtype=torch.float64)
    grads = []
    for fn in (lambda: pointer(h, z_t, x0, target, padding),
               lambda: _reference(pointer, h, z_t, x0, target, padding)):
        out = fn()
        params = [h, z_t, x0, *pointer.parameters()]
        grads.append((out, torch.autograd.grad((out * upstream).sum(), params)))
    (fast, fast_grads), (ref, ref_grads) = grads
    torch.testing.assert_close(fast, ref)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_an_open_gate_writes_the_source_embedding_it_reads():
    """A source of one repeated token and a gate saturated open: the target reads that token's
    embedding exactly, whatever the network's own x0 is; the source rows keep the network's."""
    pointer = SourcePointer(8)
    with torch.no_grad():
        pointer.gate.bias.fill_(50.0)
    target, padding = _masks([(5, 3)], 8)
    token = torch.randn(4)
    z_t = torch.randn(1, 8, 4)
    z_t[0, :5] = token
    x0 = torch.randn(1, 8, 4)
    out = pointer(torch.randn(1, 8, 8), z_t, x0, target, padding)
    torch.testing.assert_close(out[0, 5:8], token.expand(3, 4))
    torch.testing.assert_close(out[0, :5], x0[0, :5])


def test_denoiser_with_a_pointer_reads_a_far_source_token_through_it():
    """A one-layer denoiser whose band cannot reach the source: without the pointer (and without
    target globals) a source token far from the target leaves its x0 unchanged; with the pointer
    it moves it."""
    target, padding = _masks([(40, 4)], 44)
    changed = {}
    for pointer in (False, True):
        torch.manual_seed(0)
        config = NetworkConfig(vocab_size=32, max_src_len=40, max_trg_len=4, embed_dim=8,
                               hidden_size=16, num_layers=1, num_heads=2, dropout=0.0,
                               source_pointer=pointer, moe=None, ffn_hidden=16,
                               attention={"window": 4, "target_global": False})
        net = Denoiser(config, soft_absorbing=False).eval()
        z_t = torch.randn(1, 44, 8)
        moved = z_t.clone()
        moved[0, 2] += 1.0
        t = torch.tensor([1000])
        glob = torch.zeros_like(target)
        with torch.no_grad():
            before, _ = net(z_t, t, glob, padding, target)
            after, _ = net(moved, t, glob, padding, target)
        changed[pointer] = float((after - before)[0, 40:].abs().max())
    assert changed[False] == 0.0 and changed[True] > 1e-4


def test_a_slot_continues_the_span_its_left_neighbour_holds():
    """Hidden states that match nothing and a left-neighbour match set to the identity: a target
    slot whose left neighbour holds source token j writes source token j + 1, wherever j lies.
    Without neighbours the same pointer reads a blur of the whole source."""
    torch.manual_seed(0)
    src, trg = 12, 4
    target, padding = _masks([(src, trg)], src + trg)
    z_t = torch.randn(1, src + trg, 8) * 3.0  # distinct source tokens
    starts = [2, 7, 3]  # what slots 0, 1, 2 hold: slots 1, 2, 3 should continue them
    for slot, j in enumerate(starts):
        z_t[0, src + slot] = z_t[0, j]
    x0 = torch.zeros_like(z_t)
    h = torch.zeros(1, src + trg, 16)
    written = {}
    for neighbours in (False, True):
        pointer = SourcePointer(16, 8 if neighbours else None)
        with torch.no_grad():
            pointer.gate.bias.fill_(50.0)
            for layer in (pointer.query, pointer.key):
                layer.weight.zero_(), layer.bias.zero_()
            if neighbours:
                for layers in (pointer.neighbour_query, pointer.neighbour_key):
                    for side, layer in enumerate(layers):
                        layer.weight.copy_(torch.eye(8) * (10.0 if side == 0 else 0.0))
                        layer.bias.zero_()
            written[neighbours] = pointer(h, z_t, x0, target, padding)[0, src + 1 : src + trg]
    expected = torch.stack([z_t[0, j + 1] for j in starts])
    torch.testing.assert_close(written[True], expected, atol=1e-3, rtol=1e-3)
    assert (written[False] - expected).abs().max() > 1.0


def test_coverage_skips_the_token_an_earlier_slot_wrote():
    """Slot 0 matches source token A; slot 1 matches A and B equally, so alone it reads their
    blur. With a negative weight on what the slots before drafted, slot 1 writes B; a zero weight
    (coverage's initial one) leaves the pointer as it was without coverage."""
    torch.manual_seed(0)
    src, trg = 6, 2
    target, padding = _masks([(src, trg)], src + trg)
    z_t = torch.randn(1, src + trg, 8) * 3.0
    a, b = 1, 4  # where A and B lie in the source
    h = torch.zeros(1, src + trg, 8)
    h[0, a, :2] = 1.0  # A's key: features 0 and 1
    h[0, b, 0] = h[0, b, 2] = 1.0  # B's key: features 0 and 2
    h[0, src, 1] = 1.0  # slot 0 asks for feature 1: A only
    h[0, src + 1, 0] = 1.0  # slot 1 asks for feature 0: A and B alike
    written = {}
    for before_weight in (None, 0.0, -20.0):
        pointer = SourcePointer(8, coverage=before_weight is not None)
        with torch.no_grad():
            pointer.gate.bias.fill_(50.0)
            pointer.query.weight.copy_(torch.eye(8) * 100.0), pointer.query.bias.zero_()
            pointer.key.weight.copy_(torch.eye(8)), pointer.key.bias.zero_()
            if before_weight is not None:
                pointer.coverage.bias[0] = before_weight
            written[before_weight] = pointer(h, z_t, torch.zeros_like(z_t), target, padding)[0]
    torch.testing.assert_close(written[-20.0][src], z_t[0, a], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(written[-20.0][src + 1], z_t[0, b], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(written[None][src + 1], (z_t[0, a] + z_t[0, b]) / 2,
                               atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(written[0.0], written[None])


def test_coverage_needs_the_pointer():
    with pytest.raises(ValueError, match="network.pointer_coverage"):
        NetworkConfig(pointer_coverage=True)


def test_neighbours_need_the_pointer():
    with pytest.raises(ValueError, match="network.pointer_neighbours"):
        NetworkConfig(pointer_neighbours=True)


def test_slots_of_a_span_agree_on_where_it_lies():
    """Each of three slots matches its token at two source places equally, and only one place
    holds all three in a row: along the diagonal the scores pick that place for every slot;
    without a span the pointer cannot choose."""
    pointer = SourcePointer(8, span=2)
    sources = torch.zeros(1, 16, dtype=torch.bool)
    sources[0, :12] = True
    valid = torch.ones(1, 3, dtype=torch.bool)
    scores = torch.zeros(1, 3, 16)
    for slot, places in enumerate(([2, 6], [3, 9], [4, 0])):  # the span is 2, 3, 4
        scores[0, slot, places] = 4.0
    with torch.no_grad():
        spread = pointer.along_spans(scores, valid, sources)
    assert spread[0].argmax(-1).tolist() == [2, 3, 4]
    assert scores[0, 0, 2] == scores[0, 0, 6]  # the plain scores tie


def test_span_dropout_leaves_the_spans_out_of_dropped_examples_in_training_only():
    """With span_dropout 1 a training forward is the span-free pointer's; in eval the spans
    count whatever the rate; ``keep`` picks the examples that add them."""
    torch.manual_seed(0)
    spanned = SourcePointer(16, 8, span=3, span_dropout=1.0).double()
    plain = SourcePointer(16, 8, span=0).double()
    plain.load_state_dict({k: v for k, v in spanned.state_dict().items() if k != "span_weight"})
    for module in (spanned, plain):
        module.train()
    target, padding = _masks([(20, 8), (12, 10)], 30)
    h = torch.randn(2, 30, 16, dtype=torch.double)
    z_t, x0 = torch.randn(2, 30, 8, dtype=torch.double), torch.randn(2, 30, 8, dtype=torch.double)
    torch.testing.assert_close(spanned(h, z_t, x0, target, padding),
                               plain(h, z_t, x0, target, padding))
    spanned.eval()
    assert not torch.allclose(spanned(h, z_t, x0, target, padding),
                              plain(h, z_t, x0, target, padding))
    scores = torch.randn(2, 4, 12, dtype=torch.double)
    valid, sources = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 12, dtype=torch.bool)
    kept = spanned.along_spans(scores, valid, sources, torch.tensor([True, False]))
    torch.testing.assert_close(kept[0], spanned.along_spans(scores, valid, sources)[0])
    torch.testing.assert_close(kept[1], scores[1])


def test_neighbour_gate_needs_the_neighbours():
    with pytest.raises(ValueError, match="network.pointer_neighbour_gate"):
        NetworkConfig(source_pointer=True, pointer_neighbour_gate=True)


def test_a_closed_neighbour_gate_leaves_only_the_hidden_state_match():
    """Gate bias at -50: the neighbours' noisy inputs no longer move where the pointer points."""
    torch.manual_seed(0)
    pointer = SourcePointer(16, 8, neighbour_gate=True).double()
    target, padding = _masks([(10, 5)], 15)
    h = torch.randn(1, 15, 16, dtype=torch.double)
    z_t, x0 = torch.randn(1, 15, 8, dtype=torch.double), torch.randn(1, 15, 8, dtype=torch.double)
    other = z_t.clone()
    other[:, 10:] = torch.randn(1, 5, 8, dtype=torch.double)  # the target slots' noisy inputs
    with torch.no_grad():
        pointer.neighbour_gate.bias.fill_(-50.0)
        closed = [pointer(h, z, x0, target, padding) for z in (z_t, other)]
        pointer.neighbour_gate.bias.fill_(0.0)
        opened = [pointer(h, z, x0, target, padding) for z in (z_t, other)]
    torch.testing.assert_close(closed[0], closed[1])
    assert not torch.allclose(opened[0], opened[1])


def test_span_dropout_is_a_rate():
    with pytest.raises(ValueError, match="network.pointer_span_dropout"):
        NetworkConfig(source_pointer=True, pointer_span=2, pointer_span_dropout=1.5)


def test_span_needs_the_pointer():
    with pytest.raises(ValueError, match="network.pointer_span"):
        NetworkConfig(pointer_span=1)


@pytest.mark.parametrize("coverage", [False, True])
def test_span_path_runs_under_bf16_autocast_and_agrees_with_float32(coverage):
    """Under bf16 autocast (the bf16-mixed trainer configs) the span path, and coverage's second
    pass, sum their scores in float32 beside bf16 projections: the output is within bf16's
    rounding of the float32 one."""
    torch.manual_seed(0)
    pointer = SourcePointer(16, 8, span=4, coverage=coverage)
    if coverage:
        with torch.no_grad():
            pointer.coverage.weight.copy_(torch.randn_like(pointer.coverage.weight))
    target, padding = _masks([(20, 8), (12, 10)], 30)
    h, z_t, x0 = torch.randn(2, 30, 16), torch.randn(2, 30, 8), torch.randn(2, 30, 8)
    exact = pointer(h, z_t, x0, target, padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pointer(h, z_t, x0, target, padding)
    torch.testing.assert_close(mixed.float(), exact, atol=0.05, rtol=0.05)


def test_denoiser_builds_the_span_its_config_asks_for():
    config = NetworkConfig(vocab_size=32, max_src_len=16, max_trg_len=8, embed_dim=8,
                           hidden_size=16, num_layers=1, num_heads=2, source_pointer=True,
                           pointer_span=3, pointer_coverage=True, moe=None, ffn_hidden=16)
    pointer = Denoiser(config, soft_absorbing=False).pointer
    assert pointer.span_weight.shape == (2, 3) and pointer.coverage.out_features == 2
