"""Save and restore everything a run needs to continue exactly, complete-or-invisible.

A checkpoint holds DeepSpeed's files (model, ZeRO optimizer shards, LR schedule), per rank the RNG
states and the rank's stateful parts (the methods' state, the pipelined schedule's pending scores), and,
written last by rank 0, the progress counters and the run's description (engine/checkpoint.py: the
manifest that marks it complete). Resuming restores all of it; the RNG states go back last, after
everything that might draw from them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint as ckpt
from engine import ds, hooks, reshard
from engine.progress import Progress

log = logging.getLogger(__name__)


def resume_point(root: Path, resume: bool) -> str | None:
    """The tag to resume from (``checkpoint.find_latest``); a ConfigError when resuming is off but
    checkpoints exist."""
    if not resume:
        if (root / ckpt.LATEST).exists():
            from engine.config import ConfigError

            raise ConfigError([f"train.resume=false but {root.parent} already holds checkpoints; choose "
                               "a new train.out_dir (or resume)"], "run config")
        return None
    return ckpt.find_latest(root)


class Checkpointer:
    def __init__(self, root: Path, engine: Any, *, rank: int, world_size: int, keep_last: int, cuda: bool,
                 description: dict[str, Any], check_free_space: bool = True):
        """``description``: what rank 0 records with every checkpoint besides the counters (config,
        model, data), for `sift export` and for people. ``check_free_space``: refuse to start a save
        with less free space than the last checkpoint took."""
        self.root, self.engine, self.rank, self.world = root, engine, rank, world_size
        self.keep_last, self.cuda, self.description = keep_last, cuda, description
        self.check_free_space, self._last_bytes = check_free_space, None

    def resume(self, tag: str, progress: Progress, universal: bool = False) -> dict[str, Any] | None:
        """Load ``tag`` into the engine and ``progress``; returns this rank's saved state (RNG, parts), or
        None when it cannot be used (resumed at another world size: fresh dropout streams).

        ``universal`` (``reshard.needs_universal``; the engine was built to load one): the checkpoint was
        saved at another world size under ZeRO-1/2/3 and loads through its universal form, converted
        now by rank 0 unless it exists. Every rank must call it."""
        record = ckpt.verify(self.root, tag)
        saved_world = record.get("world_size")
        root, name = self.root, tag
        if universal:
            error = None
            if self.rank == 0:
                try:
                    reshard.universal(self.root, tag)
                except ckpt.CheckpointError as e:
                    error = e
            error = ds.broadcast_object(error)  # the other ranks wait here for the conversion
            if error is not None:
                raise error
            root, name = self.root / tag, reshard.UNIVERSAL
            ckpt.verify(root, name)  # before DeepSpeed unpickles it
        try:
            ds.load_checkpoint(self.engine, root, name)
        except Exception as e:
            raise ckpt.CheckpointError(f"checkpoint {root / name} could not be loaded: {e}") from e
        progress.load_state_dict(record)
        log.info("resumed from %s at step %d (%d samples consumed)", self.root / tag, progress.step,
                 progress.consumed_samples)
        if saved_world == self.world:
            return ckpt.load_rank_state(self.root, tag, self.rank)
        log.warning("resumed at world size %d from %s, saved at world size %s%s: the data order continues at the "
                    "next sample; dropout streams, pending scores and per-rank method state restart", self.world,
                    self.root / tag, saved_world, " through its universal checkpoint" if universal else "")
        return None

    def restore_rng(self, state: dict[str, Any] | None) -> None:
        """Put back this rank's RNG states (call last: DataLoader iterators draw from the global RNG)."""
        if state is None:
            return
        torch.set_rng_state(state["torch_rng"])
        if self.cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])

    def save(self, progress: Progress, parts: dict[str, Any], tag: str | None = None) -> str:
        """Write a complete checkpoint of the current state; ``parts``: this rank's stateful parts
        (tensors and plain data), returned by ``resume`` next time. ``tag``: another name than the step's
        (a diverged state, engine/checkpoint.py ``diverged_tag``). Every rank must call it.

        A save that fails on any rank (a full disk, most often) removes its partial directory, keeps the
        previous checkpoints, and raises a ``CheckpointError`` naming the cause on every rank."""
        tag = tag or ckpt.tag_for(progress.step)
        if self.rank == 0:  # the conversion of an earlier save under this name (one a resume skipped) is stale
            shutil.rmtree(self.root / tag / reshard.UNIVERSAL, ignore_errors=True)
        if self.check_free_space:
            self._check_room(tag)
        try:
            ds.save_checkpoint(self.engine, self.root, tag)
            hooks.fire("checkpoint_files_written", step=progress.step, tag=tag, rank=self.rank)
            ckpt.save_rank_state(self.root, tag, self.rank, {
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if self.cuda else None,
                **parts,
            })
            failure = None
        except Exception as e:  # DeepSpeed's torch.save reports a full disk as a RuntimeError
            failure = e
        self._agree(tag, failure)
        if self.rank == 0:
            state = {**progress.state_dict(), "world_size": self.world, **self.description}
            try:
                ckpt.mark_complete(self.root, tag, state, self.keep_last)
            except OSError as e:
                failure = e
        self._agree(tag, failure)
        self._last_bytes = ckpt.size_of(self.root, tag)
        log.info("saved checkpoint %s", self.root / tag)
        hooks.fire("checkpoint_complete", step=progress.step, tag=tag, rank=self.rank)
        return tag

    def _agree(self, tag: str, failure: BaseException | None) -> None:
        """Collective: when the save failed on any rank, remove its directory and raise everywhere."""
        if not ds.any_rank(failure is not None):
            return
        if self.rank == 0:
            shutil.rmtree(self.root / tag, ignore_errors=True)
        ds.barrier()
        raise ckpt.CheckpointError(ckpt.save_failure(self.root, tag, failure)) from failure

    def _check_room(self, tag: str) -> None:
        """Collective: refuse to start a save with less free space than the last checkpoint took."""
        if self._last_bytes is None:
            last = ckpt.last_good(self.root)
            self._last_bytes = ckpt.size_of(self.root, last) if last else 0
        free = ckpt.free_bytes(self.root)
        if ds.any_rank(free < self._last_bytes):
            raise ckpt.CheckpointError(
                f"not saving checkpoint {self.root / tag}: {free} bytes free on the file system of {self.root} "
                f"(on this rank or another), and the last checkpoint took {self._last_bytes}. {ckpt.kept(self.root)} "
                "Free space, or set train.check_free_space=false to try anyway.")
