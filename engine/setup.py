"""Builders shared by the training loop and the benchmarks: engine, methods, schedule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from data_pipeline.batch import Batch
from engine import ds
from engine.config import RunConfig
from engine.ds_config import RunFacts, fill, load_json
from engine.methods import MethodStack, RunContext, build_methods
from engine.models.base import SiftModel
from engine.optim import build_optimizer
from engine.schedule import PipelinedSchedule, Schedule, SerialSchedule
from engine.scoring import eval_mode
from engine.streams import DevicePrefetcher, PhaseTimer, Streams


def resolve_precision(cfg: RunConfig, template: dict[str, Any], cuda: bool) -> str:
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    for name in ("bf16", "fp16"):  # an explicit "enabled": true in the JSON decides
        if template.get(name, {}).get("enabled") is True:
            return name
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def build_engine(cfg: RunConfig, model: SiftModel, *, world_size: int, cuda: bool,
                 load_universal: bool = False) -> tuple[Any, int, str]:
    """AdamW + schedule + the filled DeepSpeed config -> (engine, ZeRO stage, precision). ``load_universal``:
    the engine will load a universal checkpoint (a resume at another world size, engine/reshard.py)."""
    if cfg.train.compile:
        for block in model.blocks():  # per block: the scorer reuses the first j of them
            block.compile(dynamic=False)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.steps, cuda)
    template = load_json(cfg.deepspeed.config)
    precision = resolve_precision(cfg, template, cuda)
    facts = RunFacts(micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                     world_size=world_size, grad_clip=cfg.optim.grad_clip, precision=precision,
                     num_params=sum(p.numel() for p in model.parameters()), zero_stage=cfg.deepspeed.zero_stage)
    config = fill(template, facts, cfg.deepspeed.config)
    if load_universal:  # read only by DeepSpeed's load_checkpoint
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    engine = ds.initialize(model, optimizer, scheduler, config)
    return engine, ds.zero_stage(engine), precision


def prepare_methods(cfg: RunConfig, model: SiftModel) -> MethodStack:
    """The run's methods, checked against the model and given the chance to change it before the engine
    wraps it; ConfigError listing the problems."""
    from engine.config import ConfigError

    methods = build_methods(cfg)
    problems = methods.check(model)
    if problems:
        raise ConfigError(problems, "run config vs model")
    methods.prepare_model(model)
    return methods


def attach_methods(methods: MethodStack, model: SiftModel, engine: Any, *, stage: int, device: torch.device,
                   rank: int, world_size: int) -> None:
    def exact_losses(batch: Batch) -> torch.Tensor:
        with torch.no_grad(), eval_mode([engine.module]):
            return engine(**batch)["per_seq_loss"]

    methods.attach(RunContext(model=model, engine=engine, device=device, zero_stage=stage, gather=ds.gathered,
                              exact_losses=exact_losses, rank=rank, world_size=world_size))


def build_schedule(cfg: RunConfig, engine: Any, methods: MethodStack, *, batches: Iterator[Batch],
                   device: torch.device, rank: int, world_size: int, timer: PhaseTimer) -> Schedule:
    """The serial or pipelined schedule over host batches (moved to the device on a copy stream)."""
    streams = Streams(device)
    pipelined = cfg.sift.schedule == "pipelined" and methods.selector is not None
    cls = PipelinedSchedule if pipelined else SerialSchedule
    return cls(engine, methods, rank=rank, world_size=world_size, grad_accum=cfg.train.grad_accum,
               prefetcher=DevicePrefetcher(batches, device, streams), streams=streams, timer=timer,
               skip_nonfinite=cfg.train.nonfinite == "skip")
