"""BERT masking, vectorized: choose ~15% of the non-special tokens of each row, then 80/10/10.

Randomness is explicit and per sample: row i reads its own SplitMix64 stream (counter-based, so a whole
batch is generated in a few vectorized numpy operations) seeded with ``row_seeds(seed, epoch, sample_id)``. A sample's mask therefore depends only on (seed, epoch, sample),
not on which rank, step or batch it lands in: a run resumed at another world size sees the same masks,
and 2 ranks x B rows mask exactly as 1 rank x 2B rows. The global RNG (used by dropout) is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from data_pipeline.batch import IGNORE_INDEX, max_predictions

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True, slots=True)
class MaskingConfig:
    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    """Token ids never chosen for prediction (and never drawn as random replacements)."""
    mask_prob: float = 0.15
    replace_mask: float = 0.8
    """Of the chosen tokens: this fraction becomes [MASK] ..."""
    replace_random: float = 0.1
    """... this fraction a random non-special token; the rest stay unchanged."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.replace_mask < 0 or self.replace_random < 0 or self.replace_mask + self.replace_random > 1:
            raise ValueError(
                f"replace_mask ({self.replace_mask}) and replace_random ({self.replace_random}) must be >= 0 "
                "and sum to at most 1"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})"
            )


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, in place on a uint64 array (wrapping arithmetic)."""
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix64((np.asarray(x, dtype=np.uint64) + _GOLDEN) & _MASK64)


def row_seeds(seed: int, epoch: int | np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """(G,) uint64 seeds, a hash of (seed, epoch, sample_id): independent streams per sample and epoch.

    ``epoch`` is a scalar or a (G,) array (a draw that straddles an epoch boundary).
    """
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(len(sample_ids), seed, dtype=np.uint64))
        h = _splitmix64(h ^ np.asarray(epoch, dtype=np.uint64))
        return _splitmix64(h ^ np.asarray(sample_ids, dtype=np.uint64))


def row_streams(seeds: np.ndarray, width: int) -> np.ndarray:
    """(G, width) uint64: the first ``width`` outputs of a SplitMix64 generator seeded with each row's seed.

    Counter-based, so all rows are generated at once (no per-row Python loop, no generator objects).
    """
    seeds = np.asarray(seeds, dtype=np.uint64)
    with np.errstate(over="ignore"):
        steps = np.arange(1, width + 1, dtype=np.uint64) * _GOLDEN
        return _mix64(seeds[:, None] + steps[None, :])


@lru_cache(maxsize=8)
def _tables(cfg: MaskingConfig) -> tuple[np.ndarray, torch.Tensor]:
    """(vocab,) bool "is special" lookup and (V',) int64 ids allowed as random replacements."""
    special = np.zeros(cfg.vocab_size, dtype=bool)
    special[[i for i in cfg.special_ids if 0 <= i < cfg.vocab_size]] = True
    return special, torch.from_numpy(np.flatnonzero(~special).astype(np.int64))


def mask_tokens(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    cfg: MaskingConfig,
    seeds: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask a batch of token rows.

    Args:
        tokens: (G, T) int64 original token ids in [0, vocab_size) (padding beyond ``lengths``).
        lengths: (G,) number of real tokens per row.
        seeds: (G,) per-row seeds, normally ``row_seeds(seed, epoch, sample_ids)``.
    Returns:
        input_ids (G, T), mlm_positions (G, P), mlm_labels (G, P) as described in ``batch.py``.
        Row i gets k_i = round(mask_prob * n_i) predictions (at least 1 when n_i > 0), where n_i is
        its number of non-special real tokens; the positions are sorted ascending.
    """
    _G, T = tokens.shape
    P = max_predictions(T, cfg.mask_prob)
    if T > 1 << 16:
        raise ValueError(f"sequence length {T} exceeds the masking limit of 65536")
    special, allowed_ids = _tables(cfg)
    tok = tokens.numpy()
    # Row i's random words: T 32-bit keys (two per word) to choose positions, then P words whose
    # high 24 bits decide 80/10/10 and whose low 32 bits pick the random replacement id.
    half = (T + 1) // 2
    words = row_streams(seeds, half + P)
    keys = words[:, :half].view(np.uint32)[:, :T].astype(np.int64)

    candidate = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]) & ~special[tok]
    n_cand = candidate.sum(axis=1)
    k = np.clip(np.round(n_cand * cfg.mask_prob).astype(np.int64), 1, P)
    k = np.where(n_cand > 0, np.minimum(k, n_cand), 0)

    # A uniformly random subset of size k_i: the k_i candidates with the smallest keys. Each key
    # carries its position in the low 16 bits, so the top-P values alone say where they came from.
    packed = np.where(candidate, (keys << 16) | np.arange(T, dtype=np.int64)[None, :], np.iinfo(np.int64).max)
    smallest = torch.topk(torch.from_numpy(packed), P, dim=1, largest=False, sorted=False).values.numpy()
    smallest.sort(axis=1)  # numpy: ~5x faster than torch for many short rows
    valid = np.arange(P)[None, :] < k[:, None]
    positions = np.where(valid, smallest & 0xFFFF, T)
    positions.sort(axis=1)  # ascending; the valid slots come first
    positions[~valid] = 0

    originals = np.take_along_axis(tok, positions, axis=1)
    labels = np.where(valid, originals, IGNORE_INDEX)

    extra = words[:, half:]
    u = (extra >> np.uint64(40)).astype(np.int64)  # 24-bit uniform integers
    v = (((extra & np.uint64(0xFFFFFFFF)) * np.uint64(len(allowed_ids))) >> np.uint64(32)).astype(np.int64)
    mask_below = round(cfg.replace_mask * (1 << 24))
    random_below = round((cfg.replace_mask + cfg.replace_random) * (1 << 24))
    replaced = np.where(u < mask_below, cfg.mask_token_id, originals)
    replaced = np.where((u >= mask_below) & (u < random_below), allowed_ids.numpy()[v], replaced)

    input_ids = tok.copy()
    rows, slots = np.nonzero(valid)  # only the used slots: unused ones point at position 0 too
    input_ids[rows, positions[rows, slots]] = replaced[rows, slots]
    return torch.from_numpy(input_ids), torch.from_numpy(positions), torch.from_numpy(labels)
