"""Text -> shards -> batches on a small generated corpus: content, conservation, loader contract."""

from __future__ import annotations

import json
import re
from itertools import islice

import numpy as np
import pytest
import torch

from data_pipeline import prepare
from data_pipeline.batch import BATCH_KEYS, IGNORE_INDEX, max_predictions
from data_pipeline.demo_corpus import generate_documents
from data_pipeline.index import read_index
from data_pipeline.loader import build_loader, eval_batches, eval_rows, masking_config
from data_pipeline.reader import ShardDataset

T = 64


def squash(text: str) -> str:
    """Lowercase, no whitespace: how decoded word pieces compare with the source text."""
    return re.sub(r"\s+", "", text.lower())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = list(generate_documents(seed=1, target_docs=120, stdlib=False))
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path, docs


def run_prepare(corpus_path, out, *extra):
    argv = [str(corpus_path), "--out", str(out), "--train-tokenizer", "--vocab-size", "400",
            "--seq-len", str(T), "--shard-rows", "40", "--val-fraction", "0.1", "--num-proc", "1",
            "--log-level", "WARNING", *extra]  # fmt: skip
    assert prepare.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def nsp_dir(corpus, tmp_path_factory):
    return run_prepare(corpus[0], tmp_path_factory.mktemp("nsp") / "ds")


@pytest.fixture(scope="module")
def mlm_dir(corpus, tmp_path_factory):
    return run_prepare(corpus[0], tmp_path_factory.mktemp("mlm") / "ds", "--objective", "mlm_packed")


@pytest.fixture(scope="module")
def tokenizer(nsp_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ShardDataset.open(nsp_dir).tokenizer_path())


def test_index_and_splits(nsp_dir, corpus):
    meta, shards = read_index(nsp_dir)
    assert meta.seq_len == T and meta.objective == "nsp_pairs" and meta.token_dtype == "uint16"
    assert set(meta.splits) == {"train", "validation"} and all(v > 0 for v in meta.splits.values())
    assert all(s.rows == 40 for s in shards["train"][:-1]) and len(shards["train"]) > 1
    stats = meta.extra["prepare"]["stats"]
    assert stats["documents"] == len(corpus[1])
    assert sum(stats["documents_per_split"].values()) + stats["short_documents_skipped"] == len(corpus[1])


def test_tokenizer_saved_next_to_shards_loads_with_transformers(nsp_dir, tokenizer):
    from transformers import BertTokenizerFast

    ds = ShardDataset.open(nsp_dir)
    assert ds.tokenizer_path().endswith("tokenizer") and len(tokenizer) == ds.meta.vocab_size
    assert tokenizer.mask_token_id == ds.meta.special_ids["mask"]
    assert isinstance(BertTokenizerFast.from_pretrained(ds.tokenizer_path()), type(tokenizer))
    assert tokenizer.tokenize("The Weather") == tokenizer.tokenize("the weather")  # uncased


def test_nsp_rows_hold_document_text(nsp_dir, corpus, tokenizer):
    ds = ShardDataset.open(nsp_dir)
    rows = ds.rows(np.arange(len(ds)))
    cls, sep, pad = (ds.meta.special_ids[k] for k in ("cls", "sep", "pad"))
    text = "\n".join(squash(d["text"]) for d in corpus[1])
    labels = rows["nsp_label"]
    assert set(np.unique(labels).tolist()) == {0, 1} and 0.3 < labels.mean() < 0.7
    assert rows["lengths"].mean() > 0.8 * T  # rows are filled, not padded
    for tok, length, seg_b in islice(
        zip(rows["tokens"], rows["lengths"], rows["segment_b"], strict=True), 200
    ):
        assert tok[0] == cls and tok[length - 1] == sep and tok[seg_b - 1] == sep
        assert np.all(tok[length:] == pad) and 2 < seg_b < length
        a, b = tok[1 : seg_b - 1], tok[seg_b : length - 1]
        for seg in (a, b):  # each segment is contiguous text of some document (modulo [UNK])
            piece = squash(tokenizer.decode(seg.tolist())).replace("##", "")  # a cut may start mid-word
            if "[unk]" not in tokenizer.decode(seg.tolist()).lower():
                assert piece in text


