"""Input documents, streamed: local text/JSONL/Parquet files, ``save_to_disk`` dirs, hub datasets.

Every input kind becomes an iterator of ``Document`` read lazily (a row group, a line, a paragraph at a
time), so memory does not grow with the corpus. Problems a user can cause raise ``DataError`` naming
the file (and line); undecodable bytes are replaced with U+FFFD and counted, not fatal.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.errors import DataError

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_GLOB_CHARS = set("*?[")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str
    origin: str
    """Where it came from, for messages: ``file:line``, ``file#row`` or ``hub:name#row``."""


@dataclass
class SourceOptions:
    text_field: str = "text"
    id_field: str | None = None
    """Field holding a document id; None: use ``id`` when present, else the origin."""
    txt_mode: str = "paragraphs"
    """``.txt``: ``paragraphs`` (documents separated by blank lines) or ``file`` (one document per file)."""
    hf_config: str | None = None
    hf_split: str = "train"
    max_undecodable: float = 0.01
    """Refuse a text file in which more than this fraction of the characters read were undecodable bytes
    (replaced with U+FFFD): binary data or another encoding, not UTF-8 text. 1 accepts anything."""


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    replaced_bytes: dict[str, int] = field(default_factory=dict)
    """File -> number of undecodable bytes replaced with U+FFFD."""
    empty_files: list[str] = field(default_factory=list)
    warn: bool = True
    """Log per-file problems (off for the tokenizer-training pass, which reads the same files first)."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def _is_save_to_disk_dir(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def resolve_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """Expand globs and directories into ``(kind, location)`` pairs, kind in file | saved | hub.

    Raises ``DataError`` for a missing path, a glob without matches, an unsupported extension, or a
    directory without any supported file.
    """
    if not inputs:
        raise DataError("no input given: pass files, globs, directories or a Hugging Face dataset name")
    resolved: list[tuple[str, str]] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if any(c in spec for c in _GLOB_CHARS):
            matches = sorted(glob.glob(str(path), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file() and _suffix(Path(m)) in FILE_SUFFIXES]
            if not files:
                raise DataError(f"input glob {spec!r} matches no {'/'.join(FILE_SUFFIXES)} file")
            resolved += [("file", str(f)) for f in files]
        elif path.is_dir():
            if _is_save_to_disk_dir(path):
                resolved.append(("saved", str(path)))
                continue
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and _suffix(p) in FILE_SUFFIXES and not p.name.startswith(".")
            )
            if not files:
                raise DataError(f"input directory {path} holds no {'/'.join(FILE_SUFFIXES)} file")
            resolved += [("file", str(f)) for f in files]
        elif path.is_file():
            if _suffix(path) not in FILE_SUFFIXES:
                raise DataError(
                    f"input {path}: unsupported extension {_suffix(path) or '(none)'!r}; "
                    f"supported: {', '.join(FILE_SUFFIXES)} (or a directory / Hugging Face dataset name)"
                )
            resolved.append(("file", str(path)))
        elif (
            _HUB_NAME.match(spec)
            and Path(spec).suffix.lower() not in FILE_SUFFIXES
            and not spec.startswith(".")
        ):
            resolved.append(("hub", spec))
        else:
            raise DataError(f"input {spec!r} does not exist")
    return resolved


class _ReplaceCounter:
    """Counts bytes that the ``sift-count-replace`` codecs handler replaced with U+FFFD.

    One module-level handler (the codecs registry is process-global and never forgets); files are read
    one at a time in the main process, so a single counter reset per file is enough.
    """

    count = 0
    chars = 0
    """Characters decoded from the current file (the denominator of the undecodable share)."""
    name = "sift-count-replace"

    @classmethod
    def handler(cls, err: UnicodeError) -> tuple[str, int]:
        if not isinstance(err, UnicodeDecodeError):
            raise err
        cls.count += err.end - err.start
        return "\ufffd", err.end


codecs.register_error(_ReplaceCounter.name, _ReplaceCounter.handler)


def _open_text(path: Path, counter: type[_ReplaceCounter]):
    if _suffix(path) == ".jsonl.gz":
        return gzip.open(path, "rt", encoding="utf-8", errors=counter.name, newline="")
    return open(path, encoding="utf-8", errors=counter.name, newline="")


def _read_txt(path: Path, opts: SourceOptions, counter: type[_ReplaceCounter]) -> Iterator[Document]:
    if opts.txt_mode == "file":
        with _open_text(path, counter) as f:
            text = f.read()
        counter.chars += len(text)
        if text.strip():
            yield Document(path.stem, text.strip(), str(path))
        return
    # Paragraph mode: stream line by line so a huge file never sits in memory at once.
    lines: list[str] = []
    start_line, number = 1, 0
    with _open_text(path, counter) as f:
        for number, line in enumerate(f, 1):
            counter.chars += len(line)
            if line.strip():
                if not lines:
                    start_line = number
                lines.append(line.rstrip("\r\n"))
            elif lines:
                yield Document(f"{path.name}:{start_line}", "\n".join(lines), f"{path}:{start_line}")
                lines = []
    if lines:
        yield Document(f"{path.name}:{start_line}", "\n".join(lines), f"{path}:{start_line}")


def _record_text(record: object, opts: SourceOptions, where: str) -> tuple[str, str | None]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if opts.text_field not in record:
        fields = ", ".join(sorted(map(str, record))[:20])
        raise DataError(
            f"{where}: missing text field {opts.text_field!r} (fields: {fields}); set --text-field"
        )
    text = record[opts.text_field]
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise DataError(f"{where}: text field {opts.text_field!r} is a {type(text).__name__}, not a string")
    id_field = opts.id_field or ("id" if "id" in record else None)
    if id_field is not None and id_field not in record:
        raise DataError(f"{where}: missing id field {id_field!r}; set --id-field")
    return text, (None if id_field is None else str(record[id_field]))


def _read_jsonl(path: Path, opts: SourceOptions, counter: type[_ReplaceCounter]) -> Iterator[Document]:
    try:
        with _open_text(path, counter) as f:
            for number, line in enumerate(f, 1):
                counter.chars += len(line)
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:  # e.msg may end in "at" ("Unterminated string starting at")
                    msg = e.msg.removesuffix(" at")
                    raise DataError(f"{where}: invalid JSON ({msg} at column {e.colno})") from None
                text, doc_id = _record_text(record, opts, where)
                if "\\ud" in line or "\\uD" in line:  # a JSON escape may encode a lone surrogate
                    text, n = _SURROGATE.subn("\ufffd", text)
                    counter.count += n
                yield Document(doc_id or f"{path.name}:{number}", text, where)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None


def _read_parquet(path: Path, opts: SourceOptions) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot be read as Parquet ({e})") from None
    names = pf.schema_arrow.names
    if opts.text_field not in names:
        raise DataError(
            f"{path}: missing text column {opts.text_field!r} (columns: {', '.join(names)}); set --text-field"
        )
    id_field = opts.id_field or ("id" if "id" in names else None)
    if id_field is not None and id_field not in names:
        raise DataError(
            f"{path}: missing id column {id_field!r} (columns: {', '.join(names)}); set --id-field"
        )
    if not pa.types.is_string(pf.schema_arrow.field(opts.text_field).type) and not pa.types.is_large_string(
        pf.schema_arrow.field(opts.text_field).type
    ):
        raise DataError(
            f"{path}: text column {opts.text_field!r} has type {pf.schema_arrow.field(opts.text_field).type}, not string"
        )
    columns = [opts.text_field] + ([id_field] if id_field and id_field != opts.text_field else [])
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            texts = batch.column(opts.text_field).to_pylist()
            ids = batch.column(id_field).to_pylist() if id_field else [None] * len(texts)
            for text, doc_id in zip(texts, ids, strict=True):
                yield Document(
                    str(doc_id) if doc_id is not None else f"{path.name}#{row}", text or "", f"{path}#{row}"
                )
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot be read as Parquet near row {row} ({e})") from None


def _read_datasets(kind: str, location: str, opts: SourceOptions) -> Iterator[Document]:
    """A ``save_to_disk`` directory (memory-mapped) or a hub dataset (streamed, never fully downloaded)."""
    import datasets

    where = location if kind == "saved" else f"hub:{location}"
    try:
        if kind == "saved":
            ds = datasets.load_from_disk(location)
            if isinstance(ds, datasets.DatasetDict):
                if opts.hf_split not in ds:
                    raise DataError(
                        f"{location}: no split {opts.hf_split!r} (splits: {', '.join(ds)}); set --hf-split"
                    )
                ds = ds[opts.hf_split]
        else:
            ds = datasets.load_dataset(location, opts.hf_config, split=opts.hf_split, streaming=True)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = (
            " (offline: HF_HUB_OFFLINE=1; use local files, a save_to_disk directory, or run where the hub is reachable)"
            if offline or "offline" in str(e).lower() or isinstance(e, ConnectionError)
            else ""
        )
        kind_text = (
            "saved dataset directory" if kind == "saved" else "Hugging Face dataset (and no such local path)"
        )
        raise DataError(
            f"input {location!r}: cannot load {kind_text}: {type(e).__name__}: {e}{hint}"
        ) from None
    for row, record in enumerate(ds):
        text, doc_id = _record_text(record, opts, f"{where}#{row}")
        yield Document(doc_id or f"{location}#{row}", text, f"{where}#{row}")


def iter_documents(
    inputs: list[tuple[str, str]], opts: SourceOptions, stats: ReadStats
) -> Iterator[Document]:
    """Stream every document of the resolved inputs, in order; updates ``stats`` as it goes."""
    for kind, location in inputs:
        stats.files += 1
        before = stats.documents
        if kind == "file":
            path = Path(location)
            counter = _ReplaceCounter
            counter.count = counter.chars = 0
            suffix = _suffix(path)
            if suffix == ".txt":
                docs = _read_txt(path, opts, counter)
            elif suffix == ".parquet":
                docs = _read_parquet(path, opts)
            else:
                docs = _read_jsonl(path, opts, counter)
            try:
                for doc in docs:
                    stats.documents += 1
                    yield doc
            except OSError as e:
                raise DataError(f"{path}: cannot be read ({e})") from None
            if counter.count:
                stats.replaced_bytes[location] = counter.count
                share = counter.count / max(counter.chars, 1)
                if share > opts.max_undecodable:
                    raise DataError(
                        f"{location}: {counter.count} undecodable bytes, {share:.1%} of the {counter.chars} characters "
                        f"read (more than --max-undecodable {opts.max_undecodable:g}): not UTF-8 text (binary data, "
                        "or another encoding such as Latin-1: convert it with iconv); pass --max-undecodable 1 to "
                        "accept it with the bytes replaced by U+FFFD"
                    )
                if stats.warn:
                    log.warning("%s: %d undecodable byte(s) replaced with U+FFFD", location, counter.count)
        else:
            for doc in _read_datasets(kind, location, opts):
                stats.documents += 1
                yield doc
        if stats.documents == before:
            stats.empty_files.append(location)
            if stats.warn:
                log.warning("input %s holds no documents", location)
