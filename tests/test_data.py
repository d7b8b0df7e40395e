"""Batch layout, the code corpus builder, the tokenizer and the data module on real files."""

from __future__ import annotations

import json

import pytest
import torch

from data_modules import Seq2SeqDataModule, load_tokenizer
from data_modules.corpora.code import build_code_corpus, split_of, stdlib_root
from data_modules.rows import BadRowError, MissingColumnError
from moe_diffuseq.batch import (
    SPECIAL_TOKENS,
    SpecialIds,
    collate_pairs,
    decode_targets,
    encode_pairs,
)


def test_tokenizer_has_specials_first(small_tokenizer):
    assert [small_tokenizer.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    for text in ("def f(x):\n    return x  # é", "    indented first\n\n", "\n", " ", ""):
        assert small_tokenizer.decode(small_tokenizer.encode(text).ids) == text


def test_a_word_is_the_same_tokens_at_a_line_start_and_after_a_space():
    # An answer lists the source's words after "; ": a pointer can only copy them if they are
    # the source's tokens. Plain byte-level BPE makes "HAMLET" at a line's start and " HAMLET"
    # different tokens.
    from data_modules.tokenization import train_tokenizer

    source = "HAMLET.\nWho's there?\n\nHORATIO.\nFriends.\ndef alpha(self):\n    def beta(y):\n"
    answer = "HAMLET. ; HORATIO. ; def alpha ; def beta"
    for word_starts, expected in ((True, {";"}), (False, {";", "HORATIO"})):
        tokenizer = train_tokenizer([source, answer] * 20, 300, word_starts=word_starts)
        missing = set(tokenizer.encode(answer).ids) - set(tokenizer.encode(source).ids)
        assert {tokenizer.id_to_token(i).lstrip("Ġ") for i in missing} == expected, word_starts


def test_budgets_are_separate_and_layout_is_cls_src_sep_trg_sep_pad(small_tokenizer):
    special = SpecialIds.from_tokenizer(small_tokenizer)
    pairs = encode_pairs(small_tokenizer, ["a " * 50, "b"], ["c " * 50, "d"], max_src_len=5,
                         max_trg_len=7)
    assert [len(p.src_ids) for p in pairs] == [5, 1] and [len(p.trg_ids) for p in pairs] == [7, 1]
    assert pairs[0].src_truncated > 0 and pairs[0].trg_truncated > 0
    batch = collate_pairs(pairs, special, max_trg_len=7, example_ids=["x:1", "x:2"])
    assert batch.input_ids.shape == (2, 1 + 5 + 1 + 8)
    row = batch.input_ids[1].tolist()
    assert row[0] == special.cls and row[2] == special.sep and row[4] == special.sep
    assert batch.input_mask[1].tolist() == [False] * 3 + [True] * 8 + [False] * 4
    assert batch.padding_mask[1].tolist() == [False] * 11 + [True] * 4
    assert batch.global_mask[1].nonzero().flatten().tolist() == [0, 2]  # [CLS] and the source [SEP]
    assert decode_targets(small_tokenizer, batch.input_ids, batch, special)[1] == "d"



def test_decode_strips_interior_padding_or_truncates_at_it(small_tokenizer):
    special = SpecialIds.from_tokenizer(small_tokenizer)
    pairs = encode_pairs(small_tokenizer, ["a"], ["x"], max_src_len=4, max_trg_len=6)
    batch = collate_pairs(pairs, special, max_trg_len=6)
    word = {w: small_tokenizer.token_to_id(w) for w in ("b", "c", "d")}
    assert None not in word.values()
    # A sample's target region (7 positions): b [PAD] c [SEP] d [PAD] [PAD]: a weak model's output.
    sample = batch.input_ids.clone()
    region = batch.input_mask[0].nonzero().flatten()
    sample[0, region] = torch.tensor([word["b"], special.pad, word["c"], special.sep, word["d"],
                                      special.pad, special.pad])
    assert decode_targets(small_tokenizer, sample, batch, special, "truncate") == ["b"]
    # strip: the default, DiffuSeq's rule
    stripped = decode_targets(small_tokenizer, sample, batch, special)
    assert stripped == decode_targets(small_tokenizer, sample, batch, special, "strip")
    # every word kept, in order (byte-level BPE: no spaces between these tokens)
    assert stripped == ["bcd"]
    # The reference itself (padding after its words) reads the same either way.
    assert {decode_targets(small_tokenizer, batch.input_ids, batch, special, m)[0]
            for m in ("strip", "truncate")} == {"x"}
    with pytest.raises(ValueError, match="sampling.decode='first'"):
        decode_targets(small_tokenizer, sample, batch, special, "first")

def test_code_corpus_pairs(tmp_path):
    counts = build_code_corpus(tmp_path, root=stdlib_root() / "json")
    rows = [json.loads(line) for s in counts
            for line in (tmp_path / f"{s}.jsonl").read_text().splitlines()]
    assert sum(counts.values()) == len(rows) > 10
    modules = [r for r in rows if r["kind"] == "module"]
    functions = [r for r in rows if r["kind"] == "function"]
    assert {r["module"] for r in modules} >= {"json", "json.decoder", "json.encoder"}
    skeleton = next(r for r in modules if r["module"] == "json.decoder")
    assert "class JSONDecoder" in skeleton["src"] and "..." in skeleton["src"]
    assert "def raw_decode" in skeleton["src"] and "end = _w(s, end).end()" in skeleton["trg"]
    fn = next(r for r in functions if r["src"].startswith("def raw_decode"))
    assert fn["trg"].startswith("def raw_decode") and fn["src"].rstrip().endswith("...")
    for r in rows:
        assert split_of(r["module"]) == next(
            s for s in counts
            if r in [json.loads(x) for x in (tmp_path / f"{s}.jsonl").read_text().splitlines()])


def test_split_is_deterministic_and_excludes_tests():
    assert split_of("json.decoder") == split_of("json.decoder")
    from data_modules.corpora.code import module_files

    names = [n for n, _ in module_files(stdlib_root())]
    assert not any(n.startswith(("test.", "idlelib")) or ".test_" in n for n in names)


def _dm(small_corpus, small_tokenizer_file, **kw):
    args = dict(
        train_path=str(small_corpus / "train.jsonl"),
        val_path=str(small_corpus / "validation.jsonl"),
        tokenizer_path=str(small_tokenizer_file), max_src_len=32, max_trg_len=24, batch_size=4,
        data_dir=str(small_corpus / "work"),
    )
    args.update(kw)
    return Seq2SeqDataModule(**args)


def test_map_style_and_streaming_give_the_same_validation_batches(small_corpus,
                                                                  small_tokenizer_file):
    batches = []
    for streaming in (False, True):
        dm = _dm(small_corpus, small_tokenizer_file, streaming=streaming)
        dm.setup("validate")
        batches.append(list(dm.val_dataloader()))
    assert len(batches[0]) == len(batches[1]) == 4
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and a.example_ids == b.example_ids


def test_tokenizer_is_trained_from_the_training_split_when_missing(small_corpus, tmp_path):
    dm = Seq2SeqDataModule(
        train_path=str(small_corpus / "train.jsonl"), data_dir=str(tmp_path),
        tokenizer_vocab_size=300, max_src_len=8, max_trg_len=8,
    )
    dm.prepare_data()
    tok = load_tokenizer(tmp_path / "custom" / "tokenizer-300.json")
    assert tok.get_vocab_size() == 300


def test_a_cached_tokenizer_without_word_starts_is_retrained(small_corpus, tmp_path):
    from data_modules.tokenization import has_word_starts, train_tokenizer

    dm = Seq2SeqDataModule(
        train_path=str(small_corpus / "train.jsonl"), data_dir=str(tmp_path),
        tokenizer_vocab_size=300, max_src_len=8, max_trg_len=8,
    )
    dm.prepare_data()
    cached = tmp_path / "custom" / "tokenizer-300.json"
    # As tokenizers were trained before word-start spaces.
    train_tokenizer(["some old text"] * 10, 300, word_starts=False).save(str(cached))
    assert not has_word_starts(load_tokenizer(cached))
    dm.setup("fit")
    assert has_word_starts(dm.tokenizer) and has_word_starts(load_tokenizer(cached))


def test_plain_tokenizer_option_has_its_own_cache(small_corpus, tmp_path):
    from data_modules.tokenization import has_word_starts

    common = dict(train_path=str(small_corpus / "train.jsonl"), data_dir=str(tmp_path),
                  tokenizer_vocab_size=300, max_src_len=8, max_trg_len=8)
    plain = Seq2SeqDataModule(**common, tokenizer_word_starts=False)
    plain.setup("fit")
    assert plain.tokenizer_file.name == "tokenizer-plain-300.json"
    assert not has_word_starts(plain.tokenizer)
    # The plain cache is not mistaken for a stale word-start cache, nor the other way round.
    plain_again = Seq2SeqDataModule(**common, tokenizer_word_starts=False)
    plain_again.setup("fit")
    assert not has_word_starts(plain_again.tokenizer)
    default = Seq2SeqDataModule(**common)
    default.setup("fit")
    assert default.tokenizer_file.name == "tokenizer-300.json"
    assert has_word_starts(default.tokenizer)


def test_missing_column_names_the_file_and_key(small_corpus, small_tokenizer_file, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"source": "a", "trg": "b"}) + "\n")
    dm = _dm(small_corpus, small_tokenizer_file, val_path=str(path))
    with pytest.raises(MissingColumnError, match=r"bad.jsonl.*missing column.*'src'"):
        dm.setup("validate")


