"""The methods of one process inside a loop that is not the project's (a Hugging Face Trainer, an
accelerate loop): what ``SiftTrainer`` and ``SiftSelector`` share.

Per micro-step: turn the gross Hugging Face batch into the adapter's batch (models.py), score it with the
early exit, keep B rows (the project's Sift method, engine/methods/sift.py, with its policies and
criteria), and hand the loop the kept rows of the original batch. Around the training forward the
methods' hooks run as in `sift train` (VCAS's sampling plan, its calibration after an optimizer step;
SIFT's replica refresh under ZeRO-3).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.config import ConfigError
from engine.methods import MethodStack, MicroContext, RunContext, TrainShape
from engine.models.base import Batch, SiftModel
from engine.scoring import eval_mode
from sift_hf.arguments import SOURCE, SiftArguments
from sift_hf.models import adapter_batch, adapter_for, rows, take_rows


class MethodLoop:
    """One process's methods, the adapter around the loop's model, and the per-interval statistics."""

    def __init__(self, settings: SiftArguments, model: nn.Module, shape: TrainShape):
        self.settings, self.shape = settings, shape
        self.adapter: SiftModel = adapter_for(model)
        self.family = self.adapter.family
        self.methods: MethodStack = settings.build(shape)
        self.B, self.G = shape.micro_batch_size, settings.gross_batch_size(shape.micro_batch_size)
        problems = self.methods.check(self.adapter)
        if problems:
            raise ConfigError(problems, f"{SOURCE} vs {type(model).__name__}")
        self.methods.prepare_model(self.adapter)  # VCAS swaps its Linears here: before any engine exists
        self.attached = False
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    @property
    def needs_adapter_batch(self) -> bool:
        """Does a method other than the selecting one see the training batches (VCAS)?"""
        return any(m is not self.methods.selector for m in self.methods.methods)

    def attach(self, *, engine: Any, zero_stage: int, device: torch.device, rank: int, world_size: int,
               group: Any = None) -> None:
        """Once the engine (DeepSpeed, DDP or the bare model) exists, before the first micro-step."""
        problems = []
        if zero_stage == 3 and self.settings.sift.fidelity_every and self.methods.selector is not None:
            problems.append("sift.fidelity_every: not available at ZeRO-3 in a Hugging Face loop (the exact "
                            "losses would need a partial forward through the partitioned model); set it to 0")
        if problems:
            raise ConfigError(problems, SOURCE)
        gather = None
        if zero_stage == 3:
            from engine import ds  # ZeRO-3 means deepspeed is there

            gather = ds.gathered
        adapter = self.adapter

        def exact_losses(batch: Batch) -> torch.Tensor:
            with torch.no_grad(), eval_mode([adapter]):
                return adapter(**batch)["per_seq_loss"]

        self.methods.attach(RunContext(model=adapter, engine=engine, device=device, zero_stage=zero_stage,
                                       gather=gather if gather is not None else _no_gather,
                                       exact_losses=exact_losses, rank=rank, world_size=world_size, group=group))
        self.attached = True

    def select(self, batch: dict[str, Any], ctx: MicroContext) -> tuple[dict[str, Any], Batch | None]:
        """The kept rows of a gross Hugging Face batch, and (when a method needs it) their adapter batch."""
        n = rows(batch)
        selecting = self.methods.selector is not None and self.methods.rows_for_draw(ctx.draw) > self.B
        if not selecting or n <= self.B:  # vanilla, warm-up (the first B rows of the draw), a short batch
            kept_rows = torch.arange(min(n, self.B), device=batch["input_ids"].device)
            kept = batch if kept_rows.numel() == n else take_rows(batch, kept_rows, n)
            return kept, (adapter_batch(kept, self.family) if self.needs_adapter_batch else None)
        gross = adapter_batch(batch, self.family)
        scores = self.methods.score(gross, ctx.draw)
        kept_rows = self.methods.select(gross, scores, ctx)
        self._add({"sift_scored_rows": torch.tensor(float(n)), "sift_kept_rows": torch.tensor(float(kept_rows.numel()))})
        self._add(self.methods.stats())
        kept_adapter = take_rows(gross, kept_rows, n) if self.needs_adapter_batch else None
        return take_rows(batch, kept_rows, n), kept_adapter

    def before_forward(self, batch: Batch | None, ctx: MicroContext) -> None:
        if batch is not None:
            self.methods.before_forward(batch, ctx)

    def after_backward(self, ctx: MicroContext) -> None:
        self.methods.after_backward(ctx)
        self._add(self.methods.stats())

    def after_step(self, ctx: MicroContext) -> None:
        self.methods.after_step(ctx)
        self._add(self.methods.stats())

    def _add(self, stats: dict[str, Any]) -> None:
        for k, v in stats.items():
            v = torch.as_tensor(v, dtype=torch.float64).detach()
            self._sums[k] = self._sums[k] + v.to(self._sums[k].device) if k in self._sums else v
            self._counts[k] = self._counts.get(k, 0) + 1

    def logs(self) -> dict[str, float]:
        """The methods' statistics since the last call: row counts summed, everything else averaged over
        the micro-steps (or steps) that reported it. This process's values."""
        out = {k: float(v) if k.endswith("_rows") else float(v) / self._counts[k] for k, v in self._sums.items()}
        self._sums, self._counts = {}, {}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"methods": self.methods.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.methods.load_state_dict(state.get("methods", {}))


def _no_gather(params: list[nn.Parameter]) -> Any:
    from contextlib import nullcontext

    return nullcontext()
