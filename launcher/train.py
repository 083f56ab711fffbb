"""The training entry point for every launcher.

    sift train --config RUN.yaml [section.key=value ...]                 # one process
    deepspeed --hostfile hostfile launcher/train.py --config RUN.yaml    # many GPUs / nodes
    torchrun --nproc-per-node 8 launcher/train.py --config RUN.yaml
    mpirun -np 16 python launcher/train.py --config RUN.yaml
    srun python launcher/train.py --config RUN.yaml                      # inside an allocation
    python -m launcher.train ...                                         # the same, outside a clone

It works out this process's rank from whichever launcher started it (launcher/dist_env.py), exports the
standard RANK/WORLD_SIZE/MASTER_* variables, checks the config and data (engine/preflight.py: before torch
and DeepSpeed load) and hands over to engine/train.py. Run as a script, it
needs the package installed (`pip install -e .` in a clone), as every `sift` command does.
"""

from __future__ import annotations

import os
import sys

from launcher.dist_env import prepare_process, wait_for_master

MASTER_WAIT_S = float(os.environ.get("SIFT_MASTER_TIMEOUT", "300"))


def main(argv: list[str] | None = None) -> int:
    dist = prepare_process(os.environ)
    from engine.preflight import load_run

    loaded = load_run(sys.argv[1:] if argv is None else argv)  # config and data mistakes fail here, in seconds
    if dist.rank != 0:
        wait_for_master(dist.master_addr, dist.master_port, MASTER_WAIT_S)
    from engine import ds
    from engine.train import start

    status = start(*loaded)
    ds.leave_process_group()  # on a normal or preempted end only: after a lost peer it could wait on it
    if dist.world_size > 1:
        _exit_without_finalization(status)
    return status


def _exit_without_finalization(status: int) -> None:
    """End a rank of a finished run now. In interpreter finalization gloo's threads can still release
    tensors, which needs the GIL of an interpreter being torn down: the process aborts ("terminate called
    without an active exception", status -6) after a run that finished and saved, seen in 2-rank tests on a
    busy machine even with the process group destroyed. Everything the run wrote is closed by now; the
    exit handlers (loader workers, logging) still run."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    from launcher.cli import main as sift

    sys.exit(sift(["train", *sys.argv[1:]]))
