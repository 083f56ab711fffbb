"""Batches for the engine: sampler -> (worker) read rows + mask (BERT) or shift labels (``clm``) + collate
-> ``Batch``.

``build_loader`` wires a ``torch.utils.data.DataLoader`` with ``batch_size=None``: its sampler, iterated
in the main process, yields one small ``DrawRequest`` (draw index, row ids, epochs) per draw, and the
dataset turns each request into a complete, collated and masked ``Batch`` inside a worker (sent back
compactly, see ``wire.py``). Workers hold no per-sample state, only the memory-mapped shards.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # (registers its exit hook first: see _kill_workers_at_exit)
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from data_pipeline.batch import BATCH_KEYS, CLM_KEYS, IGNORE_INDEX, Batch
from data_pipeline.errors import DataError
from data_pipeline.masking import MaskingConfig, mask_tokens, row_seeds
from data_pipeline.reader import DatasetMeta, ShardDataset
from data_pipeline.sampler import DrawRequest, DrawSampler
from data_pipeline.wire import WireBatch, empty_batch

log = logging.getLogger(__name__)

EVAL_EPOCH = 0xFFFF_FFFF
"""The epoch evaluation masks are keyed on: fixed, and unlike any training epoch's masks."""


def masking_config(meta: DatasetMeta, mask_prob: float = 0.15) -> MaskingConfig | None:
    """BERT 80/10/10 masking for this dataset (every special token id is excluded from prediction); None
    for ``clm`` data, which is not masked."""
    if meta.objective == "clm":
        return None
    return MaskingConfig(
        mask_token_id=meta.special_ids["mask"],
        vocab_size=meta.vocab_size,
        special_ids=tuple(sorted(set(meta.special_ids.values()))),
        mask_prob=mask_prob,
    )


def collate_clm(rows: dict[str, np.ndarray], sample_ids: np.ndarray) -> Batch:
    """``clm`` rows -> a causal-LM ``Batch``: the tokens as they are, ``labels`` the next token (-100 at
    the last position), no masking and no randomness (see ``batch.py``)."""
    tokens = torch.from_numpy(rows["tokens"])
    G, T = tokens.shape
    batch = empty_batch({key: (G,) if key == "sample_ids" else (G, T) for key in CLM_KEYS})
    batch["input_ids"].copy_(tokens)
    batch["attention_mask"].fill_(1)
    batch["labels"][:, :-1].copy_(tokens[:, 1:])
    batch["labels"][:, -1] = IGNORE_INDEX
    batch["sample_ids"].copy_(torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)))
    return batch


def collate(
    rows: dict[str, np.ndarray],
    sample_ids: np.ndarray,
    epochs: np.ndarray | int,
    cfg: MaskingConfig | None,
    seed: int,
    objective: str,
) -> Batch:
    """Turn rows from ``ShardDataset.rows`` into a ``Batch`` (see ``batch.py`` for keys and shapes):
    masked for the BERT objectives, next-token labels for ``clm`` (``cfg`` None).

    Args:
        rows: tokens (G, T), lengths (G,), segment_b (G,), nsp_label (G,).
        sample_ids: (G,) row ids in the split; epochs: (G,) or scalar, the epoch each row was drawn in.
    """
    if objective == "clm":
        return collate_clm(rows, sample_ids)
    tokens = torch.from_numpy(rows["tokens"])
    lengths = torch.from_numpy(rows["lengths"])
    G, T = tokens.shape
    ids = np.asarray(sample_ids, dtype=np.int64)
    input_ids, positions, labels = mask_tokens(tokens, lengths, cfg, row_seeds(seed, epochs, ids))
    P = positions.shape[1]
    shapes = {"input_ids": (G, T), "token_type_ids": (G, T), "attention_mask": (G, T), "mlm_positions": (G, P),
              "mlm_labels": (G, P), "nsp_labels": (G,), "sample_ids": (G,)}  # fmt: skip
    batch = empty_batch({key: shapes[key] for key in BATCH_KEYS})
    cols = torch.arange(T)
    attention = cols[None, :] < lengths[:, None]
    segment_b = torch.from_numpy(rows["segment_b"])
    batch["input_ids"].copy_(input_ids)
    batch["token_type_ids"].copy_((cols[None, :] >= segment_b[:, None]) & attention)
    batch["attention_mask"].copy_(attention)
    batch["mlm_positions"].copy_(positions)
    batch["mlm_labels"].copy_(labels)
    if objective == "nsp_pairs":
        batch["nsp_labels"].copy_(torch.from_numpy(rows["nsp_label"]))
    else:
        batch["nsp_labels"].fill_(IGNORE_INDEX)
    batch["sample_ids"].copy_(torch.from_numpy(ids))
    return batch


@dataclass(frozen=True)
class WorkerDataError:
    """A ``DataError`` raised in a DataLoader worker, sent back as a value: PyTorch would re-raise it with
    the worker's whole traceback pasted into the message; ``_Batches`` raises it as it was."""

    message: str


class DrawDataset(Dataset):
    """Map-style dataset whose "index" is a ``DrawRequest``; ``__getitem__`` returns a whole Batch."""

    def __init__(self, dataset: ShardDataset, cfg: MaskingConfig | None, seed: int):
        self.dataset, self.cfg, self.seed = dataset, cfg, seed

    def __getitem__(self, request: DrawRequest) -> Batch | WorkerDataError:
        in_worker = get_worker_info() is not None
        try:
            rows = self.dataset.rows(request.sample_ids)
        except DataError as e:
            if in_worker:
                return WorkerDataError(str(e))
            raise
        meta = self.dataset.meta
        batch = collate(rows, request.sample_ids, request.epochs, self.cfg, self.seed, meta.objective)
        # Leaving a worker process: travel compactly through the pipe (see wire.py).
        return WireBatch(batch) if in_worker else batch