def test_bad_rows_raise_with_line_or_are_skipped(small_corpus, small_tokenizer_file, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"src": "a", "trg": "b"},
                                                           {"src": "a", "trg": "  "},
                                                           {"src": "c", "trg": "d"}]))
    with pytest.raises(BadRowError, match=r"rows.jsonl, line 2: empty target"):
        _dm(small_corpus, small_tokenizer_file, val_path=str(path)).setup("validate")
    dm = _dm(small_corpus, small_tokenizer_file, val_path=str(path), on_bad_row="skip")
    dm.setup("validate")
    assert len(dm.datasets["validation"]) == 2


def test_errors_and_example_ids_name_lines_past_blank_and_skipped_lines(
        small_corpus, small_tokenizer_file, tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"src": "a", "trg": "b"}\n\n   \n{"src": "a", "trg": " "}\n')
    with pytest.raises(BadRowError, match=r"gaps.jsonl, line 4: empty target"):
        _dm(small_corpus, small_tokenizer_file, val_path=str(path)).setup("validate")
    path.write_text('{"src": "a", "trg": "b"}\nnot json\n\n{"src": "c", "trg": "d"}\n')
    dm = _dm(small_corpus, small_tokenizer_file, val_path=str(path), on_bad_row="skip")
    dm.setup("validate")
    assert [item[0] for item in dm.datasets["validation"].items] == [f"{path}:1", f"{path}:4"]