def test_mlm_packed_keeps_every_token(mlm_dir):
    ds = ShardDataset.open(mlm_dir)
    meta = ds.meta
    stats = meta.extra["prepare"]["stats"]
    kept = 0
    for split in meta.splits:
        part = ShardDataset.open(mlm_dir, split)
        rows = part.rows(np.arange(len(part)))
        assert np.all(rows["nsp_label"] == -1) and np.array_equal(rows["segment_b"], rows["lengths"])
        for tok, length in zip(rows["tokens"], rows["lengths"], strict=True):
            assert tok[0] == meta.special_ids["cls"] and tok[length - 1] == meta.special_ids["sep"]
            kept += int(length) - 2 - int(np.sum(tok[1 : length - 1] == meta.special_ids["sep"]))
    # Every word piece of every kept document is in exactly one row: nothing dropped, nothing repeated.
    assert stats["short_documents_skipped"] == 0
    assert kept == stats["tokens"]
    assert stats["fill"]["train"] > 0.75  # whole sentences of ~25 pieces in 62 slots


def test_loader_batches_follow_the_contract(nsp_dir):
    ds = ShardDataset.open(nsp_dir)
    sizes = {0: 3, 1: 5}
    loader = build_loader(ds, seed=4, rank=0, world_size=1, batch_size_for_draw=lambda d: sizes.get(d, 7))
    P = max_predictions(T, 0.15)
    for d, batch in enumerate(islice(loader, 4)):
        G = sizes.get(d, 7)
        assert tuple(batch) == BATCH_KEYS
        assert all(v.dtype == torch.int64 for v in batch.values())
        assert batch["input_ids"].shape == (G, T) and batch["mlm_positions"].shape == (G, P)
        rows = ds.rows(batch["sample_ids"].numpy())
        length = torch.from_numpy(rows["lengths"])
        assert torch.equal(batch["attention_mask"].sum(1), length)
        assert torch.equal(
            (batch["token_type_ids"] == 0).sum(1) - (T - length), torch.from_numpy(rows["segment_b"])
        )
        valid = batch["mlm_labels"] != IGNORE_INDEX
        orig = torch.from_numpy(rows["tokens"]).gather(1, batch["mlm_positions"])
        assert torch.equal(orig[valid], batch["mlm_labels"][valid])
        assert torch.equal(batch["nsp_labels"], torch.from_numpy(rows["nsp_label"]))


def test_mlm_packed_batches_have_no_nsp_labels(mlm_dir):
    batch = next(iter(build_loader(ShardDataset.open(mlm_dir), seed=0, rank=0, world_size=1,
                                   batch_size_for_draw=lambda d: 4)))  # fmt: skip
    assert torch.all(batch["nsp_labels"] == IGNORE_INDEX) and torch.all(batch["token_type_ids"] == 0)


def test_two_ranks_of_b_equal_one_rank_of_2b(nsp_dir):
    ds = ShardDataset.open(nsp_dir)
    one = list(islice(build_loader(ds, seed=9, rank=0, world_size=1, batch_size_for_draw=lambda d: 6), 6))
    two = [list(islice(build_loader(ds, seed=9, rank=r, world_size=2, batch_size_for_draw=lambda d: 3), 6))
           for r in range(2)]  # fmt: skip
    for d in range(6):  # spans several epochs of the tiny split
        for key in BATCH_KEYS:
            assert torch.equal(one[d][key], torch.cat([two[0][d][key], two[1][d][key]]))


def test_resume_mid_run_gives_the_same_batches(nsp_dir):
    ds = ShardDataset.open(nsp_dir)
    size = lambda d: 4 if d < 3 else 5  # noqa: E731
    full = list(islice(build_loader(ds, seed=2, rank=0, world_size=1, batch_size_for_draw=size), 8))
    consumed = sum(size(d) for d in range(5))
    resumed = list(islice(build_loader(ds, seed=2, rank=0, world_size=1, batch_size_for_draw=size,
                                       start_draw=5, consumed_samples=consumed), 3))  # fmt: skip
    for a, b in zip(full[5:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in BATCH_KEYS)


def test_worker_processes_give_identical_batches(nsp_dir):
    ds = ShardDataset.open(nsp_dir)
    kw = dict(seed=3, rank=1, world_size=2, batch_size_for_draw=lambda d: 5)
    serial = list(islice(build_loader(ds, **kw), 5))
    parallel = list(islice(build_loader(ds, num_workers=2, **kw), 5))
    for a, b in zip(serial, parallel, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in BATCH_KEYS)


def test_eval_batches_are_fixed_and_split_across_ranks(nsp_dir):
    ds = ShardDataset.open(nsp_dir, "validation")
    n = len(ds)
    first = list(eval_batches(ds, seed=0, rank=0, world_size=1, batch_size=4))
    again = list(eval_batches(ds, seed=0, rank=0, world_size=1, batch_size=4))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in BATCH_KEYS)
    assert torch.equal(torch.cat([b["sample_ids"] for b in first]), torch.arange(n))
    for world in (2, 3):
        parts = [torch.cat([b["sample_ids"] for b in eval_batches(ds, seed=0, rank=r, world_size=world,
                                                                  batch_size=2, num_samples=n - 1)])
                 for r in range(world)]  # fmt: skip
        assert torch.equal(torch.cat(parts), torch.from_numpy(eval_rows(n, 0, 1, n - 1)))
        ids = torch.cat([b["input_ids"] for r in range(world)
                         for b in eval_batches(ds, seed=0, rank=r, world_size=world, batch_size=2)])  # fmt: skip
        assert torch.equal(ids, torch.cat([b["input_ids"] for b in first]))  # masks do not depend on world
    assert len(eval_rows(10, 2, 3)) + len(eval_rows(10, 0, 3)) + len(eval_rows(10, 1, 3)) == 10


