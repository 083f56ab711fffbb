"""End to end on real English: prepare a slice of ../shared/corpus (skipped where it is absent)."""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch

from data_pipeline import prepare
from data_pipeline.batch import IGNORE_INDEX
from data_pipeline.loader import build_loader
from data_pipeline.reader import ShardDataset


def test_prepare_a_slice_of_the_shared_corpus(shared_corpus, tmp_path):
    out = tmp_path / "english"
    argv = [str(shared_corpus), "--out", str(out), "--max-docs", "150", "--train-tokenizer", "--vocab-size", "2000",
            "--seq-len", "128", "--num-proc", "2", "--val-fraction", "0.05", "--log-level", "WARNING"]  # fmt: skip
    assert prepare.main(argv) == 0
    ds = ShardDataset.open(out, verify_checksums=True)
    stats = ds.meta.extra["prepare"]["stats"]
    assert stats["documents"] == 150 and stats["tokens"] > 50_000
    assert set(ds.meta.splits) == {"train", "validation"}
    assert stats["fill"]["train"] > 0.9  # [CLS] A [SEP] B [SEP] rows are filled close to seq_len
    rows = ds.rows(np.arange(len(ds)))
    assert 0.35 < rows["nsp_label"].mean() < 0.65
    unk = ds.meta.special_ids["unk"]
    assert np.mean(rows["tokens"] == unk) < 0.01  # the trained vocabulary covers the text

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ds.tokenizer_path())
    pieces = tok.convert_ids_to_tokens(rows["tokens"][0][: rows["lengths"][0]].tolist())
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and pieces.count("[SEP]") == 2
    words = tok.decode(rows["tokens"][0][1 : rows["segment_b"][0] - 1].tolist()).split()
    assert sum(w.isalpha() for w in words) > 0.5 * len(words)  # real words, not [UNK] soup

    batch = next(islice(build_loader(ds, seed=0, rank=0, world_size=1, batch_size_for_draw=lambda d: 16), 1))
    valid = batch["mlm_labels"] != IGNORE_INDEX
    assert 0.12 < valid.sum().item() / batch["attention_mask"].sum().item() < 0.16
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == ds.meta.special_ids["pad"])
