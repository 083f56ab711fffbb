"""Validation: MLM loss and accuracy of the full model, NSP accuracy; deterministic across calls."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.batch import Batch, to_device
from engine.scoring import eval_mode


def evaluate(engine: Any, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
    """Sums over this rank's validation batches, all-reduced over ranks.

    Every rank must get the same number of batches (ZeRO-3 gathers parameters collectively in each
    forward); the caller sizes the validation set to a multiple of world x batch size.
    """
    # mlm loss sum, mlm correct, mlm count, nsp correct, nsp count
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    with torch.no_grad(), eval_mode([engine.module]):
        for batch in batches:
            out = engine(**to_device(batch, device, non_blocking=True))
            count = out["mlm_count"].double()
            sums[0] += out["mlm_sum"].double()
            sums[1] += out["mlm_correct"].double()
            sums[2] += count
            if "nsp_correct" in out:
                sums[3] += out["nsp_correct"].double()
                sums[4] += out["nsp_count"].double()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    loss, correct, count, nsp_correct, nsp_count = sums.tolist()
    result = {
        "val_mlm_loss": loss / max(count, 1.0),
        "val_mlm_acc": correct / max(count, 1.0),
        "val_tokens": int(count),
    }
    if nsp_count:
        result["val_nsp_acc"] = nsp_correct / nsp_count
    return result
