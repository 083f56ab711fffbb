"""The ``sift prepare`` pipeline: inputs -> chunks of documents -> process pool -> shards -> index.json.

Documents stream from the inputs, are assigned to train/validation by a hash of their text (or id),
grouped into chunks per split, and tokenized + turned into rows by a process pool; the main process
writes shards as results arrive, in chunk order, so the output does not depend on ``--num-proc``.
The dataset is built in a hidden directory inside the output and swapped in at the end, ``index.json``
last; on any failure, what this run built is removed and an old dataset there is left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.index import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, sha256_dir, write_index
from data_pipeline.instances import InstanceConfig, Rows, TokenPacker, build_rows, clm_stream
from data_pipeline.shards import SHARD_SUFFIX, ShardWriter, token_dtype_for
from data_pipeline.sources import Document, ReadStats, SourceOptions, iter_documents, resolve_inputs
from data_pipeline.tokenization import (
    MAX_WORD_CHARS,
    LongWords,
    SentenceSplitter,
    check_tokenizer_fits,
    dataset_special_ids,
    load_tokenizer,
    train_bytelevel_bpe,
    train_wordpiece,
)
from sift_common.atomic import fsync_dir

log = logging.getLogger("sift.prepare")

SPLITS = ("train", "validation")
TOKENIZER_DIR = "tokenizer"
SHARD_TARGET_BYTES = 32 << 20
CHUNK_DOCS, CHUNK_CHARS = 256, 2 << 20
THREADED_MAX_CORES = 4
"""Up to this many cores, the default ``--num-proc`` is one process using the tokenizer's own threads (faster
than processes, and cheaper per token, on 2 cores: benchmarks/prepare_vs_hf.py); above, one process per core."""


# ----------------------------------------------------------------------------------------------------
# Output directory
# ----------------------------------------------------------------------------------------------------


BUILD_PREFIX = ".tmp-prepare-"


def _our_files(out: Path) -> list[Path]:
    return [
        p
        for p in out.iterdir()
        if p.name == INDEX_NAME
        or p.name.endswith(SHARD_SUFFIX)
        or (p.name.startswith(".") and p.name.endswith(".tmp"))
        or ".tmp-" in p.name
        or (p.name == TOKENIZER_DIR and p.is_dir())
    ]


def prepare_output(out: Path, overwrite: bool) -> Path:
    """Check ``out`` before any work and return a new, empty build directory inside it.

    Refuses to replace a dataset (or leftovers of an unfinished prepare) unless ``overwrite``, and an
    output that cannot be written, in one line. Nothing already in ``out`` is touched here: the new
    dataset is built aside and swapped in by ``install`` only once it is complete.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if out.is_dir() and _our_files(out) and not overwrite:
        what = (
            "a dataset (index.json)"
            if (out / INDEX_NAME).exists()
            else "files of an unfinished prepare"
        )
        raise DataError(f"output directory {out} already holds {what}; pass --overwrite to replace it")
    try:  # the real test of writability (permissions, read-only mounts, ACLs): create the build directory
        out.mkdir(parents=True, exist_ok=True)
        build_dir = out / f"{BUILD_PREFIX}{os.getpid()}"
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir()
    except OSError as e:
        raise DataError(f"cannot write to the output directory {out}: {e.strerror or e}") from None
    return build_dir


def install(build_dir: Path, out: Path) -> None:
    """Swap a complete dataset from ``build_dir`` into ``out``: the old index goes first (the old dataset
    stops being complete), then the old shards and tokenizer, then the new files are renamed in (same
    filesystem: no copy) and the new index.json last, so a reader never sees a mix."""
    (out / INDEX_NAME).unlink(missing_ok=True)
    for p in _our_files(out):
        if p != build_dir:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for p in sorted(build_dir.iterdir()):
        if p.name != INDEX_NAME:
            os.replace(p, out / p.name)
    os.replace(build_dir / INDEX_NAME, out / INDEX_NAME)
    fsync_dir(out)
    build_dir.rmdir()


