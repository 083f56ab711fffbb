"""The offline demo corpus: deterministic, stdlib text plus graded generated documents."""

from __future__ import annotations

import json
from collections import Counter

from data_pipeline.demo_corpus import generate_documents, write_demo_corpus


def test_demo_corpus_is_deterministic_and_mixed(tmp_path):
    a = write_demo_corpus(tmp_path / "a", seed=5, target_docs=300)
    b = write_demo_corpus(tmp_path / "b", seed=5, target_docs=300)
    assert a.read_bytes() == b.read_bytes()
    records = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"id", "source", "text"} and r["text"].strip() for r in records)
    assert len({r["id"] for r in records}) == len(records)
    sources = Counter(r["source"] for r in records)
    for kind in ("template/easy", "grammar/medium", "grammar/hard", "noise/random"):
        assert sources[kind] > 0, kind
    assert sum(v for k, v in sources.items() if not k.startswith("stdlib")) == 300
    # Stdlib text is included where this Python ships it (pydoc_data is part of CPython).
    assert sources["stdlib/pydoc-topics"] > 0
    other = list(generate_documents(seed=6, target_docs=20, stdlib=False))
    assert [r["text"] for r in other] != [r["text"] for r in records if r["id"].startswith("gen-")][:20]


def test_difficulty_levels_differ_in_vocabulary():
    docs = list(generate_documents(seed=0, target_docs=400, stdlib=False))

    def distinct_ratio(kind: str) -> float:
        words = [w for d in docs if d["source"] == kind for w in d["text"].lower().split()]
        return len(set(words)) / len(words)

    easy, medium, hard = (distinct_ratio(k) for k in ("template/easy", "grammar/medium", "grammar/hard"))
    assert easy < medium < hard
