"""DeepSpeed JSON configs: read, then fill the "auto" fields from the run config (pure dict code).

As in the Hugging Face DeepSpeed integration, the JSON in ``ds_configs/`` says "auto" wherever the run
decides (batch sizes, clipping, precision, ZeRO bucket sizes). An explicit value that disagrees with
the run is an error, never silently overridden: `train_micro_batch_size_per_gpu` must be the
back-propagated B, not the gross G that SIFT scores.

Two DeepSpeed defaults that cost every step are switched off unless the JSON sets them (DeepSpeed
0.19.8): the throughput timer (`timers.throughput`), which calls a device-wide synchronize at every
forward start and every step end when no training_data is passed to deepspeed.initialize (we never
pass it), and bf16 `check_grad_overflow`, which in ZeRO 1/2 tests every gradient for inf/NaN and reads
the all-reduced flag to the host before each optimizer step (the schedules already skip a micro-batch
whose loss is non-finite on any rank, before its backward). ZeRO bucket sizes given as "auto" are
sized from the model's parameter count and the world size (`bucket_sizes`).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import ConfigError

AUTO = "auto"


class DSConfigError(ConfigError):
    """A DeepSpeed JSON that cannot be used with this run; lists every problem."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFacts:
    """What the run decides, for filling a DeepSpeed config."""

    micro_batch_size: int
    grad_accum: int
    world_size: int
    grad_clip: float
    precision: str  # "fp32" | "bf16" | "fp16" (already resolved from "auto")
    num_params: int | None = None
    """sum(p.numel()) of the model: sizes the "auto" ZeRO buckets (`bucket_sizes`)."""
    zero_stage: int | None = None  # run-config override of zero_optimization.stage


# "auto" ZeRO buckets: a handful per step, so that the first gradient reduction starts after about a sixth
# of the backward and overlaps the rest (one bucket overlaps nothing; hidden^2 elements make ~150 small
# reductions per BERT-base backward, tests/unit/test_ds_config.py), bounded below so that collectives are
# not dominated by their latency and above by DeepSpeed's own default. The floors are rules of thumb for
# NCCL, not measured here.
REDUCE_BUCKETS = 6
MIN_BUCKET = 1 << 22
"""Elements (8 MiB in bf16) of the smallest bucket."""
MIN_BUCKET_PER_RANK = 1 << 19
"""Elements each rank's share of a reduce-scatter / all-gather should hold (1 MiB in bf16)."""
MAX_BUCKET = 500_000_000
PERSISTENCE_RANGE = (10_000, 100_000)
"""ZeRO-3 keeps parameters smaller than num_params / 10^4 (clamped to this range) whole on every rank:
every bias and LayerNorm vector of a BERT/GPT-style model, no weight matrix."""


SIZED_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
              "stage3_param_persistence_threshold")


def bucket_sizes(num_params: int, world_size: int) -> dict[str, int]:
    """The "auto" ZeRO bucket sizes, in elements, for a model of ``num_params`` on ``world_size`` ranks."""
    floor = max(MIN_BUCKET, MIN_BUCKET_PER_RANK * world_size)
    bucket = min(MAX_BUCKET, max(floor, math.ceil(num_params / REDUCE_BUCKETS)))
    lo, hi = PERSISTENCE_RANGE
    return {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": bucket,
        "stage3_param_persistence_threshold": min(hi, max(lo, num_params // 10_000)),
    }


def load_json(path: str | Path) -> dict[str, Any]:
    from engine.resources import resolve

    p = resolve(path, "ds_configs")
    try:
        text = p.read_text()
    except OSError as e:
        raise DSConfigError([f"cannot read it: {e.strerror}"], str(p)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DSConfigError([f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"], str(p)) from None
    if not isinstance(data, dict):
        raise DSConfigError(["the top level must be a JSON object"], str(p))
    return data


def _fill(node: dict[str, Any], key: str, value: Any, where: str, problems: list[str], why: str) -> None:
    current = node.get(key, AUTO)
    if current == AUTO:
        node[key] = value
    elif current != value:
        problems.append(f"{where}{key} is {current!r} but the run needs {value!r} ({why}); set it to \"auto\"")


def fill(template: dict[str, Any], run: RunFacts, source: str = "deepspeed config") -> dict[str, Any]:
    """A complete DeepSpeed config dict; raises DSConfigError listing every conflict."""
    cfg = copy.deepcopy(template)
    problems: list[str] = []
    for block in ("optimizer", "scheduler"):
        if block in cfg:
            problems.append(
                f"{block!r} block: SIFT-Train builds AdamW and its warm-up/decay schedule itself; "
                f"set them under optim.* in the run config and remove {block!r} from the JSON"
            )
    B, ga = run.micro_batch_size, run.grad_accum
    _fill(cfg, "train_micro_batch_size_per_gpu", B, "", problems, "train.micro_batch_size: the back-propagated B")
    _fill(cfg, "gradient_accumulation_steps", ga, "", problems, "train.grad_accum")
    _fill(cfg, "train_batch_size", B * ga * run.world_size, "", problems, "B x grad_accum x world size")
    _fill(cfg, "gradient_clipping", run.grad_clip, "", problems, "optim.grad_clip")

    for name in ("bf16", "fp16"):
        block = cfg.setdefault(name, {"enabled": AUTO})
        if not isinstance(block, dict):
            problems.append(f"{name}: expected an object")
            continue
        _fill(block, "enabled", run.precision == name, f"{name}.", problems, f"deepspeed.precision={run.precision}")

    # Per-step overhead DeepSpeed adds by default (module docstring); an explicit setting is kept.
    timers = cfg.setdefault("timers", {})
    if isinstance(timers, dict):
        throughput = timers.setdefault("throughput", {})
        if isinstance(throughput, dict):
            throughput.setdefault("enabled", False)
    if isinstance(cfg["bf16"], dict):
        cfg["bf16"].setdefault("check_grad_overflow", False)

    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if run.zero_stage is not None:
        zero["stage"] = run.zero_stage
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if zero.get("overlap_comm") == AUTO:  # reduce during the backward; one rank has nothing to overlap and
        zero["overlap_comm"] = run.world_size > 1  # would pay for the bucket copies (docs/architecture.md)
    auto_sizes = [k for k in SIZED_KEYS if zero.get(k) == AUTO]
    if auto_sizes:
        if run.num_params is not None:
            zero.update({k: bucket_sizes(run.num_params, run.world_size)[k] for k in auto_sizes})
        else:
            problems.append(f"zero_optimization: {', '.join(auto_sizes)} are \"auto\" but the run gave no "
                            "parameter count to size them from")
            for k in auto_sizes:  # reported once, here
                del zero[k]

    def leftover(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                leftover(v, f"{path}{k}.")
        elif node == AUTO:
            problems.append(f"{path[:-1]}: \"auto\" is not supported here; give a value")

    leftover(cfg, "")
    if problems:
        raise DSConfigError(problems, source)
    return cfg


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
