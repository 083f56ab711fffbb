"""SIFT: score a gross micro-batch with an early exit, back-propagate the B rows a policy keeps.

Each selecting micro-step draws G = B / keep rows; ``score`` runs the embeddings, blocks 1..j and the
model's own output head (the early exit of the model adapter) and reduces each row to one score
(``sift.criterion``); ``select`` keeps B rows (``sift.policy``: the top B, or B at random as the
control). ``sift.score_positions`` scores each row on a random subset of its target positions (fewer
logits through the head: the early exit of a large-vocabulary decoder spends most of its FLOPs there),
drawn from a generator keyed on (seed, draw, rank). The first ``sift.warmup_steps`` optimizer steps (and
those after ``sift.stop_fraction``) draw only B rows and select nothing. When the scoring runs (before the step, or overlapped with the previous
one) is the schedule's business (engine/schedule.py).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.config import RunConfig
from engine.methods.base import Method, MicroContext, RunContext
from engine.models.base import Batch, ExitPath, SiftModel
from engine.scoring import exit_scores
from engine.selection import (
    POLICIES,
    kept_dropped_means,
    position_generator,
    selection_active,
    selection_generator,
    spearman,
    topk_overlap,
)


class Scorer:
    """Early-exit scores of a gross batch.

    ZeRO 0-2: reads the live modules (embeddings, blocks 1..j, output head) directly. ZeRO-3: their
    parameters are partitioned, so it keeps a replica of exactly those modules, refreshed by gathering
    exactly their parameters after every optimizer step (``refresh``).
    """

    def __init__(self, model: SiftModel, exit_layer: int, criterion: str, *, device: torch.device,
                 gather: Any | None = None, positions: int = 0):
        self.criterion, self.positions = criterion, positions
        live = model.exit_path(exit_layer)
        self._gather = gather
        if gather is None:
            self.path: ExitPath = live
        else:
            self._src = live.parameters()
            self.path = live.replicate(device, self._src[0].dtype)
            self._dst = self.path.parameters()
            self.refresh()

    def refresh(self) -> None:
        if self._gather is None:
            return
        with torch.no_grad(), self._gather(self._src):
            for s, d in zip(self._src, self._dst, strict=True):
                d.copy_(s.data.view(d.shape))

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """(G,) scores; ``generator`` (on the batch's device) draws the scored positions when
        ``positions`` > 0."""
        return exit_scores(self.path, batch, self.criterion, positions=self.positions, generator=generator)


class Sift(Method):
    name = "sift"
    selects = True

    def __init__(self, cfg: RunConfig):
        s, t = cfg.sift, cfg.train
        self.cfg = s
        self.B, self.G, self.ga = t.micro_batch_size, round(t.micro_batch_size / s.keep), t.grad_accum
        self.seed, self.total_steps = t.seed, t.steps
        self.policy = POLICIES[s.policy]
        self.scorer: Scorer | None = None
        self._run: RunContext | None = None
        self._stats: dict[str, torch.Tensor] = {}

    def check(self, model: SiftModel) -> list[str]:
        L = model.num_layers
        if self.cfg.exit_layer > L:
            return [f"sift.exit_layer={self.cfg.exit_layer} but the model has {L} layers (1..{L})"]
        return []

    def attach(self, run: RunContext) -> None:
        self._run = run
        self.scorer = Scorer(run.model, self.cfg.exit_layer, self.cfg.criterion, device=run.device,
                             gather=run.gather if run.zero_stage == 3 else None, positions=self.cfg.score_positions)

    def active(self, step: int) -> bool:
        return selection_active(step, total_steps=self.total_steps, warmup_steps=self.cfg.warmup_steps,
                                stop_fraction=self.cfg.stop_fraction)

    def rows_for_draw(self, draw: int) -> int:
        return self.G if self.active(draw // self.ga) else self.B

    def score(self, batch: Batch, draw: int) -> torch.Tensor:
        gen = None
        if self.cfg.score_positions:
            gen = position_generator(self.seed, draw, self._run.rank, batch["input_ids"].device)
        return self.scorer(batch, gen)

    def select(self, batch: Batch, scores: torch.Tensor, ctx: MicroContext) -> torch.Tensor:
        gen = selection_generator(self.seed, ctx.draw, ctx.rank) if self.cfg.policy == "random" else None
        kept = self.policy(scores, self.B, gen)
        kept_mean, dropped_mean = kept_dropped_means(scores, kept)
        self._stats = {"kept_score": kept_mean, "dropped_score": dropped_mean}
        every = self.cfg.fidelity_every
        if every and ctx.first_micro and ctx.step % every == 0:
            exact = self._run.exact_losses(batch)
            self._stats |= {"spearman": spearman(scores, exact), "topk_overlap": topk_overlap(scores, exact, self.B)}
        return kept

    def after_step(self, ctx: MicroContext) -> None:
        self.scorer.refresh()

    def stats(self) -> dict[str, torch.Tensor]:
        out, self._stats = self._stats, {}
        return out
