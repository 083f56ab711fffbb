"""The one module that imports deepspeed: distributed init, the engine, ZeRO-3 gathering, checkpoints."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    # The CPU accelerator is what DeepSpeed would pick; naming it spares every command its warning
    # that it "was unable to detect" a GPU.
    os.environ["DS_ACCELERATOR"] = "cpu"

import deepspeed
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from engine import build_lock
from sift_common.errors import SiftError

build_lock.use_environment_cache()  # before DeepSpeed JIT-builds any op
log = logging.getLogger(__name__)


class DistributedInitError(SiftError, RuntimeError):
    pass


class PeerLost(SiftError, RuntimeError):
    """A collective failed because another rank died or stopped answering (a node lost mid-run)."""

    exit_code = 3


HOST_ADDR_VAR = "SIFT_HOST_ADDR"
"""The address this rank's peers reach it at (launcher/dist_env.py sets it); names a lost host's ranks."""
_hosts: list[str] = []  # every rank's host, gathered once by init_distributed


def accelerator_name() -> str:
    """"cuda" or "cpu" (DS_ACCELERATOR=cpu selects DeepSpeed's CPU accelerator)."""
    return get_accelerator().device_name()


def device_for(local_rank: int) -> torch.device:
    if accelerator_name() == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def one_process_env(env: MutableMapping[str, str]) -> None:
    """The variables `init_distributed` reads, for a process that is its own one-rank world (a benchmark, a
    study's probe) and was started by no launcher; a free port, so that such processes never collide.
    Multi-process launches go through launcher/dist_env.py instead."""
    if env.get("WORLD_SIZE", "1") != "1":
        raise DistributedInitError(f"this process runs alone, but WORLD_SIZE={env['WORLD_SIZE']}")
    if "RANK" in env:
        return
    if "MASTER_PORT" not in env:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": env.get("MASTER_ADDR", "").strip() or "127.0.0.1"})


def init_distributed(backend: str | None, timeout_s: float = 600.0) -> None:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (set by the launcher
    or by launcher/dist_env.py), with a clear error instead of a deep traceback when it fails."""
    backend = backend or ("nccl" if accelerator_name() == "cuda" else "gloo")
    build_lock.check()  # DeepSpeed may JIT-build an op now (CPU: its shm collective) and would wait on a stale lock
    announce_op_build()
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # DeepSpeed prints "... built successfully" on every start
            deepspeed.init_distributed(
                dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s)
            )
    except Exception as e:  # the causes are many (network, ports, mismatched world sizes)
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedInitError(
            f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')} could not join the "
            f"process group at {where} with backend {backend}: {e.__class__.__name__}: {e}"
        ) from e
    finally:
        for line in said.getvalue().splitlines():
            log.debug("deepspeed: %s", line)
    _hosts[:] = [""] * dist.get_world_size()
    dist.all_gather_object(_hosts, os.environ.get(HOST_ADDR_VAR) or socket.gethostname())


SHM_OP = "ShareMemCommBuilder"
"""The op DeepSpeed's CPU accelerator compiles the first time a process group starts on a machine."""


def announce_op_build() -> None:
    """Say so when DeepSpeed is about to compile its CPU communication op (a minute of silence otherwise;
    once per Python environment, cached in TORCH_EXTENSIONS_DIR: engine/build_lock.py)."""
    if accelerator_name() != "cpu":
        return
    try:
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder(SHM_OP)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return  # DeepSpeed will not build it here
        built = Path(_get_build_directory(builder.name, verbose=False)) / f"{builder.name}.so"
    except Exception:  # only a notice: never fail a run over it
        return
    if not built.is_file():
        log.info("DeepSpeed is compiling its CPU communication op (%s), once for this environment: about a "
                 "minute, cached in %s", builder.name, built.parent)



ROLL_CALL_S = 10.0
"""After a collective timed out: how long a rank waits for every other rank to check in through the
rendezvous store (those that do not are the lost ones)."""


def peer_lost(exc: BaseException, step: int, roll_call: Callable[[int], list[int] | None] | None = None
              ) -> PeerLost | None:
    """The one-line error for a collective that failed because a peer went away; None for other errors.

    gloo reports a peer whose process died as `Connection closed by peer [ADDR]:PORT` (or a reset) at
    once, and a peer that went silent (a cut link, a hung node) as `Timed out waiting Nms` after
    train.collective_timeout_s, without saying which: ``roll_call`` (default ``silent_ranks``) names them.
    """
    text = str(exc)
    me = f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "this rank"
    again = "relaunch the same command to resume from the latest complete checkpoint"
    if re.search(r"(?:closed|reset) by peer", text):
        # The peer's address: gloo writes `remote=[ADDR]:PORT` or `by peer [ADDR]:PORT` (file names are
        # bracketed too, but hold a '/').
        found = re.search(r"remote=\[([^\]/]+)\]", text) or re.search(r"\[([^\]/]+)\]:\d+", text)
        addr = found.group(1) if found else None
        ranks = [r for r, h in enumerate(_hosts) if addr and h == addr]
        who = (f"host {addr} (rank {_list(ranks)})" if ranks else f"host {addr}") if addr else "a peer"
        return PeerLost(f"{me} lost {who} at step {step}: its connection closed (the process or node died); {again}")
    timed_out = re.search(r"Timed out waiting (\d+)ms", text)
    if not timed_out:
        return None
    within = f"within {int(timed_out.group(1)) / 1000:g} s (train.collective_timeout_s)"
    silent = (roll_call or silent_ranks)(step)
    if silent is None:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return PeerLost(f"{me}: no answer from the other ranks {within} at step {step}, nor from the rendezvous store "
                        f"at {where}: this rank's node may be the one cut off; {again}")
    if not silent:
        return PeerLost(f"{me}: a collective found no answer {within} at step {step}, though every rank answered a "
                        "roll call after it: raise train.collective_timeout_s if a step or a save can take that long; "
                        f"{again}")
    by_host: dict[str, list[int]] = {}
    for r in silent:
        by_host.setdefault(_hosts[r] if r < len(_hosts) else "?", []).append(r)
    who = ", ".join(f"host {h} (rank {_list(rs)})" for h, rs in by_host.items())
    return PeerLost(f"{me} lost {who} at step {step}: no answer {within}: its node stopped responding or its link "
                    f"is down; {again}")


def _list(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def silent_ranks(step: int, wait_s: float = ROLL_CALL_S) -> list[int] | None:
    """The ranks that do not check in through the rendezvous store within ``wait_s`` while this one waits
    (every survivor of a timed-out collective calls this at about the same time); None if the store
    cannot be reached either. The store lives with rank 0 (or torchrun's agent), so a rank cut off from
    it learns only that. Run in a daemon thread: a store call to an unreachable host can block for long."""
    if not dist.is_initialized():
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()  # the one store every rank of the group shares
    answered: list[list[int]] = []

    def call() -> None:
        key = f"sift/roll-call/{step}/"
        with contextlib.suppress(Exception):  # unreachable: keep the last complete answer, if any
            store.set(key + str(rank), "1")
            deadline = time.monotonic() + wait_s
            while True:
                answered.append([r for r in range(world) if not store.check([key + str(r)])])
                if not answered[-1] or time.monotonic() > deadline:
                    return
                time.sleep(0.2)

    caller = threading.Thread(target=call, name="sift-roll-call", daemon=True)
    caller.start()
    caller.join(wait_s + 5)
    return answered[-1] if answered else None


def initialize(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    config: dict[str, Any],
) -> Any:
    """deepspeed.initialize with a client optimizer and schedule; returns the engine.

    No training_data is passed (the schedules feed batches), which in DeepSpeed 0.19.8 leaves the
    throughput timer to synchronize the device at every forward and step unless the config turns it off
    (engine/ds_config.py does).
    """
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config, dist_init_required=False
    )
    return engine


def zero_stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


@contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """ZeRO-3: all-gather exactly ``params`` for the duration (read-only)."""
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextmanager
def whole(param: torch.nn.Parameter) -> Iterator[None]:
    """ZeRO-3, inside a backward: make a partitioned weight whole for the duration, as DeepSpeed's own
    ZeRO-3 linear function does (its module hooks usually have gathered it already: then nothing)."""
    partitioned = getattr(getattr(param, "ds_status", None), "name", None) == "NOT_AVAILABLE"
    if partitioned:
        param.all_gather()
    try:
        yield
    finally:
        if partitioned:
            param.partition()


def save_checkpoint(engine: Any, root: Path, tag: str) -> None:
    """DeepSpeed's own files (model, ZeRO optimizer shards, scheduler) under root/tag. Our pointer to the
    latest complete checkpoint is written separately, last (engine/checkpoint.py)."""
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)


