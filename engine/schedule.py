"""One micro-step of SIFT training: score -> select -> forward/backward -> step, serial or pipelined.

Serial (the paper, the reference): micro-step k scores gross batch k with the current weights, keeps B
rows and trains on them.

Pipelined: micro-step k trains on batch k's kept rows while batch k+1 is scored on a side CUDA stream,
from a replica of the exit's weights (SIFT's scorer keeps two and refreshes the idle one after each
optimizer step), so nothing on the training stream waits for the scoring until micro-step k+1 selects
with its scores. Batch k+1 is therefore scored with the weights of micro-step k: when an optimizer step
falls between k and k+1 (always, without gradient accumulation) its scores are one optimizer step stale.
A method whose scoring reads the live weights makes the step wait for it instead. On CPU the same code
runs sequentially, in the same order, with the same semantics.

Non-finite losses (``train.nonfinite``): ``skip`` reads one flag per micro-step to the host and skips a
micro-batch whose loss is non-finite on any rank (no backward, no step); ``stop`` reads nothing: it
counts them on the device, and the loop reads the count at its next log flush, evaluation or checkpoint
and stops there. Which rows to draw, how to score them and which to keep is the methods' business
(engine/methods/); without a selecting method every micro-step trains on what it drew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.batch import Batch, batch_rows, select_rows, weighted_rows
from engine.methods import MethodStack, MicroContext
from engine.selection import Kept
from engine.streams import DevicePrefetcher, PhaseTimer, Streams


@dataclass
class MicroOut:
    """What one micro-step did; tensors stay on the device until the loop flushes its metrics."""

    out: dict[str, torch.Tensor]
    """The model's outputs (engine/models/base.py), ``loss`` replaced by the cross-rank objective."""
    finite: bool
    stepped: bool
    """An optimizer step was taken (end of a gradient-accumulation cycle)."""
    rows_scored: int
    rows_trained: int
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """The methods' statistics of this micro-step (e.g. SIFT's kept and dropped mean scores)."""


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_objective(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss as a token mean over the whole data-parallel micro-batch.

    DeepSpeed averages gradients over ranks, so each rank back-propagates its token sum over the global
    token count, times the world size: B rows on each of W ranks then train exactly like W x B rows on
    one, whatever each rank's number of target tokens (one scalar all-reduce, no host sync). The
    model's extra terms (``extra_loss``, e.g. NSP) are rank-local means of equal-sized batches already.
    Weighted rows (``row_weights``): the sums and the count are weighted, and a weighted extra mean
    counts by the weight behind it (``extra_weight``, all-reduced with the count in one call), so the
    ranks again train like one rank holding all their rows with their weights.
    """
    world = _world()
    if world == 1:
        return out["loss"]
    count = out["loss_tokens"].detach().to(torch.float32)
    if "extra_weight" not in out:
        dist.all_reduce(count)
        loss = out["loss_sum"] * world / count.clamp(min=1)
        return loss + out["extra_loss"] if "extra_loss" in out else loss
    weight = out["extra_weight"].detach().to(torch.float32)
    totals = torch.stack([count, weight])
    dist.all_reduce(totals)
    return (out["loss_sum"] * world / totals[0].clamp(min=1)
            + out["extra_loss"] * (weight * world / totals[1]))


def nonfinite_flag(loss: torch.Tensor) -> torch.Tensor:
    """1.0 where the loss is non-finite, 0.0 where it is finite, on the device (no host sync)."""
    return (~torch.isfinite(loss.detach())).to(torch.float32)


def all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (one tiny all-reduce and one host sync)."""
    flag = nonfinite_flag(loss)
    if _world() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not flag.item()


class Schedule:
    """Shared machinery; subclasses decide when scoring happens."""

    def __init__(self, engine: Any, methods: MethodStack, *, rank: int, world_size: int, grad_accum: int,
                 prefetcher: DevicePrefetcher, streams: Streams, timer: PhaseTimer, skip_nonfinite: bool = True):
        self.engine, self.methods, self.B = engine, methods, methods.B
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.prefetcher, self.streams, self.timer = prefetcher, streams, timer
        self.skip_nonfinite = skip_nonfinite
        self._nonfinite: torch.Tensor | None = None  # train.nonfinite=stop: the count since the last read

    def take_nonfinite(self) -> int:
        """``stop`` mode: non-finite losses on any rank since the last call (an all-reduce and one host
        read; every rank must call it at the same step)."""
        count, self._nonfinite = self._nonfinite, None
        if count is None:
            return 0
        if _world() > 1:
            dist.all_reduce(count)
        return int(count.item())

    @property
    def pending_scores(self) -> torch.Tensor | None:
        """Scores already computed for the next batch (the pipelined schedule; saved in checkpoints)."""
        return None

    def set_pending_scores(self, scores: torch.Tensor | None) -> None:
        """On resume: the scores the interrupted run had computed for its next batch."""

    def context(self, draw: int, step: int) -> MicroContext:
        return MicroContext(draw=draw, step=step, rank=self.rank, world_size=self.world_size,
                            grad_accum=self.grad_accum)

    # -- pieces ---------------------------------------------------------------------------------

    def _fetch(self) -> tuple[Batch, torch.cuda.Event | None]:
        with self.timer.phase("data", host=True):
            return self.prefetcher.next()

    def _keep(self, batch: Batch, scores: torch.Tensor, ctx: MicroContext) -> Batch:
        kept = self.methods.select(batch, scores, ctx)
        if isinstance(kept, Kept):
            return weighted_rows(batch, kept.indices, kept.weights)
        return select_rows(batch, kept)

    def _train(self, kept: Batch, ctx: MicroContext, after_forward: Callable[[], None] | None = None,
               before_step: Callable[[], None] | None = None) -> tuple[dict[str, torch.Tensor], bool, bool]:
        """Forward, backward and (at a boundary) the optimizer step on the kept rows."""
        self.methods.before_forward(kept, ctx)
        with self.timer.phase("forward"):
            out = self.engine(**kept)
            out["loss"] = global_objective(out)
        if after_forward is not None:
            after_forward()
        if not self.skip_nonfinite:  # counted on the device; the loop reads the count at its next check
            flag = nonfinite_flag(out["loss"])
            self._nonfinite = flag if self._nonfinite is None else self._nonfinite + flag
        elif not all_finite(out["loss"]):
            return out, False, False
        with self.timer.phase("backward"):
            self.engine.backward(out["loss"])
        self.methods.after_backward(ctx)
        if before_step is not None:
            before_step()
        boundary = self.engine.is_gradient_accumulation_boundary()
        with self.timer.phase("optimizer"):
            self.engine.step()
        if boundary:
            self.methods.after_step(ctx)
        return out, True, boundary

    def _out(self, out: dict[str, torch.Tensor], finite: bool, stepped: bool, scored: int) -> MicroOut:
        return MicroOut(out, finite, stepped, scored, self.B, self.methods.stats())


class SerialSchedule(Schedule):
    """Score, then train: the paper's schedule and the reference for the pipelined one."""

    def micro_step(self, draw: int, step: int) -> MicroOut:
        ctx = self.context(draw, step)
        batch, ready = self._fetch()
        Streams.wait(self.streams.main, ready)
        Streams.keep_alive(batch, self.streams.main)
        G = batch_rows(batch)
        kept = batch
        if G > self.B:
            with self.timer.phase("scoring"):
                scores = self.methods.score(batch, draw)
            kept = self._keep(batch, scores, ctx)
        out, finite, stepped = self._train(kept, ctx)
        return self._out(out, finite, stepped, G if G > self.B else 0)


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

    def _score_async(self, batch: Batch, draw: int, ready: torch.cuda.Event | None) -> tuple[torch.Tensor, Any]:
        s = self.streams
        with s.on(s.side):
            Streams.wait(s.side, ready)
            Streams.wait(s.side, self._params_ready)
            Streams.keep_alive(batch, s.side)
            with self.timer.phase("scoring", stream=s.side):
                scores = self.methods.score(batch, draw)
        return scores, s.record(s.side)

    def micro_step(self, draw: int, step: int) -> MicroOut:
        ctx = self.context(draw, step)
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
                    scores = self.methods.score(batch, draw)
            done = None
        else:
            batch, scores, done = self._pending
        Streams.wait(s.main, done)
        Streams.keep_alive(batch, s.main)
        if scores is not None:
            Streams.keep_alive([scores], s.main)

        G = batch_rows(batch)
        kept = self._keep(batch, scores, ctx) if G > self.B else batch

        nxt: list[Any] = []

        def launch_next_scoring() -> None:  # after the forward is queued: overlaps forward and backward
            try:
                nb, nready = self._fetch()
            except StopIteration:
                return
            if batch_rows(nb) > self.B:
                nxt.append((nb, *self._score_async(nb, draw + 1, nready)))
            else:
                nxt.append((nb, None, nready))

        def wait_for_scoring() -> None:  # the step is about to write weights the scorer reads
            if nxt:
                Streams.wait(s.main, nxt[0][2])

        # A scorer reading its own replica of the weights lets the step run while it scores; the main
        # stream then waits for the scores only when the next micro-step selects with them.
        live = self.methods.scoring_reads_live_weights
        out, finite, stepped = self._train(kept, ctx, after_forward=launch_next_scoring,
                                           before_step=wait_for_scoring if live else None)
        if not finite and live:
            wait_for_scoring()
        self._params_ready = s.record(s.main)
        self._pending = nxt[0] if nxt else None
        return self._out(out, finite, stepped, G if G > self.B else 0)