class _Batches:
    """A DataLoader whose iterators raise a worker's ``DataError`` as it was."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(iter(self.loader))


class _BatchIterator:
    def __init__(self, inner: Iterator[Batch | WorkerDataError]):
        self.inner = inner
        """The DataLoader's own iterator (benchmarks read its worker processes)."""

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> Batch:
        try:
            batch = next(self.inner)
        except BaseException:
            self.close()  # the traceback keeps this iterator alive: its workers must not outlive the error
            raise
        if isinstance(batch, WorkerDataError):
            self.close()
            raise DataError(batch.message)
        return batch

    def close(self) -> None:
        """Stop the worker processes now (the DataLoader's own shutdown; a no-op without workers)."""
        shutdown = getattr(self.inner, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __len__(self) -> int:  # not used for iteration (the sampler is infinite); keeps DataLoader happy
        return len(self.dataset)


def _as_is(batch: Batch) -> Batch:
    """The DataLoader's collate_fn: the dataset already returns a finished batch."""
    return batch


def _kill_workers_at_exit() -> None:
    """At interpreter exit, SIGKILL the daemonic children still running. multiprocessing's own exit hook
    (registered before this one, so it runs after it) stops them with SIGTERM, which the workers ignore
    (`_worker_init`), and then waits for them forever: a `sift train` that ended on an error while an
    iterator was still referenced would never exit."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


atexit.register(_kill_workers_at_exit)  # after multiprocessing.util's own hook (imported above), so before it


def _worker_init(_: int) -> None:
    # Each worker is one process doing numpy/torch work on small arrays: intra-op threads only contend.
    torch.set_num_threads(1)
    # SLURM, Kubernetes and Ctrl-C signal every process of the job; the training process decides when
    # to stop (it saves first), and its workers end with it. A worker dying now would end it at once.
    for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def build_loader(
    dataset: ShardDataset,
    *,
    seed: int,
    rank: int,
    world_size: int,
    batch_size_for_draw: Callable[[int], int],
    start_draw: int = 0,
    consumed_samples: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    mask_prob: float = 0.15,
    shuffle: bool = True,
    rows: np.ndarray | None = None,
) -> Iterable[Batch]:
    """Infinite iterable of this rank's batches, one per draw: ``start_draw``, ``start_draw + 1``, ...

    Draw d has ``batch_size_for_draw(d)`` rows (a pure function: e.g. B during warm-up, G after). To
    resume, pass the number of draws already taken by every rank as ``start_draw`` and the global
    number of samples consumed so far as ``consumed_samples`` (``sum(world * size(d))`` over past draws,
    which stays valid across a change of world size). Each ``iter()`` restarts at the resume point.
    Masks depend only on (seed, epoch, sample), never on rank, world size or batch composition.
    ``rows``: draw only these row ids of the split (``DrawSampler``).
    """
    if pin_memory and not torch.cuda.is_available():
        log.warning("pin_memory requested but CUDA is not available: not pinning")
        pin_memory = False
    sampler = DrawSampler(
        len(dataset),
        seed=seed,
        rank=rank,
        world_size=world_size,
        size_fn=batch_size_for_draw,
        start_draw=start_draw,
        consumed_samples=consumed_samples,
        shuffle=shuffle,
        rows=rows,
    )
    draws = DrawDataset(dataset, masking_config(dataset.meta, mask_prob), seed)
    return _Batches(DataLoader(
        draws,
        batch_size=None,
        sampler=sampler,
        collate_fn=_as_is,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        # DataLoader draws a base seed for its workers on every iter(): from this generator, not from the
        # global torch RNG (which dropout uses). The batches themselves never depend on it.
        generator=torch.Generator().manual_seed(seed),
    ))


def eval_rows(n: int, rank: int, world_size: int, num_samples: int | None = None) -> np.ndarray:
    """Rows rank ``rank`` evaluates: its contiguous share of ``num_samples`` rows spread evenly over the
    split (all rows if None).

    Evenly spaced rather than the first ``num_samples``: rows follow the input's document order, and an
    input sorted by source would otherwise be evaluated on its first source only. Shares differ in size
    by at most one row, so ranks may yield different numbers of batches.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    total = n if num_samples is None else min(int(num_samples), n)
    share = np.arange(total * rank // world_size, total * (rank + 1) // world_size, dtype=np.int64)
    return share * n // max(total, 1)  # i -> floor(i * n / total): the identity when total == n


def eval_batches(
    dataset: ShardDataset,
    *,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_samples: int | None = None,
    mask_prob: float = 0.15,
) -> Iterator[Batch]:
    """Deterministic, unshuffled, finite: this rank's share of ``num_samples`` evenly spaced rows (see
    ``eval_rows``) in batches of ``batch_size`` (the last may be smaller), with masks keyed on
    (seed, ``EVAL_EPOCH``, sample): the same on every call, at every world size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = masking_config(dataset.meta, mask_prob)
    ids = eval_rows(len(dataset), rank, world_size, num_samples)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        yield collate(dataset.rows(chunk), chunk, EVAL_EPOCH, cfg, seed, dataset.meta.objective)
