"""The method interface: how a training method (SIFT, VCAS, ...) plugs into the loop.

A method may change which rows a micro-step trains on (``selects``: draw more rows than it trains,
score them, keep some), and may hook the forward, the backward and the optimizer step. Every hook has
a no-op default, so a method implements only what it changes. Methods hold their own state
(``state_dict``, saved per rank in every checkpoint) and report per-micro-step statistics (``stats``:
device tensors, summed and averaged by the metrics logger under whatever names they carry).

The loop always talks to a ``MethodStack``: none, one or several methods (``method: sift+vcas``). At
most one of them selects rows; vanilla training is the empty stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from engine.models.base import Batch, SiftModel
from engine.selection import Kept

if TYPE_CHECKING:
    from engine.config import RunConfig


@dataclass(frozen=True, slots=True)
class MicroContext:
    """Where a micro-step stands, for a method's hooks."""

    draw: int
    """Micro-steps taken so far (skipped non-finite ones included); the loader's draw index."""
    step: int
    """Optimizer steps taken so far."""
    rank: int
    world_size: int
    grad_accum: int

    @property
    def first_micro(self) -> bool:
        """The first micro-step of a gradient-accumulation window."""
        return self.draw % self.grad_accum == 0


@dataclass(frozen=True, slots=True)
class TrainShape:
    """What a method needs to know about the run besides its own settings (so that it can be built
    without a whole ``RunConfig``, e.g. inside a Hugging Face Trainer: sift_hf)."""

    micro_batch_size: int
    """B: the rows each micro-step back-propagates."""
    grad_accum: int
    seed: int
    total_steps: int
    """Optimizer steps of the whole run."""
    compile: bool = False
    """Are the blocks compiled (torch.compile)?"""

    @classmethod
    def of(cls, cfg: RunConfig) -> TrainShape:
        t = cfg.train
        return cls(t.micro_batch_size, t.grad_accum, t.seed, t.steps, t.compile)


@dataclass(slots=True)
class RunContext:
    """What a method gets once the engine exists (``Method.attach``)."""

    model: SiftModel
    """The model (its parameters are the engine's; partitioned under ZeRO-3)."""
    engine: Any
    device: torch.device
    zero_stage: int
    gather: Callable[[list[torch.nn.Parameter]], Any]
    """Context manager that makes full copies of the given (ZeRO-3 partitioned) parameters readable."""
    exact_losses: Callable[[Batch], torch.Tensor]
    """(G,) exact per-sequence losses of the full model on a batch (eval mode, no grad)."""
    rank: int
    world_size: int
    group: Any = None
    """The data-parallel process group (None: the default group)."""


class Method:
    """Base class: every hook is a no-op."""

    name: ClassVar[str]
    selects: ClassVar[bool] = False
    """True for a method that draws more rows than it trains and keeps some (``rows_for_draw``,
    ``score``, ``select``)."""

    def check(self, model: SiftModel) -> list[str]:
        """Problems with this method on this model (config errors, listed together)."""
        return []

    def prepare_model(self, model: SiftModel) -> None:
        """Before the engine is built: swap modules in place, keeping parameter names."""

    def attach(self, run: RunContext) -> None:
        """After the engine is built."""

    def rows_for_draw(self, draw: int) -> int:
        """Rows to draw for micro-step ``draw``; a pure function of it (the loader runs ahead)."""
        raise NotImplementedError

    def score(self, batch: Batch, draw: int) -> torch.Tensor:
        """(G,) scores of the gross batch of micro-step ``draw``; no grad, no draws from a stateful RNG
        (randomness only from generators keyed on ``draw``), weights untouched (may run on a side CUDA
        stream while the previous micro-step trains)."""
        raise NotImplementedError

    @property
    def scoring_reads_live_weights(self) -> bool:
        """Does ``score`` read the parameters the optimizer step writes? Then a step waits for a scoring
        in flight on another stream; a method that scores from its own copy of the weights says False."""
        return True

    def select(self, batch: Batch, scores: torch.Tensor, ctx: MicroContext) -> torch.Tensor | Kept:
        """(B,) ascending indices of the rows to train on, on the batch's device, without a host sync; or
        a ``Kept``: those indices and the weight of each row in the loss (engine/models/base.py)."""
        raise NotImplementedError

    def before_forward(self, batch: Batch, ctx: MicroContext) -> None:
        """Before the training forward on the kept rows."""

    def after_backward(self, ctx: MicroContext) -> None:
        """After the backward, before the optimizer step."""

    def after_step(self, ctx: MicroContext) -> None:
        """After an optimizer step (the end of a gradient-accumulation window)."""

    def stats(self) -> dict[str, torch.Tensor]:
        """Statistics of the last micro-step (device tensors); each key is averaged over the micro-steps
        that report it. Returning clears them."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (tensors, numbers, strings, lists and dicts of them)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's saved state ({} on a fresh start); called once, after the engine's weights are
        loaded (or initialised) and before the first micro-step."""
        if state:
            raise ValueError(f"method {self.name!r} has no state, got keys {sorted(state)}")


class MethodStack:
    """The methods of a run, as one: the selecting member (if any) decides rows; hooks go to all."""

    def __init__(self, methods: list[Method], micro_batch_size: int):
        selecting = [m for m in methods if m.selects]
        if len(selecting) > 1:
            raise ValueError(f"at most one method may select rows, got {[m.name for m in selecting]}")
        self.methods, self.B = methods, micro_batch_size
        self.selector = selecting[0] if selecting else None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    def check(self, model: SiftModel) -> list[str]:
        return [p for m in self.methods for p in m.check(model)]

    def prepare_model(self, model: SiftModel) -> None:
        for m in self.methods:
            m.prepare_model(model)

    def attach(self, run: RunContext) -> None:
        for m in self.methods:
            m.attach(run)

    def rows_for_draw(self, draw: int) -> int:
        return self.selector.rows_for_draw(draw) if self.selector is not None else self.B

    def score(self, batch: Batch, draw: int) -> torch.Tensor:
        assert self.selector is not None, "score() without a selecting method"
        return self.selector.score(batch, draw)

    @property
    def scoring_reads_live_weights(self) -> bool:
        return self.selector is not None and self.selector.scoring_reads_live_weights

    def select(self, batch: Batch, scores: torch.Tensor, ctx: MicroContext) -> torch.Tensor | Kept:
        assert self.selector is not None, "select() without a selecting method"
        return self.selector.select(batch, scores, ctx)

    def before_forward(self, batch: Batch, ctx: MicroContext) -> None:
        for m in self.methods:
            m.before_forward(batch, ctx)

    def after_backward(self, ctx: MicroContext) -> None:
        for m in self.methods:
            m.after_backward(ctx)

    def after_step(self, ctx: MicroContext) -> None:
        for m in self.methods:
            m.after_step(ctx)

    def stats(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in self.methods:
            out.update(m.stats())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {m.name: m.state_dict() for m in self.methods}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m in self.methods:
            m.load_state_dict(state.get(m.name, {}))
