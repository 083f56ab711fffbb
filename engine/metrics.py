"""Step metrics: accumulated on the device, flushed every `log_every` steps to JSONL, TensorBoard and a
progress bar, on rank 0 only."""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from engine.schedule import MicroOut

log = logging.getLogger(__name__)


class StepAccumulator:
    """Sums of device tensors over the micro-steps of a log interval; one host sync per flush."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self.micro_steps = 0
        self.skipped = 0

    def _add(self, name: str, value: torch.Tensor | float) -> None:
        v = value.detach().float() if isinstance(value, torch.Tensor) else value
        self._sums[name] = self._sums[name] + v
        self._counts[name] += 1

    def add(self, mo: MicroOut) -> None:
        self.micro_steps += 1
        if not mo.finite:
            self.skipped += 1
            return
        out = mo.out
        for key in ("loss", "mlm_loss", "nsp_loss"):
            if key in out:
                self._add(key, out[key])
        self._add("mlm_correct", out["mlm_correct"])
        self._add("mlm_count", out["mlm_count"])
        if mo.kept_mean is not None:
            self._add("kept_score", mo.kept_mean)
            self._add("dropped_score", mo.dropped_mean)
        if mo.fidelity is not None:
            self._add("spearman", mo.fidelity[0])
            self._add("topk_overlap", mo.fidelity[1])

    def flush(self) -> dict[str, float]:
        """Means over the interval (accuracy as a ratio of sums)."""
        names = list(self._sums)
        values = [self._sums[n] for n in names]
        tensors = [v if isinstance(v, torch.Tensor) else torch.tensor(v) for v in values]
        host = torch.stack([t.cpu() for t in tensors]).tolist() if tensors else []
        sums = dict(zip(names, host))
        out = {n: sums[n] / self._counts[n] for n in names if n not in ("mlm_correct", "mlm_count")}
        if sums.get("mlm_count"):
            out["mlm_acc"] = sums["mlm_correct"] / sums["mlm_count"]
        out["skipped_nonfinite"] = self.skipped
        self.reset()
        return out


class MetricLogger:
    """JSONL (metrics.jsonl), TensorBoard (tb/) and a tqdm bar; every method is a no-op off rank 0."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool, progress: bool | None,
                 total_steps: int, initial_step: int):
        self.enabled = enabled
        self._tb = self._bar = self._file = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but keep training without it
                log.warning("tensorboard is not installed; logging to metrics.jsonl only")
        if progress if progress is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        if self._tb is not None:
            kind = record.get("event", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
