"""A study run's probe, on its latest checkpoint once it has trained: which kinds of rows its selection
keeps (the engine does not log which rows it keeps).

    python -m study.probe --run DIR --select loss:1 \\
        --kind original=DATA_A:0.6 --kind duplicate=DATA_B:0.4

* ``--select CRITERION:EXIT`` (repeatable) with ``--kind NAME=DIR:SHARE``: score ``--rows`` training rows
  of each kind (a dataset per kind, prepared like the study's) with that early exit and with the full
  model, then draw ``--batches`` gross batches of G rows, each row of kind k with probability SHARE_k,
  and count the kinds among the B rows top-k keeps (by the exit's score, and by the exact loss). This is
  the share of each kind a selecting arm back-propagates at these weights; vanilla and random keep the
  drawn shares.
* ``--train CONFIG``: first train that run config (as `sift train --config CONFIG`) in this process, and
  probe only if it succeeds: the study's jobs do both in one process, which saves a start-up per run.

Writes DIR/probe.json: {"step", "kept": {"loss:1": {"exit": {kind: share}, "exact": {...},
"drawn": {...}}}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engine.run_model import load_run_model
from sift_common.logs import setup_logging
from study.sources import batches, kept_shares, source_scores
from study.spec import StudyError

log = logging.getLogger("sift.study.probe")


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise StudyError(f"{what} {text!r}: expected NAME=VALUE")
    return name, value


def probe(run_dir: Path, selects: list[str], kinds: dict[str, tuple[Path, float]], rows: int,
          n_batches: int) -> dict[str, Any]:
    cfg, model = load_run_model(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    result: dict[str, Any] = {"step": summary.get("steps"), "kept": {}}
    if selects and kinds:
        parts = {k: batches(d, "train", rows) for k, (d, _) in kinds.items()}
        weights = {k: w for k, (_, w) in kinds.items()}
        G, B = cfg.sift.gross_batch(cfg.train.micro_batch_size), cfg.train.micro_batch_size
        for sel in selects:
            criterion, _, exit_layer = sel.partition(":")
            scores = source_scores(model, parts, criterion, int(exit_layer))
            entry: dict[str, Any] = {"drawn": {k: w / sum(weights.values()) for k, w in weights.items()},
                                     "rows_scored": {k: len(v["exit"]) for k, v in scores.items()},
                                     "mean_exit_score": {k: float(v["exit"].mean()) for k, v in scores.items()},
                                     "mean_exact_loss": {k: float(v["exact"].mean()) for k, v in scores.items()}}
            for which in ("exit", "exact"):
                rng = np.random.default_rng([cfg.train.seed, 0x9B0BE])  # the same draws for both
                entry[which] = kept_shares({k: v[which] for k, v in scores.items()}, weights, gross=G, keep=B,
                                           batches_=n_batches, rng=rng)
            result["kept"][sel] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a run directory with a checkpoint and config.yaml")
    p.add_argument("--select", action="append", default=[], help="CRITERION:EXIT to probe (repeatable)")
    p.add_argument("--kind", action="append", default=[], help="NAME=DIR:SHARE, a dataset of one kind of rows")
    p.add_argument("--rows", type=int, default=256, help="training rows scored per kind")
    p.add_argument("--batches", type=int, default=2000, help="simulated gross batches")
    p.add_argument("--train", type=Path, help="train this run config first (in this process)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.train is not None:
        import os

        from engine import ds
        from engine.train import main as train_main

        ds.one_process_env(os.environ)  # a study job is its own one-process world (study/jobs.py child_env)
        code = train_main(["--config", str(args.train)])
        if code:
            return code
    setup_logging()
    kinds = {}
    for item in args.kind:
        name, value = _pair(item, "--kind")
        path, _, share = value.rpartition(":")
        kinds[name] = (Path(path), float(share))
    result = probe(args.run, args.select, kinds, args.rows, args.batches)
    tmp = args.run / "probe.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.run / "probe.json")
    log.info("probe of %s: %s", args.run, json.dumps(result)[:400])
    return 0


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("study.probe", main, sys.argv[1:]))
