"""Tokenizers: load one (hub name or directory), train an uncased BERT WordPiece or a byte-level BPE (for
causal LMs), split into sentences.

Whatever the source, the tokenizer used is saved next to the shards (``<out>/tokenizer``, a directory
``transformers.AutoTokenizer`` loads offline), so a dataset is self-contained and its ``index.json``
records a hash of exactly those files. Workers get the Rust tokenizer as its JSON serialization.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
# Sentence ends: terminal punctuation (optionally closed by a quote or bracket) before whitespace, or a
# blank line. Cheap and language-agnostic enough for packing; it is not a linguistic segmenter. Every match
# starts with whitespace: the leading (?=\s) says so to the regex engine, which then skips to whitespace
# instead of trying each alternative at every character (same matches, about twice as fast).
_SENTENCE_END = re.compile(r"(?=\s)(?:(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\n\s*\n)")
_LINE_END = re.compile(r"(?=\s)\s*\n\s*")


MAX_WORD_CHARS = 100
"""Longer words encode as one [UNK] (WordPiece's max_input_chars_per_word), so tokenizer training leaves
them out: the trainer's merges are superlinear in a word's length (one 5 MB "word" ran for > 300 s)."""
_LONG_RUN = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}")


@dataclass
class LongWords:
    """Words left out of tokenizer training by ``drop_long_words``."""

    count: int = 0
    first: str = ""


def drop_long_words(text: str, normalizer, pre_tokenizer, seen: LongWords) -> str:
    """``text`` without the words longer than ``MAX_WORD_CHARS`` characters, as a tokenizer splits words
    (its ``tokenizers`` normalizer, if any, then its pre-tokenizer: separate objects from the tokenizer
    being trained, which is locked meanwhile). Only runs of more than ``MAX_WORD_CHARS`` non-space
    characters are looked at (one regex scan for ordinary text); they are replaced by their short words
    (cut at the pre-tokenizer's offsets, so a byte-level pre-tokenizer's byte symbols never reach the
    text), joined with spaces."""
    if _LONG_RUN.search(text) is None:
        return text

    def short_words(m: re.Match) -> str:
        run = m.group() if normalizer is None else normalizer.normalize_str(m.group())
        words = [run[start:end] for _, (start, end) in pre_tokenizer.pre_tokenize_str(run)]
        short = [w for w in words if len(w) <= MAX_WORD_CHARS]
        if len(short) < len(words):
            seen.count += len(words) - len(short)
            seen.first = seen.first or next(w for w in words if len(w) > MAX_WORD_CHARS)[:40] + "..."
        return " ".join(short)

    return _LONG_RUN.sub(short_words, text)


def _continuation_symbols(chars: Iterable[str], normalizer, pre_tokenizer, prefix: str) -> list[str]:
    """``prefix + c`` for every character ``c`` that can continue a word made of the text's characters
    ``chars``: the ones the tokenizer's normalizer and pre-tokenizer keep inside a word after a letter
    (not whitespace, punctuation or CJK), in code point order."""
    out = set()
    for raw in chars:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str("a" + raw))
        out.update(c for word, _ in words for c in word[1:])
    return sorted(prefix + c for c in out)


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: Path, min_frequency: int = 2,
                    long_words: LongWords | None = None):  # fmt: skip
    """Train an uncased BERT WordPiece tokenizer on ``texts`` and save it to ``out_dir``.

    ``texts`` is read twice (a list, or an iterable whose ``iter()`` restarts the stream, never a
    generator): once for its characters, then to train. Words longer than ``MAX_WORD_CHARS`` are left
    out (counted in ``long_words``). Returns the ``transformers`` tokenizer (a fast BERT tokenizer, as
    ``AutoTokenizer`` loads it back).

    Deterministic: the same texts give the same files. ``tokenizers``' trainer numbers the word-continuing
    symbols (``##e``) in the order of a randomly seeded hash map, and ties between equally frequent merges
    are broken by those numbers, so two runs learned different vocabularies (huggingface/tokenizers#1794).
    Every continuation symbol the text can produce is therefore registered up front, in code point order,
    as a trainer special token (which the trainer numbers first, in the order given), and demoted to an
    ordinary vocabulary entry after training. A symbol training would not have made (for a character seen
    only at word starts) is one extra entry; it lets that character continue a word when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    if vocab_size < 64:
        raise DataError(f"--vocab-size {vocab_size} is too small for a WordPiece vocabulary (use >= 64)")
    if iter(texts) is texts:
        raise TypeError("train_wordpiece reads texts twice: pass a list or a re-iterable, not an iterator")

    def normalizer():
        return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)

    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    continuation = _continuation_symbols(chars, normalizer(), pre_tokenizers.BertPreTokenizer(), "##")
    tok = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk"], max_input_chars_per_word=MAX_WORD_CHARS))
    tok.normalizer = normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS.values(), *continuation],
        continuing_subword_prefix="##",
        show_progress=sys.stderr.isatty(),  # the merge phase after reading can take minutes on a large corpus
    )
    seen = long_words if long_words is not None else LongWords()
    split = normalizer(), pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator((drop_long_words(t, *split, seen) for t in texts), trainer=trainer)
    state = json.loads(tok.to_str())  # demote the continuation symbols to ordinary vocabulary entries
    specials = set(SPECIAL_TOKENS.values())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] in specials]
    tok = Tokenizer.from_str(json.dumps(state))
    cls_id, sep_id = tok.token_to_id(SPECIAL_TOKENS["cls"]), tok.token_to_id(SPECIAL_TOKENS["sep"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    hf = BertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=True,
        **{f"{k}_token": v for k, v in SPECIAL_TOKENS.items()},
    )
    hf.save_pretrained(str(out_dir))
    log.info("trained a %d-token uncased WordPiece tokenizer", len(hf))  # not out_dir: sift prepare's temporary one
    return hf


END_OF_TEXT = "<|endoftext|>"
"""The one special token of a byte-level BPE trained by ``train_bytelevel_bpe`` (GPT-2's spelling)."""


def train_bytelevel_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path, min_frequency: int = 2,
                        long_words: LongWords | None = None):  # fmt: skip
    """Train a byte-level BPE tokenizer (GPT-2's scheme: no normalization, no unknown token) on ``texts``
    (streamed) and save it to ``out_dir``; ``<|endoftext|>`` is its end-of-text (and beginning and
    unknown) token, as in GPT-2. Words longer than ``MAX_WORD_CHARS`` are left out of training (counted
    in ``long_words``); they still encode, byte by byte. Returns the ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE vocabulary (use >= "
                        f"{len(alphabet) + 2}: the {len(alphabet)} byte symbols, {END_OF_TEXT} and merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=alphabet, show_progress=sys.stderr.isatty())
    seen = long_words if long_words is not None else LongWords()
    split = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator((drop_long_words(t, None, split, seen) for t in texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                 unk_token=END_OF_TEXT)
    hf.save_pretrained(str(out_dir))
    log.info("trained a %d-token byte-level BPE tokenizer", len(hf))  # not out_dir: sift prepare's temporary one
    return hf


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""What a tokenizer directory written by ``sift prepare`` holds (``transformers``' ``save_pretrained``)."""
_PLAIN_CLASSES = ("BertTokenizer", "BertTokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend")
"""Tokenizer classes whose special tokens are exactly those named in ``tokenizer_config.json``."""


