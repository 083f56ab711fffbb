"""``index.json``: the manifest that marks a prepared dataset as complete.

``sift prepare`` writes it last, atomically (temporary file, fsync, rename), after every shard is
closed and checksummed; a directory without it is an unfinished (interrupted or failed) prepare and
the reader refuses it. The schema is documented in ``data_pipeline/README.md``; this module writes it,
parses it and validates everything that can be checked without touching the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.errors import DataError
from sift_common.atomic import atomic_write_text

INDEX_NAME = "index.json"
FORMAT_NAME = "sift-shards"
FORMAT_VERSION = 1
"""Bump on any change a version-1 reader would misread; readers refuse versions newer than theirs."""
OBJECTIVES = ("nsp_pairs", "mlm_packed", "clm")
BERT_SPECIALS = ("pad", "unk", "cls", "sep", "mask")
REQUIRED_SPECIALS = {"nsp_pairs": BERT_SPECIALS, "mlm_packed": BERT_SPECIALS, "clm": ("eos", "pad")}
"""Special token ids ``index.json`` must name, per objective (``clm``: the end-of-text token that joins
documents, and ``pad``, which is the tokenizer's pad token or else the end-of-text token)."""
TOKEN_DTYPES = ("uint16", "uint32")


@dataclass(frozen=True)
class ShardInfo:
    """One shard file as recorded in ``index.json``."""

    file: str
    """File name relative to the dataset directory."""
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DatasetMeta:
    """The dataset-level facts of ``index.json`` that a trainer needs (no shard list)."""

    format_version: int
    seq_len: int
    objective: str
    """``"nsp_pairs"`` ([CLS] A [SEP] B [SEP] with NSP labels), ``"mlm_packed"`` (no NSP) or ``"clm"``
    (documents joined with the end-of-text token, cut into rows of exactly ``seq_len`` tokens)."""
    vocab_size: int
    special_ids: dict[str, int]
    """At least pad, unk, cls, sep, mask (BERT objectives), or eos and pad (``clm``)."""
    tokenizer: str
    """Tokenizer name, or a directory relative to the dataset directory (``"tokenizer"``)."""
    splits: dict[str, int]
    """Split name -> number of rows."""
    token_dtype: str = "uint16"
    rows_per_shard: int = 0
    """Every shard of a split but its last holds exactly this many rows (global row -> shard in O(1))."""
    tokenizer_sha256: str = ""
    tokenizer_source: str = ""
    """What the user passed (hub name, directory) or ``"trained"``: provenance only."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Everything else in index.json (prepare arguments and statistics): informational."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike) -> str:
    """Hash of a directory's regular files: names and contents, in sorted order (tokenizer identity)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*"), key=lambda q: q.relative_to(path).as_posix()):
        if p.is_file():  # sorted by relative path string, as data_pipeline/README.md documents
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def write_index(root: str | os.PathLike, index: dict[str, Any]) -> Path:
    """Write ``index.json`` atomically: readers see either no index or the complete one."""
    final = Path(root) / INDEX_NAME
    atomic_write_text(final, json.dumps(index, indent=2, sort_keys=False) + "\n")
    return final


def _require(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise DataError(f"{where}: {what}")


def _int(raw: dict[str, Any], key: str, where: Path, minimum: int = 0) -> int:
    value = raw.get(key)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        where,
        f"field {key!r} must be an integer >= {minimum}, got {value!r}",
    )
    return value


def read_index(root: str | os.PathLike) -> tuple[DatasetMeta, dict[str, list[ShardInfo]]]:
    """Parse and validate ``root/index.json`` (not the shards: see ``reader.ShardDataset.open``).

    Returns the dataset metadata and, per split, its shard list in order.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a directory")
    path = root / INDEX_NAME
    if not path.is_file():
        shards = sorted(p.name for p in root.glob("*.arrow"))
        building = sorted(p.name for p in root.glob(".tmp-prepare-*"))
        hint = (
            f"it holds {len(shards)} shard file(s) but no index: an interrupted or failed `sift prepare` "
            "(index.json is written last); run prepare again with --overwrite"
            if shards
            else f"it holds {building[0]}, the build directory of an interrupted `sift prepare`; run prepare "
            "again with --overwrite"
            if building
            else "run `sift prepare` to create a dataset there"
        )
        raise DataError(f"{path} is missing: {root} is not a complete prepared dataset; {hint}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot be parsed as JSON ({e})") from None
    _require(isinstance(raw, dict), path, "must hold a JSON object")
    _require(
        raw.get("format") == FORMAT_NAME,
        path,
        f"field 'format' must be {FORMAT_NAME!r}, got {raw.get('format')!r} (not a sift-train dataset?)",
    )
    version = _int(raw, "format_version", path, minimum=1)
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {version} is newer than this reader supports ({FORMAT_VERSION}); "
            "upgrade sift-train, or prepare the data again with this version"
        )
    seq_len = _int(raw, "seq_len", path, minimum=8)
    objective = raw.get("objective")
    _require(
        objective in OBJECTIVES, path, f"field 'objective' must be one of {OBJECTIVES}, got {objective!r}"
    )
    vocab_size = _int(raw, "vocab_size", path, minimum=1)
    token_dtype = raw.get("token_dtype")
    _require(token_dtype in TOKEN_DTYPES, path, f"field 'token_dtype' must be one of {TOKEN_DTYPES}")
    _require(
        token_dtype == "uint32" or vocab_size <= 1 << 16,
        path,
        f"vocab_size {vocab_size} does not fit token_dtype uint16",
    )
    rows_per_shard = _int(raw, "rows_per_shard", path, minimum=1)
    specials = raw.get("special_ids")
    _require(isinstance(specials, dict), path, "field 'special_ids' must be an object")
    missing = [k for k in REQUIRED_SPECIALS[objective] if k not in specials]
    _require(not missing, path, f"special_ids lacks {missing}")
    for k, v in specials.items():
        _require(
            isinstance(v, int) and 0 <= v < vocab_size,
            path,
            f"special id {k}={v!r} outside [0, {vocab_size})",
        )
    tokenizer = raw.get("tokenizer")
    _require(
        isinstance(tokenizer, str) and tokenizer != "", path, "field 'tokenizer' must be a non-empty string"
    )

    splits_raw = raw.get("splits")
    _require(isinstance(splits_raw, dict) and splits_raw, path, "field 'splits' must be a non-empty object")
    splits: dict[str, int] = {}
    shards: dict[str, list[ShardInfo]] = {}
    for name, split in splits_raw.items():
        where = f"split {name!r}"
        _require(isinstance(split, dict), path, f"{where} must be an object")
        rows = _int(split, "rows", path)
        entries = split.get("shards")
        _require(isinstance(entries, list), path, f"{where}: 'shards' must be a list")
        infos = []
        for i, e in enumerate(entries):
            ok = (
                isinstance(e, dict)
                and isinstance(e.get("file"), str)
                and "/" not in e["file"]
                and "\\" not in e["file"]
                and isinstance(e.get("rows"), int)
                and isinstance(e.get("bytes"), int)
                and isinstance(e.get("sha256"), str)
            )
            _require(ok, path, f"{where}: shard entry {i} must have file (a plain name), rows, bytes, sha256")
            infos.append(ShardInfo(e["file"], e["rows"], e["bytes"], e["sha256"]))
        _require(
            sum(s.rows for s in infos) == rows,
            path,
            f"{where}: shard rows sum to {sum(s.rows for s in infos)}, but the split says {rows}",
        )
        for i, s in enumerate(infos):
            full = i < len(infos) - 1
            _require(
                (s.rows == rows_per_shard) if full else (1 <= s.rows <= rows_per_shard),
                path,
                f"{where}: shard {s.file} has {s.rows} rows; every shard but the last must hold "
                f"rows_per_shard={rows_per_shard} (and the last 1..{rows_per_shard})",
            )
        splits[name] = rows
        shards[name] = infos

    known = {
        "format", "format_version", "seq_len", "objective", "vocab_size", "token_dtype", "rows_per_shard",
        "special_ids", "tokenizer", "tokenizer_sha256", "tokenizer_source", "splits",
    }  # fmt: skip
    meta = DatasetMeta(
        format_version=version,
        seq_len=seq_len,
        objective=objective,
        vocab_size=vocab_size,
        special_ids={str(k): int(v) for k, v in specials.items()},
        tokenizer=tokenizer,
        splits=splits,
        token_dtype=token_dtype,
        rows_per_shard=rows_per_shard,
        tokenizer_sha256=str(raw.get("tokenizer_sha256", "")),
        tokenizer_source=str(raw.get("tokenizer_source", "")),
        extra={k: v for k, v in raw.items() if k not in known},
    )
    return meta, shards