def test_unreadable_file_is_named(small_corpus, small_tokenizer_file, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b'{"src": "a", "trg": \n')
    with pytest.raises(ValueError, match="broken.jsonl"):
        _dm(small_corpus, small_tokenizer_file, val_path=str(path)).setup("validate")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _dm(small_corpus, small_tokenizer_file,
            val_path=str(tmp_path / "nope.jsonl")).setup("validate")


def test_non_utf8_and_invalid_json_lines_are_named_or_skipped(small_corpus, small_tokenizer_file,
                                                              tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"src": f"s{i}", "trg": f"t{i}"}).encode() for i in range(3)]
    path.write_bytes(b"\n".join([good[0], b'{"src": "caf\xe9", "trg": "x"}', good[1], b"{not json",
                                 good[2]]) + b"\n")
    with pytest.raises(BadRowError, match=r"mixed.jsonl, line 2: not UTF-8"):
        _dm(small_corpus, small_tokenizer_file, val_path=str(path)).setup("validate")
    dm = _dm(small_corpus, small_tokenizer_file, val_path=str(path), on_bad_row="skip")
    dm.setup("validate")
    assert len(dm.datasets["validation"]) == 3
    assert dm.report() == {"skipped: not UTF-8": 1, "skipped: not JSON": 1}
    assert path.read_bytes().count(b"\n") == 5  # the user's file is never rewritten