class SavedTokenizer:
    """A tokenizer directory of exactly ``TOKENIZER_FILES``, read with ``tokenizers`` alone: the part of a
    ``transformers`` tokenizer that prepare uses (``len``, ``backend_tokenizer``, ``<name>_token_id``,
    ``save_pretrained``), without importing ``transformers`` and torch (about 2 s of CPU per run)."""

    def __init__(self, directory: Path, backend, config: dict):
        self.directory, self.backend_tokenizer, self.config = directory, backend, config

    @classmethod
    def open(cls, directory: Path) -> SavedTokenizer | None:
        """The tokenizer in ``directory``, or None where only ``transformers`` can load it faithfully (other
        files, another tokenizer class, a special token named in the config but absent from the vocabulary)."""
        from tokenizers import Tokenizer

        if sorted(p.name for p in directory.iterdir()) != sorted(TOKENIZER_FILES):
            return None
        try:
            config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
            backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception:  # let transformers report it in its own words
            return None
        if not isinstance(config, dict) or config.get("tokenizer_class") not in _PLAIN_CLASSES:
            return None
        if config["tokenizer_class"].startswith("Bert") and any(f"{k}_token" not in config for k in SPECIAL_TOKENS):
            return None  # BertTokenizer has defaults for the ones not named
        tok = cls(directory, backend, config)
        names = [k.removesuffix("_token") for k in config if k.endswith("_token")]
        if any(getattr(tok, f"{n}_token_id") is None for n in names if config[f"{n}_token"] is not None):
            return None
        return tok

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __getattr__(self, name: str):
        if not name.endswith("_token_id"):
            raise AttributeError(name)
        token = self.__dict__["config"].get(name.removesuffix("_id"))
        content = token.get("content") if isinstance(token, dict) else token
        return None if content is None else self.__dict__["backend_tokenizer"].token_to_id(content)

    def save_pretrained(self, out_dir: str) -> None:
        """The files as they are (``transformers`` writes the same tokenizer.json; its tokenizer_config.json
        adds bookkeeping keys, ``is_local``, to a directory it did not write itself)."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            shutil.copyfile(self.directory / name, Path(out_dir) / name)


def load_tokenizer(name_or_path: str):
    """A directory in the form prepare writes through ``SavedTokenizer``, anything else through
    ``AutoTokenizer.from_pretrained``; errors a user can act on (``DataError``, no traceback)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir() and (saved := SavedTokenizer.open(local)) is not None:
        return saved
    if local.exists() and not local.is_dir():
        raise DataError(
            f"--tokenizer {name_or_path}: expected a tokenizer directory or a hub name, got a file"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name_or_path)
    except Exception as e:  # transformers/hub raise OSError, ValueError, HTTP errors...
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = (
            f"directory {local}" if local.is_dir() else f"hub name {name_or_path!r} (no such local directory)"
        )
        hint = "; offline (HF_HUB_OFFLINE=1): use a local directory or --train-tokenizer" if offline else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load tokenizer from {where}: {first}{hint}") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise DataError(
            f"tokenizer {name_or_path!r} has no fast (Rust `tokenizers`) backend, which prepare needs"
        )
    return tok


