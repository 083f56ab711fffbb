"""DeepSpeed JSON configs: read, then fill the "auto" fields from the run config (pure dict code).

As in the Hugging Face DeepSpeed integration, the JSON in ``ds_configs/`` says "auto" wherever the run
decides (batch sizes, clipping, precision, ZeRO bucket sizes). An explicit value that disagrees with
the run is an error, never silently overridden: `train_micro_batch_size_per_gpu` must be the
back-propagated B, not the gross G that SIFT scores.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import ConfigError

AUTO = "auto"


class DSConfigError(ConfigError):
    """A DeepSpeed JSON that cannot be used with this run; lists every problem."""


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the run decides, for filling a DeepSpeed config."""

    micro_batch_size: int
    grad_accum: int
    world_size: int
    grad_clip: float
    precision: str  # "fp32" | "bf16" | "fp16" (already resolved from "auto")
    hidden_size: int
    zero_stage: int | None = None  # run-config override of zero_optimization.stage


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

    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if run.zero_stage is not None:
        zero["stage"] = run.zero_stage
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    h = run.hidden_size
    # Bucket sizes scale with the model, as the Hugging Face integration sets them.
    sizes = {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
    }
    for key, value in sizes.items():
        if zero.get(key) == AUTO:
            zero[key] = value

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
