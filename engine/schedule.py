"""One micro-step of SIFT training: score -> select -> forward/backward -> step, serial or pipelined.

Serial (the paper, the reference): micro-step k scores gross batch k with the current weights, keeps B
rows and trains on them.

Pipelined: micro-step k trains on batch k's kept rows while batch k+1 is scored on a low-priority side
CUDA stream; the optimizer step waits for that scoring to finish. Batch k+1 is therefore scored with
the weights of micro-step k: when an optimizer step falls between k and k+1 (always, without gradient
accumulation) its scores are one optimizer step stale. On CPU the same code runs sequentially, in the
same order, with the same semantics.

Both schedules skip a micro-batch whose loss is non-finite on any rank (no backward, no step).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.batch import Batch, batch_rows, select_rows
from engine.models.bert import ExitPath, SiftBert
from engine.scoring import eval_mode, exit_scores
from engine.selection import SELECTORS, kept_dropped_means, selection_generator, spearman, topk_overlap
from engine.streams import DevicePrefetcher, PhaseTimer, Streams

Gather = Callable[[list[torch.nn.Parameter]], AbstractContextManager]


class Scorer:
    """Early-exit scores of a gross batch.

    ZeRO 0-2: reads the live modules (embeddings, layers 1..j, MLM head) directly. ZeRO-3: their
    parameters are partitioned, so it keeps a replica of exactly those modules, refreshed by gathering
    exactly their parameters after every optimizer step (``refresh``).
    """

    def __init__(self, model: SiftBert, exit_layer: int, criterion: str, *, device: torch.device,
                 gather: Gather | None = None):
        self.criterion = criterion
        live = model.exit_path(exit_layer)
        self._gather = gather
        if gather is None:
            self.path: ExitPath = live
        else:
            self._src = list(live.parameters())
            self.path = live.replicate(device, self._src[0].dtype)
            self._dst = list(self.path.parameters())
            self.refresh()

    def refresh(self) -> None:
        if self._gather is None:
            return
        with torch.no_grad(), self._gather(self._src):
            for s, d in zip(self._src, self._dst, strict=True):
                d.copy_(s.data.view(d.shape))

    def __call__(self, batch: Batch) -> torch.Tensor:
        return exit_scores(self.path, batch, self.criterion)


@dataclass
class MicroOut:
    """What one micro-step did; tensors stay on the device until the loop flushes its metrics."""

    out: dict[str, torch.Tensor]
    finite: bool
    stepped: bool
    """An optimizer step was taken (end of a gradient-accumulation cycle)."""
    rows_scored: int
    rows_trained: int
    kept_mean: torch.Tensor | None = None
    dropped_mean: torch.Tensor | None = None
    fidelity: tuple[torch.Tensor, torch.Tensor] | None = None
    """(Spearman, top-B overlap) of exit scores vs exact full-model losses on the gross batch."""


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_objective(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss as a token mean over the whole data-parallel micro-batch.

    DeepSpeed averages gradients over ranks, so each rank back-propagates its token sum over the global
    token count, times the world size: B rows on each of W ranks then train exactly like W x B rows on
    one, whatever each rank's number of masked tokens (one scalar all-reduce, no host sync).
    """
    world = _world()
    if world == 1:
        return out["loss"]
    count = out["mlm_count"].detach().to(torch.float32)
    dist.all_reduce(count)
    loss = out["mlm_sum"] * world / count.clamp(min=1)
    return loss + out["nsp_loss"] if "nsp_loss" in out else loss


def all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (one tiny all-reduce and one host sync)."""
    flag = torch.isfinite(loss.detach()).to(torch.float32)
    if _world() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class Schedule:
    """Shared machinery; subclasses decide when scoring happens."""

    def __init__(self, engine: Any, scorer: Scorer | None, *, policy: str, micro_batch_size: int, seed: int,
                 rank: int, prefetcher: DevicePrefetcher, streams: Streams, timer: PhaseTimer):
        self.engine, self.scorer, self.policy = engine, scorer, policy
        self.select = SELECTORS.get(policy)
        self.B, self.seed, self.rank = micro_batch_size, seed, rank
        self.prefetcher, self.streams, self.timer = prefetcher, streams, timer

    @property
    def pending_scores(self) -> torch.Tensor | None:
        """Scores already computed for the next batch (the pipelined schedule; saved in checkpoints)."""
        return None

    def set_pending_scores(self, scores: torch.Tensor | None) -> None:
        """On resume: the scores the interrupted run had computed for its next batch."""

    # -- pieces ---------------------------------------------------------------------------------

    def _fetch(self) -> tuple[Batch, torch.cuda.Event | None]:
        with self.timer.phase("data", host=True):
            return self.prefetcher.next()

    def _keep(self, batch: Batch, scores: torch.Tensor, draw: int) -> tuple[Batch, torch.Tensor]:
        gen = selection_generator(self.seed, draw, self.rank) if self.policy == "random" else None
        kept = self.select(scores, self.B, gen)
        return select_rows(batch, kept), kept

    def _fidelity(self, batch: Batch, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact per-sequence MLM losses of the full model (eval mode, no grad) vs the exit scores."""
        with torch.no_grad(), eval_mode([self.engine.module]):
            exact = self.engine(**batch)["mlm_per_seq"]
        return spearman(scores, exact), topk_overlap(scores, exact, self.B)

    def _train(self, kept: Batch, after_forward: Callable[[], None] | None = None,
               before_step: Callable[[], None] | None = None) -> tuple[dict[str, torch.Tensor], bool, bool]:
        """Forward, backward and (at a boundary) the optimizer step on the kept rows."""
        with self.timer.phase("forward"):
            out = self.engine(**kept)
            out["loss"] = global_objective(out)
        if after_forward is not None:
            after_forward()
        if not all_finite(out["loss"]):
            return out, False, False
        with self.timer.phase("backward"):
            self.engine.backward(out["loss"])
        if before_step is not None:
            before_step()
        boundary = self.engine.is_gradient_accumulation_boundary()
        with self.timer.phase("optimizer"):
            self.engine.step()
        if boundary and self.scorer is not None:
            self.scorer.refresh()
        return out, True, boundary

    def _selection_stats(self, mo: MicroOut, scores: torch.Tensor, kept_idx: torch.Tensor) -> None:
        mo.kept_mean, mo.dropped_mean = kept_dropped_means(scores, kept_idx)


