"""Train a model with a sample-selection method on prepared Arrow shards, through a DeepSpeed ZeRO engine.

One process (CPU, or one GPU):

    sift train --config demo-cpu
    sift train --config configs/demo-cpu.yaml sift.exit_layer=2 train.steps=500 train.out_dir=runs/exit2

Many GPUs and nodes (the same entry point, through any launcher; see launcher/README.md):

    deepspeed --hostfile hostfile launcher/train.py --config configs/paper-bert-base.yaml
    mpirun -np 16 python launcher/train.py --config configs/paper-bert-base.yaml

Every micro-step: the methods say how many rows to draw (SIFT: G = B / keep), which to keep (SIFT: the
B its early exit scores highest) and may hook the forward, backward and step; the engine trains on the
kept rows. Outputs land in train.out_dir: metrics.jsonl, tb/, checkpoints/, summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.loader import build_loader
from data_pipeline.reader import ShardDataset
from data_pipeline.sampler import split_half
from engine import checkpoint as ckpt
from engine import ds, hooks, identity, reshard
from engine.audit import DrawAudit
from engine.checkpointer import Checkpointer, resume_point
from engine.config import ConfigError, RunConfig, to_dict
from engine.evaluate import EvalSet, Evaluator, eval_size
from engine.methods.registry import method_names
from engine.metrics import MetricLogger, TrainMetrics
from engine.models import build_model
from engine.models.base import DataFacts
from engine.optim import set_peak_lr
from engine.preflight import load_run
from engine.progress import Progress, clock, eta
from engine.setup import attach_methods, build_engine, build_schedule, prepare_methods
from engine.stopping import PREEMPTED_EXIT, StopRequests
from engine.streams import PhaseTimer, training_stream
from sift_common.atomic import atomic_write_text
from sift_common.errors import SiftError

log = logging.getLogger("sift.train")


class TrainingAborted(SiftError):
    pass


def abort_message(streak: int, step: int, at_start: bool, root: Path, diverged: str, good: str | None, *,
                  since: int | None = None) -> str:
    """Why training stopped, where its state went, and where a resume starts. ``since``: the
    ``train.nonfinite=stop`` check at ``step`` found ``streak`` non-finite losses in steps since..step."""
    where = (f"the last good checkpoint is {root / good} (a resume starts there)" if good is not None
             else "there is no good checkpoint (a resume starts from scratch)")
    causes = ("the first steps of this run were already non-finite: possible causes are a corrupt checkpoint or "
              "corrupt data, or settings that overflow at once (optim.lr, deepspeed.precision)" if at_start
              else "the steps before were finite: possible causes are corrupt input data, an fp16 overflow "
                   "(try deepspeed.precision=bf16), or a learning rate too high for this model (optim.lr)")
    what = (f"{streak} non-finite losses in a row at step {step}, each skipped" if since is None else
            f"{streak} non-finite loss(es) in steps {since}-{step} (train.nonfinite=stop: none is skipped, so "
            "the weights after the first are not trusted; train.nonfinite=skip skips such micro-batches, at one "
            "host read per micro-step)")
    return (f"{what}; the diverged state is saved in {root / diverged} for inspection (never resumed); {where}. "
            f"{causes[0].upper()}{causes[1:]}.")


def open_eval_sets(cfg: RunConfig, train_set: ShardDataset, world: int) -> list[EvalSet]:
    """The validation split, then each ``data.extra_eval`` dataset; ConfigError listing every misfit."""
    t, problems, sets = cfg.train, [], []
    main = ShardDataset.open(cfg.data.path, cfg.data.eval_split, verify_checksums=cfg.data.verify_checksums)
    if t.eval_samples > len(main):
        problems.append(f"train.eval_samples={t.eval_samples} but split {cfg.data.eval_split!r} of {cfg.data.path} "
                        f"has {len(main)} rows; set train.eval_samples to {len(main)} or fewer (0: the whole split)")
    named = [("", cfg.data.path, main)] + [
        (f"{name}_", path, ShardDataset.open(path, cfg.data.eval_split, verify_checksums=cfg.data.verify_checksums))
        for name, path in cfg.data.extra_eval.items()]
    for prefix, path, ds_ in named:
        n = eval_size(len(ds_), t.eval_samples, world, t.eval_batch_size)
        if n == 0:
            problems.append(f"split {cfg.data.eval_split!r} of {path} has {len(ds_)} rows, fewer than one batch per "
                            f"rank (world {world} x train.eval_batch_size {t.eval_batch_size})")
        mine, theirs = train_set.meta, ds_.meta
        if (theirs.vocab_size, theirs.special_ids, theirs.objective, theirs.seq_len) != (
                mine.vocab_size, mine.special_ids, mine.objective, mine.seq_len):
            problems.append(f"data.extra_eval: {path} was not prepared like {cfg.data.path} (tokenizer, objective and "
                            "seq_len must match: prepare it with --tokenizer <that dataset's directory>)")
        sets.append(EvalSet(ds_, n, prefix))
    if problems:
        raise ConfigError(problems, "run config vs data")
    return sets


def claim_out_dir(cfg: RunConfig, allowed: list[str], branch_from: str | None) -> identity.RunLock | None:
    """Rank 0 locks train.out_dir (identity.RunLock), branches it when asked and checks the run's identity;
    every rank raises what it found (one collective). Returns rank 0's lock, to hold for the run's life."""
    out_dir, lock, error = Path(cfg.train.out_dir), None, None
    if dist.get_rank() == 0:
        try:
            lock = identity.RunLock(out_dir)
            if branch_from is not None:
                identity.branch(out_dir, Path(branch_from))
            ident = identity.identity(to_dict(cfg), dist.get_world_size())
            identity.log_changes(identity.check(out_dir, ident, set(allowed)))
        except SiftError as e:
            error = e
            if lock is not None:
                lock.release()
    error = ds.broadcast_object(error)
    if error is not None:
        raise error
    return lock


def run(cfg: RunConfig, allowed: list[str] = (), branch_from: str | None = None) -> dict[str, Any]:
    progress = Progress()
    ds.init_distributed(cfg.deepspeed.dist_backend, cfg.train.collective_timeout_s)
    device = ds.device_for(int(os.environ.get("LOCAL_RANK", "0")))
    lock = claim_out_dir(cfg, list(allowed), branch_from)
    # Handlers from the start: a signal during the build stops the run at its first step boundary.
    stop = StopRequests(cfg.train.stop_signals)
    try:
        with training_stream(device):  # CUDA: training outranks the scoring and copy streams, from the build on
            return train(cfg, progress, device, stop)
    except RuntimeError as e:  # a collective whose peer died or went silent: one line, not a deep traceback
        lost = ds.peer_lost(e, progress.step)
        if lost is None:
            raise
        raise lost from e
    finally:
        stop.close()
        if lock is not None:
            lock.release()


def train(cfg: RunConfig, progress: Progress, device: torch.device, stop: StopRequests) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = device.type == "cuda"
    out_dir, t = Path(cfg.train.out_dir), cfg.train

    # ------------------------------------------------------------------ data
    train_set = ShardDataset.open(cfg.data.path, cfg.data.train_split, verify_checksums=cfg.data.verify_checksums)
    meta = train_set.meta
    eval_sets = open_eval_sets(cfg, train_set, world)

    # ------------------------------------------------------------------ model, methods, engine
    torch.manual_seed(t.seed)  # identical init on every rank
    specials = meta.special_ids
    model = build_model(cfg.model, DataFacts(meta.vocab_size, meta.seq_len, meta.objective, specials["pad"],
                                             eos_id=specials.get("eos"), bos_id=specials.get("bos")))
    methods = prepare_methods(cfg, model)
    torch.manual_seed(t.seed * 1_000_003 + rank + 1)  # per-rank dropout streams
    root = out_dir / "checkpoints"
    tag = resume_point(root, t.resume)
    universal = tag is not None and reshard.needs_universal(root, tag, world)  # another world size, ZeRO-1/2/3
    engine, stage, precision = build_engine(cfg, model, world_size=world, cuda=cuda, load_universal=universal)
    log.info("world %d, device %s, ZeRO-%d, %s; B=%d grad_accum=%d; method %s (%s)", world, device.type, stage,
             precision, t.micro_batch_size, t.grad_accum, cfg.effective_method, describe(cfg))

    # ------------------------------------------------------------------ resume
    checkpointer = Checkpointer(root, engine, rank=rank, world_size=world, keep_last=t.keep_last,
                                cuda=cuda, description={"config": to_dict(cfg), "model": model.export_config(),
                                                        "objective": meta.objective,
                                                        "tokenizer": train_set.tokenizer_path()},
                                check_free_space=t.check_free_space)
    saved = checkpointer.resume(tag, progress, universal) if tag is not None else None
    if tag is not None:
        set_peak_lr(engine.lr_scheduler, cfg.optim.lr)  # the config's, not the checkpoint's (--allow-change)
    # After the weights are final: a method may copy them (SIFT's scorer replica under ZeRO-3).
    attach_methods(methods, model, engine, stage=stage, device=device, rank=rank, world_size=world)
    methods.load_state_dict((saved or {}).get("methods", {}))

    # ------------------------------------------------------------------ loop parts
    timer = PhaseTimer(cuda)
    half = cfg.data.train_half
    loader = build_loader(train_set, seed=t.seed, rank=rank, world_size=world, batch_size_for_draw=methods.rows_for_draw,
                          start_draw=progress.draws, consumed_samples=progress.consumed_samples,
                          rows=None if half is None else split_half(len(train_set), half),
                          num_workers=cfg.data.num_workers, mask_prob=cfg.data.mask_prob,
                          pin_memory=cuda if cfg.data.pin_memory is None else cfg.data.pin_memory)
    audit = DrawAudit(iter(loader), progress.draws, group=ds.host_group())
    schedule = build_schedule(cfg, engine, methods, batches=audit, device=device, rank=rank, world_size=world,
                              timer=timer)
    if saved is not None and saved.get("pending_scores") is not None:
        schedule.set_pending_scores(saved["pending_scores"].to(device))
    evaluator = Evaluator(engine, model.metrics(), eval_sets, device=device, seed=t.seed, rank=rank,
                          world_size=world, batch_size=t.eval_batch_size, mask_prob=cfg.data.mask_prob)
    logger = MetricLogger(out_dir, enabled=rank == 0, tensorboard=t.tensorboard, progress=t.progress,
                          total_steps=t.steps, initial_step=progress.step)
    train_metrics = TrainMetrics(model.metrics(), timer, world_size=world, seq_len=meta.seq_len)
    checkpointer.restore_rng(saved)  # last: building the loader's iterator draws from the global RNG

    def save(tag: str | None = None) -> str:
        pending = schedule.pending_scores
        return checkpointer.save(progress, {"pending_scores": None if pending is None else pending.cpu(),
                                            "methods": methods.state_dict()}, tag=tag)

    def do_eval() -> dict[str, Any]:
        record = {"event": "eval", "step": progress.step, "backprop_samples": progress.backprop_samples,
                  "hours": progress.elapsed_hours(), **evaluator()}
        logger.write(record)
        log.info("step %s: %s", eta(progress.step, t.steps, progress_start, time.time() - started, t.time_budget_s),
                 ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.endswith(("_acc", "_loss", "_ppl"))))
        return record

    def out_of_time() -> bool:
        """The time budget is spent on some rank (every rank then stops at the same step)."""
        spent = torch.tensor([time.time() - started], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(spent, op=dist.ReduceOp.MAX)
        return spent.item() >= t.time_budget_s

    # ------------------------------------------------------------------ the loop
    last_eval, streak, draws0, stopped_early, started, stopped = None, 0, progress.draws, False, time.time(), None
    checked = progress_start = progress.step  # stop mode: the step of the last non-finite check
    while progress.step < t.steps:
        hooks.fire("micro_step_start", step=progress.step, draw=progress.draws, model=model, engine=engine)
        rows = methods.rows_for_draw(progress.draws)
        mo = schedule.micro_step(progress.draws, progress.step)
        progress.count(rows_drawn=rows, rows_trained=mo.rows_trained, rows_scored=mo.rows_scored,
                       finite=mo.finite, stepped=mo.stepped, world_size=world)
        train_metrics.add(mo)
        if not mo.finite:
            streak += 1
            log.warning("non-finite loss at step %d (draw %d): skipped (%d in a row)", progress.step,
                        progress.draws - 1, streak)
            if streak >= t.max_nonfinite:  # keep the diverged state aside; never touch the good checkpoints
                diverged = save(ckpt.diverged_tag(progress.step))
                raise TrainingAborted(abort_message(streak, progress.step, progress.draws - streak == draws0,
                                                    checkpointer.root, diverged, ckpt.last_good(checkpointer.root)))
            continue
        streak = 0
        if not mo.stepped:
            continue
        step = progress.step
        hooks.fire("step_end", step=step)
        stopping = stop.agreed() and step < t.steps  # collective: every rank stops after the same step
        log_due = step % t.log_every == 0 or step == t.steps or stopping
        eval_due = step % t.eval_every == 0 or step == t.steps
        save_due = bool(t.save_every and step % t.save_every == 0) or step == t.steps or stopping
        # one process checks every step; ranks agree at log steps (a collective)
        if t.time_budget_s and (log_due or world == 1) and step < t.steps and out_of_time():
            stopped_early = log_due = eval_due = save_due = True
        if not schedule.skip_nonfinite and (log_due or eval_due or save_due):
            found = schedule.take_nonfinite()  # stop mode: the only host read of its non-finite count
            if found:
                diverged = save(ckpt.diverged_tag(step))
                every_one = found == (step - progress_start) * t.grad_accum  # no finite step since the start
                raise TrainingAborted(abort_message(found, step, every_one, checkpointer.root, diverged,
                                                    ckpt.last_good(checkpointer.root), since=checked + 1))
            checked = step
        if log_due:
            record = train_metrics.flush(step=step, lr=engine.get_lr()[0], progress=progress,
                                         selecting=rows > t.micro_batch_size) | audit.take(progress.draws)
            logger.write(record)
            postfix = {"loss": record.get("loss", float("nan")), "seq/s": record["backprop_seq_per_s"]}
            if t.time_budget_s:  # the bar's own estimate is for all train.steps
                postfix["budget left"] = clock(max(t.time_budget_s - (time.time() - started), 0.0))
            logger.progress(step, postfix)
        if eval_due:
            last_eval = do_eval()
        if save_due:
            tag = save()
        if stopped_early:
            log.info("train.time_budget_s=%g spent at step %d of %d: stopped; the same command continues the run",
                     t.time_budget_s, step, t.steps)
            break
        if stopping:
            stopped = {"signal": stop.requested, "step": step, "checkpoint": str(checkpointer.root / tag)}
            logger.write({"event": "stopped", **stopped, "exit_status": PREEMPTED_EXIT})
            log.warning("stopped by %s after step %d of %d; saved %s; the same command resumes there (exit "
                        "status %d)", stop.requested, step, t.steps, stopped["checkpoint"], PREEMPTED_EXIT)
            break

    if last_eval is None and stopped is None:
        last_eval = do_eval()
    summary = {"steps": progress.step, "backprop_samples": progress.backprop_samples,
               "scored_samples": progress.scored_samples, "nonfinite_skipped": progress.nonfinite_total,
               "hours": progress.elapsed_hours(), "final_eval": last_eval, "out_dir": str(out_dir),
               "token_loss": model.token_loss_name, "planned_steps": t.steps, "stopped_early": stopped_early,
               "stopped": stopped}
    if rank == 0:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    logger.close()
    return summary


def describe(cfg: RunConfig) -> str:
    """The methods' settings in one phrase, for the start-up log line."""
    s, v = cfg.sift, cfg.vcas
    out = (f"G={cfg.gross_batch_size}, {s.policy} selection, {s.criterion} exit at layer {s.exit_layer}, "
           f"{s.schedule}") if cfg.selecting else "every drawn row trained"
    if "vcas" in method_names(cfg.effective_method):
        out += (f"; VCAS adaptive (tau {v.tau_act:g}/{v.tau_w:g}, every {v.calib_every} steps on {v.calib_batches} "
                f"batches)" if v.adaptive else f"; VCAS fixed rho={v.rho:g} nu={v.nu:g}")
    return out


# ---------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """Parse, check and run. Raises SiftError for what a user can fix."""
    return start(*load_run(sys.argv[1:] if argv is None else argv))


def start(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Run a config ``engine.preflight.load_run`` checked (launcher/train.py checks before importing this
    module, so that a mistake fails before torch and DeepSpeed load)."""
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    summary = run(cfg, args.allow_change, args.branch_from)
    if summary["stopped"] is not None:
        return PREEMPTED_EXIT
    if int(os.environ.get("RANK", "0")) == 0:
        ev, name = summary["final_eval"], summary["token_loss"]
        stopped = (f" (train.time_budget_s ran out before step {summary['planned_steps']}; the same command "
                   "continues)") if summary["stopped_early"] else ""
        print(f"done: {summary['steps']} steps{stopped}, {summary['backprop_samples']} back-propagated samples, "
              f"val {name.upper()} accuracy {ev[f'val_{name}_acc']:.4f}; results in {summary['out_dir']}")
    return 0