def special_ids(tok, name: str) -> dict[str, int]:
    """pad/unk/cls/sep/mask ids of a transformers tokenizer; ``DataError`` if any is missing."""
    ids = {k: getattr(tok, f"{k}_token_id", None) for k in SPECIAL_TOKENS}
    missing = [f"{k} ({SPECIAL_TOKENS[k]})" for k, v in ids.items() if v is None]
    if missing:
        raise DataError(
            f"tokenizer {name!r} lacks special token(s) {', '.join(missing)}: BERT-style pretraining needs "
            "pad, unk, cls, sep and mask tokens"
        )
    return {k: int(v) for k, v in ids.items()}


def clm_special_ids(tok, name: str) -> dict[str, int]:
    """eos (joins documents) and pad of a transformers tokenizer for ``--objective clm``: pad is the
    tokenizer's own pad token, or else the end-of-text token (packed rows are never padded; the id is
    recorded for models that want one). ``DataError`` when there is no end-of-text token."""
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        raise DataError(
            f"tokenizer {name!r} has no end-of-text (eos) token, which --objective clm puts between documents; "
            "use a causal-LM tokenizer (GPT-2's, Llama's) or --train-tokenizer"
        )
    pad = getattr(tok, "pad_token_id", None)
    out = {"eos": int(eos), "pad": int(eos if pad is None else pad)}
    bos = getattr(tok, "bos_token_id", None)
    return out | ({"bos": int(bos)} if bos is not None else {})