class SerialSchedule(Schedule):
    """Score, then train: the paper's schedule and the reference for the pipelined one."""

    def micro_step(self, draw: int, fidelity: bool = False) -> MicroOut:
        batch, ready = self._fetch()
        Streams.wait(self.streams.main, ready)
        Streams.keep_alive(batch, self.streams.main)
        G = batch_rows(batch)
        scores = kept_idx = fid = None
        if G > self.B:
            with self.timer.phase("scoring"):
                scores = self.scorer(batch)
            if fidelity:
                fid = self._fidelity(batch, scores)
            kept, kept_idx = self._keep(batch, scores, draw)
        else:
            kept = batch
        out, finite, stepped = self._train(kept)
        mo = MicroOut(out, finite, stepped, G if scores is not None else 0, self.B, fidelity=fid)
        if scores is not None:
            self._selection_stats(mo, scores, kept_idx)
        return mo


class PipelinedSchedule(Schedule):
    """Score batch k+1 on the side stream while batch k trains (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pending: tuple[Batch, torch.Tensor | None, torch.cuda.Event | None] | None = None
        self._params_ready = None  # event after the last optimizer step (and replica refresh)
        self._resume_scores: torch.Tensor | None = None

    @property
    def pending_scores(self) -> torch.Tensor | None:
        return None if self._pending is None else self._pending[1]

    def set_pending_scores(self, scores: torch.Tensor | None) -> None:
        self._resume_scores = scores

    def _score_async(self, batch: Batch, ready: torch.cuda.Event | None) -> tuple[torch.Tensor, Any]:
        s = self.streams
        with s.on(s.side):
            Streams.wait(s.side, ready)
            Streams.wait(s.side, self._params_ready)
            Streams.keep_alive(batch, s.side)
            with self.timer.phase("scoring", stream=s.side):
                scores = self.scorer(batch)
        return scores, s.record(s.side)

    def micro_step(self, draw: int, fidelity: bool = False) -> MicroOut:
        s = self.streams
        if self._pending is None:  # first micro-step, or just resumed: score batch k serially
            # The side stream must also see every weight write queued so far (DeepSpeed's init, a
            # checkpoint load); later micro-steps order it after their optimizer step instead.
            self._params_ready = s.record(s.main)
            batch, ready = self._fetch()
            Streams.wait(s.main, ready)
            scores, self._resume_scores = self._resume_scores, None
            if scores is None and batch_rows(batch) > self.B:
                with self.timer.phase("scoring"):
                    scores = self.scorer(batch)
            done = None
        else:
            batch, scores, done = self._pending
        Streams.wait(s.main, done)
        Streams.keep_alive(batch, s.main)
        if scores is not None:
            Streams.keep_alive([scores], s.main)

        G = batch_rows(batch)
        kept_idx = fid = None
        if G > self.B:
            if fidelity:
                fid = self._fidelity(batch, scores)
            kept, kept_idx = self._keep(batch, scores, draw)
        else:
            kept = batch

        nxt: list[Any] = []

        def launch_next_scoring() -> None:  # after the forward is queued: overlaps forward and backward
            try:
                nb, nready = self._fetch()
            except StopIteration:
                return
            if batch_rows(nb) > self.B:
                nxt.append((nb, *self._score_async(nb, nready)))
            else:
                nxt.append((nb, None, nready))

        def wait_for_scoring() -> None:  # the step is about to write weights the scorer reads
            if nxt:
                Streams.wait(s.main, nxt[0][2])

        out, finite, stepped = self._train(kept, after_forward=launch_next_scoring, before_step=wait_for_scoring)
        if not finite:
            wait_for_scoring()
        self._params_ready = s.record(s.main)
        self._pending = nxt[0] if nxt else None
        mo = MicroOut(out, finite, stepped, G if kept_idx is not None else 0, self.B, fidelity=fid)
        if kept_idx is not None:
            self._selection_stats(mo, scores, kept_idx)
        return mo
