"""SIFT and VCAS inside ``transformers.Trainer``: ``SiftTrainer(..., sift=SiftArguments(...))``, or
``with_sift(SomeTrainerSubclass)`` for any subclass (TRL's SFTTrainer, say).

``per_device_train_batch_size`` stays B, the rows each micro-step back-propagates; the training loader
draws G = B / keep rows per micro-step. Selection happens in ``get_batch_samples``, where the Trainer
pulls the micro-batches of one gradient-accumulation window and then counts their label tokens: every
micro-batch of the window is scored there, with the weights at the window's start (as `sift train`'s
serial schedule does: the weights do not change inside a window), and the Trainer's loss normalisation
(``num_items_in_batch``), its token count across ranks and the accumulation see only the kept rows.

The hooks this relies on are private to transformers 5.x (``get_batch_samples``,
``_get_num_items_in_batch``, ``_save_checkpoint``); ``check_trainer_hooks`` refuses a Trainer without
them, and a training step that finds no selection made for it stops with an error naming the version.
"""

from __future__ import annotations

import inspect
import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from engine.config import ConfigError
from engine.methods import MicroContext, TrainShape
from sift_hf.arguments import SOURCE, SiftArguments
from sift_hf.loop import MethodLoop
from sift_hf.models import UnsupportedError, version_problems

STATE_FILE = "sift_state_rank{rank}.pt"
"""Each process's method state, beside the Trainer's files in every checkpoint folder."""

def check_trainer_hooks(cls: type) -> None:
    """UnsupportedError unless ``cls`` has the Trainer hooks selection relies on, with their arguments."""
    problems = version_problems()
    expected = {"get_batch_samples": ["epoch_iterator", "num_batches", "device"],
                "_get_num_items_in_batch": ["batch_samples", "device"], "_save_checkpoint": ["model", "trial"],
                "training_step": ["model", "inputs", "num_items_in_batch"]}
    for name, params in expected.items():
        fn = getattr(cls, name, None)
        got = list(inspect.signature(fn).parameters)[1:] if fn is not None else None
        if got != params:
            problems.append(f"{cls.__name__}.{name}{'(' + ', '.join(got) + ')' if got is not None else ' is missing'}, "
                            f"expected ({', '.join(params)})")
    if problems:
        raise UnsupportedError("SIFT cannot hook this Trainer: " + "; ".join(problems))


