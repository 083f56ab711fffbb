"""Every bad input of the issue: a ``sift prepare: error: ...`` naming what and where, exit status 2.

Also the dataset-side failures the reader must catch on open (truncated/altered shards, missing or
mismatched index.json, a future format version), and the input kinds that must work.
"""

from __future__ import annotations

import gzip
import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import prepare
from data_pipeline.errors import DataError
from data_pipeline.index import FORMAT_VERSION
from data_pipeline.loader import build_loader
from data_pipeline.reader import ShardDataset
from data_pipeline.sources import ReadStats, SourceOptions, iter_documents, resolve_inputs
from launcher.cli import main as sift

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A small boat drifted slowly along the quiet canal at dawn.",
    "Every morning the baker opens his shop before the town wakes up.",
    "Children played in the park while their parents talked on the benches.",
]


def doc_text(i: int) -> str:
    return " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(6)) + f" Document number {i}."


def write_jsonl(path, n=12, field="text"):
    path.write_text("".join(json.dumps({"id": f"d{i}", field: doc_text(i)}) + "\n" for i in range(n)))
    return path


def run(argv, capsys) -> tuple[int, str]:
    """`sift prepare ...` as the command line runs it (errors become a message and exit status 2)."""
    code = sift(["prepare", *argv, "--log-level", "WARNING"])
    return code, capsys.readouterr().err


