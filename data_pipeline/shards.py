"""Shard files: one uncompressed Arrow IPC *file* per shard, one record batch per file.

Columns (all non-nullable, no validity bitmaps; layout byte by byte in ``data_pipeline/README.md``):

=============  ====================================  ==================================================
column         Arrow type                            meaning
=============  ====================================  ==================================================
``tokens``     fixed_size_list<uint16 | uint32>[T]   token ids, padded with [PAD] after ``length``
``length``     uint16 (uint32 if T > 65535)          real tokens in the row (incl. [CLS]/[SEP])
``segment_b``  same as ``length``                    index of segment B's first token; == length if none
``nsp_label``  int8                                  0 = B follows A, 1 = B is random, -1 = no NSP
=============  ====================================  ==================================================

The writer fills a fixed buffer of ``rows_per_shard`` rows per split and writes a shard whenever it is
full, so memory does not grow with the corpus; each file is written under a temporary name, fsynced,
hashed (SHA-256) and then renamed, so a listed shard is always a complete file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.errors import DataError
from data_pipeline.index import FORMAT_VERSION, ShardInfo, sha256_file

SHARD_SUFFIX = ".arrow"


def token_dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (BERT's 30,522 does), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def index_dtype_for(seq_len: int) -> np.dtype:
    return np.dtype(np.uint16) if seq_len <= 0xFFFF else np.dtype(np.uint32)


def shard_schema(seq_len: int, token_dtype: np.dtype) -> pa.Schema:
    tok = pa.from_numpy_dtype(np.dtype(token_dtype))
    idx = pa.from_numpy_dtype(index_dtype_for(seq_len))
    return pa.schema(
        [
            pa.field("tokens", pa.list_(pa.field("item", tok, nullable=False), seq_len), nullable=False),
            pa.field("length", idx, nullable=False),
            pa.field("segment_b", idx, nullable=False),
            pa.field("nsp_label", pa.int8(), nullable=False),
        ],
        metadata={
            b"sift.format_version": str(FORMAT_VERSION).encode(),
            b"sift.seq_len": str(seq_len).encode(),
        },
    )


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}{SHARD_SUFFIX}"


class ShardWriter:
    """Buffers rows of one split and writes ``rows_per_shard``-row shards as they fill.

    ``add`` takes tokens (n, T), length (n,), segment_b (n,), nsp_label (n,); ``close`` writes the final
    partial shard and returns the ``ShardInfo`` list for ``index.json``.
    """

    def __init__(self, root: Path, split: str, seq_len: int, token_dtype: np.dtype, rows_per_shard: int):
        self.root, self.split, self.seq_len, self.rows_per_shard = Path(root), split, seq_len, rows_per_shard
        self.schema = shard_schema(seq_len, token_dtype)
        idx = index_dtype_for(seq_len)
        self._tokens = np.zeros((rows_per_shard, seq_len), dtype=token_dtype)
        self._length = np.zeros(rows_per_shard, dtype=idx)
        self._segment_b = np.zeros(rows_per_shard, dtype=idx)
        self._nsp = np.zeros(rows_per_shard, dtype=np.int8)
        self._fill = 0
        self.shards: list[ShardInfo] = []
        self.rows = 0
        self.real_tokens = 0

    def add(
        self, tokens: np.ndarray, length: np.ndarray, segment_b: np.ndarray, nsp_label: np.ndarray
    ) -> None:
        n, start = len(tokens), 0
        while start < n:
            take = min(n - start, self.rows_per_shard - self._fill)
            sl, dst = slice(start, start + take), slice(self._fill, self._fill + take)
            self._tokens[dst] = tokens[sl]
            self._length[dst] = length[sl]
            self._segment_b[dst] = segment_b[sl]
            self._nsp[dst] = nsp_label[sl]
            self._fill += take
            start += take
            if self._fill == self.rows_per_shard:
                self._flush()
        self.rows += n
        self.real_tokens += int(np.asarray(length, dtype=np.int64).sum())

    def close(self) -> list[ShardInfo]:
        if self._fill:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        n = self._fill
        flat = pa.array(self._tokens[:n].reshape(-1), type=self.schema.field("tokens").type.value_type)
        batch = pa.record_batch(
            [
                pa.FixedSizeListArray.from_arrays(flat, self.seq_len),
                pa.array(self._length[:n]),
                pa.array(self._segment_b[:n]),
                pa.array(self._nsp[:n]),
            ],
            schema=self.schema,
        )
        name = shard_name(self.split, len(self.shards))
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        options = pa.ipc.IpcWriteOptions(compression=None)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, self.schema, options=options) as w:
            w.write_batch(batch)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        info = ShardInfo(file=name, rows=n, bytes=tmp.stat().st_size, sha256=sha256_file(tmp))
        os.replace(tmp, final)
        self.shards.append(info)
        self._fill = 0


class MappedShard:
    """A memory-mapped shard: zero-copy numpy views of its columns (valid while the object lives).

    ``tokens`` is (rows, T) of the stored dtype; ``length``, ``segment_b``, ``nsp_label`` are (rows,).
    """

    def __init__(self, path: Path, seq_len: int, token_dtype: np.dtype):
        self.path = path
        try:
            # Kernel default read-ahead on purpose: datasets usually fit in the page cache, and network
            # filesystems (FSx/Lustre) want large reads. (MADV_RANDOM would map only the pages read: less
            # page cache on a cold, larger-than-memory corpus, but 4 KiB reads and ~15% slower warm.)
            self._mmap = pa.memory_map(str(path), "r")
            reader = pa.ipc.open_file(self._mmap)
            if reader.num_record_batches != 1:
                raise DataError(f"shard {path}: holds {reader.num_record_batches} record batches, expected 1")
            expected = shard_schema(seq_len, token_dtype)
            if not reader.schema.remove_metadata().equals(expected.remove_metadata()):
                raise DataError(
                    f"shard {path}: schema {reader.schema.remove_metadata()} does not match index.json "
                    f"(seq_len={seq_len}, token dtype {np.dtype(token_dtype).name})"
                )
            batch = reader.get_batch(0)
            tokens = batch.column(0)
            self.num_rows = batch.num_rows
            self.tokens = (
                tokens.values.to_numpy(zero_copy_only=True).reshape(self.num_rows, seq_len)
                if self.num_rows
                else np.zeros((0, seq_len), dtype=token_dtype)
            )
            self.length = batch.column(1).to_numpy(zero_copy_only=True)
            self.segment_b = batch.column(2).to_numpy(zero_copy_only=True)
            self.nsp_label = batch.column(3).to_numpy(zero_copy_only=True)
        except DataError:
            raise
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(
                f"shard {path}: cannot be read as an Arrow IPC file ({e}); truncated or altered?"
            ) from None
