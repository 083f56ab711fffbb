"""A study run's probe, on its latest checkpoint once it has trained: which kinds of rows its selection
keeps, and how much of the loss each kind carries (the engine does not log which rows it keeps).

    python -m study.probe --run DIR --select loss:1 --select stratified-loss:1@q=0.75 \\
        --kind original=DATA_A:0.6 --kind duplicate=DATA_B:0.4 [--reference REF]

* ``--select KEY`` (repeatable; ``study.spec.Selection.key``: ``CRITERION:EXIT`` for top-k,
  ``stratified-CRITERION:EXIT@q=Q``, ``importance-CRITERION:EXIT@t=T,u=U``) with ``--kind NAME=DIR:SHARE``:
  score ``--rows`` training rows of each kind (a dataset per kind, prepared like the study's) with that
  early exit and with the full model, then draw ``--batches`` gross batches of G rows, each row of kind k
  with probability SHARE_k, and let the arm's own policy (engine/selection.py, bound as the engine binds
  it, with the engine's keyed generator for draw b) keep B of them, by the exit's score and by the exact
  loss. Two shares per kind, means over the batches: ``rows``, of the B kept rows; ``weight``, of the kept
  rows' loss weights (sum of w_i over the kind / sum of w_i: what the gradient sees of each kind, when
  rows carry equal numbers of target tokens; top-k's weights are all 1, so it equals ``rows``). Vanilla
  and random keep the drawn shares.
* criterion ``reducible``: the exit's (and the full model's) loss minus the reference's on the same
  targets; the reference is ``--reference`` or the run's own ``sift.reference``, run online on the kind
  samples (they are not rows of the training split, so a sidecar cannot score them).
* ``--train CONFIG``: first train that run config (as `sift train --config CONFIG`) in this process, and
  probe only if it succeeds: the study's jobs do both in one process, which saves a start-up per run.

Writes DIR/probe.json: {"step", "kept": {KEY: {"policy", "drawn": {kind: share}, "exit": {...}, "exact":
{...}, "exit_weight": {...}, "exact_weight": {...}, ...}}}. Selections already in an existing probe.json
of the same step are kept as they are, and only the missing ones are computed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sift_common.logs import setup_logging
from study.draws import gross_batches
from study.spec import Selection, StudyError, parse_selection

log = logging.getLogger("sift.study.probe")
PROBE_SEED = 0x9B0BE  # the probe's draws: the batches' kinds and rows, and the policies' generators


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise StudyError(f"{what} {text!r}: expected NAME=VALUE")
    return name, value


def policy_shares(scores: dict[str, np.ndarray], weights: dict[str, float], selection: Selection, *, gross: int,
                  keep: int, batches_: int, rng: np.random.Generator, seed: int) -> dict[str, dict[str, float]]:
    """{"rows": {kind: share of the kept rows}, "weight": {kind: share of the kept rows' loss weights}},
    each the mean over ``batches_`` gross batches of ``gross`` rows, each row drawn from kind k with
    probability ``weights[k]`` (then uniformly within it), of which ``selection``'s policy keeps ``keep``:
    the engine's own policy function (``configured_policy``) and, for the policies that draw, its
    generator keyed on (``seed``, batch, rank 0) (``selection_generator``), as Sift.select calls them."""
    import torch

    from engine.methods.sift import configured_policy
    from engine.methods.sift_config import SiftConfig
    from engine.selection import selection_generator

    policy = configured_policy(SiftConfig(policy=selection.policy, criterion=selection.criterion,
                                          exit_layer=selection.exit_layer,
                                          threshold_quantile=selection.threshold_quantile,
                                          temperature=selection.temperature, uniform_mix=selection.uniform_mix))
    names = sorted(scores)
    rows, weight = np.zeros(len(names)), np.zeros(len(names))
    draws = gross_batches(scores, weights, gross=gross, batches_=batches_, rng=rng)
    for b, (src, _, vals) in enumerate(draws):
        gen = None if selection.policy == "topk" else selection_generator(seed, b, 0)
        r, w = batch_shares(policy(torch.tensor(vals, dtype=torch.float32), keep, gen), src, len(names))
        rows, weight = rows + r, weight + w
    return {"rows": {k: float(v / batches_) for k, v in zip(names, rows)},
            "weight": {k: float(v / batches_) for k, v in zip(names, weight)}}


def batch_shares(kept: Any, kinds: np.ndarray, n_kinds: int) -> tuple[np.ndarray, np.ndarray]:
    """One gross batch: (each kind's share of the kept rows, its share of their loss weights), from a
    policy's result (kept row indices, or a ``Kept`` with weights) and the kind (0..n_kinds-1) of every
    row of the batch."""
    from engine.selection import Kept

    idx, w = (kept.indices, kept.weights.double().numpy()) if isinstance(kept, Kept) else (kept, None)
    kept_kinds = kinds[idx.numpy()]
    w = np.ones(len(kept_kinds)) if w is None else w
    return (np.bincount(kept_kinds, minlength=n_kinds) / len(kept_kinds),
            np.bincount(kept_kinds, weights=w, minlength=n_kinds) / w.sum())


def open_reference(path: str | Path, cfg: Any) -> Any:
    """The reference model at ``path`` (checked against the run's data and tokenizer), run online."""
    import torch

    from data_pipeline.reader import ShardDataset
    from engine.reference import OnlineReference, data_facts, load_reference

    data = ShardDataset.open(cfg.data.path, cfg.data.eval_split)
    with torch.random.fork_rng(devices=[]):
        model = load_reference(path, data_facts(data.meta), cfg.data.path, data.tokenizer_path())
    return OnlineReference(model, data.meta.seq_len)


def probe(run_dir: Path, selects: list[str], kinds: dict[str, tuple[Path, float]], rows: int,
          n_batches: int, reference: Path | None = None, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's probe.json content; the selections ``earlier`` (a probe.json of the same step) holds are
    copied, the others computed."""
    from engine.run_model import load_run_model
    from study.sources import batches, source_scores

    cfg, model = load_run_model(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    result: dict[str, Any] = {"step": summary.get("steps"), "kept": {}}
    if earlier and earlier.get("step") == result["step"]:
        result["kept"] = {k: v for k, v in earlier.get("kept", {}).items()}
    todo = [parse_selection(s) for s in selects if s not in result["kept"]]
    if not todo or not kinds:
        return result
    parts = {k: batches(d, "train", rows) for k, (d, _) in kinds.items()}
    weights = {k: w for k, (_, w) in kinds.items()}
    G, B = cfg.sift.gross_batch(cfg.train.micro_batch_size), cfg.train.micro_batch_size
    ref, scored = None, {}
    for sel in todo:
        if sel.criterion == "reducible" and ref is None:
            where = reference or cfg.sift.reference
            if where is None:
                raise StudyError(f"probe of {run_dir}: {sel.key} scores by reducible loss, but neither --reference "
                                 "nor the run's sift.reference names a reference model")
            ref = open_reference(where, cfg)
        if (sel.criterion, sel.exit_layer) not in scored:  # shared by the policies of one criterion and exit
            scored[sel.criterion, sel.exit_layer] = source_scores(model, parts, sel.criterion, sel.exit_layer,
                                                                ref if sel.criterion == "reducible" else None)
        scores = scored[sel.criterion, sel.exit_layer]
        entry: dict[str, Any] = {"policy": sel.policy,
                                 "drawn": {k: w / sum(weights.values()) for k, w in weights.items()},
                                 "rows_scored": {k: len(v["exit"]) for k, v in scores.items()},
                                 "mean_exit_score": {k: float(v["exit"].mean()) for k, v in scores.items()},
                                 "mean_exact_loss": {k: float(v["exact"].mean()) for k, v in scores.items()}}
        for which in ("exit", "exact"):
            rng = np.random.default_rng([cfg.train.seed, PROBE_SEED])  # the same batches for both
            shares = policy_shares({k: v[which] for k, v in scores.items()}, weights, sel, gross=G, keep=B,
                                   batches_=n_batches, rng=rng, seed=PROBE_SEED)
            entry[which], entry[f"{which}_weight"] = shares["rows"], shares["weight"]
        result["kept"][sel.key] = entry
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m study.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a run directory with a checkpoint and config.yaml")
    p.add_argument("--select", action="append", default=[], help="a selection key to probe (repeatable)")
    p.add_argument("--kind", action="append", default=[], help="NAME=DIR:SHARE, a dataset of one kind of rows")
    p.add_argument("--reference", type=Path, help="the reference model of reducible selections (default: the "
                   "run's sift.reference)")
    p.add_argument("--rows", type=int, default=256, help="training rows scored per kind")
    p.add_argument("--batches", type=int, default=2000, help="simulated gross batches")
    p.add_argument("--train", type=Path, help="train this run config first (in this process)")
    return p.parse_args(argv)


def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Probe ``args.run`` and write its probe.json (atomically); returns it."""
    kinds = {}
    for item in args.kind:
        name, value = _pair(item, "--kind")
        path, _, share = value.rpartition(":")
        kinds[name] = (Path(path), float(share))
    path = args.run / "probe.json"
    earlier = None
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            log.warning("%s is unreadable; probing every selection again", path)
    result = probe(args.run, args.select, kinds, args.rows, args.batches, args.reference, earlier)
    tmp = args.run / "probe.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    log.info("probe of %s: %s", args.run, json.dumps(result)[:400])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.train is not None:
        import os

        from engine import ds
        from engine.train import main as train_main

        ds.one_process_env(os.environ)  # a study job is its own one-process world (study/jobs.py child_env)
        code = train_main(["--config", str(args.train)])
        if code:
            return code
    setup_logging()
    run_probe(args)
    return 0


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("study.probe", main, sys.argv[1:]))
