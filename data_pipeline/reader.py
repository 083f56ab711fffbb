"""Read a prepared dataset: validate ``index.json`` and the shards, memory-map them, fetch rows.

Opening validates the manifest, every shard file's existence, byte size, schema and row count, naming
the bad file in a ``DataError``. Content is checked too, so that flipped bytes never reach training:
each shard's SHA-256 is verified once per process, the first time a row of it is read (or every shard
at open with ``verify_checksums=True``), and every batch of rows is range-checked (token ids below the
vocabulary, lengths within the row). Rows are then served zero-copy from the page cache: resident memory
does not grow with the corpus (only the pages actually touched are mapped in, and the kernel can drop
them at will).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.index import DatasetMeta, ShardInfo, read_index, sha256_file
from data_pipeline.shards import MappedShard

__all__ = ["DatasetMeta", "ShardDataset"]

log = logging.getLogger(__name__)


class ShardDataset:
    """One split of a prepared dataset; global row ``i`` lives in shard ``i // rows_per_shard``."""

    meta: DatasetMeta

    def __init__(self, root: Path, split: str, meta: DatasetMeta, shards: list[ShardInfo]):
        self.root, self.split, self.meta = root, split, meta
        self._infos = shards
        self._shards: list[MappedShard] | None = None
        self._token_dtype = np.dtype(meta.token_dtype)
        self._len = meta.splits[split]
        self._verified: set[int] = set()
        """Shards whose SHA-256 this process (or the one it was pickled from) has checked."""

    @classmethod
    def open(
        cls, root: str | os.PathLike, split: str = "train", verify_checksums: bool = False
    ) -> ShardDataset:
        """Validate and memory-map split ``split`` of the dataset in ``root``; raises ``DataError``."""
        root = Path(root)
        meta, all_shards = read_index(root)
        if split not in meta.splits:
            raise DataError(f"dataset {root} has no split {split!r} (splits: {', '.join(meta.splits)})")
        infos = all_shards[split]
        for info in infos:
            path = root / info.file
            if not path.is_file():
                raise DataError(f"shard {path} listed in index.json is missing")
            size = path.stat().st_size
            if size != info.bytes:
                raise DataError(
                    f"shard {path} has {size} bytes but index.json records {info.bytes}: truncated or altered"
                )
        ds = cls(root, split, meta, infos)
        if verify_checksums:
            for i in range(len(infos)):
                ds._verify(i)
        ds._open_shards()
        log.debug("opened %s split %s: %d rows in %d shards", root, split, len(ds), len(infos))
        return ds

    def _verify(self, i: int) -> None:
        """Check shard ``i`` against its SHA-256 in index.json, once per process."""
        if i in self._verified:
            return
        info = self._infos[i]
        path = self.root / info.file
        if sha256_file(path) != info.sha256:
            raise DataError(
                f"shard {path} fails its SHA-256 check against index.json: altered or corrupted on disk; "
                "restore it or prepare the data again"
            )
        self._verified.add(i)

    def _check_rows(self, i: int, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray,
                    seg_b: np.ndarray) -> None:
        """Values a model would index with must be in range: name the shard and row when one is not.

        tokens (n, T), lengths (n,), segment_b (n,) of rows ``rows`` (n,) of shard ``i``.
        """
        T, vocab = self.meta.seq_len, self.meta.vocab_size
        bad = (tokens.max(axis=1, initial=0) >= vocab) | (lengths < 1) | (lengths > T) | (seg_b > lengths)
        if not bad.any():
            return
        k = int(np.argmax(bad))
        row, path = int(rows[k]), self.root / self._infos[i].file
        if tokens[k].max() >= vocab:
            what = f"token id {int(tokens[k].max())} at position {int(np.argmax(tokens[k] >= vocab))} is not below " \
                   f"the vocabulary size {vocab} of index.json"
        else:
            what = f"length {int(lengths[k])} / segment_b {int(seg_b[k])} do not fit a row of {T} tokens"
        raise DataError(
            f"shard {path} row {row} (row {i * self.meta.rows_per_shard + row} of split {self.split!r}): {what}; "
            "the shard is corrupt or was prepared with another tokenizer"
        )

    def _open_shards(self) -> None:
        shards = []
        for info in self._infos:
            shard = MappedShard(self.root / info.file, self.meta.seq_len, self._token_dtype)
            if shard.num_rows != info.rows:
                raise DataError(
                    f"shard {shard.path} holds {shard.num_rows} rows but index.json records {info.rows}"
                )
            shards.append(shard)
        self._shards = shards

    # Pickling (spawn-started DataLoader workers) sends only the paths; the child maps the files again.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shards"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __len__(self) -> int:
        return self._len

    def tokenizer_path(self) -> str:
        """What ``AutoTokenizer.from_pretrained`` should load: the absolute tokenizer directory saved
        next to the shards, or the recorded hub name when no such directory exists."""
        local = self.root / self.meta.tokenizer
        return str(local.resolve()) if local.is_dir() else self.meta.tokenizer

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``indices`` (n,) of this split, in that order, copied out of the mapped shards.

        Returns tokens (n, T), lengths (n,), segment_b (n,), nsp_label (n,), all int64.
        """
        if self._shards is None:
            self._open_shards()
        idx = np.asarray(indices, dtype=np.int64)
        n, T = len(idx), self.meta.seq_len
        if n and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"row index out of range for split {self.split!r} with {self._len} rows")
        shard_of, row = np.divmod(idx, self.meta.rows_per_shard)
        tokens = np.empty((n, T), dtype=self._token_dtype)
        lengths = np.empty(n, dtype=np.int64)
        seg_b = np.empty(n, dtype=np.int64)
        nsp = np.empty(n, dtype=np.int64)
        # Group by shard so that each shard is indexed once (one fancy-index per shard touched).
        order = np.argsort(shard_of, kind="stable")
        sorted_shards = shard_of[order]
        cuts = np.flatnonzero(np.diff(sorted_shards)) + 1
        for group in np.split(order, cuts) if n else ():
            i = int(shard_of[group[0]])
            self._verify(i)
            shard = self._shards[i]  # type: ignore[index]
            r = row[group]
            tokens[group] = shard.tokens[r]
            lengths[group] = shard.length[r]
            seg_b[group] = shard.segment_b[r]
            nsp[group] = shard.nsp_label[r]
            self._check_rows(i, r, tokens[group], lengths[group], seg_b[group])
        return {"tokens": tokens.astype(np.int64), "lengths": lengths, "segment_b": seg_b, "nsp_label": nsp}

