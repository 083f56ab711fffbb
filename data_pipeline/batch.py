"""The batch contract between the data pipeline and the engine.

A (gross) micro-batch is a plain ``dict[str, torch.Tensor]`` of G rows and sequence length T. Every
batch has the keys of the first table; each objective adds its own. The engine never reads the
objective's keys itself: the model adapter does (engine/models/), so a new objective is new keys plus
an adapter that reads them.

Every batch:

========================  ==========  =======  ===========================================================
key                       shape       dtype    meaning
========================  ==========  =======  ===========================================================
``input_ids``             (G, T)      int64    token ids (after masking, for BERT)
``attention_mask``        (G, T)      int64    1 on real tokens, 0 on padding
``sample_ids``            (G,)        int64    global row index in the split (provenance, tests, debugging)
========================  ==========  =======  ===========================================================

BERT objectives (``nsp_pairs``, ``mlm_packed``): the loss is taken at P = ``max_predictions(T,
mask_prob)`` fixed slots per row, so every batch has static shapes (good for CUDA graphs /
torch.compile) and the MLM head runs only on the G x P gathered positions:

========================  ==========  =======  ===========================================================
``token_type_ids``        (G, T)      int64    0 for segment A (and padding), 1 for segment B
``mlm_positions``         (G, P)      int64    positions of the chosen (masked) tokens; 0 in unused slots
``mlm_labels``            (G, P)      int64    original token id at each chosen position; -100 in unused slots
``nsp_labels``            (G,)        int64    0 = B follows A, 1 = B is random; -100 for packed MLM-only data
========================  ==========  =======  ===========================================================

The causal-LM objective (``clm``) fills instead (the contract its collator and adapter share):

========================  ==========  =======  ===========================================================
``labels``                (G, T)      int64    the token to predict at each position (the next one); -100
                                               where there is no loss: the loss mask is ``labels >= 0``
========================  ==========  =======  ===========================================================

A ``clm`` row is T tokens of the packed stream with no padding (``attention_mask`` is all ones, kept for
the contract), so ``labels[:, t] = input_ids[:, t + 1]`` and ``labels[:, T - 1] = -100``: T - 1 target
tokens per row. Attention is causal over the whole row and positions run 0..T-1, across document
boundaries (GPT-2's and GPT-3's packing); the end-of-text token between documents is what the model
sees of a boundary.

Rows are independent: selecting rows ``idx`` from every tensor (``select_rows``) yields a valid batch.
A weighted selection (engine/selection.py ``Kept``) adds ``row_weights`` (K,) float32 to the kept rows
(``weighted_rows``); the loader never does, and the model adapters weigh each row's loss terms by it.
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
"""The keys of a BERT batch (``nsp_pairs``, ``mlm_packed``), in the collator's order."""
CLM_KEYS = ("input_ids", "attention_mask", "labels", "sample_ids")
"""The keys of a causal-LM batch (``clm``), in the collator's order."""
ROW_WEIGHTS = "row_weights"
"""The optional key of a kept batch that carries each row's weight in the loss."""

Batch = dict[str, torch.Tensor]


def max_predictions(seq_len: int, mask_prob: float) -> int:
    """P: slots per row for masked positions; never binds, since at most round(p * (T - 2)) are chosen."""
    return max(1, math.ceil(mask_prob * seq_len))


def select_rows(batch: Batch, index: torch.Tensor) -> Batch:
    """Rows ``index`` (K,) of every tensor; stays on the batch's device (no host sync)."""
    return {k: v.index_select(0, index) for k, v in batch.items()}


def weighted_rows(batch: Batch, index: torch.Tensor, weights: torch.Tensor) -> Batch:
    """Rows ``index`` of every tensor, plus their ``row_weights``."""
    return select_rows(batch, index) | {ROW_WEIGHTS: weights}


def batch_rows(batch: Batch) -> int:
    return batch["input_ids"].shape[0]


def to_device(batch: Batch, device: torch.device | str, non_blocking: bool = False) -> Batch:
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
