"""Exactly-once, observable: a hash of the rows each log interval drew, comparable between runs.

The loop's batches pass through ``DrawAudit``, which keeps each draw's sample ids; at every log flush
``take`` gathers the ids of the draws consumed since the last one from every rank and hashes them in
the sampler's global stream order (draw by draw, rank 0's chunk first), which does not depend on the
world size. Two runs, or a run and its resumption, drew the same rows in the same order over the same
draws exactly when their records' ``draws`` and ``samples_sha256`` agree.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.batch import Batch


class DrawAudit:
    """The batch iterator, recording each draw's ``sample_ids`` (host tensors, before the device copy)."""

    def __init__(self, batches: Iterator[Batch], start_draw: int, group: Any = None):
        self._batches, self._group = batches, group
        self._ids: deque[np.ndarray] = deque()
        self._first = start_draw  # the draw of self._ids[0]

    def __iter__(self) -> DrawAudit:
        return self

    def __next__(self) -> Batch:
        batch = next(self._batches)
        self._ids.append(batch["sample_ids"].numpy().astype(np.int64, copy=True))
        return batch

    def take(self, upto_draw: int) -> dict[str, Any]:
        """``draws`` [first, upto_draw) and the SHA-256 (16 hex digits) of their rows over all ranks.
        Every rank must call it (one all-gather of the interval's ids)."""
        parts = [self._ids.popleft() for _ in range(upto_draw - self._first)]
        span, self._first = [self._first, upto_draw], upto_draw
        local = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        ranks = [local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(ranks, local, group=self._group)
        return {"draws": span, "samples_sha256": stream_digest([r.numpy() for r in ranks], [len(p) for p in parts])}


def stream_digest(ranks: list[np.ndarray], sizes: list[int]) -> str:
    """SHA-256 (16 hex digits) of the rows of consecutive draws of ``sizes`` rows per rank, ``ranks[r]``
    holding rank r's rows of them all, taken in the global stream order: draw by draw, rank by rank."""
    h, start = hashlib.sha256(), 0
    for size in sizes:
        for ids in ranks:
            h.update(ids[start:start + size].astype("<i8").tobytes())
        start += size
    return h.hexdigest()[:16]
