"""The offline demo's corpus: text every CPython carries, plus generated documents of graded difficulty.

The project ships no third-party text, so the demo builds its corpus on the spot, deterministically from
a seed, in a few seconds:

* ``stdlib/pydoc-topics``: the interpreter's own help topics (``pydoc_data.topics``), one per document;
* ``stdlib/docstrings``: docstrings from the standard library's ``.py`` sources;
* ``template/easy``: formulaic records (weather reports, arithmetic facts, inventory lines) whose words
  are almost all predictable from the template: an MLM learns them fast (low loss);
* ``grammar/medium`` and ``grammar/hard``: sentences from a small random grammar over invented words,
  with a small Zipf-skewed vocabulary (medium) or a large flat one (hard);
* ``noise/random``: strings of random invented words, which no model can predict (the highest loss).

Either stdlib source is skipped cleanly where a distribution strips it. The mix gives a sample-selection
method (loss- or entropy-based SIFT) something to find: easy, learnable and unlearnable samples.
"""

from __future__ import annotations

import json
import logging
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_DOCSTRING = re.compile(r'^\s*(?:(?:async\s+)?def|class)\s[^\n]*:\s*\n\s*[rRuU]?"""(.*?)"""', re.S | re.M)
_MODULE_DOCSTRING = re.compile(r'\A(?:\s*#[^\n]*\n)*\s*[rRuU]?"""(.*?)"""', re.S)
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]

# Template fragments: a few fixed words around slots filled from short lists.
_CITIES = ["springfield", "riverton", "lakeside", "fairview", "greenville", "oakdale", "hillcrest", "maple"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy"]
_ITEMS = ["apples", "chairs", "lamps", "books", "pencils", "boxes", "cups", "plates"]
_NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]


def _pydoc_topics() -> Iterator[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        log.info("pydoc_data is not installed here: no stdlib help topics in the demo corpus")
        return
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) > 200:
            yield f"pydoc-{name}", text


def _docstrings(max_files: int = 400) -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:max_files] if stdlib.is_dir() else []
    if not files:
        log.info("no stdlib .py sources here (stripped distribution?): no docstrings in the demo corpus")
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts = [m.group(1) for m in _MODULE_DOCSTRING.finditer(source)]
        parts += [m.group(1) for m in _DOCSTRING.finditer(source)]
        paragraphs = [" ".join(p.split()) for p in parts if len(p.split()) >= 8]
        # Group a module's docstrings into documents of a few thousand characters.
        doc: list[str] = []
        for i, para in enumerate(paragraphs):
            doc.append(para)
            if sum(map(len, doc)) > 3000 or i == len(paragraphs) - 1:
                yield f"doc-{path.stem}-{i}", "\n".join(doc)
                doc = []


def _words(rng: np.random.Generator, n: int, syllables: tuple[int, int] = (1, 3)) -> list[str]:
    """``n`` distinct invented words (pronounceable syllable strings)."""
    out: dict[str, None] = {}
    while len(out) < n:
        k = int(rng.integers(syllables[0], syllables[1] + 1))
        out["".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), k))] = None
    return list(out)


def _template_doc(rng: np.random.Generator, sentences: int) -> str:
    lines = []
    for _ in range(sentences):
        kind = int(rng.integers(0, 3))
        if kind == 0:
            c, d, w = rng.choice(_CITIES), rng.choice(_DAYS), rng.choice(_WEATHER)
            lines.append(f"The weather in {c} on {d} was {w}, and the weather in {c} on {d} stayed {w}.")
        elif kind == 1:
            a, b = (int(x) for x in rng.integers(0, 4, 2))
            lines.append(f"{_NUMBERS[a].capitalize()} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}.")
        else:
            n, item = _NUMBERS[int(rng.integers(1, 13))], rng.choice(_ITEMS)
            lines.append(f"The shop has {n} {item} on the shelf, {n} {item} in total.")
    return " ".join(lines)


