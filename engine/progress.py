"""Where a run stands: the counters a checkpoint stores and a resume restores."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Progress:
    step: int = 0
    """Optimizer steps taken."""
    draws: int = 0
    """Micro-steps taken (the loader's draw index), skipped non-finite ones included."""
    consumed_samples: int = 0
    """Rows drawn from the sampler over all ranks (the data order resumes from it)."""
    backprop_samples: int = 0
    scored_samples: int = 0
    nonfinite_total: int = 0
    hours: float = 0.0
    """Wall-clock hours of the run up to the last checkpoint (``elapsed_hours()`` is live)."""
    _started: float = field(default_factory=time.time, repr=False)

    def elapsed_hours(self) -> float:
        """Hours of earlier sessions plus this one (counted from when this object was made)."""
        return self.hours + (time.time() - self._started) / 3600.0

    def count(self, *, rows_drawn: int, rows_trained: int, rows_scored: int, finite: bool, stepped: bool,
              world_size: int) -> None:
        """Account for one micro-step on every rank (all ranks draw, train and score alike)."""
        self.draws += 1
        self.consumed_samples += world_size * rows_drawn
        if not finite:
            self.nonfinite_total += 1
            return
        self.backprop_samples += world_size * rows_trained
        self.scored_samples += world_size * rows_scored
        self.step += stepped

    def state_dict(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        state["hours"] = self.elapsed_hours()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if not f.name.startswith("_"):
                setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))


def clock(seconds: float) -> str:
    """h:mm:ss or m:ss."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta(step: int, total: int, first_step: int, elapsed_s: float, budget_s: float = 0.0) -> str:
    """``step/total, m:ss elapsed, about m:ss left`` at this session's pace (steps since ``first_step``),
    the time budget's end when that comes first."""
    text = f"{step}/{total}, {clock(elapsed_s)} elapsed"
    done = step - first_step
    if done <= 0:
        return text
    left = elapsed_s / done * (total - step)
    if budget_s and budget_s - elapsed_s < left:
        return f"{text}, about {clock(max(budget_s - elapsed_s, 0.0))} left (train.time_budget_s)"
    return f"{text}, about {clock(left)} left"
