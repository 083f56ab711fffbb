"""What `sift train` checks before torch, DeepSpeed or a model start: its arguments, the config, and
the datasets it names (their index.json only), so that a mistake fails in seconds with its fix.

launcher/train.py calls ``load_run`` before it imports engine/train.py.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.index import read_index
from engine.config import ConfigError, RunConfig, load_config
from sift_common.logs import setup_logging

DESCRIPTION = "Train a model with a sample-selection method on prepared Arrow shards, through a DeepSpeed ZeRO engine."


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sift train", description=DESCRIPTION)
    p.add_argument("--config", help="run config: a YAML path, or the name of a shipped one (e.g. demo-cpu)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="resume although KEY differs from the run recorded in train.out_dir (repeatable)")
    p.add_argument("--branch-from", metavar="CHECKPOINT",
                   help="start a new run in train.out_dir from this checkpoint (a checkpoint directory, or a run "
                        "directory: its latest), with this command's config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 sift.policy=random")
    return p.parse_intermixed_args(argv)


def check_data(cfg: RunConfig, world_size: int = 1) -> None:
    """The run's datasets exist, are complete, and have the splits it reads with enough rows; one
    ConfigError naming each key and its fix."""
    d, t = cfg.data, cfg.train
    problems = []
    for key, path in [("data.path", d.path), *((f"data.extra_eval.{n}", p) for n, p in d.extra_eval.items())]:
        try:
            meta, _ = read_index(path)
        except DataError as e:
            fix = "" if Path(path).exists() else (f"; write one with `sift prepare <text files> --out {path}` (`sift "
                                                  f"demo` prepares its corpus into runs/demo/data), or set {key}")
            problems.append(f"{key}: {e}{fix}")
            continue
        wanted = [d.train_split, d.eval_split] if key == "data.path" else [d.eval_split]
        for split in dict.fromkeys(wanted):
            evaluating = split == d.eval_split
            rows = meta.splits.get(split, 0)
            if split not in meta.splits:
                has = f"it has no split {split!r} (splits: {', '.join(meta.splits) or 'none'})"
            elif evaluating and rows < world_size * t.eval_batch_size:
                has = (f"its split {split!r} has {rows} rows, fewer than one evaluation batch per rank (world "
                       f"{world_size} x train.eval_batch_size {t.eval_batch_size})")
            elif not rows:
                has = f"its split {split!r} is empty"
            elif evaluating and key == "data.path" and t.eval_samples > rows:
                problems.append(f"train.eval_samples={t.eval_samples} but split {split!r} of {path} has {rows} rows; "
                                f"set train.eval_samples to {rows} or fewer (0: the whole split)")
                continue
            else:
                continue
            fix = ("every run evaluates (every train.eval_every steps and at the end): prepare it again with a "
                   "larger held-out part (`sift prepare ... --val-fraction 0.05`), or set data.eval_split to a "
                   "split it has" if evaluating else "prepare it from more text, or set data.train_split")
            problems.append(f"{key}: {path}: {has}; {fix}")
    if problems:
        raise ConfigError(problems, "run config vs data")


def load_run(argv: list[str]) -> tuple[argparse.Namespace, RunConfig]:
    """Arguments -> (args, the validated config), its data checked unless only the config is printed."""
    args = parse_args(argv)
    setup_logging(rank=int(os.environ.get("RANK", "0")))
    cfg = load_config(args.config, args.overrides)
    if not args.print_config:
        check_data(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return args, cfg