def dataset_special_ids(tok, name: str, objective: str) -> dict[str, int]:
    """The special ids ``index.json`` records for ``objective`` (see ``index.REQUIRED_SPECIALS``)."""
    return clm_special_ids(tok, name) if objective == "clm" else special_ids(tok, name)


def check_tokenizer_fits(vocab_size: int, name: str, max_vocab_size: int | None) -> None:
    if max_vocab_size is not None and vocab_size > max_vocab_size:
        raise DataError(
            f"tokenizer {name!r} has {vocab_size} tokens but --max-vocab-size (the model's embedding rows) "
            f"is {max_vocab_size}: its ids would index past the model's embedding table; use a smaller "
            "tokenizer or a larger model vocabulary"
        )
    if vocab_size > 1 << 32:
        raise DataError(f"tokenizer {name!r} has {vocab_size} tokens, more than uint32 token ids can hold")


@dataclass(frozen=True)
class SentenceSplitter:
    """Documents -> word-piece ids per sentence, run inside prepare's worker processes.

    Built from the Rust tokenizer's JSON (picklable, cheap to rebuild once per worker). Sentence ends
    are marked in the text with the tokenizer's own separator token, so each document is encoded in one
    call and split on the separator ids afterwards: ~30% faster than encoding sentence by sentence, with
    identical ids. (A literal separator token already in the text therefore also ends a sentence.)
    """

    tokenizer_json: str
    mode: str = "punct"
    """``punct``: end sentences at . ! ? and blank lines; ``line``: every line is a sentence."""
    sep_id: int | None = None
    """The separator token id used as the in-text marker; None: encode sentence by sentence."""

    def __post_init__(self) -> None:
        if self.mode not in ("punct", "line"):
            raise DataError(f"--sentence-split must be 'punct' or 'line', got {self.mode!r}")

    def build(self):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.tokenizer_json)
        tok.no_truncation()
        tok.no_padding()
        return tok

    def marker(self, tok) -> str | None:
        if self.sep_id is None:
            return None
        text = f" {tok.id_to_token(self.sep_id)} "
        return text if tok.encode(f"a{text}b", add_special_tokens=False).ids.count(self.sep_id) == 1 else None

    def split(self, text: str) -> list[str]:
        pattern = _LINE_END if self.mode == "line" else _SENTENCE_END
        return [s for s in pattern.split(text) if s and not s.isspace()]

    def encode(self, tok, texts: list[str], marker: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per document: (ids (n_tokens,) uint32, sentence_lengths (n_sentences,) int64), empty ones dropped.

        ``marker``: ``self.marker(tok)``, computed once per worker.
        """
        if marker is None:
            return self._encode_sentences(tok, texts)
        pattern = _LINE_END if self.mode == "line" else _SENTENCE_END
        encodings = tok.encode_batch_fast([pattern.sub(marker, t) for t in texts], add_special_tokens=False)
        out = []
        for e in encodings:
            ids = np.array(e.ids, dtype=np.uint32)
            cuts = np.flatnonzero(ids == self.sep_id)
            lengths = np.diff(np.concatenate(([-1], cuts, [len(ids)]))) - 1
            out.append((np.delete(ids, cuts), lengths[lengths > 0]))
        return out

    def _encode_sentences(self, tok, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        sentences: list[str] = []
        counts: list[int] = []
        for text in texts:
            parts = self.split(text)
            sentences += parts
            counts.append(len(parts))
        ids = [e.ids for e in tok.encode_batch_fast(sentences, add_special_tokens=False)] if sentences else []
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
        out = []
        s = t = 0
        for c in counts:
            lens = lengths[s : s + c]
            n = int(lens.sum())
            out.append((flat[t : t + n], lens[lens > 0]))
            s, t = s + c, t + n
        return out