class _Grammar:
    """S -> NP VP [CONJ S]; NP -> DET [ADJ] N [PP]; VP -> V NP | V ADV; words drawn Zipf(alpha)."""

    def __init__(self, rng: np.random.Generator, vocab: int, alpha: float):
        self.rng = rng
        sizes = {"n": vocab // 2, "v": vocab // 4, "adj": vocab // 8, "adv": max(4, vocab // 16)}
        self.lex = {k: _words(rng, s, (1, 3)) for k, s in sizes.items()}
        # Cumulative Zipf weights: a word is one uniform draw and a binary search.
        self.cdf = {k: np.cumsum(1.0 / np.arange(1, len(w) + 1) ** alpha) for k, w in self.lex.items()}

    def word(self, kind: str) -> str:
        cdf = self.cdf[kind]
        return self.lex[kind][min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1])), len(cdf) - 1)]

    def np_(self, depth: int) -> str:
        parts = [str(self.rng.choice(["the", "a", "every", "some"]))]
        if self.rng.random() < 0.5:
            parts.append(self.word("adj"))
        parts.append(self.word("n"))
        if depth < 2 and self.rng.random() < 0.3:
            parts += [str(self.rng.choice(["of", "near", "with", "under"])), self.np_(depth + 1)]
        return " ".join(parts)

    def sentence(self, depth: int = 0) -> str:
        vp = (
            f"{self.word('v')} {self.np_(1)}"
            if self.rng.random() < 0.7
            else f"{self.word('v')} {self.word('adv')}"
        )
        s = f"{self.np_(0)} {vp}"
        if depth < 1 and self.rng.random() < 0.25:
            s += f" {self.rng.choice(['and', 'but', 'because'])} {self.sentence(depth + 1)}"
        return s

    def document(self, sentences: int) -> str:
        return " ".join(self.sentence().capitalize() + "." for _ in range(sentences))


def generate_documents(
    seed: int = 0, target_docs: int = 2000, stdlib: bool = True
) -> Iterator[dict[str, str]]:
    """Yield ``{"id", "source", "text"}`` records: the stdlib text (unless ``stdlib=False``), then
    ``target_docs`` generated documents of mixed difficulty."""
    if stdlib:
        for doc_id, text in _pydoc_topics():
            yield {"id": doc_id, "source": "stdlib/pydoc-topics", "text": text}
        for doc_id, text in _docstrings():
            yield {"id": doc_id, "source": "stdlib/docstrings", "text": text}
    rng = np.random.default_rng([seed, 0xDE30])
    medium = _Grammar(np.random.default_rng([seed, 1]), vocab=300, alpha=1.1)
    hard = _Grammar(np.random.default_rng([seed, 2]), vocab=6000, alpha=0.6)
    noise_words = _words(np.random.default_rng([seed, 3]), 4000, (1, 4))
    kinds = ["template/easy", "grammar/medium", "grammar/hard", "noise/random"]
    weights = [0.35, 0.3, 0.3, 0.05]
    for i in range(target_docs):
        kind = kinds[int(rng.choice(4, p=weights))]
        n = int(rng.integers(8, 30))
        if kind == "template/easy":
            text = _template_doc(rng, n)
        elif kind == "grammar/medium":
            text = medium.document(n)
        elif kind == "grammar/hard":
            text = hard.document(n)
        else:
            words = rng.choice(noise_words, size=n * 12)
            text = " ".join(" ".join(words[j : j + 12]).capitalize() + "." for j in range(0, len(words), 12))
        yield {"id": f"gen-{i:06d}", "source": kind, "text": text}


def write_demo_corpus(
    out_dir: str | Path, seed: int = 0, target_docs: int = 2000, stdlib: bool = True
) -> Path:
    """Write ``<out_dir>/demo-corpus.jsonl`` (fields id, source, text) and return its path.

    ``target_docs`` generated documents (about 250 words each) come on top of the stdlib text; the
    default gives roughly 1 M word pieces, several thousand rows at seq_len 128.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo-corpus.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in generate_documents(seed, target_docs, stdlib):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