# ----------------------------------------------------------------------------------------------------
# Worker side: a chunk of documents -> rows
# ----------------------------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    split: str
    rows: Rows | None
    """BERT objectives: finished rows."""
    stream: np.ndarray | None
    """``clm``: the chunk's token stream (the main process cuts rows across chunks, ``TokenPacker``)."""
    docs: int
    short_docs: int
    first_short: str | None
    tokens: int


_STATE: dict[str, Any] = {}


def _init_worker(splitter: SentenceSplitter, icfg: InstanceConfig, min_doc_tokens: int, seed: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = splitter.build()
    _STATE.update(tok=tok, marker=splitter.marker(tok), splitter=splitter, icfg=icfg, min_tokens=min_doc_tokens,
                  seed=seed)  # fmt: skip


def _encode(texts: list[str], icfg: InstanceConfig) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per document: (ids, sentence lengths); ``clm`` encodes whole documents (no sentences)."""
    if icfg.objective == "clm":
        encodings = _STATE["tok"].encode_batch_fast(texts, add_special_tokens=False)
        return [(np.array(e.ids, dtype=np.uint32), None) for e in encodings]
    return _STATE["splitter"].encode(_STATE["tok"], texts, _STATE["marker"])


def _process_chunk(split: str, chunk_index: int, texts: list[str], origins: list[str]) -> ChunkResult:
    icfg: InstanceConfig = _STATE["icfg"]
    docs, short, first_short, tokens = [], 0, None, 0
    for (ids, lens), origin in zip(_encode(texts, icfg), origins, strict=True):
        tokens += len(ids)
        if len(ids) < _STATE["min_tokens"]:
            short += 1
            first_short = first_short or origin
        else:
            docs.append((ids, lens))
    if icfg.objective == "clm":
        stream = clm_stream([ids for ids, _ in docs], icfg.eos_id, icfg.token_dtype)
        return ChunkResult(split, None, stream, len(texts), short, first_short, tokens)
    rng = np.random.default_rng([_STATE["seed"], SPLITS.index(split), chunk_index])
    rows = build_rows(docs, icfg, rng)
    return ChunkResult(split, rows, None, len(texts), short, first_short, tokens)


# ----------------------------------------------------------------------------------------------------
# Main side
# ----------------------------------------------------------------------------------------------------


def split_of(doc: Document, val_fraction: float, by: str) -> str:
    """Deterministic train/validation assignment: a 64-bit BLAKE2b hash of the text (or id)."""
    if val_fraction <= 0:
        return "train"
    key = (doc.text if by == "text" else doc.id).encode("utf-8", "surrogatepass")
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return "validation" if h < val_fraction * 2.0**64 else "train"


def _chunks(
    docs: Iterator[Document], val_fraction: float, by: str
) -> Iterator[tuple[str, int, list[str], list[str]]]:
    """Group each split's documents into chunks of <= CHUNK_DOCS documents / ~CHUNK_CHARS characters."""
    buf: dict[str, tuple[list[str], list[str]]] = {s: ([], []) for s in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    count = dict.fromkeys(SPLITS, 0)
    for doc in docs:
        s = split_of(doc, val_fraction, by)
        texts, origins = buf[s]
        texts.append(doc.text)
        origins.append(doc.origin)
        chars[s] += len(doc.text)
        if len(texts) >= CHUNK_DOCS or chars[s] >= CHUNK_CHARS:
            yield s, count[s], texts, origins
            buf[s], chars[s], count[s] = ([], []), 0, count[s] + 1
    for s in SPLITS:
        if buf[s][0]:
            yield s, count[s], *buf[s]


@dataclass
class Summary:
    read: ReadStats = field(default_factory=ReadStats)
    docs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    short_docs: int = 0
    first_short: str | None = None
    tokens: int = 0
    seconds: float = 0.0


class Progress:
    """A log line at most every ``every`` seconds during a long phase (counts so far)."""

    def __init__(self, phase: str, every: float = 30.0):
        self.phase, self.every = phase, every
        self.t0 = self.last = time.perf_counter()

    def tick(self, **counts: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            done = ", ".join(f"{v:,} {k}" for k, v in counts.items())
            log.info("%s: %s so far (%.0f s)", self.phase, done, now - self.t0)


class _TrainingTexts:
    """The texts tokenizer training reads: the inputs' documents (up to ``--max-docs`` and
    ``--tokenizer-train-docs``), streamed anew on every ``iter()`` (the WordPiece trainer reads twice)."""

    def __init__(self, args: argparse.Namespace, resolved, opts: SourceOptions):
        self.args, self.resolved, self.opts = args, resolved, opts
        self.stats = ReadStats(warn=False)

    def __iter__(self) -> Iterator[str]:
        self.stats = stats = ReadStats(warn=False)
        progress, chars = Progress("tokenizer training, reading"), 0
        docs = islice(iter_documents(self.resolved, self.opts, stats), self.args.max_docs)
        for doc in islice(docs, self.args.tokenizer_train_docs):
            chars += len(doc.text)
            progress.tick(documents=stats.documents, characters=chars)
            yield doc.text


def _train_tokenizer(args: argparse.Namespace, resolved, opts: SourceOptions, out_dir: Path):
    clm = args.objective == "clm"
    log.info("training %s tokenizer (vocab %d) on the input", "a byte-level BPE" if clm else "an uncased WordPiece",
             args.vocab_size)
    long_words = LongWords()
    train = train_bytelevel_bpe if clm else train_wordpiece
    texts = _TrainingTexts(args, resolved, opts)
    tok = train(texts, args.vocab_size, out_dir, min_frequency=args.min_frequency, long_words=long_words)
    if texts.stats.documents == 0:
        raise DataError(f"empty input: no documents in {', '.join(loc for _, loc in resolved)}")
    if long_words.count:
        log.warning("left %d word(s) longer than %d characters out of tokenizer training (they encode as %s; "
                    "first: %s)", long_words.count, MAX_WORD_CHARS, "bytes" if clm else "[UNK]",
                    long_words.first)  # fmt: skip
    return tok


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare the dataset described by parsed (and validated) ``args``; returns the written index."""
    t0 = time.perf_counter()
    out = Path(args.out)
    opts = SourceOptions(args.text_field, args.id_field, args.txt_mode, args.hf_config, args.hf_split,
                         max_undecodable=args.max_undecodable)  # fmt: skip
    resolved = resolve_inputs(args.inputs)
    created = [d for d in (out, *out.parents) if not d.exists()]  # removed again if this run fails
    build_dir = prepare_output(out, args.overwrite)
    tok = None
    args.train_tokenizer = not args.tokenizer  # the offline default; recorded as such in index.json
    try:
        if args.tokenizer:  # may live in the old dataset in --out: untouched until install
            tok = load_tokenizer(args.tokenizer)
            check_tokenizer_fits(len(tok), args.tokenizer, args.max_vocab_size)
            dataset_special_ids(tok, args.tokenizer, args.objective)
            tok.save_pretrained(str(build_dir / TOKENIZER_DIR))
        else:
            tok = _train_tokenizer(args, resolved, opts, build_dir / TOKENIZER_DIR)
            check_tokenizer_fits(len(tok), "trained", args.max_vocab_size)
        source = args.tokenizer or "trained"
        specials = dataset_special_ids(tok, source, args.objective)
        index = _write_dataset(args, build_dir, resolved, opts, tok, source, specials, len(tok), t0)
        install(build_dir, out)
        return index
    except BaseException:
        # The old dataset (if any) is as it was; what this run built goes, directories it created included.
        shutil.rmtree(build_dir, ignore_errors=True)
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty
        raise


def _write_dataset(
    args,
    out: Path,
    resolved,
    opts: SourceOptions,
    tok,
    source: str,
    specials: dict[str, int],
    vocab_size: int,
    t0: float,
) -> dict[str, Any]:
    dtype = token_dtype_for(vocab_size)
    rows_per_shard = args.shard_rows or max(1, SHARD_TARGET_BYTES // (args.seq_len * dtype.itemsize))
    icfg = InstanceConfig(
        args.seq_len,
        args.objective,
        specials.get("cls", -1),
        specials.get("sep", -1),
        specials["pad"],
        dtype.name,
        args.short_seq_prob,
        eos_id=specials.get("eos"),
    )
    splitter = SentenceSplitter(tok.backend_tokenizer.to_str(), args.sentence_split, specials.get("sep"))
    writers = {s: ShardWriter(out, s, args.seq_len, dtype, rows_per_shard) for s in SPLITS}
    packers = {s: TokenPacker(args.seq_len, dtype.name) for s in SPLITS}  # clm only
    summary = Summary()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    num_proc = args.num_proc or (1 if cores <= THREADED_MAX_CORES else cores)
    threads = cores if args.num_proc is None and num_proc == 1 else 1  # the tokenizer's own threads
    t_pass = time.perf_counter()
    docs = islice(iter_documents(resolved, opts, summary.read), args.max_docs)
    chunks = _chunks(docs, args.val_fraction, args.split_by)

    progress = Progress("tokenizing and writing shards")

    def consume(result: ChunkResult) -> None:
        if result.stream is not None:
            tokens = packers[result.split].add(result.stream)
            full = np.full(len(tokens), args.seq_len, dtype=np.int64)
            writers[result.split].add(tokens, full, full, np.full(len(tokens), -1, dtype=np.int8))
        else:
            writers[result.split].add(
                result.rows.tokens, result.rows.length, result.rows.segment_b, result.rows.nsp_label
            )
        summary.docs[result.split] += result.docs - result.short_docs
        summary.short_docs += result.short_docs
        summary.first_short = summary.first_short or result.first_short
        summary.tokens += result.tokens
        progress.tick(documents=summary.read.documents, tokens=summary.tokens,
                      rows=sum(w.rows for w in writers.values()))  # fmt: skip

    initargs = (splitter, icfg, args.min_doc_tokens, args.seed)
    if num_proc <= 1 and threads == 1:
        _init_worker(*initargs)
        for chunk in chunks:
            consume(_process_chunk(*chunk))
    elif num_proc <= 1:
        # One process: the tokenizer encodes each chunk on all cores (its Rust threads, without the GIL) in a
        # helper thread, while this thread reads the next chunk and writes the last one's rows.
        _init_worker(*initargs)
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        try:
            with ThreadPoolExecutor(1) as helper:
                ahead: deque[Future] = deque()
                for chunk in chunks:
                    ahead.append(helper.submit(_process_chunk, *chunk))
                    if len(ahead) >= 2:
                        consume(ahead.popleft().result())
                while ahead:
                    consume(ahead.popleft().result())
        finally:  # as it was, for whatever else runs in this process (tests, library callers)
            if before is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers are the parallelism; set before forking
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pending: deque[Future] = deque()
        with ProcessPoolExecutor(
            num_proc, mp_context=ctx, initializer=_init_worker, initargs=initargs
        ) as pool:
            try:
                for chunk in chunks:
                    pending.append(pool.submit(_process_chunk, *chunk))
                    if len(pending) >= 2 * num_proc:  # bounded: memory must not grow with the corpus
                        consume(pending.popleft().result())
                while pending:
                    consume(pending.popleft().result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    total_docs = summary.read.documents
    if total_docs == 0:
        raise DataError(f"empty input: no documents in {', '.join(loc for _, loc in resolved)}")
    if summary.short_docs:
        log.warning(
            "skipped %d of %d documents shorter than --min-doc-tokens=%d word pieces (first: %s)",
            summary.short_docs,
            total_docs,
            args.min_doc_tokens,
            summary.first_short,
        )
    if summary.short_docs == total_docs:
        raise DataError(
            f"no usable documents: all {total_docs} are shorter than --min-doc-tokens={args.min_doc_tokens} "
            f"word pieces (e.g. {summary.first_short}); lower --min-doc-tokens if that is intended"
        )
    if args.train_tokenizer and vocab_size < args.vocab_size / 2:  # the merges ran out of repeated pairs
        raise DataError(
            f"the input is too small for --vocab-size {args.vocab_size}: the tokenizer trained on it has only "
            f"{vocab_size} tokens (no pair of symbols was left that occurs --min-frequency {args.min_frequency} "
            "times); add input, or lower --vocab-size")
    shards = {s: w.close() for s, w in writers.items()}
    if not shards["train"]:
        short = (f"the train split's {packers['train'].pending} tokens do not fill one row of --seq-len "
                 f"{args.seq_len}" if args.objective == "clm" else "every document went to validation?")
        raise DataError(f"no training rows were produced ({short}); lower --val-fraction or add input")
    if args.val_fraction > 0 and not shards["validation"]:
        why = (f"its documents' {packers['validation'].pending} tokens do not fill one row of --seq-len "
               f"{args.seq_len}" if args.objective == "clm" and summary.docs["validation"]
               else f"no document was assigned to it (--val-fraction {args.val_fraction:.4g} on {total_docs} "
                    "documents)")
        raise DataError(
            f"no validation rows: {why}; sift train evaluates on the validation split: add input (about "
            f"{math.ceil(1 / args.val_fraction)} documents or more), raise --val-fraction, or pass --val-fraction 0 "
            "for a train-only dataset (then train with data.eval_split=train)")
    summary.seconds = time.perf_counter() - t0
    pass_seconds = time.perf_counter() - t_pass
    index = _make_index(
        args, out, writers, shards, summary, pass_seconds, num_proc, threads, source, specials, vocab_size
    )
    if args.objective == "clm":  # the stream's end that did not fill a row
        index["prepare"]["stats"]["tail_tokens_dropped"] = {s: packers[s].pending for s in SPLITS}
    write_index(out, index)  # last: this is what makes the directory a dataset (once installed)
    return index


def _make_index(args, out: Path, writers: dict[str, ShardWriter], shards: dict, summary: Summary,
                pass_seconds: float, num_proc: int, threads: int, source: str, specials: dict[str, int],
                vocab_size: int) -> dict[str, Any]:  # fmt: skip
    """The ``index.json`` content (schema: data_pipeline/README.md)."""
    dtype = token_dtype_for(vocab_size)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": "sift-train data_pipeline.prepare",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seq_len": args.seq_len,
        "objective": args.objective,
        "token_dtype": dtype.name,
        "rows_per_shard": writers["train"].rows_per_shard,
        "vocab_size": vocab_size,
        "special_ids": specials,
        "tokenizer": TOKENIZER_DIR,
        "tokenizer_source": source,
        "tokenizer_sha256": sha256_dir(out / TOKENIZER_DIR),
        "splits": {
            s: {"rows": writers[s].rows, "shards": [vars(i) for i in shards[s]]} for s in SPLITS if shards[s]
        },
        "prepare": {
            "inputs": args.inputs,
            "options": {
                k: v for k, v in vars(args).items() if k not in ("inputs", "out", "log_level", "overwrite")
            },
            "stats": {
                "documents": summary.read.documents,
                "documents_per_split": summary.docs,
                "short_documents_skipped": summary.short_docs,
                "undecodable_bytes_replaced": summary.read.replaced_bytes,
                "empty_inputs": summary.read.empty_files,
                "tokens": summary.tokens,
                "real_tokens_per_split": {s: writers[s].real_tokens for s in SPLITS},
                "fill": {
                    s: round(writers[s].real_tokens / max(1, writers[s].rows * args.seq_len), 4)
                    for s in SPLITS
                },
                "seconds": round(summary.seconds, 3),
                "tokenize_seconds": round(pass_seconds, 3),
                "tokens_per_second": round(summary.tokens / max(pass_seconds, 1e-9)),
                "num_proc": num_proc,
                "tokenizer_threads": threads,
            },
        },
    }
