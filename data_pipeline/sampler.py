"""Which rows each rank reads at each draw: pure functions of (seed, epoch, consumed samples, rank, world).

The global sample *stream* is the concatenation of per-epoch permutations of ``range(n)``: stream
position ``p`` is row ``perm(seed, p // n)[p % n]`` of epoch ``p // n``. A draw takes the next
``world_size * size`` positions of the stream and rank ``r`` takes the ``r``-th contiguous chunk of
``size``. Hence every row appears exactly once per epoch, ranks are disjoint, nothing is dropped (a draw
may straddle two epochs), and a run resumes exactly, at any world size, from its consumed-samples
counter alone. No global RNG is used; the permutation is a ``numpy.random.Generator`` keyed on
``(seed, epoch)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

_BUCKET_ROWS = 1 << 15
"""Rows per bucket of the two-pass shuffle: small enough that each bucket's shuffle stays in cache."""


class EpochPermutation:
    """A uniformly random permutation of ``range(n)`` for ``(seed, epoch)``, shuffled lazily.

    Rao-Sandelius two-pass shuffle: scatter rows into random buckets (a stable radix partition), then
    Fisher-Yates each bucket. It is exactly uniform, like one big shuffle, but cache-friendly, and the
    buckets are shuffled in order only when a position in them is first asked for: the sampler's first
    draw of a 10 M-row epoch waits for the partition (~0.1 s), not for the whole shuffle. The values do
    not depend on the order of the requests (buckets are always shuffled first to last).
    """

    def __init__(self, seed: int, epoch: int, n: int):
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 0x5EED])))
        dtype = np.int32 if n < 2**31 else np.int64
        buckets = int(min(256, max(1, n // _BUCKET_ROWS)))
        if buckets == 1:
            self.perm = np.arange(n, dtype=dtype)
            self._ends = np.array([n], dtype=np.int64)
        else:
            which = self._rng.integers(0, buckets, n, dtype=np.uint8)
            self.perm = np.argsort(which, kind="stable").astype(dtype, copy=False)
            self._ends = np.cumsum(np.bincount(which, minlength=buckets))
        self._done = 0  # buckets [0, _done) are shuffled

    def take(self, offsets: np.ndarray) -> np.ndarray:
        """Permutation values at ``offsets`` (k,), as int64."""
        if len(offsets):
            need = int(np.searchsorted(self._ends, offsets.max(), side="right")) + 1
            while self._done < min(need, len(self._ends)):
                start = int(self._ends[self._done - 1]) if self._done else 0
                self._rng.shuffle(self.perm[start : int(self._ends[self._done])])
                self._done += 1
        return self.perm[offsets].astype(np.int64)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """(n,) uniformly random permutation of ``range(n)`` for ``(seed, epoch)``; int32 when n < 2**31."""
    perm = EpochPermutation(seed, epoch, n)
    perm.take(np.array([n - 1]) if n else np.array([], dtype=np.int64))  # shuffles every bucket
    return perm.perm


HALF_KEY = 0x4A1F
"""The fixed seed of ``split_half``: the same halves for every run and every reference on a dataset."""


def split_half(n: int, half: int) -> np.ndarray:
    """Ascending row ids of half ``half`` (0 or 1) of ``range(n)``: a fixed uniformly random halving
    (half 0 gets n // 2 rows), so that a model trained on one half can score the other (RHO-LOSS's
    "double irreducible" loss)."""
    if half not in (0, 1):
        raise ValueError(f"half must be 0 or 1, got {half}")
    perm = epoch_permutation(HALF_KEY, 0, n)
    return np.sort(perm[: n // 2] if half == 0 else perm[n // 2 :]).astype(np.int64)


def draw_start(
    consumed_samples: int, start_draw: int, draw: int, world_size: int, size_fn: Callable[[int], int]
) -> int:
    """Stream position where draw ``draw`` begins, for a run resumed at (start_draw, consumed_samples)."""
    if draw < start_draw:
        raise ValueError(f"draw {draw} precedes the resume point start_draw={start_draw}")
    return consumed_samples + world_size * sum(size_fn(d) for d in range(start_draw, draw))


def rank_positions(consumed: int, size: int, rank: int, world_size: int) -> np.ndarray:
    """(size,) stream positions rank ``rank`` reads in a draw that starts at stream position ``consumed``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return consumed + rank * size + np.arange(size, dtype=np.int64)


class _Permutations:
    """Small cache: at most two epochs' permutations (a draw straddles at most a boundary or two)."""

    def __init__(self, seed: int, n: int, shuffle: bool):
        self.seed, self.n, self.shuffle = seed, n, shuffle
        self._cache: dict[int, EpochPermutation] = {}

    def get(self, epoch: int) -> EpochPermutation:
        perm = self._cache.get(epoch)
        if perm is None:
            perm = EpochPermutation(self.seed, epoch, self.n)
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = perm
        return perm

    def samples(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        epochs, offsets = np.divmod(positions, self.n)
        if not self.shuffle:
            return offsets, epochs
        ids = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs).tolist():
            m = epochs == e
            ids[m] = self.get(e).take(offsets[m])
        return ids, epochs


def positions_to_samples(
    seed: int, n: int, positions: np.ndarray, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Row ids (k,) and epochs (k,) at stream positions (k,)."""
    return _Permutations(seed, n, shuffle).samples(np.asarray(positions, dtype=np.int64))


def rank_indices(
    seed: int, consumed: int, size: int, rank: int, world_size: int, n: int, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Row ids (size,) and their epochs (size,) for ``rank`` in the draw starting at stream pos ``consumed``."""
    return positions_to_samples(seed, n, rank_positions(consumed, size, rank, world_size), shuffle)


@dataclass(frozen=True, slots=True)
class DrawRequest:
    """What the loader's worker needs to build one batch: a few small arrays, no per-sample objects."""

    draw: int
    sample_ids: np.ndarray
    """(size,) int64 rows of the split."""
    epochs: np.ndarray
    """(size,) int64 epoch of each row (a draw can straddle an epoch boundary)."""


class DrawSampler:
    """Infinite iterator of ``DrawRequest`` for one rank: draws ``start_draw, start_draw + 1, ...``.

    Iterated in the main process (the DataLoader's sampler); it keeps a running stream offset, so each
    draw costs O(size) plus, once per epoch, one permutation. ``rows`` (ascending ids of the split):
    sample only these, as if they were the whole split (the stream runs over ``range(len(rows))``).
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        size_fn: Callable[[int], int],
        start_draw: int = 0,
        consumed_samples: int = 0,
        shuffle: bool = True,
        rows: np.ndarray | None = None,
    ):
        if rows is not None:
            if len(rows) and not (rows.min() >= 0 and rows.max() < n):
                raise ValueError(f"row subset outside the split's {n} rows")
            n = len(rows)
        if n <= 0:
            raise ValueError("cannot sample from an empty split")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if start_draw < 0 or consumed_samples < 0:
            raise ValueError("start_draw and consumed_samples must be >= 0")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.size_fn, self.start_draw, self.consumed_samples, self.shuffle = (
            size_fn, start_draw, consumed_samples, shuffle,
        )  # fmt: skip
        self.rows = rows

    def __iter__(self) -> Iterator[DrawRequest]:
        perms = _Permutations(self.seed, self.n, self.shuffle)
        pos, draw = self.consumed_samples, self.start_draw
        while True:
            size = int(self.size_fn(draw))
            if size < 1:
                raise ValueError(f"batch_size_for_draw({draw}) returned {size}; it must be >= 1")
            ids, epochs = perms.samples(rank_positions(pos, size, self.rank, self.world_size))
            if self.rows is not None:
                ids = self.rows[ids]
            yield DrawRequest(draw, ids, epochs)
            pos += self.world_size * size
            draw += 1