def base(out, *inputs):
    return [*map(str, inputs), "--out", str(out), "--train-tokenizer", "--vocab-size", "120", "--seq-len", "32",
            "--num-proc", "1", "--val-fraction", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    src = write_jsonl(root / "in.jsonl", n=30)
    out = root / "ds"
    assert prepare.main([*base(out, src), "--shard-rows", "10", "--log-level", "WARNING"]) == 0
    return out


def fresh_copy(dataset, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(dataset, dst)
    return dst


# --- prepare: bad inputs ---------------------------------------------------------------------------


def test_missing_path(tmp_path, capsys):
    code, err = run(base(tmp_path / "out", tmp_path / "nope.jsonl"), capsys)
    assert (
        code == 2
        and err.startswith("sift prepare: error:")
        and "nope.jsonl" in err
        and "does not exist" in err
    )
    assert "Traceback" not in err


def test_glob_without_matches(tmp_path, capsys):
    code, err = run(base(tmp_path / "out", f"{tmp_path}/*.jsonl"), capsys)
    assert code == 2 and "matches no" in err and "*.jsonl" in err


def test_unsupported_extension(tmp_path, capsys):
    bad = tmp_path / "corpus.csv"
    bad.write_text("text\nhello\n")
    code, err = run(base(tmp_path / "out", bad), capsys)
    assert code == 2 and "corpus.csv" in err and "unsupported extension '.csv'" in err


def test_directory_without_supported_files(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.md").write_text("hello")
    code, err = run(base(tmp_path / "out", tmp_path / "in"), capsys)
    assert code == 2 and "holds no" in err and str(tmp_path / "in") in err


def test_empty_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    code, err = run(base(tmp_path / "out", empty), capsys)
    assert code == 2 and "empty input" in err and "empty.txt" in err
    assert not (tmp_path / "out" / "index.json").exists()


def test_missing_text_field_jsonl(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", field="body")
    code, err = run(base(tmp_path / "out", src), capsys)
    assert code == 2 and "in.jsonl:1" in err and "missing text field 'text'" in err and "body" in err


def test_missing_text_field_parquet(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some words here"]}), tmp_path / "in.parquet")
    code, err = run(base(tmp_path / "out", tmp_path / "in.parquet"), capsys)
    assert code == 2 and "in.parquet" in err and "missing text column 'text'" in err and "body" in err


def test_invalid_json_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", n=3)
    src.write_text(src.read_text() + "{not json\n")
    code, err = run(base(tmp_path / "out", src), capsys)
    assert code == 2 and "in.jsonl:4" in err and "invalid JSON" in err


def test_corrupt_parquet_and_gzip(tmp_path, capsys):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    code, err = run(base(tmp_path / "o1", tmp_path / "bad.parquet"), capsys)
    assert code == 2 and "bad.parquet" in err and "Parquet" in err
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    code, err = run(base(tmp_path / "o2", tmp_path / "bad.jsonl.gz"), capsys)
    assert code == 2 and "bad.jsonl.gz" in err


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, capsys, caplog):
    src = tmp_path / "latin1.txt"
    body = "\n\n".join(doc_text(i) for i in range(8)).encode() + b"\n\ncaf\xe9 cr\xe8me br\xfbl\xe9e " * 3
    src.write_bytes(body)
    out = tmp_path / "out"
    code, _err = run(base(out, src), capsys)
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(warnings) == 1 and "latin1.txt" in warnings[0] and "12 undecodable" in warnings[0]
    stats = json.loads((out / "index.json").read_text())["prepare"]["stats"]
    assert stats["undecodable_bytes_replaced"] == {str(src): 12}


def test_documents_shorter_than_a_sentence(tmp_path, capsys, caplog):
    src = tmp_path / "short.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Hi.", "Ok", "  "]))
    code, err = run(base(tmp_path / "out", src), capsys)
    assert code == 2 and "no usable documents" in err and "short.jsonl:1" in err and "--min-doc-tokens" in err
    # Mixed with good documents, the short ones are skipped, counted and reported.
    write_jsonl(tmp_path / "good.jsonl")
    code, err = run(base(tmp_path / "out2", src, tmp_path / "good.jsonl"), capsys)
    assert code == 0 and "skipped 3 of 15 documents" in caplog.text and "short.jsonl:1" in caplog.text


def test_tokenizer_vocabulary_that_does_not_fit_the_model(tmp_path, capsys, dataset):
    src = write_jsonl(tmp_path / "in.jsonl")
    argv = [str(src), "--out", str(tmp_path / "out"), "--tokenizer", str(dataset / "tokenizer"),
            "--max-vocab-size", "50", "--num-proc", "1"]  # fmt: skip
    code, err = run(argv, capsys)
    assert code == 2 and "--max-vocab-size" in err and "50" in err and str(dataset / "tokenizer") in err


def test_unloadable_tokenizer_and_offline_hub_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = write_jsonl(tmp_path / "in.jsonl")
    code, err = run(
        [str(src), "--out", str(tmp_path / "o1"), "--tokenizer", "no-such-org/no-such-tokenizer"], capsys
    )
    assert code == 2 and "cannot load tokenizer" in err and "no-such-org/no-such-tokenizer" in err
    assert "Traceback" not in err
    code, err = run(base(tmp_path / "o2", "no-such-org/no-such-dataset"), capsys)
    assert code == 2 and "no-such-org/no-such-dataset" in err and "offline" in err.lower()
    assert "Traceback" not in err


def test_output_directory_with_a_dataset_needs_overwrite(tmp_path, capsys, dataset):
    out = fresh_copy(dataset, tmp_path)
    before = sorted(p.name for p in out.iterdir())
    src = write_jsonl(tmp_path / "in.jsonl")
    code, err = run(base(out, src), capsys)
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing was touched
    code, _ = run([*base(out, src), "--overwrite"], capsys)
    assert code == 0 and ShardDataset.open(out).meta.splits["train"] > 0


def test_bad_options_are_listed_together(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl")
    code, err = run(
        [str(src), "--out", str(tmp_path / "o"), "--seq-len", "4", "--val-fraction", "1.5"], capsys
    )
    assert code == 2 and "--seq-len" in err and "--val-fraction" in err


# --- reader: bad datasets --------------------------------------------------------------------------


def test_missing_index(tmp_path, dataset):
    out = fresh_copy(dataset, tmp_path)
    (out / "index.json").unlink()
    with pytest.raises(DataError, match=r"index\.json is missing.*interrupted"):
        ShardDataset.open(out)
    with pytest.raises(DataError, match="does not exist"):
        ShardDataset.open(tmp_path / "nothing")


def test_truncated_shard(tmp_path, dataset):
    out = fresh_copy(dataset, tmp_path)
    shard = out / "train-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-00001\.arrow.*bytes.*truncated"):
        ShardDataset.open(out)


def flip_byte(shard, offset=None):
    data = bytearray(shard.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_altered_shard_fails_the_checksum(tmp_path, dataset):
    out = fresh_copy(dataset, tmp_path)
    flip_byte(out / "train-00000.arrow")
    ds = ShardDataset.open(out)  # sizes match: only the checksum can tell, on open ...
    with pytest.raises(DataError, match=r"train-00000\.arrow.*SHA-256"):
        ShardDataset.open(out, verify_checksums=True)
    # ... or, by default, before the first row of that shard is served (the other shards still read)
    assert len(ds.rows(np.arange(10, 20))["tokens"]) == 10
    with pytest.raises(DataError, match=r"shard .*train-00000\.arrow fails its SHA-256 check"):
        ds.rows(np.array([12, 3]))


@pytest.mark.parametrize("workers", [0, 1])
def test_altered_shard_stops_the_default_loader_with_the_file_named(tmp_path, dataset, workers):
    out = fresh_copy(dataset, tmp_path)
    flip_byte(out / "train-00001.arrow")
    loader = build_loader(ShardDataset.open(out), seed=0, rank=0, world_size=1, batch_size_for_draw=lambda d: 8,
                          num_workers=workers)
    with pytest.raises(DataError) as e:
        list(islice(loader, 10))
    assert "train-00001.arrow fails its SHA-256 check" in str(e.value)
    assert "Traceback" not in str(e.value)  # not PyTorch's worker re-raise, which pastes the worker's traceback


EXIT_SCRIPT = """
import sys
from itertools import islice
from data_pipeline.errors import DataError
from data_pipeline.loader import build_loader
from data_pipeline.reader import ShardDataset
loader = build_loader(ShardDataset.open(sys.argv[1]), seed=0, rank=0, world_size=1,
                      batch_size_for_draw=lambda d: 8, num_workers=1)
if sys.argv[2] == "error":
    try:
        list(islice(loader, 10))
    except DataError as e:
        kept = e  # a caller holding the error holds the iterator through its traceback
        print("error:", e)
else:
    live = iter(loader)
    next(live)  # an iterator still referenced when the interpreter exits
print("exiting", flush=True)
"""


@pytest.mark.parametrize("case", ["error", "live"])
def test_a_process_with_loader_workers_exits(tmp_path, dataset, case):
    """Workers ignore SIGTERM (a preemption signal is the training process's to act on), and that is the
    signal multiprocessing ends them with at exit: without the loader's own shutdown, the process hung."""
    import os
    import subprocess
    import sys

    out = fresh_copy(dataset, tmp_path)
    if case == "error":
        flip_byte(out / "train-00001.arrow")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(out), case], capture_output=True, text=True,
                              timeout=60, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"still running 60 s after: {e.stdout!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "exiting"
    if case == "error":
        assert "fails its SHA-256 check" in done.stdout


def corrupt_token(out, shard_name, row, col, value):
    """Rewrite a shard with ``value`` as the token at (row, col), recording its new hash: corruption that
    happened before the hash was taken (a faulty writer or copy), which only the range check can see."""
    from data_pipeline.shards import MappedShard, ShardWriter

    meta = ShardDataset.open(out).meta
    dtype = np.dtype(meta.token_dtype)
    shard = MappedShard(out / shard_name, meta.seq_len, dtype)
    tokens = shard.tokens.copy()
    tokens[row, col] = value
    tmp = out / "rewrite"
    tmp.mkdir()
    writer = ShardWriter(tmp, "train", meta.seq_len, dtype, meta.rows_per_shard)
    writer.add(tokens, shard.length, shard.segment_b, shard.nsp_label)
    (info,) = writer.close()
    del shard
    (tmp / info.file).replace(out / shard_name)
    index = json.loads((out / "index.json").read_text())
    entry = next(e for e in index["splits"]["train"]["shards"] if e["file"] == shard_name)
    entry.update(sha256=info.sha256, bytes=info.bytes)
    (out / "index.json").write_text(json.dumps(index))


def test_token_id_outside_the_vocabulary_names_shard_and_row(tmp_path, dataset):
    out = fresh_copy(dataset, tmp_path)
    corrupt_token(out, "train-00001.arrow", row=3, col=5, value=52497)
    ds = ShardDataset.open(out)
    vocab = ds.meta.vocab_size
    with pytest.raises(DataError, match=rf"train-00001\.arrow row 3 \(row 13 of split 'train'\): token id 52497 at "
                                        rf"position 5 is not below the vocabulary size {vocab}"):
        ds.rows(np.array([0, 13, 25]))
    loader = build_loader(ds, seed=0, rank=0, world_size=1, batch_size_for_draw=lambda d: 8)
    with pytest.raises(DataError, match="row 13 of split 'train'"):  # not the collator's bare IndexError
        list(islice(loader, 10))


def test_garbage_shard_of_the_right_size(tmp_path, dataset):
    out = fresh_copy(dataset, tmp_path)
    shard = out / "train-00000.arrow"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(DataError, match=r"train-00000\.arrow.*Arrow"):
        ShardDataset.open(out)


def test_missing_shard(tmp_path, dataset):
    out = fresh_copy(dataset, tmp_path)
    (out / "train-00002.arrow").unlink()
    with pytest.raises(DataError, match=r"train-00002\.arrow.*missing"):
        ShardDataset.open(out)


def edit_index(out, fn):
    index = json.loads((out / "index.json").read_text())
    fn(index)
    (out / "index.json").write_text(json.dumps(index))


def test_index_that_does_not_match_the_shards(tmp_path, dataset):
    out = fresh_copy(dataset, tmp_path)

    def swap_rows(index):
        shards = index["splits"]["train"]["shards"]
        shards[-1]["rows"] += 1
        index["splits"]["train"]["rows"] += 1

    edit_index(out, swap_rows)
    with pytest.raises(DataError, match="rows"):
        ShardDataset.open(out)
    out2 = fresh_copy(dataset, tmp_path / "b")
    edit_index(out2, lambda i: i.update(seq_len=64))
    with pytest.raises(DataError, match=r"train-00000\.arrow.*schema"):
        ShardDataset.open(out2)


def test_future_format_version(tmp_path, dataset):
    out = fresh_copy(dataset, tmp_path)
    edit_index(out, lambda i: i.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(DataError, match=f"format version {FORMAT_VERSION + 1} is newer"):
        ShardDataset.open(out)


def test_invalid_index_json(tmp_path, dataset):
    out = fresh_copy(dataset, tmp_path)
    (out / "index.json").write_text("{")
    with pytest.raises(DataError, match=r"index\.json.*JSON"):
        ShardDataset.open(out)
    edit_index_out = fresh_copy(dataset, tmp_path / "c")
    edit_index(edit_index_out, lambda i: i["special_ids"].pop("mask"))
    with pytest.raises(DataError, match="special_ids lacks"):
        ShardDataset.open(edit_index_out)


def test_unknown_split(dataset):
    with pytest.raises(DataError, match="no split 'validation'"):
        ShardDataset.open(dataset, "validation")


# --- input kinds -----------------------------------------------------------------------------------


def test_every_input_kind_reads_the_same_documents(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [doc_text(i) for i in range(5)]
    (tmp_path / "a.txt").write_text("\n\n".join(texts) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    pq.write_table(pa.table({"text": texts, "id": [f"p{i}" for i in range(5)]}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    one_per_file = tmp_path / "files"
    one_per_file.mkdir()
    for i, t in enumerate(texts):
        (one_per_file / f"{i}.txt").write_text(t)

    def read(spec, **opts):
        return [
            d.text for d in iter_documents(resolve_inputs([str(spec)]), SourceOptions(**opts), ReadStats())
        ]

    for spec in ["a.txt", "b.jsonl", "c.jsonl.gz", "d.parquet", "saved", "[abcd].*"]:
        got = read(tmp_path / spec)
        assert got == texts * (4 if spec.startswith("[") else 1), spec
    assert read(one_per_file, txt_mode="file") == texts
    kinds = resolve_inputs([str(tmp_path / "saved"), "some-org/some-dataset"])
    assert [k for k, _ in kinds] == ["saved", "hub"]
