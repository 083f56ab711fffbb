"""``sift prepare``: text in, pre-tokenized Arrow shards + ``index.json`` out.

    sift prepare corpus/*.jsonl.gz --out data/bert128 --tokenizer bert-base-uncased --seq-len 128
    sift prepare notes.txt --out data/tiny --train-tokenizer --vocab-size 8000 --objective mlm_packed
    sift prepare corpus/ --out data/gpt2-1024 --objective clm --tokenizer gpt2 --seq-len 1024

This module is the command line (options, their validation, error reporting); the pipeline itself is
``build.py``. ``index.json`` is written last and atomically: an interrupted or failed run never leaves a
dataset the reader accepts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent.futures.process import BrokenProcessPool

from data_pipeline import build
from data_pipeline.errors import DataError
from data_pipeline.index import OBJECTIVES
from sift_common.errors import SiftError
from sift_common.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sift prepare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "inputs",
        nargs="+",
        help="files (.txt .jsonl .jsonl.gz .parquet), globs, directories, "
        "a datasets save_to_disk directory, or a Hugging Face dataset name",
    )
    p.add_argument("--out", required=True, help="output dataset directory")
    g = p.add_argument_group("input")
    g.add_argument("--text-field", default="text", help="JSONL/Parquet/datasets field holding the text")
    g.add_argument("--id-field", default=None, help="field holding a document id (default: 'id' if present)")
    g.add_argument(
        "--txt-mode",
        choices=("paragraphs", "file"),
        default="paragraphs",
        help=".txt files: documents separated by blank lines, or one document per file",
    )
    g.add_argument("--hf-config", default=None, help="dataset configuration (hub datasets)")
    g.add_argument("--hf-split", default="train", help="split to read from a hub dataset or DatasetDict")
    g.add_argument("--max-docs", type=int, default=None, help="read only the first N documents (smoke runs)")
    g.add_argument(
        "--max-undecodable",
        type=float,
        default=0.01,
        help="refuse a text file with a larger share of bytes that are not UTF-8 (1 accepts any, replacing "
        "them with U+FFFD)",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", default=None, help="hub name or local directory (e.g. bert-base-uncased)")
    g.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="train a tokenizer on the input (default when --tokenizer is absent): an uncased BERT WordPiece, "
        "or a byte-level BPE for --objective clm",
    )
    g.add_argument("--vocab-size", type=int, default=30522, help="vocabulary size for --train-tokenizer")
    g.add_argument("--min-frequency", type=int, default=2, help="--train-tokenizer: minimum pair frequency")
    g.add_argument(
        "--tokenizer-train-docs",
        type=int,
        default=None,
        help="--train-tokenizer: use only the first N documents (default: all)",
    )
    g.add_argument(
        "--max-vocab-size",
        type=int,
        default=None,
        help="the model's embedding rows: refuse a tokenizer with more tokens",
    )
    g = p.add_argument_group("instances")
    g.add_argument(
        "--seq-len", type=int, default=128, help="tokens per row, [CLS]/[SEP] included (BERT: 128 or 512)"
    )
    g.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="nsp_pairs",
        help="nsp_pairs: [CLS] A [SEP] B [SEP] + next-sentence labels; mlm_packed: packed sentences; clm: "
        "documents joined with the end-of-text token, cut into rows of exactly --seq-len tokens (causal LMs)",
    )
    g.add_argument(
        "--sentence-split",
        choices=("punct", "line"),
        default="punct",
        help="sentence ends: punctuation and blank lines, or every line",
    )
    g.add_argument(
        "--short-seq-prob",
        type=float,
        default=0.0,
        help="probability of a shorter random target length (BERT used 0.1; 0 fills rows)",
    )
    g.add_argument(
        "--min-doc-tokens",
        type=int,
        default=8,
        help="skip (and count) documents with fewer word pieces than this",
    )
    g.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents for validation")
    g.add_argument(
        "--split-by",
        choices=("text", "id"),
        default="text",
        help="hash the document text (duplicates stay together) or its id to pick the split",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for pairing and random-next choices")
    g = p.add_argument_group("output")
    g.add_argument(
        "--shard-rows", type=int, default=None, help="rows per shard (default: about 32 MiB of tokens)"
    )
    g.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: CPU count)")
    g.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    g.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Check every option at once and raise one ``DataError`` listing all problems."""
    problems = []
    if args.tokenizer and args.train_tokenizer:
        problems.append("--tokenizer and --train-tokenizer are exclusive")
    if not 16 <= args.seq_len <= 8192:
        problems.append(f"--seq-len must be in [16, 8192], got {args.seq_len}")
    if not 0.0 <= args.val_fraction < 1.0:
        problems.append(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not 0.0 <= args.short_seq_prob <= 1.0:
        problems.append(f"--short-seq-prob must be in [0, 1], got {args.short_seq_prob}")
    if args.objective == "clm" and args.short_seq_prob > 0:
        problems.append("--short-seq-prob applies to BERT pairs; --objective clm rows are always full")
    if args.min_doc_tokens < 1:
        problems.append(f"--min-doc-tokens must be >= 1, got {args.min_doc_tokens}")
    if args.shard_rows is not None and args.shard_rows < 1:
        problems.append(f"--shard-rows must be >= 1, got {args.shard_rows}")
    if args.num_proc is not None and args.num_proc < 1:
        problems.append(f"--num-proc must be >= 1, got {args.num_proc}")
    if args.max_docs is not None and args.max_docs < 1:
        problems.append(f"--max-docs must be >= 1, got {args.max_docs}")
    if not 0.0 <= args.max_undecodable <= 1.0:
        problems.append(f"--max-undecodable must be in [0, 1], got {args.max_undecodable}")
    if args.max_vocab_size is not None and args.max_vocab_size < 1:
        problems.append(f"--max-vocab-size must be >= 1, got {args.max_vocab_size}")
    if problems:
        raise DataError("invalid options: " + "; ".join(problems))


class PrepareFailed(SiftError):
    """The machine, not the input, stopped the build (disk full, a worker killed)."""

    exit_code = 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(logging.WARNING)
    logging.getLogger("sift").setLevel(args.log_level)
    logging.getLogger("data_pipeline").setLevel(args.log_level)
    validate_args(args)
    try:
        index = build.run(args)
    except OSError as e:  # e.g. the disk filled up while writing shards
        raise PrepareFailed(f"{e.filename or args.out}: {e.strerror or e}; no dataset was written") from e
    except BrokenProcessPool as e:
        raise PrepareFailed(f"a tokenizer worker process died ({e}); out of memory? try a smaller --num-proc; "
                            "no dataset was written") from e
    stats = index["prepare"]["stats"]
    parts = [
        f"{s} {v['rows']} rows ({len(v['shards'])} shards, fill {stats['fill'][s]:.1%})"
        for s, v in index["splits"].items()
    ]
    print(
        f"sift prepare: wrote {args.out}: {'; '.join(parts)}; {stats['tokens']} tokens from "
        f"{stats['documents']} documents in {stats['seconds']:.1f}s (tokenizing: {stats['tokens_per_second']} tokens/s)"
    )
    return 0


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("sift prepare", main, sys.argv[1:]))
