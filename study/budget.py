"""Equal compute (``study.budget: flops``): each arm runs as many optimizer steps as vanilla's budget of
counted FLOPs allows, and its LR schedule ends at its own last step.

Per optimizer step (the model adapters' FLOP counts, engine/models/base.py ``FlopCounts``):

    vanilla:   B x train
    selecting: B x train + G x scoring(exit j)  [+ G x reference forward, when it runs online]

with B = micro_batch_size x grad_accum, G = B / keep. An arm's steps = its selection warm-up steps (each at
vanilla's cost) + floor(what is left of vanilla's budget / its cost per step). The reference model's
training is not in the budget (RHO-LOSS amortises it over many runs); the report states it beside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BUDGETS = ("samples", "flops")


@dataclass(frozen=True, slots=True)
class StepFlops:
    """Counted FLOPs of one optimizer step, by part."""

    train: float
    score: float = 0.0
    reference: float = 0.0

    @property
    def total(self) -> float:
        return self.train + self.score + self.reference


def step_flops(cfg: Any, flops: Any, seq_len: int, reference_forward: float = 0.0, objective: str = "mlm") -> StepFlops:
    """One step of the run config ``cfg`` (engine.config.RunConfig) with the model's ``flops`` (FlopCounts
    per row of ``seq_len`` positions) and the reference's forward FLOPs per row (read from a sidecar: not
    counted per step)."""
    t, s = cfg.train, cfg.sift
    accum = t.grad_accum
    train = t.micro_batch_size * accum * flops.train()
    if not cfg.selecting:
        return StepFlops(train)
    gross = cfg.gross_batch_size * accum
    head_fraction = 1.0
    if s.score_positions and objective == "clm":  # decoders score the head at P of T positions
        head_fraction = min(1.0, s.score_positions / seq_len)
    score = gross * flops.scoring(s.exit_layer, head_fraction)
    online = s.criterion == "reducible" and s.reference_losses is None
    return StepFlops(train, score, gross * reference_forward if online else 0.0)


def budget_steps(vanilla_steps: int, vanilla: StepFlops, arm: StepFlops, warmup_steps: int = 0) -> int:
    """The arm's optimizer steps within vanilla's budget of ``vanilla_steps`` x vanilla's FLOPs: its first
    ``warmup_steps`` (no selection yet) cost what vanilla's do; each later one costs ``arm.total``."""
    if vanilla_steps < 1 or arm.total <= 0:
        raise ValueError(f"budget_steps: vanilla_steps={vanilla_steps}, arm cost {arm.total}")
    warm = min(warmup_steps, vanilla_steps)
    left = (vanilla_steps - warm) * vanilla.total
    # a hair of tolerance: equal costs give exactly vanilla_steps despite rounding in the float sums
    return warm + math.floor(left / arm.total + 1e-9)