def test_empty_file_and_missing_values(small_corpus, small_tokenizer_file, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no rows"):
        _dm(small_corpus, small_tokenizer_file, val_path=str(empty)).setup("validate")
    rows = tmp_path / "holes.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [{"src": "a", "trg": "b"},
                                                           {"src": None, "trg": "b"},
                                                           {"src": "", "trg": "c"}]))
    with pytest.raises(BadRowError, match=r"holes.jsonl, line 2: missing src/trg value"):
        _dm(small_corpus, small_tokenizer_file, val_path=str(rows)).setup("validate")
    dm = _dm(small_corpus, small_tokenizer_file, val_path=str(rows), on_bad_row="skip")
    dm.setup("validate")
    assert dm.report() == {"skipped: missing src/trg value": 1, "skipped: empty source": 1}


@pytest.mark.parametrize("policy", ["truncate", "skip", "raise"])
def test_too_long_documents_follow_the_policy(small_corpus, small_tokenizer_file, tmp_path, policy):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"src": "a b", "trg": "c"},
                                                           {"src": "word " * 200, "trg": "d"}]))
    dm = _dm(small_corpus, small_tokenizer_file, val_path=str(path), on_too_long=policy,
             max_src_len=16)
    dm.setup("validate")
    items = [dm.datasets["validation"][i] for i in range(2)]
    if policy == "raise":
        with pytest.raises(BadRowError, match=r"long.jsonl:2: longer than the budget"):
            dm.collate(items)
        return
    batch = dm.collate(items)
    assert len(batch) == (2 if policy == "truncate" else 1)
    assert int(batch.src_truncated) == 1 and int(batch.dropped) == (policy == "skip")


