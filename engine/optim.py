"""AdamW with BERT's weight-decay exclusions and the paper's warm-up + linear-decay schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (as BERT); each parameter exactly once."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return math.ceil(cfg.warmup_fraction * total_steps)


def lr_factor(step: int, *, total_steps: int, warmup: int, decay: str) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warm-up, then linear decay to 0
    at ``total_steps`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def schedule_horizon(cfg: OptimConfig, train_steps: int) -> int:
    """The step at which the schedule reaches its end: optim.schedule_steps, or the run's train.steps."""
    return cfg.schedule_steps if cfg.schedule_steps is not None else train_steps


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int, cuda: bool):
    """AdamW and its LambdaLR schedule over ``schedule_horizon(cfg, total_steps)`` steps (``total_steps``:
    the run's train.steps)."""
    total_steps = schedule_horizon(cfg, total_steps)
    fused = cfg.fused if cfg.fused is not None else cuda
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None
    )
    warm = warmup_steps(cfg, total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps=total_steps, warmup=warm, decay=cfg.decay)
    )
    return optimizer, schedule


def set_peak_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """After loading a checkpoint: the peak lr is ``lr`` (the config's; the checkpoint restored its own)
    and the current one its schedule's value at the restored step (the factors come from the config)."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    values = [lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, value in zip(scheduler.optimizer.param_groups, values, strict=True):
        group["lr"] = value
    scheduler._last_lr = values
