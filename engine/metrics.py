"""Step metrics: accumulated on the device, flushed every `log_every` steps to JSONL, TensorBoard and a
progress bar, on rank 0 only."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.models.base import Exp, Mean, Metric, Ratio, exp_metric
from engine.progress import Progress
from engine.schedule import MicroOut
from engine.streams import PhaseTimer
from sift_common.atomic import atomic_write_text

log = logging.getLogger(__name__)


class StepAccumulator:
    """Sums of device tensors over the micro-steps of a log interval, reduced over ranks at ``flush``
    (one all-reduce and one host sync per log interval; every rank must call it).

    Reports ``loss`` (the cross-rank objective), the model's metrics (``metrics``: ratios of summed
    outputs, means, or exp of either) and whatever statistics the methods attached to each micro-step,
    by their names.
    """

    def __init__(self, metrics: dict[str, Metric]) -> None:
        self.means = {name: m.key for name, m in metrics.items() if isinstance(m, Mean)}
        self.ratios = {name: m for name, m in metrics.items() if isinstance(m, Ratio)}
        self.exps = {name: m.of for name, m in metrics.items() if isinstance(m, Exp)}
        # each output once, however many ratios share it (a token count is every token metric's den)
        self.raw_keys = sorted({k for m in self.ratios.values() for k in (m.num, m.den)})
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._raw: dict[str, torch.Tensor | float] = defaultdict(float)
        self.skipped = 0

    def _add(self, sums: dict[str, torch.Tensor | float], name: str, value: torch.Tensor | float) -> None:
        v = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
        sums[name] = sums[name] + v

    def add(self, mo: MicroOut) -> None:
        if not mo.finite:
            self.skipped += 1
            return
        means = {"loss": mo.out["loss"], **{n: mo.out[k] for n, k in self.means.items() if k in mo.out}, **mo.stats}
        for name, value in means.items():
            self._add(self._sums, name, value)
            self._counts[name] += 1
        for key in self.raw_keys:
            if key in mo.out:
                self._add(self._raw, key, mo.out[key])

    def flush(self) -> dict[str, float]:
        """Global values over the interval: ratios of sums, and means over micro-steps and ranks (``loss``
        is the global token-mean objective)."""
        names, raw = sorted(self._sums), sorted(self._raw)
        values = [*(self._sums[n] for n in names), *(self._raw[k] for k in raw), float(self.skipped)]
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values])
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(stacked)
        host = stacked.tolist()
        sums = dict(zip(names, host))
        totals = dict(zip(raw, host[len(names):]))
        out = {n: sums[n] / (self._counts[n] * world) for n in names}
        for name, m in self.ratios.items():
            if totals.get(m.den):
                out[name] = totals[m.num] / totals[m.den]
        out |= {name: exp_metric(out[of]) for name, of in self.exps.items() if of in out}
        out["skipped_nonfinite"] = int(host[-1])
        self.reset()
        return out


class TrainMetrics:
    """The training record of each log interval: the accumulated metrics, throughput over the interval,
    the run's totals and the per-step time of each phase (engine/streams.py PhaseTimer)."""

    def __init__(self, metrics: dict[str, Metric], timer: PhaseTimer, *, world_size: int, seq_len: int):
        self.acc, self.timer, self.world, self.seq_len = StepAccumulator(metrics), timer, world_size, seq_len
        self._start, self._backprop, self._scored, self._steps = time.time(), 0, 0, 0

    def add(self, mo: MicroOut) -> None:
        self.acc.add(mo)
        if mo.finite:
            self._backprop += self.world * mo.rows_trained
            self._scored += self.world * mo.rows_scored
            self._steps += mo.stepped

    def flush(self, *, step: int, lr: float, progress: Progress, selecting: bool) -> dict[str, Any]:
        """The record since the last flush (every rank must call it: it all-reduces)."""
        now = time.time()
        dt = max(now - self._start, 1e-9)
        stats, phases = self.acc.flush(), self.timer.flush()
        record = {
            "step": step, "lr": lr, **stats,
            "backprop_seq_per_s": self._backprop / dt,
            "gross_seq_per_s": self._scored / dt,
            "tokens_per_s": self._backprop * self.seq_len / dt,
            "backprop_samples": progress.backprop_samples, "scored_samples": progress.scored_samples,
            "hours": progress.elapsed_hours(), "selecting": selecting,
            **{f"time_{k}": v / max(self._steps, 1) for k, v in phases.items()},
        }
        self._start, self._backprop, self._scored, self._steps = now, 0, 0, 0
        return record


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

    def progress(self, step: int, postfix: dict[str, float | str]) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: v if isinstance(v, str) else f"{v:.4g}" for k, v in postfix.items()}, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
