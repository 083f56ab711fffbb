"""Synthetic batches for benchmarks: masked BERT batches (random non-special token ids, realistic lengths),
or causal-LM batches (random ids with an end-of-text token every few hundred tokens, as packed data has).

Rows look like BERT's sentence-pair pretraining data ([CLS] A [SEP] B [SEP], padded to T): most rows
fill the sequence, about 10% are shorter (BERT's ``short_seq_prob``), and masking is the loader's own
(``mask_tokens``). Never all-zero inputs: timings on constant inputs can flatter some kernels.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from data_pipeline.batch import Batch
from data_pipeline.masking import MaskingConfig, mask_tokens, row_seeds

# bert-base-uncased ids; ids below FIRST_WORD are [unused*] slots and specials, never drawn.
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
FIRST_WORD = 999
SHORT_SEQ_PROB = 0.1


def special_ids(vocab_size: int) -> tuple[int, ...]:
    return tuple(i for i in (PAD, UNK, CLS, SEP, MASK) if i < vocab_size)


def make_batch(rows: int, seq_len: int, vocab_size: int, seed: int = 0, first_id: int = 0) -> Batch:
    """One masked batch of ``rows`` sentence pairs; ``first_id`` numbers the rows' sample ids."""
    if vocab_size <= FIRST_WORD + 1:
        raise ValueError(f"vocab_size must exceed {FIRST_WORD + 1} (BERT's special and unused ids)")
    if seq_len < 8:
        raise ValueError(f"seq_len must be at least 8, got {seq_len}")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(FIRST_WORD, vocab_size, (rows, seq_len), generator=g)
    lengths = torch.full((rows,), seq_len)
    short = torch.rand(rows, generator=g) < SHORT_SEQ_PROB
    lengths[short] = torch.randint(8, seq_len + 1, (int(short.sum()),), generator=g)
    # Segment A ends at a random point between a quarter and three quarters of the row.
    cut = (lengths * (0.25 + 0.5 * torch.rand(rows, generator=g))).long().clamp(min=2)
    idx = torch.arange(rows)
    tokens[:, 0] = CLS
    tokens[idx, cut - 1] = SEP
    tokens[idx, lengths - 1] = SEP
    cols = torch.arange(seq_len)[None, :]
    real = cols < lengths[:, None]
    tokens = torch.where(real, tokens, torch.full_like(tokens, PAD))
    mcfg = MaskingConfig(mask_token_id=MASK, vocab_size=vocab_size, special_ids=special_ids(vocab_size))
    sample_ids = torch.arange(first_id, first_id + rows)
    ids, pos, labels = mask_tokens(tokens, lengths, mcfg, row_seeds(seed, 0, sample_ids.numpy()))
    return {
        "input_ids": ids,
        "token_type_ids": ((cols >= cut[:, None]) & real).long(),
        "attention_mask": real.long(),
        "mlm_positions": pos,
        "mlm_labels": labels,
        "nsp_labels": torch.randint(0, 2, (rows,), generator=g),
        "sample_ids": sample_ids,
    }


def make_clm_batch(rows: int, seq_len: int, vocab_size: int, seed: int = 0, first_id: int = 0) -> Batch:
    """One packed causal-LM batch (data_pipeline/batch.py): random ids, id ``PAD`` (0, the end-of-text
    token here) at about one position in 500, next-token labels from the loader's own collator."""
    from data_pipeline.loader import collate_clm

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab_size, (rows, seq_len), generator=g)
    tokens[torch.rand(rows, seq_len, generator=g) < 1 / 500] = PAD
    return collate_clm({"tokens": tokens.numpy()}, np.arange(first_id, first_id + rows))


def batch_pool(rows: int, seq_len: int, vocab_size: int, *, size: int = 8, seed: int = 0,
               pin: bool = False, objective: str = "nsp_pairs") -> list[Batch]:
    """``size`` distinct batches, generated once so that masking on the host is not what gets timed;
    ``objective`` clm: causal-LM batches."""
    make = make_clm_batch if objective == "clm" else make_batch
    pool = [make(rows, seq_len, vocab_size, seed=seed + i, first_id=i * rows) for i in range(size)]
    if pin:  # pinned host memory: the copy stream's non_blocking copies are truly asynchronous
        pool = [{k: v.pin_memory() for k, v in b.items()} for b in pool]
    return pool


def cycle(pool: list[Batch]) -> Iterator[Batch]:
    """An endless loader over the pool (the host tensors are never written, so reuse is safe)."""
    return itertools.cycle(pool)


def real_token_fraction(pool: list[Batch]) -> float:
    """Share of non-padding tokens: throughputs count all T positions, this says how many are text."""
    return float(np.mean([b["attention_mask"].float().mean().item() for b in pool]))
