"""SIFT: score a gross micro-batch with an early exit, back-propagate the B rows a policy keeps.

Each selecting micro-step draws G = B / keep rows; ``score`` runs the embeddings, blocks 1..j and the
model's own output head (the early exit of the model adapter) and reduces each row to one score
(``sift.criterion``); ``select`` keeps B rows (``sift.policy``: the top B, B at random as the
control, or a weighted, unbiased draw, ``stratified`` or ``importance``, whose weights the loss
applies; engine/selection.py). ``sift.score_positions`` scores each row on a random subset of its
target positions (fewer logits through the head: the early exit of a large-vocabulary decoder spends
most of its FLOPs there), drawn from a generator keyed on (seed, draw, rank). ``sift.criterion: reducible`` subtracts a
reference model's per-token losses (engine/reference.py) at the same positions. The first ``sift.warmup_steps`` optimizer steps (and
those after ``sift.stop_fraction``) draw only B rows and select nothing. When the scoring runs (before the step, or overlapped with the previous
one) is the schedule's business (engine/schedule.py).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from engine.methods.base import Method, MicroContext, RunContext, TrainShape
from engine.models.base import Batch, ExitPath, SiftModel
from engine.scoring import REFERENCED, exit_scores, per_sequence_mean
from engine.selection import (
    POLICIES,
    Kept,
    Policy,
    kept_dropped_means,
    position_generator,
    selection_active,
    selection_generator,
    spearman,
    topk_overlap,
)

if TYPE_CHECKING:
    from engine.config import DataConfig, RunConfig
    from engine.methods.sift_config import SiftConfig


class Scorer:
    """Early-exit scores of a gross batch, from the live modules or from replicas of them.

    ``replicas=0``: reads the live modules (embeddings, blocks 1..j, output head) directly (the serial
    schedule at ZeRO 0-2). ``replicas=1``: a copy of exactly those modules, refreshed after every
    optimizer step (ZeRO-3, where the live parameters are partitioned: gathered for the copy).
    ``replicas=2``: two copies used in turn (the pipelined schedule at every stage): the refresh after
    an optimizer step writes the copy no scoring is reading, so the step never waits for the scoring of
    the next batch, which still sees exactly the weights of the micro-step it overlaps.
    """

    def __init__(self, model: SiftModel, exit_layer: int, criterion: str, *, device: torch.device,
                 gather: Any | None = None, replicas: int = 0, positions: int = 0):
        self.criterion, self.positions = criterion, positions
        live = model.exit_path(exit_layer)
        self._src = live.parameters()
        self._gather = gather
        with torch.random.fork_rng(devices=[]):  # module init must not shift the run's dropout stream
            copies = [live.replicate(device, self._src[0].dtype) for _ in range(replicas)]
        self.paths: list[ExitPath] = copies or [live]
        self._dst = [p.parameters() for p in self.paths]
        self._current = 0
        self.reads_live_weights = replicas == 0
        """An optimizer step must then wait for a scoring in flight: it overwrites the weights it reads."""
        if replicas:
            self._fill(0)

    def _fill(self, i: int) -> None:
        with torch.no_grad(), self._gather(self._src) if self._gather is not None else nullcontext():
            torch._foreach_copy_(self._dst[i], [s.data.view(d.shape) for s, d in zip(self._src, self._dst[i],
                                                                                         strict=True)])

    def refresh(self) -> None:
        """After an optimizer step: copy the new weights into the next replica (queued on the current
        stream; a scoring launched later on another stream must wait for it) and score from it."""
        if self.reads_live_weights:
            return
        nxt = (self._current + 1) % len(self.paths)
        self._fill(nxt)
        self._current = nxt

    def __call__(self, batch: Batch, generator: torch.Generator | None = None,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
        """(G,) scores; ``generator`` (on the batch's device) draws the scored positions when
        ``positions`` > 0; ``reference``: the reference's per-token losses (criterion reducible)."""
        return exit_scores(self.paths[self._current], batch, self.criterion, positions=self.positions,
                           generator=generator, reference=reference)


def configured_policy(s: SiftConfig) -> Policy:
    """``sift.policy`` with its knobs bound."""
    if s.policy == "stratified":
        return partial(POLICIES["stratified"], quantile=s.threshold_quantile)
    if s.policy == "importance":
        return partial(POLICIES["importance"], temperature=s.temperature, uniform_mix=s.uniform_mix)
    return POLICIES[s.policy]


class Sift(Method):
    name = "sift"
    selects = True

    def __init__(self, cfg: RunConfig):
        self._setup(cfg.sift, TrainShape.of(cfg), cfg.data)

    @classmethod
    def from_settings(cls, settings: SiftConfig, shape: TrainShape) -> Sift:
        """Built from its own settings and the run's shape alone (no ``RunConfig``; so no ``data`` section,
        which only a reference criterion reads)."""
        method = cls.__new__(cls)
        method._setup(settings, shape)
        return method

    def _setup(self, s: SiftConfig, shape: TrainShape, data: DataConfig | None = None) -> None:
        self.cfg, self.data = s, data
        self.B, self.G, self.ga = shape.micro_batch_size, s.gross_batch(shape.micro_batch_size), shape.grad_accum
        self.seed, self.total_steps = shape.seed, shape.total_steps
        self.policy = configured_policy(s)
        self.scorer: Scorer | None = None
        self._run: RunContext | None = None
        self.reference: Any = None
        """criterion reducible: an ``engine.reference`` Reference, opened in ``attach``."""
        self._stats: dict[str, torch.Tensor] = {}
        self._cost: dict[str, float] = {}

    def check(self, model: SiftModel) -> list[str]:
        L = model.num_layers
        if self.cfg.exit_layer > L:
            return [f"sift.exit_layer={self.cfg.exit_layer} but the model has {L} layers (1..{L})"]
        if self.cfg.reference_losses is not None and model.family == "bert":
            return ["sift.reference_losses: BERT draws its masks anew each epoch, so its reference runs online; "
                    "leave sift.reference_losses unset"]
        return []

    def attach(self, run: RunContext) -> None:
        self._run = run
        pipelined = self.cfg.schedule == "pipelined"
        self.scorer = Scorer(run.model, self.cfg.exit_layer, self.cfg.criterion, device=run.device,
                             gather=run.gather if run.zero_stage == 3 else None,
                             replicas=2 if pipelined else int(run.zero_stage == 3),
                             positions=self.cfg.score_positions)
        if self.cfg.criterion in REFERENCED:
            from engine.reference import open_reference

            self.reference = open_reference(self.cfg.reference, self.cfg.reference_losses, data_path=self.data.path,
                                            split=self.data.train_split, device=run.device)

    def active(self, step: int) -> bool:
        return selection_active(step, total_steps=self.total_steps, warmup_steps=self.cfg.warmup_steps,
                                stop_fraction=self.cfg.stop_fraction)

    def rows_for_draw(self, draw: int) -> int:
        return self.G if self.active(draw // self.ga) else self.B

    def reference_losses(self, batch: Batch) -> torch.Tensor:
        """(G, P) the reference's per-token losses on the batch; its cost per scored micro-step goes to the
        statistics (``reference_flops``; ``reference_s``: host seconds, the forward's time on CPU, only its
        launch on CUDA)."""
        t0 = time.perf_counter()
        out = self.reference.token_losses(batch)
        rows = batch["input_ids"].shape[0]
        self._cost = {"reference_s": time.perf_counter() - t0, "reference_flops": self.reference.flops_per_row * rows}
        return out

    def score(self, batch: Batch, draw: int) -> torch.Tensor:
        gen = None
        if self.cfg.score_positions:
            gen = position_generator(self.seed, draw, self._run.rank, batch["input_ids"].device)
        reference = self.reference_losses(batch) if self.reference is not None else None
        return self.scorer(batch, gen, reference)

    @property
    def scoring_reads_live_weights(self) -> bool:
        return self.scorer.reads_live_weights

    def select(self, batch: Batch, scores: torch.Tensor, ctx: MicroContext) -> torch.Tensor | Kept:
        gen = None if self.cfg.policy == "topk" else selection_generator(self.seed, ctx.draw, ctx.rank)
        kept = self.policy(scores, self.B, gen)
        weighted = isinstance(kept, Kept)
        kept_mean, dropped_mean = kept_dropped_means(scores, kept.indices if weighted else kept)
        self._stats = {"kept_score": kept_mean, "dropped_score": dropped_mean, **(kept.stats if weighted else {})}
        every = self.cfg.fidelity_every
        if every and ctx.first_micro and ctx.step % every == 0:
            exact = self._run.exact_losses(batch)
            if self.reference is not None:  # the exact reducible loss: the full model's, over every target
                labels = self.scorer.paths[0].targets(batch)
                exact = exact - per_sequence_mean(self.reference.token_losses(batch), labels >= 0)
            self._stats |= {"spearman": spearman(scores, exact), "topk_overlap": topk_overlap(scores, exact, self.B)}
        return kept

    def after_step(self, ctx: MicroContext) -> None:
        self.scorer.refresh()

    def stats(self) -> dict[str, torch.Tensor | float]:
        out, self._stats, self._cost = {**self._stats, **self._cost}, {}, {}
        return out
