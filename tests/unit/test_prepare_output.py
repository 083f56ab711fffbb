"""`sift prepare` never loses a dataset and never hangs: --overwrite swaps the new dataset in only when it
is complete; an unwritable output, undecodable input and pathological words give one clear line."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from data_pipeline import build, prepare
from data_pipeline.errors import DataError
from data_pipeline.reader import ShardDataset
from tests.distributed.common import REPO, base_env
from tests.unit.test_data_errors import base, run, write_jsonl
from tests.unprivileged import run_unprivileged


@pytest.fixture
def old_dataset(tmp_path):
    out = tmp_path / "ds"
    assert prepare.main([*base(out, write_jsonl(tmp_path / "in.jsonl", n=20)), "--log-level", "WARNING"]) == 0
    return out


def snapshot(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_overwrite_with_a_malformed_input_leaves_the_old_dataset_intact(old_dataset, tmp_path, capsys):
    before = snapshot(old_dataset)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(write_jsonl(tmp_path / "more.jsonl", n=20).read_text() + "{broken\n")
    code, err = run([*base(old_dataset, bad), "--overwrite"], capsys)
    assert code == 2 and "bad.jsonl:21: invalid JSON" in err
    assert snapshot(old_dataset) == before  # byte for byte, and nothing left over
    assert len(ShardDataset.open(old_dataset)) > 0


def test_overwrite_swaps_the_new_dataset_in_only_once_complete(old_dataset, tmp_path, monkeypatch):
    before = snapshot(old_dataset)

    def crash(root, index):
        raise RuntimeError("crash")

    with monkeypatch.context() as m:
        m.setattr(build, "write_index", crash)
        with pytest.raises(RuntimeError):
            prepare.main([*base(old_dataset, write_jsonl(tmp_path / "b.jsonl", n=8)), "--overwrite", "--seq-len", "64"])
    assert snapshot(old_dataset) == before
    assert prepare.main([*base(old_dataset, write_jsonl(tmp_path / "b.jsonl", n=8)), "--overwrite",
                         "--seq-len", "64", "--log-level", "WARNING"]) == 0
    assert ShardDataset.open(old_dataset).meta.seq_len == 64
    assert sorted(p.name for p in old_dataset.iterdir()) == ["index.json", "tokenizer", "train-00000.arrow"]


@pytest.mark.parametrize("where", ["existing", "inside"])
def test_read_only_output_is_one_line_before_any_work(tmp_path, where):
    src = write_jsonl(tmp_path / "in.jsonl")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    out = ro if where == "existing" else ro / "ds"
    result = run_unprivileged([sys.executable, "-m", "data_pipeline.prepare", *base(out, src)], cwd=REPO)
    ro.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"sift prepare: error: cannot write to the output directory {out}: Permission denied\n"


def test_pathological_long_word_with_train_tokenizer_finishes(tmp_path):
    """One 5 MB line without spaces ran for more than 300 s in tokenizer training; the bound is the timeout."""
    rng = random.Random(0)
    text = "A few ordinary sentences come first. They are short and plain.\n\n"
    text += "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5_000_000)) + "\n"
    (tmp_path / "long.txt").write_text(text)
    out = tmp_path / "ds"
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.prepare", str(tmp_path / "long.txt"), "--out", str(out),
         "--train-tokenizer", "--vocab-size", "64", "--seq-len", "32", "--num-proc", "1", "--min-doc-tokens", "1",
         "--val-fraction", "0"],
        cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "left 1 word(s) longer than 100 characters out of tokenizer training" in result.stderr
    assert ShardDataset.open(out).meta.vocab_size <= 64


def test_undecodable_input_is_refused_unless_accepted(tmp_path, capsys):
    noise = tmp_path / "noise.txt"
    noise.write_bytes(random.Random(0).randbytes(200_000))
    code, err = run(base(tmp_path / "ds", noise), capsys)
    assert code == 2 and f"{noise}: " in err and "undecodable bytes" in err and "--max-undecodable 1" in err
    assert not (tmp_path / "ds" / "index.json").exists()
    code, err = run([*base(tmp_path / "ds", noise), "--max-undecodable", "1"], capsys)
    assert code == 0, err


def test_a_few_undecodable_bytes_are_replaced_and_counted(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", n=12)
    src.write_bytes(src.read_bytes().replace(b"quick", b"qu\xffck", 1))
    code, _ = run(base(tmp_path / "ds", src), capsys)
    assert code == 0
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert index["prepare"]["stats"]["undecodable_bytes_replaced"] == {str(src): 1}


def test_invalid_json_message_reads_well(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "unterminated}')  # the last line, no newline
    code, err = run(base(tmp_path / "ds", src), capsys)
    assert code == 2 and "in.jsonl:1: invalid JSON (Unterminated string starting at column 10)" in err
    assert "at at" not in err


def test_library_callers_get_a_data_error_for_an_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="exists and is not a directory"):
        build.prepare_output(tmp_path / "file", overwrite=False)
