"""Validation: the model's own metrics (engine/models/base.py ``metrics()``) on held-out rows of one or
more datasets, deterministic across calls, summed over ranks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.batch import Batch, to_device
from data_pipeline.loader import eval_batches
from data_pipeline.reader import ShardDataset
from engine.models.base import Exp, Metric, Ratio, exp_metric
from engine.scoring import eval_mode


def evaluate(engine: Any, batches: Iterable[Batch], device: torch.device, metrics: dict[str, Metric]) -> dict[str, float]:
    """``val_<name>`` for every ratio metric (token means, accuracies) and every ``Exp`` of one (perplexity),
    and ``val_tokens``, from sums over this rank's batches all-reduced over ranks.

    Every rank must get the same number of batches (ZeRO-3 gathers parameters collectively in each
    forward); the caller sizes the validation set to a multiple of world x batch size.
    """
    ratios = {name: m for name, m in metrics.items() if isinstance(m, Ratio)}
    keys = sorted({k for m in ratios.values() for k in (m.num, m.den)} | {"loss_tokens"})
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
    with torch.no_grad(), eval_mode([engine.module]):
        for batch in batches:
            out = engine(**to_device(batch, device, non_blocking=True))
            sums += torch.stack([out[k].double() for k in keys])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    total = dict(zip(keys, sums.tolist()))
    result = {f"val_{name}": total[m.num] / max(total[m.den], 1.0) for name, m in ratios.items()}
    result |= {f"val_{name}": exp_metric(result[f"val_{m.of}"]) for name, m in metrics.items()
               if isinstance(m, Exp) and f"val_{m.of}" in result}
    result["val_tokens"] = int(total["loss_tokens"])
    return result


@dataclass(frozen=True, slots=True)
class EvalSet:
    dataset: ShardDataset
    num_samples: int
    prefix: str
    """Prepended to every key of its results ("" for the main validation split)."""


class Evaluator:
    """Evaluates the main validation split and any extra datasets (``data.extra_eval``) in one call."""

    def __init__(self, engine: Any, metrics: dict[str, Metric], sets: list[EvalSet], *, device: torch.device,
                 seed: int, rank: int, world_size: int, batch_size: int, mask_prob: float):
        self.engine, self.metrics, self.sets, self.device = engine, metrics, sets, device
        self.seed, self.rank, self.world, self.batch_size, self.mask_prob = seed, rank, world_size, batch_size, mask_prob

    def __call__(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.sets:
            batches = eval_batches(s.dataset, seed=self.seed, rank=self.rank, world_size=self.world,
                                   batch_size=self.batch_size, num_samples=s.num_samples, mask_prob=self.mask_prob)
            out |= {s.prefix + k: v for k, v in evaluate(self.engine, batches, self.device, self.metrics).items()}
        return out


def eval_size(rows: int, requested: int, world_size: int, batch_size: int) -> int:
    """Rows to evaluate: ``requested`` (0 = all) capped at ``rows``, rounded down to equal full batches on
    every rank; 0 when there are fewer rows than one batch per rank."""
    n = min(requested, rows) if requested else rows
    return n - n % (world_size * batch_size)
