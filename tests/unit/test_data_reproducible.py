"""`sift prepare` is reproducible and fails early on input too small to use: the same input and seed give
the same tokenizer and byte-identical shards, tokenizer training included; a one-line corpus is refused
with what to do, and a failed prepare leaves no directory behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from data_pipeline import prepare
from data_pipeline.demo_corpus import generate_documents
from data_pipeline.tokenization import SavedTokenizer, dataset_special_ids
from tests.conftest import REPO_ROOT
from tests.unit.test_data_errors import run

TIMING = ("created_at", "seconds", "tokenize_seconds", "tokens_per_second")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = generate_documents(seed=2, target_docs=150, stdlib=False)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def fingerprint(out):
    """Every file's SHA-256, and index.json without its timestamps and timings."""
    files = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.rglob("*")) if p.is_file() and p.name != "index.json"}  # fmt: skip
    index = json.loads((out / "index.json").read_text())
    index.pop("created_at")
    for key in TIMING[1:]:
        index["prepare"]["stats"].pop(key)
    return files, index


@pytest.mark.parametrize("objective", ["nsp_pairs", "clm"])
def test_prepare_with_tokenizer_training_is_reproducible(corpus, tmp_path, objective):
    """Before the fix, two WordPiece trainings on the same text differed in ids and vocabulary (the
    trainer's hash-map order); the second run is a separate process, as a user's re-run is."""
    argv = [str(corpus), "--train-tokenizer", "--vocab-size", "600", "--seq-len", "64", "--objective", objective,
            "--shard-rows", "50", "--val-fraction", "0.1", "--seed", "3", "--num-proc", "1", "--log-level", "WARNING"]
    assert prepare.main([*argv, "--out", str(tmp_path / "a")]) == 0
    again = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", *argv, "--out", str(tmp_path / "b")],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr
    a, b = fingerprint(tmp_path / "a"), fingerprint(tmp_path / "b")
    assert len(a[0]) >= 4 and a == b
    assert a[1]["tokenizer_sha256"] == b[1]["tokenizer_sha256"] and a[1]["vocab_size"] == 600


def test_one_line_corpus_is_refused_with_what_to_do(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("The quick brown fox jumps over the lazy dog near the river.\n")
    out = tmp_path / "new" / "ds"
    argv = [str(tmp_path / "one.txt"), "--out", str(out), "--train-tokenizer", "--num-proc", "1"]
    code, err = run([*argv, "--vocab-size", "4096"], capsys)
    assert code == 2 and "too small for --vocab-size 4096" in err and "add input, or lower --vocab-size" in err
    assert not (tmp_path / "new").exists()  # no empty output directory left behind
    code, err = run([*argv, "--vocab-size", "64"], capsys)  # a vocabulary it can fill, but no validation split
    assert code == 2 and "no validation rows" in err and "--val-fraction 0" in err and "data.eval_split=train" in err
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)  # a directory the user made stays
    assert run([*argv, "--vocab-size", "64"], capsys)[0] == 2 and out.is_dir() and not any(out.iterdir())
    code, err = run([*argv, "--vocab-size", "64", "--val-fraction", "0"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("asset", ["tokenizer-512", "bpe-512"])
def test_saved_tokenizer_reads_as_transformers_does(asset):
    from transformers import AutoTokenizer

    directory = REPO_ROOT / "tests" / "assets" / asset
    mine, theirs = SavedTokenizer.open(directory), AutoTokenizer.from_pretrained(directory)
    assert mine is not None and len(mine) == len(theirs)
    assert mine.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    objective = "clm" if asset.startswith("bpe") else "nsp_pairs"
    assert dataset_special_ids(mine, asset, objective) == dataset_special_ids(theirs, asset, objective)
    assert [getattr(mine, f"{k}_token_id") for k in ("bos", "eos", "pad", "mask")] == [
        getattr(theirs, f"{k}_token_id") for k in ("bos", "eos", "pad", "mask")]


def test_prepare_with_a_tokenizer_directory_imports_no_torch(corpus, tmp_path):
    argv = [str(corpus), "--out", str(tmp_path / "o"), "--tokenizer", str(REPO_ROOT / "tests/assets/tokenizer-512"),
            "--num-proc", "1", "--log-level", "WARNING"]
    code = (f"import sys; from data_pipeline import prepare; assert prepare.main({argv!r}) == 0; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
