"""`sift prepare --objective clm`: documents joined with the end-of-text token and cut into rows of exactly
T tokens, uint32 ids for vocabularies over 65,536, the next-token collator, and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import prepare
from data_pipeline.index import read_index
from data_pipeline.instances import TokenPacker, clm_stream
from data_pipeline.loader import build_loader, collate_clm, eval_batches
from data_pipeline.reader import ShardDataset
from data_pipeline.wire import WireBatch
from launcher.cli import main as sift

WORDS = ["river", "bank", "boat", "dawn", "baker", "shop", "town", "park", "bench", "quiet", "canal", "fox"]


def docs(n: int = 40) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(10 + i % 13)) + f" doc {i}." for i in range(n)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def prepare_clm(out, src, *extra: str) -> int:
    return prepare.main([str(src), "--out", str(out), "--objective", "clm", "--seq-len", "16", "--val-fraction", "0",
                         "--log-level", "WARNING", *extra])


@pytest.fixture(scope="module")
def clm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clm")
    src = write_jsonl(root / "in.jsonl", docs())
    assert prepare_clm(root / "ds", src, "--train-tokenizer", "--vocab-size", "300", "--num-proc", "1",
                       "--shard-rows", "16") == 0
    return root


def test_rows_are_the_documents_joined_with_eos_cut_every_t_tokens(clm_dir):
    from transformers import AutoTokenizer

    meta, _ = read_index(clm_dir / "ds")
    ds = ShardDataset.open(clm_dir / "ds", "train")
    tok = AutoTokenizer.from_pretrained(ds.tokenizer_path())
    assert meta.objective == "clm" and meta.token_dtype == "uint16" and tok.eos_token == "<|endoftext|>"
    assert meta.special_ids["eos"] == meta.special_ids["pad"] == tok.eos_token_id
    rows = ds.rows(np.arange(len(ds)))
    assert (rows["lengths"] == 16).all() and (rows["nsp_label"] == -1).all()
    stream = [i for t in docs() for i in [*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    n = len(stream) // 16
    assert len(ds) == n and n > 16  # more than one shard
    assert rows["tokens"].reshape(-1).tolist() == stream[: n * 16]
    stats = meta.extra["prepare"]["stats"]
    assert stats["tail_tokens_dropped"]["train"] == len(stream) - n * 16 and stats["fill"]["train"] == 1.0
    assert tok.decode(rows["tokens"][0]).startswith(docs()[0][:20])


def test_the_output_does_not_depend_on_the_process_count(clm_dir, tmp_path):
    assert prepare_clm(tmp_path / "ds", clm_dir / "in.jsonl", "--tokenizer", str(clm_dir / "ds" / "tokenizer"),
                       "--num-proc", "2", "--shard-rows", "16") == 0
    for shard in sorted((clm_dir / "ds").glob("*.arrow")):
        assert (tmp_path / "ds" / shard.name).read_bytes() == shard.read_bytes()


def test_the_loader_gives_next_token_labels(clm_dir):
    ds = ShardDataset.open(clm_dir / "ds", "train")
    batch = next(iter(build_loader(ds, seed=0, rank=0, world_size=1, batch_size_for_draw=lambda d: 5, num_workers=1)))
    assert tuple(batch) == ("input_ids", "attention_mask", "labels", "sample_ids")
    ids, labels = batch["input_ids"], batch["labels"]
    assert torch.equal(ids, torch.from_numpy(ds.rows(batch["sample_ids"].numpy())["tokens"]))
    assert torch.equal(labels[:, :-1], ids[:, 1:]) and (labels[:, -1] == -100).all()
    assert (batch["attention_mask"] == 1).all()
    first = next(eval_batches(ds, seed=0, rank=0, world_size=1, batch_size=4))
    assert torch.equal(first["input_ids"], torch.from_numpy(ds.rows(np.arange(4))["tokens"]))


def test_a_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    """A word-level tokenizer of 70,000 tokens whose text uses ids above 65,535 (Llama-3 has 128,256)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path / "tok")
    texts = [" ".join(f"w{(d * 997 + j * 7919) % 69_990 + 2}" for j in range(30)) for d in range(20)]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    assert prepare_clm(tmp_path / "ds", src, "--tokenizer", str(tmp_path / "tok"), "--num-proc", "1") == 0
    meta, _ = read_index(tmp_path / "ds")
    assert meta.token_dtype == "uint32" and meta.vocab_size == 70_000
    ds = ShardDataset.open(tmp_path / "ds", "train")
    expected = [int(w[1:]) for t in texts for w in [*t.split(), "w0"]]  # w0: the <eos> id
    assert ds.rows(np.arange(len(ds)))["tokens"].reshape(-1).tolist() == expected[: len(ds) * 16]
    assert max(expected) > 65_535
    batch = next(iter(build_loader(ds, seed=0, rank=0, world_size=1, batch_size_for_draw=lambda d: 4, num_workers=1)))
    assert batch["input_ids"].max() > 65_535  # through the worker's compact wire format intact


