"""Compact hand-over of finished batches from DataLoader workers to the main process.

By default a worker sends CPU tensors through shared memory: one segment per storage, whose file
descriptor the receiver fetches over a socket with an authentication handshake from the worker's
resource-sharer thread. At seq_len 512 that hand-over, not the masking, bounds a 2-worker loader (and it
stalls whenever the workers keep the cores busy). A ``WireBatch`` instead pickles to ~10x fewer bytes
(uint16 ids and positions, bit-packed masks) sent through the ordinary pipe, and unpickles straight
into a plain ``Batch`` of int64 tensors: the engine sees exactly what ``collate`` produced.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from data_pipeline.batch import BATCH_KEYS, Batch


def empty_batch(G: int, T: int, P: int) -> Batch:
    """Uninitialised batch tensors (shapes as in ``batch.py``) that are views of one int64 buffer."""
    shapes = {"input_ids": (G, T), "token_type_ids": (G, T), "attention_mask": (G, T), "mlm_positions": (G, P),
              "mlm_labels": (G, P), "nsp_labels": (G,), "sample_ids": (G,)}  # fmt: skip
    buf = torch.empty(3 * G * T + 2 * G * P + 2 * G, dtype=torch.int64)
    out, offset = {}, 0
    for key in BATCH_KEYS:
        n = math.prod(shapes[key])
        out[key] = buf[offset : offset + n].view(shapes[key])
        offset += n
    return out


def _narrow(a: np.ndarray, small: type, limit: int) -> np.ndarray:
    """``a`` as the smaller dtype when every value fits (lossless), else unchanged."""
    if a.size == 0:
        return a.astype(small)
    low = -limit if np.issubdtype(small, np.signedinteger) else 0
    return a.astype(small) if low <= a.min() and a.max() < limit else a


def pack(batch: Batch) -> dict[str, np.ndarray | tuple[int, int, int]]:
    """The batch as a few small numpy arrays; ``unpack`` restores it exactly."""
    ids = batch["input_ids"].numpy()
    G, T = ids.shape
    P = batch["mlm_positions"].shape[1]
    return {
        "shape": (G, T, P),
        "input_ids": _narrow(ids, np.uint16, 1 << 16),
        "token_type_ids": np.packbits(batch["token_type_ids"].numpy() != 0, axis=1),
        "attention_mask": np.packbits(batch["attention_mask"].numpy() != 0, axis=1),
        "mlm_positions": _narrow(batch["mlm_positions"].numpy(), np.uint16, 1 << 16),
        "mlm_labels": _narrow(batch["mlm_labels"].numpy(), np.int32, 1 << 31),
        "nsp_labels": _narrow(batch["nsp_labels"].numpy(), np.int8, 1 << 7),
        "sample_ids": batch["sample_ids"].numpy().copy(),
    }


def unpack(parts: dict) -> Batch:
    G, T, P = parts["shape"]
    batch = empty_batch(G, T, P)
    for key in BATCH_KEYS:
        value = parts[key]
        if key in ("token_type_ids", "attention_mask"):
            value = np.unpackbits(value, axis=1, count=T)
        batch[key].numpy()[...] = value
    return batch


class WireBatch(dict):
    """A finished batch leaving a worker: pickles as ``pack(self)``, unpickles as a plain ``Batch``."""

    def __reduce__(self):
        return unpack, (pack(self),)
