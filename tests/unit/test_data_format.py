"""The shard byte layout documented in data_pipeline/README.md, checked with ``struct`` (no pyarrow),
plus index.json's documented fields and the reader's zero-copy, O(1) row mapping."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from data_pipeline import prepare
from data_pipeline.index import FORMAT_NAME, FORMAT_VERSION
from data_pipeline.reader import ShardDataset

T = 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_pipeline.demo_corpus import write_demo_corpus

    root = tmp_path_factory.mktemp("fmt")
    src = write_demo_corpus(root, seed=2, target_docs=40, stdlib=False)
    out = root / "ds"
    argv = [str(src), "--out", str(out), "--train-tokenizer", "--vocab-size", "200", "--seq-len", str(T),
            "--shard-rows", "64", "--num-proc", "1", "--val-fraction", "0", "--log-level", "WARNING"]  # fmt: skip
    assert prepare.main(argv) == 0
    return out


def pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def test_shard_bytes_match_the_documented_layout(dataset):
    index = json.loads((dataset / "index.json").read_text())
    ds = ShardDataset.open(dataset)
    for number, shard in enumerate(index["splits"]["train"]["shards"]):
        data = (dataset / shard["file"]).read_bytes()
        n = shard["rows"]
        assert len(data) == shard["bytes"]
        assert data[:8] == b"ARROW1\0\0" and data[-6:] == b"ARROW1"
        # Schema message, then the record batch message, each: 0xFFFFFFFF, int32 metadata size, metadata.
        cont, schema_len = struct.unpack_from("<Ii", data, 8)
        assert cont == 0xFFFFFFFF and schema_len % 8 == 0
        rb = 8 + 8 + schema_len
        cont, rb_len = struct.unpack_from("<Ii", data, rb)
        assert cont == 0xFFFFFFFF and rb_len % 8 == 0
        body = rb + 8 + rb_len
        # Body: tokens values, length, segment_b, nsp_label; each buffer padded to 8 bytes.
        offsets = [body, body + pad8(n * T * 2)]
        offsets += [offsets[-1] + pad8(n * 2), offsets[-1] + pad8(n * 2) + pad8(n * 2)]
        tokens = np.frombuffer(data, dtype="<u2", count=n * T, offset=offsets[0]).reshape(n, T)
        length = np.frombuffer(data, dtype="<u2", count=n, offset=offsets[1])
        segment_b = np.frombuffer(data, dtype="<u2", count=n, offset=offsets[2])
        nsp = np.frombuffer(data, dtype="i1", count=n, offset=offsets[3])
        rows = ds.rows(np.arange(number * 64, number * 64 + n))
        assert np.array_equal(tokens, rows["tokens"]) and np.array_equal(length, rows["lengths"])
        assert np.array_equal(segment_b, rows["segment_b"]) and np.array_equal(nsp, rows["nsp_label"])
        # End: the end-of-stream marker, the footer, its int32 size, the magic.
        footer_len = struct.unpack_from("<i", data, len(data) - 10)[0]
        footer = len(data) - 10 - footer_len
        assert data[footer - 8 : footer] == b"\xff\xff\xff\xff\0\0\0\0"
        assert footer - 8 == offsets[3] + pad8(n)  # nothing hides between the body and the end marker


def test_index_json_has_the_documented_fields(dataset):
    index = json.loads((dataset / "index.json").read_text())
    assert index["format"] == FORMAT_NAME and index["format_version"] == FORMAT_VERSION
    for key in ("seq_len", "objective", "token_dtype", "rows_per_shard", "vocab_size", "special_ids",
                "tokenizer", "tokenizer_source", "tokenizer_sha256", "splits", "created_by"):  # fmt: skip
        assert key in index, key
    assert index["tokenizer"] == "tokenizer" and index["tokenizer_source"] == "trained"
    shard = index["splits"]["train"]["shards"][0]
    assert set(shard) == {"file", "rows", "bytes", "sha256"} and len(shard["sha256"]) == 64
    assert not list(dataset.glob(".*"))  # no temporary files left behind


def test_reader_views_are_zero_copy(dataset):
    ds = ShardDataset.open(dataset)
    shard = ds._shards[0]
    assert not shard.tokens.flags.owndata and not shard.tokens.flags.writeable  # a view of the mapping
    assert shard.tokens.shape == (64, T)


def test_rows_accept_any_order_and_repeats(dataset):
    ds = ShardDataset.open(dataset)
    idx = np.array([len(ds) - 1, 0, 65, 0, 3])
    rows = ds.rows(idx)
    for j, i in enumerate(idx):
        single = ds.rows(np.array([i]))
        assert all(np.array_equal(rows[k][j], single[k][0]) for k in rows)
    with pytest.raises(IndexError):
        ds.rows(np.array([len(ds)]))
    assert ds.rows(np.array([], dtype=np.int64))["tokens"].shape == (0, T)


def test_dataset_pickles_without_its_mappings(dataset):
    import pickle

    ds = ShardDataset.open(dataset)
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone.rows(np.arange(5))["tokens"], ds.rows(np.arange(5))["tokens"])