def test_wire_format_round_trips_a_clm_batch():
    import pickle

    tokens = np.random.default_rng(0).integers(0, 128_256, (3, 8))
    batch = collate_clm({"tokens": tokens}, np.arange(3))
    back = pickle.loads(pickle.dumps(WireBatch(batch)))
    assert type(back) is dict and tuple(back) == tuple(batch)
    assert all(torch.equal(back[k], batch[k]) and back[k].dtype == torch.int64 for k in batch)


def test_packer_does_not_depend_on_how_the_stream_is_cut():
    stream = clm_stream([np.arange(1, 6), np.arange(10, 13), np.arange(20, 31)], eos_id=0, dtype="uint16")
    assert stream.tolist() == [1, 2, 3, 4, 5, 0, 10, 11, 12, 0, *range(20, 31), 0]
    whole = TokenPacker(4, "uint16")
    rows = whole.add(stream)
    pieces = TokenPacker(4, "uint16")
    cut = np.concatenate([pieces.add(stream[a:b]) for a, b in ((0, 3), (3, 3), (3, 11), (11, 22))])
    assert np.array_equal(rows, cut) and rows.shape == (5, 4) and whole.pending == pieces.pending == 2


def run(argv, capsys) -> tuple[int, str]:
    code = sift(["prepare", *argv, "--log-level", "WARNING"])
    return code, capsys.readouterr().err


def test_errors_name_the_problem(clm_dir, tmp_path, capsys):
    src = clm_dir / "in.jsonl"
    common = ["--objective", "clm", "--num-proc", "1", "--val-fraction", "0"]
    wordpiece = str(Path(__file__).resolve().parents[1] / "assets" / "tokenizer-512")  # no eos token
    code, err = run([str(src), "--out", str(tmp_path / "a"), "--tokenizer", wordpiece, *common], capsys)
    assert code == 2 and "has no end-of-text (eos) token, which --objective clm puts between documents" in err
    short = write_jsonl(tmp_path / "short.jsonl", docs(2))
    code, err = run([str(short), "--out", str(tmp_path / "b"), "--train-tokenizer", "--vocab-size", "300",
                     "--seq-len", "4096", *common], capsys)
    assert code == 2 and "tokens do not fill one row of --seq-len 4096" in err
    code, err = run([str(src), "--out", str(tmp_path / "c"), "--short-seq-prob", "0.1", *common], capsys)
    assert code == 2 and "--short-seq-prob applies to BERT pairs" in err
    code, err = run([str(src), "--out", str(tmp_path / "d"), "--train-tokenizer", "--vocab-size", "100", *common],
                    capsys)
    assert code == 2 and "too small for a byte-level BPE vocabulary (use >= 258" in err
    assert "Traceback" not in err
