"""SIFT and VCAS in an ``accelerate`` loop::

    selector = SiftSelector(accelerator, model, micro_batch_size=B, settings=SiftArguments(keep=0.5))
    loader = DataLoader(dataset, batch_size=selector.gross_batch_size, ...)   # G rows per micro-step
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        with accelerator.accumulate(model):
            batch = selector(batch)            # the B kept rows
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()

Build the selector before ``accelerator.prepare`` when VCAS is on (it swaps Linears before DeepSpeed or
DDP wraps the model). The selector counts its calls: call ``k`` is micro-step ``k`` of window
``k // gradient_accumulation_steps``, and the first call of a window follows that window's optimizer
step (SIFT's ZeRO-3 replica is refreshed there, VCAS calibrates there). Every micro-batch of a window is
scored with the weights at the window's start, since nothing steps inside a window.
``selector.logs()`` gives the statistics for ``accelerator.log``; ``state_dict`` / ``load_state_dict``
carry the counter and the methods' state (``accelerator.register_for_checkpointing(selector)``).
"""

from __future__ import annotations

from typing import Any

from engine.config import ConfigError
from engine.methods import MicroContext, TrainShape
from sift_hf.arguments import SOURCE, SiftArguments
from sift_hf.loop import MethodLoop
from sift_hf.models import UnsupportedError, version_problems


class SiftSelector:
    def __init__(self, accelerator: Any, model: Any, *, micro_batch_size: int, settings: SiftArguments | None = None,
                 seed: int = 0, total_steps: int = 0):
        """``total_steps``: the run's optimizer steps (needed only with ``stop_fraction``); ``seed`` keys the
        random policy's and the scored positions' draws."""
        problems = version_problems()
        if problems:
            raise UnsupportedError("SIFT cannot run in this accelerate loop: " + "; ".join(problems))
        self.accelerator = accelerator
        self.settings = settings if settings is not None else SiftArguments()
        if self.settings.sift.stop_fraction is not None and total_steps <= 0:
            raise ConfigError(["sift.stop_fraction needs SiftSelector(total_steps=...) > 0"], SOURCE)
        self.grad_accum = max(int(getattr(accelerator, "gradient_accumulation_steps", 1)), 1)
        shape = TrainShape(micro_batch_size=micro_batch_size, grad_accum=self.grad_accum, seed=seed,
                           total_steps=total_steps)
        self.loop = MethodLoop(self.settings, accelerator.unwrap_model(model), shape)
        self.draws = 0
        self._last: MicroContext | None = None
        self._pending_state: dict[str, Any] = {}

    @property
    def gross_batch_size(self) -> int:
        """G: the rows to draw per micro-step (the data loader's batch size)."""
        return self.loop.G

    def _attach(self) -> None:
        acc = self.accelerator
        stage = 0
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        if plugin is not None:
            stage = int(plugin.zero_stage)
        self.loop.attach(engine=None, zero_stage=stage, device=acc.device, rank=acc.process_index,
                         world_size=acc.num_processes)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The kept rows of a gross batch (moved to the accelerator's device if it is not there)."""
        if not self.loop.attached:
            self._attach()
            self.loop.load_state_dict(self._pending_state)
        last = self._last
        if last is not None:
            self.loop.after_backward(last)
            if self.draws % self.grad_accum == 0:  # an optimizer step closed the previous window
                self.loop.after_step(last)
        ctx = MicroContext(draw=self.draws, step=self.draws // self.grad_accum, rank=self.accelerator.process_index,
                           world_size=self.accelerator.num_processes, grad_accum=self.grad_accum)
        device = self.accelerator.device
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        kept, adapter = self.loop.select(batch, ctx)
        self.loop.before_forward(adapter, ctx)
        self.draws += 1
        self._last = ctx
        return kept

    def logs(self) -> dict[str, float]:
        """The methods' statistics since the last call (this process's)."""
        return self.loop.logs()

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, **self.loop.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Before the first call (the methods' state is restored once they are attached)."""
        self.draws = int(state.get("draws", 0))
        if self.draws:
            self._last = MicroContext(draw=self.draws - 1, step=(self.draws - 1) // self.grad_accum,
                                      rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
                                      grad_accum=self.grad_accum)
        self._pending_state = state
