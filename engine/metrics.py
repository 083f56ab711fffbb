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
import torch.distributed as dist

from data_pipeline.atomic import atomic_write_text
from engine.schedule import MicroOut

log = logging.getLogger(__name__)


# Reported as ratios of global sums rather than as means of per-step values.
RATIOS = {"mlm_loss": ("mlm_sum", "mlm_count"), "mlm_acc": ("mlm_correct", "mlm_count")}


class StepAccumulator:
    """Sums of device tensors over the micro-steps of a log interval, reduced over ranks at ``flush``
    (one all-reduce and one host sync per log interval; every rank must call it)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self.skipped = 0

    def _add(self, name: str, value: torch.Tensor | float) -> None:
        v = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
        self._sums[name] = self._sums[name] + v
        self._counts[name] += 1

    def add(self, mo: MicroOut) -> None:
        if not mo.finite:
            self.skipped += 1
            return
        out = mo.out
        for key in ("loss", "nsp_loss", "mlm_sum", "mlm_count", "mlm_correct"):
            if key in out:
                self._add(key, out[key])
        if mo.kept_mean is not None:
            self._add("kept_score", mo.kept_mean)
            self._add("dropped_score", mo.dropped_mean)
        if mo.fidelity is not None:
            self._add("spearman", mo.fidelity[0])
            self._add("topk_overlap", mo.fidelity[1])

    def flush(self) -> dict[str, float]:
        """Global values over the interval: token means and accuracy as ratios of sums; the rest are
        means over micro-steps and ranks (``loss`` is the global token-mean objective)."""
        names = sorted(self._sums)
        device = next((v.device for v in self._sums.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        values = [*(self._sums[n] for n in names), float(self.skipped)]
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values])
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(stacked)
        host = stacked.tolist()
        sums = dict(zip(names, host[:-1]))
        out = {n: sums[n] / (self._counts[n] * world) for n in names
               if n not in ("mlm_sum", "mlm_count", "mlm_correct")}
        for name, (num, den) in RATIOS.items():
            if sums.get(den):
                out[name] = sums[num] / sums[den]
        out["skipped_nonfinite"] = int(host[-1])
        self.reset()
        return out


def drop_replayed(path: Path, initial_step: int) -> int:
    """Remove the records of steps after ``initial_step`` from a JSONL file, atomically.

    A run resumed from its checkpoint at ``initial_step`` replays the steps after it, and writes them
    again; without this, a reader of the file would see those steps twice. A line cut short by a kill
    is dropped too. Returns the number of lines dropped (the file is rewritten only when it is > 0).
    """
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            step = None
        if isinstance(step, int) and step <= initial_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        log.info("%s: dropped %d record(s) after step %d, which this run replays", path, dropped, initial_step)
    return dropped


class MetricLogger:
    """JSONL (metrics.jsonl), TensorBoard (tb/) and a tqdm bar; every method is a no-op off rank 0.

    An existing metrics.jsonl keeps only its records up to ``initial_step`` (the step the run resumes
    from; 0 for a fresh start): the steps after it are replayed and written again.
    """

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool, progress: bool | None,
                 total_steps: int, initial_step: int):
        self.enabled = enabled
        self._tb = self._bar = self._file = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if self.path.is_file():
            drop_replayed(self.path, initial_step)
        self._file = self.path.open("a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events a resumed run replays, as drop_replayed does
                self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=initial_step + 1 if initial_step else None)
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
