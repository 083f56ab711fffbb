"""Training rows from tokenized documents: NSP sentence pairs, MLM-only packed sentences, or causal-LM
token streams cut into rows of exactly ``seq_len`` tokens.

Input per document: its word-piece ids (n,) and sentence lengths (m,). Sentences are kept whole; only a
"sentence" longer than half a row (``nsp_pairs``) or a quarter of a row (``mlm_packed``: a long one
that does not fit would leave that much padding) is cut into near-equal pieces. Both builders fill rows
close to ``seq_len`` (padding is compute wasted on every layer), and are deterministic given the numpy
``Generator``.

* ``nsp_pairs``: ``[CLS] A [SEP] B [SEP]``. Consecutive sentences are gathered until they reach the
  target length; A is a random prefix of them. With probability 1/2 (or when only one piece was
  gathered) B is a random run of sentences from *another* document of the same batch of documents
  (label 1) and the unused sentences are put back; otherwise B is the rest (label 0). A pair that is
  too long loses tokens from its longer segment, from the front or back at random.
* ``mlm_packed``: ``[CLS] s1 s2 ... [SEP]``, whole sentences packed across document boundaries with a
  ``[SEP]`` between documents; no segment B, NSP label -1.
* ``clm``: each document followed by the end-of-text token (``clm_stream``), the streams of all chunks
  concatenated in order and cut every ``seq_len`` tokens (``TokenPacker``): no padding, no special
  token at row starts, documents run across rows; only the split's final partial row is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Doc = tuple[np.ndarray, np.ndarray]
"""(ids (n,) uint32, sentence_lengths (m,) int64), sum(sentence_lengths) == n."""


@dataclass(frozen=True)
class InstanceConfig:
    seq_len: int
    objective: str
    cls_id: int
    sep_id: int
    pad_id: int
    token_dtype: str = "uint16"
    short_seq_prob: float = 0.0
    """BERT's trick to show short sequences too; 0 keeps rows full (the paper's setting fills them)."""
    random_next_prob: float = 0.5
    eos_id: int | None = None
    """``clm``: the end-of-text token that follows every document."""


@dataclass
class Rows:
    """tokens (n, T); length, segment_b (n,) int64; nsp_label (n,) int8."""

    tokens: np.ndarray
    length: np.ndarray
    segment_b: np.ndarray
    nsp_label: np.ndarray

    def __len__(self) -> int:
        return len(self.length)


class _RowBuffer:
    def __init__(self, cfg: InstanceConfig, capacity: int = 64):
        self.cfg, self.n = cfg, 0
        self.tokens = np.full((capacity, cfg.seq_len), cfg.pad_id, dtype=cfg.token_dtype)
        self.length = np.zeros(capacity, dtype=np.int64)
        self.segment_b = np.zeros(capacity, dtype=np.int64)
        self.nsp = np.zeros(capacity, dtype=np.int8)

    def _grow(self) -> None:
        cap = 2 * len(self.length)
        tokens = np.full((cap, self.cfg.seq_len), self.cfg.pad_id, dtype=self.tokens.dtype)
        tokens[: self.n] = self.tokens[: self.n]
        self.tokens = tokens
        self.length = np.resize(self.length, cap)
        self.segment_b = np.resize(self.segment_b, cap)
        self.nsp = np.resize(self.nsp, cap)

    def add(self, parts: list[np.ndarray], segment_b: int | None, nsp: int) -> None:
        """One row: [CLS] + parts + [SEP]; ``parts`` may hold [SEP] separators already."""
        if self.n == len(self.length):
            self._grow()
        row, pos = self.tokens[self.n], 1
        row[0] = self.cfg.cls_id
        for p in parts:
            row[pos : pos + len(p)] = p
            pos += len(p)
        row[pos] = self.cfg.sep_id
        self.length[self.n] = pos + 1
        self.segment_b[self.n] = pos + 1 if segment_b is None else segment_b
        self.nsp[self.n] = nsp
        self.n += 1

    def rows(self) -> Rows:
        n = self.n
        return Rows(self.tokens[:n], self.length[:n], self.segment_b[:n], self.nsp[:n])


def sentence_pieces(lengths: np.ndarray, limit: int) -> np.ndarray:
    """(k, 2) [start, end) offsets of a document's sentences in its id array, in order; a sentence
    longer than ``limit`` is cut into ``ceil(len / limit)`` near-equal pieces."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    k = np.maximum(1, -(-lengths // limit))
    which = np.repeat(np.arange(len(lengths)), k)
    j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
    L, K, S = lengths[which], k[which], starts[which]
    return np.stack([S + (L * j) // K, S + (L * (j + 1)) // K], axis=1)


def _truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator):
    """Cut the longer segment first, each cut token from the front or back with probability 1/2."""
    excess = len(a) + len(b) - max_tokens
    if excess <= 0:
        return a, b
    cut = [0, 0]
    longer = 0 if len(a) >= len(b) else 1
    d = min(excess, abs(len(a) - len(b)))
    cut[longer] += d
    excess -= d
    cut[0] += (excess + 1) // 2
    cut[1] += excess // 2
    out = []
    for seg, c in zip((a, b), cut, strict=True):
        front = int(rng.binomial(c, 0.5)) if c else 0
        out.append(seg[front : len(seg) - (c - front)])
    return out[0], out[1]


def nsp_pairs(docs: list[Doc], cfg: InstanceConfig, rng: np.random.Generator) -> Rows:
    """``[CLS] A [SEP] B [SEP]`` rows with NSP labels (0 = B follows A, 1 = B is random)."""
    max_tokens = cfg.seq_len - 3
    pieces = [sentence_pieces(lens, max(1, max_tokens // 2)) for _, lens in docs]
    out = _RowBuffer(cfg, capacity=max(64, sum(len(ids) for ids, _ in docs) // max_tokens + len(docs)))

    def target() -> int:
        if cfg.short_seq_prob > 0 and rng.random() < cfg.short_seq_prob:
            return int(rng.integers(2, max_tokens + 1))
        return max_tokens

    for d, (ids, _) in enumerate(docs):
        P = pieces[d]
        m, chunk_start, acc, goal, i = len(P), 0, 0, target(), 0
        while i < m:
            acc += int(P[i, 1] - P[i, 0])
            if i == m - 1 or acc >= goal:
                n_chunk = i - chunk_start + 1
                a_n = int(rng.integers(1, n_chunk)) if n_chunk >= 2 else 1
                a = ids[P[chunk_start, 0] : P[chunk_start + a_n - 1, 1]]
                if len(docs) > 1 and (n_chunk == 1 or rng.random() < cfg.random_next_prob):
                    label = 1
                    r = int(rng.integers(0, len(docs) - 1))
                    r += r >= d
                    Pr = pieces[r]
                    s = e = int(rng.integers(0, len(Pr)))
                    need = max(1, goal - len(a))
                    while e < len(Pr) - 1 and Pr[e, 1] - Pr[s, 0] < need:
                        e += 1
                    while s > 0 and Pr[e, 1] - Pr[s, 0] < need:  # hit the end: extend backwards
                        s -= 1
                    b = docs[r][0][Pr[s, 0] : Pr[e, 1]]
                    i = chunk_start + a_n - 1  # put the unused sentences back
                elif n_chunk >= 2:
                    label = 0
                    b = ids[P[chunk_start + a_n, 0] : P[i, 1]]
                else:  # a lone piece and no other document: its halves form an IsNext pair
                    label = 0
                    a, b = a[: len(a) // 2], a[len(a) // 2 :]
                if len(a) and len(b):
                    a, b = _truncate_pair(a, b, max_tokens, rng)
                    sep = np.array([cfg.sep_id], dtype=ids.dtype)
                    out.add([a, sep, b], segment_b=len(a) + 2, nsp=label)
                chunk_start, acc, goal = i + 1, 0, target()
            i += 1
    return out.rows()


def mlm_packed(docs: list[Doc], cfg: InstanceConfig) -> Rows:
    """``[CLS] s1 s2 ... [SEP]`` rows of whole sentences across documents; NSP label -1.

    The sentences of a document are contiguous in its ids, so a row is a few slices (one per document it
    holds, [SEP] between them): the loop over sentences only decides where rows end."""
    cap = cfg.seq_len - 2
    out = _RowBuffer(cfg, capacity=max(64, sum(len(ids) for ids, _ in docs) // cap + 8))
    sep = np.array([cfg.sep_id], dtype=np.uint32)
    parts: list[np.ndarray] = []
    used = 0
    for ids, lens in docs:
        boundary = bool(parts)  # a [SEP] goes between this document and the previous one
        first = None  # where this document's slice in the current row starts
        pieces = sentence_pieces(lens, max(8, cap // 4))  # see the module docstring
        for start, end in zip(pieces[:, 0].tolist(), pieces[:, 1].tolist(), strict=True):
            need = end - start + boundary
            if used + need > cap:
                if first is not None:
                    parts.append(ids[first:start])
                out.add(parts, segment_b=None, nsp=-1)
                parts, used, boundary, first = [], 0, False, None
                need = end - start
            if boundary:
                parts.append(sep)
                boundary = False
            if first is None:
                first = start
            used += need
        if first is not None:
            parts.append(ids[first : int(pieces[-1, 1])])
    if parts:
        out.add(parts, segment_b=None, nsp=-1)
    return out.rows()


def clm_stream(docs: list[np.ndarray], eos_id: int, dtype: str) -> np.ndarray:
    """Documents' ids -> one stream: doc1 [EOS] doc2 [EOS] ... (every document ends with [EOS])."""
    eos = np.array([eos_id], dtype=dtype)
    parts = [p for ids in docs for p in (ids.astype(dtype, copy=False), eos)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


class TokenPacker:
    """Cuts a token stream, fed in pieces (chunk by chunk, in order), into rows of exactly ``seq_len``
    tokens; the tokens after the last full row wait for the next piece. The result does not depend on
    how the stream was cut into pieces."""

    def __init__(self, seq_len: int, dtype: str):
        self.seq_len = seq_len
        self._carry = np.zeros(0, dtype=dtype)

    @property
    def pending(self) -> int:
        """Tokens waiting for a row (after the last piece: the ones that are dropped)."""
        return len(self._carry)

    def add(self, stream: np.ndarray) -> np.ndarray:
        """(n,) ids -> (rows, seq_len) full rows."""
        joined = np.concatenate([self._carry, stream.astype(self._carry.dtype, copy=False)])
        rows = len(joined) // self.seq_len
        self._carry = joined[rows * self.seq_len :].copy()
        return joined[: rows * self.seq_len].reshape(rows, self.seq_len)


def build_rows(docs: list[Doc], cfg: InstanceConfig, rng: np.random.Generator) -> Rows:
    if cfg.objective == "nsp_pairs":
        return nsp_pairs(docs, cfg, rng)
    if cfg.objective == "mlm_packed":
        return mlm_packed(docs, cfg)
    raise ValueError(f"unknown objective {cfg.objective!r}")