def test_eval_subset_spans_the_split():
    """A validation subset is spread over the whole split (rows follow input order, often by source)."""
    assert eval_rows(10, 0, 1, 5).tolist() == [0, 2, 4, 6, 8]
    assert eval_rows(10, 0, 1).tolist() == list(range(10))
    parts = [eval_rows(1000, r, 3, 100) for r in range(3)]
    ids = np.concatenate(parts)
    assert len(ids) == 100 and len(set(ids.tolist())) == 100 and ids.min() == 0 and ids.max() >= 990


def test_masking_config_excludes_every_special(nsp_dir):
    meta = ShardDataset.open(nsp_dir).meta
    cfg = masking_config(meta, mask_prob=0.2)
    assert (
        set(cfg.special_ids) == set(meta.special_ids.values())
        and cfg.mask_token_id == meta.special_ids["mask"]
    )
    assert cfg.mask_prob == 0.2 and cfg.vocab_size == meta.vocab_size


def test_prepare_output_does_not_depend_on_process_count(corpus, nsp_dir, tmp_path):
    # A fixed tokenizer: WordPiece *training* is not deterministic upstream (tokenizers issue #1794).
    common = [str(corpus[0]), "--tokenizer", str(nsp_dir / "tokenizer"), "--seq-len", str(T), "--shard-rows", "40",
              "--val-fraction", "0.1", "--log-level", "WARNING"]  # fmt: skip
    assert prepare.main([*common, "--out", str(tmp_path / "one"), "--num-proc", "1"]) == 0
    assert prepare.main([*common, "--out", str(tmp_path / "two"), "--num-proc", "2"]) == 0
    assert prepare.main([*common, "--out", str(tmp_path / "default")]) == 0  # <= 4 cores: the tokenizer's threads
    a, b = read_index(tmp_path / "one")[1], read_index(tmp_path / "two")[1]
    digests = {s: [x.sha256 for x in v] for s, v in a.items()}
    assert digests == {s: [x.sha256 for x in v] for s, v in b.items()}
    assert digests == {s: [x.sha256 for x in v] for s, v in read_index(tmp_path / "default")[1].items()}
    assert digests == {s: [x.sha256 for x in v] for s, v in read_index(nsp_dir)[1].items()}


def test_loading_never_touches_the_global_rngs(nsp_dir):
    ds = ShardDataset.open(nsp_dir)
    torch.manual_seed(1)
    np.random.seed(1)
    expected = (torch.rand(2), np.random.rand(2))
    torch.manual_seed(1)
    np.random.seed(1)
    list(islice(build_loader(ds, seed=0, rank=0, world_size=1, batch_size_for_draw=lambda d: 4), 3))
    list(eval_batches(ds, seed=0, rank=0, world_size=1, batch_size=4, num_samples=8))
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(np.random.rand(2), expected[1])


@pytest.mark.parametrize("big_vocab", [False, True])
def test_worker_hand_over_is_exact(nsp_dir, big_vocab):
    import pickle

    from data_pipeline.wire import WireBatch

    ds = ShardDataset.open(nsp_dir)
    batch = next(iter(build_loader(ds, seed=0, rank=0, world_size=1, batch_size_for_draw=lambda d: 5)))
    if big_vocab:  # ids beyond uint16 and labels beyond int32 must survive too
        batch = {k: v.clone() for k, v in batch.items()}
        batch["input_ids"][0, 0] = 70_000
        batch["mlm_labels"][0, 0] = 3_000_000_000
    wire = pickle.dumps(WireBatch(batch))
    back = pickle.loads(wire)
    assert type(back) is dict and tuple(back) == BATCH_KEYS
    assert all(torch.equal(back[k], batch[k]) and back[k].dtype == torch.int64 for k in BATCH_KEYS)
    if not big_vocab:
        assert len(wire) < 0.3 * sum(v.numel() * 8 for v in batch.values())
