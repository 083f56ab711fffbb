"""The batch contract between the data pipeline and the engine.

A (gross) micro-batch is a plain ``dict[str, torch.Tensor]`` with these keys, G rows and sequence
length T. P = ``max_predictions(T, mask_prob)`` is fixed for a run, so every batch has static shapes
(good for CUDA graphs / torch.compile) and the MLM head runs only on the G x P gathered positions.

========================  ==========  =======  ===========================================================
key                       shape       dtype    meaning
========================  ==========  =======  ===========================================================
``input_ids``             (G, T)      int64    token ids after masking ([MASK] / random / kept)
``token_type_ids``        (G, T)      int64    0 for segment A (and padding), 1 for segment B
``attention_mask``        (G, T)      int64    1 on real tokens, 0 on padding
``mlm_positions``         (G, P)      int64    positions of the chosen (masked) tokens; 0 in unused slots
``mlm_labels``            (G, P)      int64    original token id at each chosen position; -100 in unused slots
``nsp_labels``            (G,)        int64    0 = B follows A, 1 = B is random; -100 for packed MLM-only data
``sample_ids``            (G,)        int64    global row index in the split (provenance, tests, debugging)
========================  ==========  =======  ===========================================================

Rows are independent: selecting rows ``idx`` from every tensor (``select_rows``) yields a valid batch.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100

BATCH_KEYS = (
    "input_ids",
    "token_type_ids",
    "attention_mask",
    "mlm_positions",
    "mlm_labels",
    "nsp_labels",
    "sample_ids",
)

Batch = dict[str, torch.Tensor]


def max_predictions(seq_len: int, mask_prob: float) -> int:
    """P: slots per row for masked positions; never binds, since at most round(p * (T - 2)) are chosen."""
    return max(1, math.ceil(mask_prob * seq_len))


def select_rows(batch: Batch, index: torch.Tensor) -> Batch:
    """Rows ``index`` (K,) of every tensor; stays on the batch's device (no host sync)."""
    return {k: v.index_select(0, index) for k, v in batch.items()}


def batch_rows(batch: Batch) -> int:
    return batch["input_ids"].shape[0]


def to_device(batch: Batch, device: torch.device | str, non_blocking: bool = False) -> Batch:
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