def test_parquet_and_text_read_like_jsonl(small_corpus, small_tokenizer_file, tmp_path):
    import datasets

    rows = [json.loads(x) for x in (small_corpus / "validation.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "val.parquet"))
    batches = {}
    for name, path in (("jsonl", small_corpus / "validation.jsonl"),
                       ("parquet", tmp_path / "val.parquet")):
        dm = _dm(small_corpus, small_tokenizer_file, val_path=str(path))
        dm.setup("validate")
        batches[name] = list(dm.val_dataloader())
    for a, b in zip(batches["jsonl"], batches["parquet"], strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
    # Plain text: one document per line, unconditional (empty source).
    (tmp_path / "docs.txt").write_text("".join(r["trg"].replace("\n", " ") + "\n" for r in rows))
    dm = _dm(small_corpus, small_tokenizer_file, val_path=str(tmp_path / "docs.txt"), src_key="",
             trg_key="text")
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert torch.all(batch.src_len == 0) and batch.input_mask[:, 2:].any()


def test_streaming_two_ranks_two_workers_read_each_example_once(small_corpus, small_tokenizer_file,
                                                                tmp_path):
    from types import SimpleNamespace

    rows = [json.loads(x) for x in (small_corpus / "train.jsonl").read_text().splitlines()]
    for shard in range(4):  # four files: each (rank, worker) pair streams its own
        (tmp_path / f"part-{shard}.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                              for r in rows[shard::4]))
    seen = []
    for rank in range(2):
        dm = _dm(small_corpus, small_tokenizer_file, train_path=str(tmp_path / "part-*.jsonl"),
                 streaming=True, num_workers=2, batch_size=8)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, training=False)
        dm.setup("fit")
        dm.datasets["train"].set_epoch(0)
        for batch in dm.train_dataloader():
            seen += [i.rsplit(":", 2)[-2] + ":" + i.rsplit(":", 1)[-1] for i in batch.example_ids]
    assert sorted(seen) == sorted(r["id"] for r in rows)  # every example once, none twice


def test_resumable_sampler_restarts_mid_epoch_and_moves_on():
    from data_modules.pairs import ResumableRandomSampler

    sampler = ResumableRandomSampler(10, seed=3)
    full = list(sampler)
    sampler.set_epoch(0)
    sampler.start = 4
    assert list(sampler) == full[4:]  # resumed: the rest of the same permutation
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(10)) and second != full  # next epoch: a new order
    third = list(sampler)  # no set_epoch (Lightning's DDP wrapper): the next epoch again
    assert sampler.epoch == 2 and third not in (full, second)


def test_resumed_sampler_gives_each_rank_the_rest_of_its_own_epoch():
    # Under DDP Lightning wraps any sampler that is not a DistributedSampler and shuffles its
    # order again by a permutation of the remaining length: a resumed run then read other
    # examples than an uninterrupted one. This sampler splits the ranks itself.
    from torch.utils.data import DistributedSampler

    from data_modules.pairs import ResumableRandomSampler

    for size in (24, 23):  # 23: padded with the order's head to 24, as DistributedSampler pads
        uninterrupted = [list(ResumableRandomSampler(size, seed=3, rank=r, world=2))
                         for r in range(2)]
        order = list(ResumableRandomSampler(size, seed=3))
        assert sorted(set(uninterrupted[0] + uninterrupted[1])) == sorted(order)
        assert len(uninterrupted[0]) == len(uninterrupted[1]) == 12
        for rank in range(2):
            sampler = ResumableRandomSampler(size, seed=3, rank=rank, world=2)
            assert isinstance(sampler, DistributedSampler)  # Lightning leaves it as it is
            sampler.start = 16  # 8 examples read by each of the 2 ranks
            ours = list(sampler)
            assert ours == uninterrupted[rank][8:] and len(sampler) == 4
    with pytest.raises(ValueError, match="rank 2"):
        ResumableRandomSampler(4, seed=0, rank=2, world=2)


def test_length_bucketing_cuts_padding_and_keeps_every_example(small_corpus, small_tokenizer_file):
    padding = {}
    for bucketing in (False, True):
        dm = _dm(small_corpus, small_tokenizer_file, length_bucketing=bucketing, batch_size=8,
                 max_src_len=256)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        ids = [i for b in batches for i in b.example_ids]
        assert sorted(ids) == sorted(x[0] for x in dm.datasets["train"].items)  # each example once
        padding[bucketing] = (sum(int(b.padding_mask.sum()) for b in batches)
                              / sum(b.padding_mask.numel() for b in batches))
    assert padding[True] < 0.6 * padding[False]


def test_checkpoint_tokenizer_mismatch_is_an_error(small_corpus, small_tokenizer_file, tmp_path):
    from data_modules import train_tokenizer
    from moe_diffuseq import MoEDiffuSeq

    network = {"vocab_size": 400, "max_src_len": 32, "max_trg_len": 24, "embed_dim": 8,
               "hidden_size": 16, "num_layers": 1, "num_heads": 2}
    model = MoEDiffuSeq(network=network)
    model.set_tokenizer(load_tokenizer(small_tokenizer_file))
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    other = MoEDiffuSeq(network=network)
    other.tokenizer = train_tokenizer(["completely different text " * 20] * 5, vocab_size=400)
    with pytest.raises(ValueError, match="tokenizer differs"):
        other.on_load_checkpoint(checkpoint)


def test_streaming_position_resumes_after_the_last_consumed_batch(small_corpus,
                                                                  small_tokenizer_file):
    from types import SimpleNamespace

    def module():
        dm = _dm(small_corpus, small_tokenizer_file, streaming=True, shuffle_buffer=0, batch_size=4)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True)
        dm.setup("fit")
        return dm

    dm = module()
    reference = [b.example_ids for b in dm.train_dataloader()][:6]
    dm = module()
    for i, batch in enumerate(dm.train_dataloader()):
        dm.on_after_batch_transfer(batch, 0)  # consumed by the training step
        if i == 2:
            break
    state = dm.state_dict()
    resumed = module()
    resumed.load_state_dict(state)
    after = [b.example_ids for _, b in zip(range(3), resumed.train_dataloader(), strict=False)]
    assert after == reference[3:6]


def test_hub_dataset_names_fail_offline_with_a_clear_message(small_corpus, small_tokenizer_file):
    dm = _dm(small_corpus, small_tokenizer_file, val_path="hub:ccdv/arxiv-summarization:validation",
             src_key="article", trg_key="abstract")
    with pytest.raises(ValueError, match=r"hub dataset 'ccdv/arxiv-summarization' "
                                         r"\(split 'validation'\) could not be loaded"):
        dm.setup("validate")


def test_streaming_reshuffles_every_epoch_and_each_epoch_reads_every_row_once(
    small_corpus, small_tokenizer_file, tmp_path
):
    from types import SimpleNamespace

    rows = [{"id": f"r{i}", "src": f"source {i}", "trg": f"target {i}"} for i in range(64)]
    for shard in range(2):  # two files, so each rank streams one
        (tmp_path / f"part-{shard}.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                              for r in rows[shard::2]))

    def epochs(rank: int) -> list[list[str]]:
        dm = _dm(small_corpus, small_tokenizer_file, train_path=str(tmp_path / "part-*.jsonl"),
                 streaming=True, shuffle_buffer=64, batch_size=8, data_dir=str(tmp_path / "work"))
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, training=False,
                                     current_epoch=0)
        dm.setup("fit")
        loader = dm.train_dataloader()  # one loader, iterated once per epoch, as the fit loop does
        return [[i.rsplit(":", 1)[-1] for batch in loader for i in batch.example_ids]
                for _ in range(2)]

    ranks = [epochs(0), epochs(1)]
    for epoch in range(2):
        # each row once
        assert sorted(ranks[0][epoch] + ranks[1][epoch]) == sorted(r["id"] for r in rows)
    for rank in ranks:
        assert rank[0] != rank[1] and sorted(rank[0]) == sorted(rank[1])  # a new order each epoch
    assert epochs(0) == ranks[0]  # seeded: a rerun reads the same orders


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_counts_the_rows_it_skips(small_corpus, small_tokenizer_file, tmp_path, workers):
    """Streamed rows are filtered as they are read, in a worker or in this process: the counts
    ride on the batches to this process's report."""
    from types import SimpleNamespace

    rows = [json.loads(line) for line in (small_corpus / "train.jsonl").read_text().splitlines()]
    bad = [{"src": "a", "trg": " "}] * 3 + [{"src": None, "trg": "b"}] * 2
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:20] + bad + rows[20:40]))
    dm = _dm(small_corpus, small_tokenizer_file, train_path=str(path), streaming=True,
             num_workers=workers, on_bad_row="skip", shuffle_buffer=0)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True, current_epoch=0)
    dm.setup("fit")
    read = 0
    for batch in dm.train_dataloader():
        read += len(batch)
        dm.on_after_batch_transfer(batch, 0)
    skipped = {k: v for k, v in dm.report().items() if k.startswith("skipped")}
    assert read == 40
    assert skipped == {"skipped: empty target": 3, "skipped: missing src/trg value": 2}


def test_the_tokenizer_is_trained_on_checked_lines(small_corpus, tmp_path):
    rows = (small_corpus / "train.jsonl").read_text().splitlines()[:50]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(rows[:10] + ['{"src": "a", "trg":'] + rows[10:]) + "\n")
    args = dict(train_path=str(path), val_path=str(small_corpus / "validation.jsonl"),
                max_src_len=32, max_trg_len=24, data_dir=str(tmp_path / "work"),
                tokenizer_vocab_size=300)
    with pytest.raises(BadRowError, match=r"train.jsonl, line 11: not JSON"):
        Seq2SeqDataModule(**args).prepare_data()
    dm = Seq2SeqDataModule(**args, on_bad_row="skip")
    dm.prepare_data()
    assert dm.tokenizer_file.exists()
