"""Pure row-building pieces: sentence splitting/encoding, sentence pieces, pair truncation, packing."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.demo_corpus import generate_documents
from data_pipeline.instances import InstanceConfig, _truncate_pair, mlm_packed, nsp_pairs, sentence_pieces
from data_pipeline.tokenization import SentenceSplitter, train_wordpiece

CLS, SEP, PAD = 2, 3, 0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [d["text"] for d in generate_documents(seed=0, target_docs=80, stdlib=False)]
    return train_wordpiece(texts, 300, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("mode", ["punct", "line"])
def test_marker_encoding_equals_sentence_by_sentence(tokenizer, mode):
    texts = [d["text"] for d in generate_documents(seed=1, target_docs=30, stdlib=False)]
    texts += ["First line\nsecond line.  Third!\n\nNew paragraph? yes", "", "   \n ", "One sentence only"]
    splitter = SentenceSplitter(tokenizer.backend_tokenizer.to_str(), mode, tokenizer.sep_token_id)
    tok = splitter.build()
    marker = splitter.marker(tok)
    assert marker is not None
    fast, slow = splitter.encode(tok, texts, marker), splitter.encode(tok, texts, None)
    for (a_ids, a_len), (b_ids, b_len) in zip(fast, slow, strict=True):
        assert np.array_equal(a_ids, b_ids) and np.array_equal(a_len, b_len)
        assert a_len.sum() == len(a_ids) and np.all(a_len > 0)
    assert len(fast[-4][1]) == (3 if mode == "line" else 4)  # lines, or sentences + paragraphs


@pytest.mark.parametrize("limit", [1, 3, 10, 100])
def test_sentence_pieces_tile_the_document(limit):
    lengths = np.array([5, 1, 12, 30, 2])
    pieces = sentence_pieces(lengths, limit)
    assert pieces[0, 0] == 0 and pieces[-1, 1] == lengths.sum()
    assert np.array_equal(pieces[1:, 0], pieces[:-1, 1])  # contiguous, in order
    sizes = pieces[:, 1] - pieces[:, 0]
    assert sizes.min() >= 1 and sizes.max() <= max(limit, 1)
    # Sentence boundaries are kept: every sentence end is a piece end.
    assert set(np.cumsum(lengths).tolist()) <= set(pieces[:, 1].tolist())


def test_truncate_pair_cuts_the_longer_segment_first():
    rng = np.random.default_rng(0)
    a, b = np.arange(100), np.arange(100, 110)
    ta, tb = _truncate_pair(a, b, 60, rng)
    assert len(ta) + len(tb) == 60 and len(tb) == 10
    # Contiguous slices of the originals (cut at the front and/or back).
    assert np.array_equal(ta, np.arange(ta[0], ta[0] + len(ta)))
    ta, tb = _truncate_pair(np.arange(40), np.arange(40), 50, rng)
    assert (len(ta), len(tb)) == (25, 25)
    same = _truncate_pair(a[:5], b[:5], 50, rng)
    assert len(same[0]) == 5 and len(same[1]) == 5


def docs_from_lengths(spec):
    docs, start = [], 10
    for lens in spec:
        lens = np.array(lens)
        docs.append((np.arange(start, start + lens.sum(), dtype=np.uint32), lens))
        start += lens.sum()
    return docs


def test_nsp_rows_are_well_formed_and_balanced():
    rng = np.random.default_rng(0)
    docs = docs_from_lengths([[int(x) for x in rng.integers(3, 30, rng.integers(2, 40))] for _ in range(40)])
    cfg = InstanceConfig(64, "nsp_pairs", CLS, SEP, PAD)
    rows = nsp_pairs(docs, cfg, np.random.default_rng(1))
    assert 0.4 < rows.nsp_label.mean() < 0.6
    assert rows.length.max() <= 64 and rows.length.mean() > 0.85 * 64
    doc_of = {int(t): i for i, (ids, _) in enumerate(docs) for t in ids}
    for tok, n, sb, label in zip(rows.tokens, rows.length, rows.segment_b, rows.nsp_label, strict=True):
        a, b = tok[1 : sb - 1], tok[sb : n - 1]
        assert tok[0] == CLS and tok[sb - 1] == SEP and tok[n - 1] == SEP and np.all(tok[n:] == PAD)
        assert len({doc_of[int(t)] for t in a}) == 1  # A is from one document
        same_doc = doc_of[int(a[0])] == doc_of[int(b[0])]
        assert same_doc == (label == 0)
        if label == 0:
            assert b[0] > a[-1]  # B comes after A in that document
    # Deterministic given the generator.
    again = nsp_pairs(docs, cfg, np.random.default_rng(1))
    assert np.array_equal(again.tokens, rows.tokens)


def test_mlm_packing_keeps_every_token_in_order():
    docs = docs_from_lengths([[5, 7, 9], [70], [3], [20, 20, 20]])
    cfg = InstanceConfig(32, "mlm_packed", CLS, SEP, PAD)
    rows = mlm_packed(docs, cfg)
    content = np.concatenate([t[1 : n - 1] for t, n in zip(rows.tokens, rows.length, strict=True)])
    assert np.array_equal(content[content != SEP], np.concatenate([ids for ids, _ in docs]))
    assert rows.length.max() <= 32 and np.all(rows.nsp_label == -1)
