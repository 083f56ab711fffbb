"""The study's data regimes: the pure pieces (split rule, edits, shares, insertion) and a small build."""

from __future__ import annotations

import re

import numpy as np
import pytest

from data_pipeline.build import split_of
from data_pipeline.sources import Document
from study.regimes import (
    Doc,
    RegimeConfig,
    _insert,
    char_shares,
    make_regime,
    near_duplicate,
    random_words,
    shuffled_words,
    validation_side,
)
from study.spec import StudyError

WORD = re.compile(r"\S+")


def corpus(n: int = 400, seed: int = 0) -> list[Doc]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(300)]
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(vocab, size=10)) + "." for _ in range(int(rng.integers(3, 9)))]
        docs.append(Doc(f"doc-{i}", "\n".join(lines), "original", "a" if i % 3 else "b"))
    return docs


def test_validation_side_is_sift_prepares_documented_id_rule():
    for i in range(2000):
        doc_id = f"doc-{i}"
        want = split_of(Document(doc_id, "text", "x"), 0.1, "id") == "validation"
        assert validation_side(doc_id, 0.1) == want


def test_edits_keep_what_they_promise():
    rng = np.random.default_rng(0)
    text = "\n".join(f"line {i} has some words in it" for i in range(50))
    copy = near_duplicate(text, rng)
    kept = copy.split("\n")
    assert 30 <= len(kept) < 50 and set(WORD.findall(copy)) <= set(WORD.findall(text))
    same = sum(a == b for a, b in zip(WORD.findall(copy), WORD.findall("\n".join(kept))))
    assert same == len(WORD.findall(copy))  # nothing but dropped lines and word swaps
    shuffled = shuffled_words(text, rng)
    assert sorted(WORD.findall(shuffled)) == sorted(WORD.findall(text)) and shuffled != text
    assert [len(line.split()) for line in shuffled.split("\n")] == [len(line.split()) for line in text.split("\n")]
    noise = random_words(100, ["a", "b", "c"], rng)
    assert len(noise.split()) == 100 and set(noise.split()) <= {"a", "b", "c"}


def test_insert_keeps_the_order_of_the_originals():
    rng = np.random.default_rng(1)
    docs = [Doc(str(i), "t") for i in range(20)]
    extra = [Doc(f"x{i}", "t") for i in range(15)]
    out = _insert(docs, extra, rng)
    assert len(out) == 35 and [d.id for d in out if not d.id.startswith("x")] == [str(i) for i in range(20)]
    assert [d.id for d in out if d.id.startswith("x")] == [f"x{i}" for i in range(15)]


@pytest.mark.parametrize("name, share_key, kinds", [
    ("redundant", "duplicate_share", {"duplicate"}), ("noisy", "noise_share", {"noise-shuffled", "noise-random"})])
def test_regimes_reach_their_share_on_the_training_side_only(name, share_key, kinds):
    docs = corpus()
    cfg = RegimeConfig(input="x", copies=4, val_fraction=0.1)
    out = make_regime(name, docs, cfg)
    shares = char_shares(out, cfg.val_fraction)
    generated = sum(shares.get(k, 0) for k in kinds)
    assert getattr(cfg, share_key) <= generated < getattr(cfg, share_key) + 0.03
    assert all(not validation_side(d.id, cfg.val_fraction) for d in out if d.kind in kinds)
    # the validation documents, in their order, are exactly the clean corpus's
    val = [d.text for d in docs if validation_side(d.id, cfg.val_fraction)]
    assert [d.text for d in out if validation_side(d.id, cfg.val_fraction)] == val
    assert [d.text for d in out if d.kind in ("original", "duplicated")] == [d.text for d in docs]
    assert make_regime(name, docs, cfg) == out  # reproducible
    if name == "redundant":
        originals = {d.id: d.text for d in out if d.kind == "duplicated"}
        copies = [d for d in out if d.kind == "duplicate"]
        assert len(copies) == 4 * len(originals) and all(d.id in originals for d in copies)


def test_config_errors_are_listed():
    with pytest.raises(StudyError, match="unknown regime 'dirty'.*duplicate_share"):
        RegimeConfig.from_dict({"input": "x", "names": ["dirty"], "duplicate_share": 1.5})
    with pytest.raises(StudyError, match="--split-by is set by the regime builder"):
        RegimeConfig.from_dict({"input": "x", "prepare_args": ["--split-by", "text"]})
    with pytest.raises(StudyError, match="unknown key"):
        RegimeConfig.from_dict({"input": "x", "shares": 0.3})
    with pytest.raises(StudyError, match="is required"):
        RegimeConfig.from_dict({})