def load_checkpoint(engine: Any, root: Path, tag: str) -> None:
    """Load root/tag; an engine whose config has ``checkpoint.load_universal`` reads it as a universal
    checkpoint (``to_universal``'s output)."""
    zero3_universal = engine.load_universal_checkpoint() and zero_stage(engine) == 3
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.optimizer.param_groups] \
        if zero3_universal else []
    path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no model states under {root / tag}")
    if zero3_universal:
        _repair_zero3_universal(engine.optimizer.optimizer, groups)


def _repair_zero3_universal(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (its optimizer's
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``). It gives every parameter group the first group's hyperparameters (here the decay group's weight decay
    to biases and norms), and one shared Adam ``step`` tensor to all groups, which torch's AdamW then
    increments once per group at every step (a wrong bias correction from the first step on: the losses
    drift from an unresharded run's by 3e-5 after one step, 7e-4 after three). ``groups``: each group's
    hyperparameters before the load (the run's own: the identity check keeps them equal to the
    checkpoint's); the learning rate is the schedule's, set after loading."""
    for group, before in zip(optimizer.param_groups, groups, strict=True):
        group.update({k: v for k, v in before.items() if k not in ("lr", "initial_lr")})
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


UNIVERSAL_TAG = "universal"
"""Where a checkpoint's universal form lives: ``<checkpoint>/universal/``, loaded as tag ``universal`` of
the checkpoint directory (engine/reshard.py)."""


def universal_unsupported() -> str | None:
    """Why this DeepSpeed cannot reshard ZeRO-1/2/3 checkpoints through its universal checkpoint, or None.

    Needed: ``deepspeed.checkpoint.ds_to_universal`` (the converter) and the loaders the ZeRO-1/2 and
    ZeRO-3 optimizers read a universal checkpoint with (``load_hp_checkpoint_state_from_checkpoint_dir``,
    ``..._stage3``). Every DeepSpeed this project allows (0.17 to 0.19) has them."""
    try:
        from deepspeed.checkpoint import ds_to_universal  # noqa: F401
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError as e:
        return f"DeepSpeed {deepspeed.__version__} has no universal checkpoint converter ({e})"
    for cls, name in ((DeepSpeedZeroOptimizer, "load_hp_checkpoint_state_from_checkpoint_dir"),
                      (DeepSpeedZeroOptimizer_Stage3, "load_hp_checkpoint_state_from_checkpoint_dir_stage3")):
        if not hasattr(cls, name):
            return f"DeepSpeed {deepspeed.__version__}'s {cls.__name__} cannot load a universal checkpoint (no {name})"
    return None


def to_universal(source: Path, out: Path, workers: int = 1) -> None:
    """DeepSpeed's ``ds_to_universal`` of the ZeRO checkpoint ``source`` into ``out``: per parameter its
    fp32 weights and Adam moments, whole, which ZeRO-1/2/3 can load at any data-parallel size.
    ``workers`` > 1 extracts and merges in that many processes. Verify ``source`` first: this unpickles it."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(source), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # our models declare no tensor-parallel layout
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):  # its progress lines and bars
            ds_to_universal.main(args)
    finally:
        for line in said.getvalue().splitlines():
            log.debug("deepspeed: %s", line)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # its pointer beside `out`: we name the tag


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights from a checkpoint of any ZeRO stage, on CPU, without a process group."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from engine.checkpoint import verify

    verify(root, tag)  # every file against its SHA-256 before DeepSpeed / torch.load unpickles any
    model_files = sorted((root / tag).glob("*model_states.pt"))
    optim_files = sorted((root / tag).glob("*optim_states.pt"))
    if optim_files:  # ZeRO 1-3: the fp32 master weights live in the optimizer shards
        said = io.StringIO()
        with contextlib.redirect_stdout(said):  # four lines of DeepSpeed's own progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        for line in said.getvalue().splitlines():
            log.debug("deepspeed: %s", line)
        return state
    if not model_files:
        raise FileNotFoundError(f"no DeepSpeed model states in {root / tag}")
    state = torch.load(model_files[0], map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


_HOST_GROUP: list[Any] = []


def host_group() -> Any:
    """A process group for small CPU tensors (stop flags, sample ids): the default group under gloo,
    else a gloo group made once (every rank must make the first call at the same point)."""
    if not _HOST_GROUP:
        _HOST_GROUP.append(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def leave_process_group() -> None:
    """Destroy the process group before the process exits. Left to interpreter exit, gloo's worker threads
    can outlive their owner and abort the process ("terminate called without an active exception",
    status -6) after a run that had finished, seen once in a 2-rank preemption test."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP.clear()


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (one all-reduce over the host group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any."""
    return bool(max_over_ranks(int(flag)))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable value, over the host group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=host_group())
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
