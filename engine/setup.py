"""Builders shared by the training loop and the benchmarks: engine, scorer, schedule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from data_pipeline.batch import Batch
from engine import ds
from engine.config import RunConfig
from engine.ds_config import RunFacts, fill, load_json
from engine.models.bert import SiftBert
from engine.optim import build_optimizer
from engine.schedule import PipelinedSchedule, Schedule, Scorer, SerialSchedule
from engine.streams import DevicePrefetcher, PhaseTimer, Streams


def resolve_precision(cfg: RunConfig, template: dict[str, Any], cuda: bool) -> str:
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    for name in ("bf16", "fp16"):  # an explicit "enabled": true in the JSON decides
        if template.get(name, {}).get("enabled") is True:
            return name
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def build_engine(cfg: RunConfig, model: SiftBert, *, world_size: int, cuda: bool) -> tuple[Any, int, str]:
    """AdamW + schedule + the filled DeepSpeed config -> (engine, ZeRO stage, precision)."""
    if cfg.train.compile:
        for layer in model.hf.bert.encoder.layer:  # per layer: the scorer reuses the first j of them
            layer.compile(dynamic=False)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.steps, cuda)
    template = load_json(cfg.deepspeed.config)
    precision = resolve_precision(cfg, template, cuda)
    facts = RunFacts(micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                     world_size=world_size, grad_clip=cfg.optim.grad_clip, precision=precision,
                     hidden_size=model.config.hidden_size, zero_stage=cfg.deepspeed.zero_stage)
    engine = ds.initialize(model, optimizer, scheduler, fill(template, facts, cfg.deepspeed.config))
    return engine, ds.zero_stage(engine), precision


def build_schedule(cfg: RunConfig, engine: Any, model: SiftBert, *, stage: int, batches: Iterator[Batch],
                   device: torch.device, rank: int, timer: PhaseTimer) -> Schedule:
    """The serial or pipelined schedule over host batches (moved to the device on a copy stream)."""
    scorer = None
    if cfg.sift.policy != "none":
        gather = ds.gathered if stage == 3 else None
        scorer = Scorer(model, cfg.sift.exit_layer, cfg.sift.criterion, device=device, gather=gather)
    streams = Streams(device)
    cls = PipelinedSchedule if cfg.sift.schedule == "pipelined" and scorer is not None else SerialSchedule
    return cls(engine, scorer, policy=cfg.sift.policy, micro_batch_size=cfg.train.micro_batch_size,
               seed=cfg.train.seed, rank=rank, prefetcher=DevicePrefetcher(batches, device, streams),
               streams=streams, timer=timer)