class _AfterStep(TrainerCallback):
    """After each optimizer step: the methods' ``after_step`` (SIFT's replica refresh, VCAS's calibration)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._sift_after_step()


def with_sift(base: type[Trainer]) -> type[Trainer]:
    """``base`` (``transformers.Trainer`` or a subclass) with SIFT / VCAS: its constructor takes
    ``sift=SiftArguments(...)`` besides its own arguments."""
    check_trainer_hooks(base)

    class WithSift(base):
        def __init__(self, *args: Any, sift: SiftArguments | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.sift = sift if sift is not None else SiftArguments()
            a = self.args
            problems = []
            if a.torch_compile and "vcas" in self.sift.names:
                problems.append("torch_compile: not supported with method vcas (its backward keeps a data-dependent "
                                "number of rows); set TrainingArguments(torch_compile=False)")
            if self.sift.sift.stop_fraction is not None and a.max_steps <= 0:
                problems.append("sift.stop_fraction needs TrainingArguments.max_steps > 0 (the run's length)")
            if a.auto_find_batch_size:
                problems.append("auto_find_batch_size: not supported with SIFT (per_device_train_batch_size is the "
                                "back-propagated B the methods are built for)")
            if a.n_gpu > 1:
                problems.append(f"{a.n_gpu} GPUs in one process (DataParallel): run one process per GPU "
                                "(torchrun / accelerate launch)")
            if problems:
                raise ConfigError(problems, SOURCE)
            shape = TrainShape(micro_batch_size=a.per_device_train_batch_size, grad_accum=a.gradient_accumulation_steps,
                               seed=a.seed, total_steps=max(a.max_steps, 0), compile=a.torch_compile)
            self._sift_loop = MethodLoop(self.sift, self.model, shape)
            self._sift_pending: deque[tuple[MicroContext, Any]] = deque()
            self._sift_resume: str | None = None
            self._sift_last: MicroContext | None = None
            self.add_callback(_AfterStep(self))

        @property
        def gross_batch_size(self) -> int:
            """G: the rows the training loader draws per micro-step."""
            return self._sift_loop.G

        # -- data: G rows per micro-step -----------------------------------------------------------

        def get_train_dataloader(self):
            B = self._train_batch_size
            self._train_batch_size = self._sift_loop.G
            try:
                return super().get_train_dataloader()
            finally:
                self._train_batch_size = B

        # -- selection ------------------------------------------------------------------------------

        def _ctx(self, draw: int) -> MicroContext:
            return MicroContext(draw=draw, step=self.state.global_step, rank=self.args.process_index,
                                world_size=self.args.world_size, grad_accum=self.args.gradient_accumulation_steps)

        def _sift_attach(self) -> None:
            loop = self._sift_loop
            stage = 0
            if self.is_deepspeed_enabled:
                stage = int(self.accelerator.state.deepspeed_plugin.zero_stage)
            loop.attach(engine=self.model_wrapped, zero_stage=stage, device=self.args.device,
                        rank=self.args.process_index, world_size=self.args.world_size)
            state = {}
            if self._sift_resume is not None:
                path = os.path.join(self._sift_resume, STATE_FILE.format(rank=self.args.process_index))
                if not os.path.isfile(path):
                    raise UnsupportedError(f"resume_from_checkpoint: {path} is missing (a checkpoint written without "
                                           "SIFT, or by another number of processes)")
                state = torch.load(path, map_location="cpu", weights_only=False)
            loop.load_state_dict(state)

        def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
            if not self._sift_loop.attached:
                self._sift_attach()
            gross = []
            for _ in range(num_batches):
                try:
                    gross.append(next(epoch_iterator))
                except StopIteration:
                    break
            self._sift_pending.clear()
            kept = []
            first = self.state.global_step * self.args.gradient_accumulation_steps
            for i, batch in enumerate(gross):  # all with the weights at the window's start
                ctx = self._ctx(first + i)
                rows, adapter = self._sift_loop.select(self._prepare_inputs(batch), ctx)
                kept.append(rows)
                self._sift_pending.append((ctx, adapter))
            return kept, self._get_num_items_in_batch(kept, device)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if not self._sift_pending:
                raise UnsupportedError(
                    f"transformers {transformers.__version__}: a training step ran without the selection made in "
                    "Trainer.get_batch_samples; the Trainer no longer calls that hook as transformers 5.x did")
            ctx, adapter = self._sift_pending.popleft()
            self._sift_loop.before_forward(adapter, ctx)
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._sift_loop.after_backward(ctx)
            self._sift_last = ctx
            return loss

        def _sift_after_step(self) -> None:
            ctx = self._sift_last
            done = self.state.global_step - 1  # the step just taken (MicroContext.step before it)
            self._sift_loop.after_step(MicroContext(draw=ctx.draw, step=done, rank=ctx.rank,
                                                    world_size=ctx.world_size, grad_accum=ctx.grad_accum))

        # -- logs and checkpoints ------------------------------------------------------------------

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs:  # a training record (not evaluation's): add the methods' statistics
                logs = {**logs, **self._sift_loop.logs()}
            super().log(logs, *args, **kwargs)

        def _save_checkpoint(self, model, trial) -> None:
            super()._save_checkpoint(model, trial)
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            path = os.path.join(folder, STATE_FILE.format(rank=self.args.process_index))
            tmp = path + ".tmp"
            torch.save(self._sift_loop.state_dict(), tmp)
            os.replace(tmp, path)  # complete or absent

        def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            self._sift_resume = resume_from_checkpoint or None
            return super().train(resume_from_checkpoint, *args, **kwargs)

    WithSift.__name__ = WithSift.__qualname__ = f"Sift{base.__name__}"
    return WithSift


SiftTrainer = with_sift(Trainer)
"""``transformers.Trainer`` with SIFT / VCAS: ``SiftTrainer(model=..., args=..., train_dataset=...,
data_collator=..., sift=SiftArguments(keep=0.5))``."""
