"""BERT masking, vectorized: choose ~15% of the non-special tokens of each row, then 80/10/10.

Randomness is explicit and per sample: row i draws from its own ``torch.Generator`` seeded with
``row_seeds(seed, epoch, sample_id)``. A sample's mask therefore depends only on (seed, epoch, sample),
not on which rank, step or batch it lands in: a run resumed at another world size sees the same masks,
and 2 ranks x B rows mask exactly as 1 rank x 2B rows. The global RNG (used by dropout) is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

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
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def row_seeds(seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
    """(G,) uint64 seeds, a hash of (seed, epoch, sample_id): independent streams per sample and epoch."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(len(sample_ids), seed, dtype=np.uint64))
        h = _splitmix64(h ^ np.uint64(epoch))
        return _splitmix64(h ^ np.asarray(sample_ids, dtype=np.uint64))


def mask_tokens(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    cfg: MaskingConfig,
    seeds: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask a batch of token rows.

    Args:
        tokens: (G, T) int64 original token ids (padding beyond ``lengths``).
        lengths: (G,) number of real tokens per row.
        seeds: (G,) per-row seeds, normally ``row_seeds(seed, epoch, sample_ids)``.
    Returns:
        input_ids (G, T), mlm_positions (G, P), mlm_labels (G, P) as described in ``batch.py``.
        Row i gets k_i = round(mask_prob * n_i) predictions (at least 1 when n_i > 0), where n_i is
        its number of non-special real tokens; the positions are sorted ascending.
    """
    G, T = tokens.shape
    P = max_predictions(T, cfg.mask_prob)
    # One generator call per row: T keys to choose positions, P for 80/10/10, P for the random ids.
    uniform = torch.empty((G, T + 2 * P))
    gen = torch.Generator()
    for i, s in enumerate(seeds.tolist()):
        gen.manual_seed(s)
        torch.rand(T + 2 * P, generator=gen, out=uniform[i])
    keys, u, v = uniform[:, :T], uniform[:, T : T + P], uniform[:, T + P :]

    cols = torch.arange(T)
    special = torch.isin(tokens, torch.tensor(cfg.special_ids, dtype=tokens.dtype))
    candidate = (cols[None, :] < lengths[:, None]) & ~special
    n_cand = candidate.sum(dim=1)
    k = torch.clamp(torch.round(n_cand.double() * cfg.mask_prob).long(), min=1, max=P)
    k = torch.where(n_cand > 0, torch.minimum(k, n_cand), torch.zeros_like(k))

    # A uniformly random subset of size k_i: the k_i candidates with the smallest keys.
    keys = torch.where(candidate, keys, torch.full_like(keys, 2.0))
    chosen = torch.topk(keys, P, dim=1, largest=False, sorted=True).indices
    valid = torch.arange(P)[None, :] < k[:, None]
    positions = torch.sort(torch.where(valid, chosen, torch.full_like(chosen, T)), dim=1).values
    valid = positions < T  # after sorting, the valid slots come first
    positions = torch.where(valid, positions, torch.zeros_like(positions))

    originals = tokens.gather(1, positions)
    labels = torch.where(valid, originals, torch.full_like(originals, IGNORE_INDEX))

    allowed = torch.ones(cfg.vocab_size, dtype=torch.bool)
    allowed[[i for i in cfg.special_ids if 0 <= i < cfg.vocab_size]] = False
    allowed_ids = allowed.nonzero().squeeze(1)
    random_ids = allowed_ids[(v * len(allowed_ids)).long().clamp_(max=len(allowed_ids) - 1)]
    replaced = torch.where(u < cfg.replace_mask, torch.full_like(originals, cfg.mask_token_id), originals)
    is_random = (u >= cfg.replace_mask) & (u < cfg.replace_mask + cfg.replace_random)
    replaced = torch.where(is_random, random_ids, replaced)
    replaced = torch.where(valid, replaced, originals)  # unused slots write back the original token

    input_ids = tokens.clone()
    input_ids.scatter_(1, positions, replaced)
    return input_ids, positions, labels
