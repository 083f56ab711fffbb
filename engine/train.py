"""Train BERT with SIFT on prepared Arrow shards, through a DeepSpeed ZeRO engine.

One process (CPU, or one GPU):

    sift train --config configs/demo-cpu.yaml
    sift train --config configs/demo-cpu.yaml sift.exit_layer=2 train.steps=500

Many GPUs and nodes (the same file, through any launcher; see launcher/README.md):

    deepspeed --hostfile hostfile launcher/train.py --config configs/paper-bert-base.yaml
    mpirun -np 16 python launcher/train.py --config configs/paper-bert-base.yaml

Every step: draw a gross micro-batch of G = B / keep sequences per rank, score it with the early exit
(embeddings + layers 1..j + the MLM head, at the masked positions), keep the B highest-scoring rows and
back-propagate only those. Outputs land in train.out_dir: metrics.jsonl, tb/, checkpoints/, summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.atomic import atomic_write_text
from data_pipeline.loader import build_loader, eval_batches
from data_pipeline.reader import ShardDataset
from engine import checkpoint as ckpt
from engine import ds
from engine.config import ConfigError, RunConfig, load_config, to_dict
from engine.evaluate import evaluate
from engine.metrics import MetricLogger, StepAccumulator
from engine.models.bert import build_model
from engine.selection import selection_active
from engine.setup import build_engine, build_schedule
from engine.streams import PhaseTimer

log = logging.getLogger("sift.train")


class TrainingAborted(RuntimeError):
    pass


def _fault(point: str, step: int) -> bool:
    """Fault injection for the crash-safety tests: is SIFT_FAULT=<point>:<step> set?"""
    return os.environ.get("SIFT_FAULT") == f"{point}:{step}"


def _kill_if(point: str, step: int) -> None:
    if _fault(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def abort_message(streak: int, step: int, at_start: bool, root: Path, diverged: str, good: str | None) -> str:
    """Why training stopped, where its state went, and where a resume starts."""
    where = (f"the last good checkpoint is {root / good} (a resume starts there)" if good is not None
             else "there is no good checkpoint (a resume starts from scratch)")
    causes = ("the first steps of this run were already non-finite: possible causes are a corrupt checkpoint or "
              "corrupt data, or settings that overflow at once (optim.lr, deepspeed.precision)" if at_start
              else "the steps before were finite: possible causes are corrupt input data, an fp16 overflow "
                   "(try deepspeed.precision=bf16), or a learning rate too high for this model (optim.lr)")
    return (f"{streak} non-finite losses in a row at step {step}, each skipped; the diverged state is saved in "
            f"{root / diverged} for inspection (never resumed); {where}. {causes[0].upper()}{causes[1:]}.")


def check_against_data(cfg: RunConfig, meta: Any, num_layers: int) -> list[str]:
    """Problems that only show once the data and the model are known."""
    p = []
    if cfg.sift.exit_layer > num_layers:
        p.append(f"sift.exit_layer={cfg.sift.exit_layer} but the model has {num_layers} layers (1..{num_layers})")
    if cfg.train.eval_samples and cfg.train.eval_samples > meta.splits.get(cfg.data.eval_split, 0):
        p.append(
            f"train.eval_samples={cfg.train.eval_samples} but split {cfg.data.eval_split!r} of {cfg.data.path} "
            f"has {meta.splits.get(cfg.data.eval_split, 0)} rows"
        )
    return p


def run(cfg: RunConfig) -> dict[str, Any]:
    t_start = time.time()
    # ------------------------------------------------------------------ distributed
    ds.init_distributed(cfg.deepspeed.dist_backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = ds.device_for(int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.type == "cuda"
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    out_dir = Path(cfg.train.out_dir)
    ckpt_root = out_dir / "checkpoints"

    # ------------------------------------------------------------------ data
    train_set = ShardDataset.open(cfg.data.path, cfg.data.train_split, verify_checksums=cfg.data.verify_checksums)
    eval_set = ShardDataset.open(cfg.data.path, cfg.data.eval_split, verify_checksums=cfg.data.verify_checksums)
    meta = train_set.meta
    B, G, ga = cfg.train.micro_batch_size, cfg.gross_batch_size, cfg.train.grad_accum
    total = cfg.train.steps
    active = partial(selection_active, policy=cfg.sift.policy, total_steps=total,
                     warmup_steps=cfg.sift.warmup_steps, stop_fraction=cfg.sift.stop_fraction)

    def rows_for_draw(draw: int) -> int:  # pure in the draw index, so the loader can run ahead
        return G if active(draw // ga) else B

    # ------------------------------------------------------------------ model
    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    model = build_model(cfg.model, vocab_size=meta.vocab_size, seq_len=meta.seq_len,
                        pad_id=meta.special_ids["pad"], use_nsp=meta.objective == "nsp_pairs")
    problems = check_against_data(cfg, meta, model.num_layers)
    if problems:
        raise ConfigError(problems, "run config vs data/model")
    torch.manual_seed(cfg.train.seed * 1_000_003 + rank + 1)  # per-rank dropout streams

    # ------------------------------------------------------------------ deepspeed engine
    engine, stage, precision = build_engine(cfg, model, world_size=world, cuda=cuda)
    log.info("world %d, device %s, ZeRO-%d, %s; B=%d G=%d grad_accum=%d; %s selection, %s exit at layer %d, %s",
             world, device.type, stage, precision, B, G, ga, cfg.sift.policy, cfg.sift.criterion,
             cfg.sift.exit_layer, cfg.sift.schedule)

    # ------------------------------------------------------------------ resume
    c = {"step": 0, "draws": 0, "consumed_samples": 0, "backprop_samples": 0, "scored_samples": 0,
         "nonfinite_total": 0, "hours": 0.0}
    pending_scores = rng_state = None
    tag = ckpt.find_latest(ckpt_root) if cfg.train.resume else None
    if not cfg.train.resume and (ckpt_root / ckpt.LATEST).exists():
        raise ConfigError([f"train.resume=false but {out_dir} already holds checkpoints; choose a new "
                           "train.out_dir (or resume)"], "run config")
    if tag is not None:
        record = ckpt.verify(ckpt_root, tag)
        try:
            ds.load_checkpoint(engine, ckpt_root, tag)
        except Exception as e:
            raise ckpt.CheckpointError(f"checkpoint {ckpt_root / tag} could not be loaded: {e}") from e
        c.update({k: record[k] for k in c})
        mine = ckpt.load_rank_state(ckpt_root, tag, rank)
        if mine is not None and record.get("world_size") == world:
            rng_state = mine
            pending_scores = mine.get("pending_scores")
        else:
            log.warning("resuming at world size %d from %s (world size %s): dropout streams restart",
                        world, tag, record.get("world_size"))
        log.info("resumed from %s at step %d (%d samples consumed)", ckpt_root / tag, c["step"], c["consumed_samples"])

    # ------------------------------------------------------------------ the loop
    timer = PhaseTimer(cuda)
    loader = build_loader(train_set, seed=cfg.train.seed, rank=rank, world_size=world,
                          batch_size_for_draw=rows_for_draw, start_draw=c["draws"],
                          consumed_samples=c["consumed_samples"], num_workers=cfg.data.num_workers,
                          pin_memory=cuda if cfg.data.pin_memory is None else cfg.data.pin_memory,
                          mask_prob=cfg.data.mask_prob)
    schedule = build_schedule(cfg, engine, model, stage=stage, batches=iter(loader), device=device, rank=rank,
                              timer=timer)
    if pending_scores is not None:
        schedule.set_pending_scores(pending_scores.to(device))

    n_eval = cfg.train.eval_samples or len(eval_set)
    n_eval -= n_eval % (world * cfg.train.eval_batch_size)  # equal full batches on every rank
    if n_eval == 0:
        raise ConfigError([f"split {cfg.data.eval_split!r} of {cfg.data.path} has {len(eval_set)} rows, fewer than "
                           f"one batch per rank (world {world} x train.eval_batch_size {cfg.train.eval_batch_size})"],
                          "run config vs data")
    metrics = MetricLogger(out_dir, enabled=rank == 0, tensorboard=cfg.train.tensorboard,
                           progress=cfg.train.progress, total_steps=total, initial_step=c["step"])
    acc = StepAccumulator()
    hours0, t_interval, streak = c["hours"], time.time(), 0
    interval = {"backprop": 0, "scored": 0, "steps": 0}

    def hours() -> float:
        return hours0 + (time.time() - t_start) / 3600.0

    def do_eval() -> dict[str, Any]:
        batches = eval_batches(eval_set, seed=cfg.train.seed, rank=rank, world_size=world,
                               batch_size=cfg.train.eval_batch_size, num_samples=n_eval, mask_prob=cfg.data.mask_prob)
        result = evaluate(engine, batches, device)
        record = {"event": "eval", "step": c["step"], "backprop_samples": c["backprop_samples"],
                  "hours": hours(), **result}
        metrics.write(record)
        log.info("step %d: val mlm acc %.4f, loss %.4f%s", c["step"], result["val_mlm_acc"], result["val_mlm_loss"],
                 f", nsp acc {result['val_nsp_acc']:.4f}" if "val_nsp_acc" in result else "")
        return record

    def save(tag: str | None = None) -> None:
        tag = tag or ckpt.tag_for(c["step"])
        ds.save_checkpoint(engine, ckpt_root, tag)
        _kill_if("during_save", c["step"])
        pending = schedule.pending_scores
        ckpt.save_rank_state(ckpt_root, tag, rank, {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if cuda else None,
            "pending_scores": None if pending is None else pending.cpu(),
        })
        ds.barrier()
        if rank == 0:
            state = {**c, "hours": hours(), "world_size": world, "config": to_dict(cfg),
                     "model_config": model.config.to_dict(), "objective": meta.objective,
                     "tokenizer": train_set.tokenizer_path()}
            ckpt.mark_complete(ckpt_root, tag, state, cfg.train.keep_last)
        ds.barrier()
        log.info("saved checkpoint %s", ckpt_root / tag)
        _kill_if("after_save", c["step"])

    if rng_state is not None:  # last, after everything that might draw from it (DataLoader iterators do)
        torch.set_rng_state(rng_state["torch_rng"])
        if cuda and rng_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rng_state["cuda_rng"])
    last_eval = None
    draws0 = c["draws"]  # where this process started (for the abort message)
    while c["step"] < total:
        if _fault("poison_weights", c["step"]):  # diverged weights: every loss from here on is NaN
            with torch.no_grad():
                model.hf.bert.embeddings.LayerNorm.weight.fill_(float("nan"))
        first_micro = c["draws"] % ga == 0
        fidelity = bool(cfg.sift.fidelity_every) and first_micro and c["step"] % cfg.sift.fidelity_every == 0
        rows = rows_for_draw(c["draws"])
        mo = schedule.micro_step(c["draws"], fidelity=fidelity)
        c["draws"] += 1
        c["consumed_samples"] += world * rows
        acc.add(mo)
        if not mo.finite:
            c["nonfinite_total"] += 1
            streak += 1
            log.warning("non-finite loss at step %d (draw %d): skipped (%d in a row)", c["step"], c["draws"] - 1, streak)
            if streak >= cfg.train.max_nonfinite:
                # Never under a resumable name: the good checkpoints, latest and keep_last stay as they were.
                save(ckpt.diverged_tag(c["step"]))
                raise TrainingAborted(abort_message(streak, c["step"], c["draws"] - streak == draws0, ckpt_root,
                                                    ckpt.diverged_tag(c["step"]), ckpt.last_good(ckpt_root)))
            continue
        streak = 0
        c["backprop_samples"] += world * mo.rows_trained
        c["scored_samples"] += world * mo.rows_scored
        interval["backprop"] += world * mo.rows_trained
        interval["scored"] += world * mo.rows_scored
        if not mo.stepped:
            continue
        c["step"] += 1
        interval["steps"] += 1
        step = c["step"]

        if step % cfg.train.log_every == 0 or step == total:
            now = time.time()
            dt = max(now - t_interval, 1e-9)
            stats = acc.flush()
            phases = timer.flush()
            record = {
                "step": step, "lr": engine.get_lr()[0], **stats,
                "backprop_seq_per_s": interval["backprop"] / dt,
                "gross_seq_per_s": interval["scored"] / dt,
                "tokens_per_s": interval["backprop"] * meta.seq_len / dt,
                "backprop_samples": c["backprop_samples"], "scored_samples": c["scored_samples"],
                "hours": hours(), "selecting": rows > B,
                **{f"time_{k}": v / interval["steps"] for k, v in phases.items()},
            }
            metrics.write(record)
            metrics.progress(step, {"loss": stats.get("loss", float("nan")), "seq/s": record["backprop_seq_per_s"]})
            t_interval, interval = now, {"backprop": 0, "scored": 0, "steps": 0}
        if step % cfg.train.eval_every == 0 or step == total:
            last_eval = do_eval()
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == total:
            save()

    if last_eval is None:
        last_eval = do_eval()
    summary = {"steps": c["step"], "backprop_samples": c["backprop_samples"], "scored_samples": c["scored_samples"],
               "nonfinite_skipped": c["nonfinite_total"], "hours": hours(), "final_eval": last_eval,
               "out_dir": str(out_dir)}
    if rank == 0:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    metrics.close()
    return summary


# ---------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sift train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="run config YAML (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 sift.policy=random")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry for launcher/train.py (which resolves ranks first). Returns a process exit code."""
    from data_pipeline.errors import DataError
    from engine.ds_config import DSConfigError
    from engine.models.bert import ModelError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)  # replace a handler an earlier command (sift demo: prepare) set
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(json.dumps(to_dict(cfg), indent=1))
            return 0
        summary = run(cfg)
    except (ConfigError, DataError, ModelError, DSConfigError, ckpt.CheckpointError,
            ds.DistributedInitError, TrainingAborted) as e:
        print(f"sift train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        ev = summary["final_eval"]
        print(f"done: {summary['steps']} steps, {summary['backprop_samples']} back-propagated samples, "
              f"val MLM accuracy {ev['val_mlm_acc']:.4f}; results in {summary['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
