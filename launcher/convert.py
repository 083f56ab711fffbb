"""`sift convert-checkpoint`: a ZeRO-1/2/3 checkpoint -> DeepSpeed's universal checkpoint, which resumes
at any data-parallel world size.

    sift convert-checkpoint runs/bert                          # its latest complete checkpoint
    sift convert-checkpoint runs/bert --tag step00001000

It writes ``<checkpoint>/universal/`` (engine/reshard.py). `sift train` converts by itself when it resumes
at another world size (rank 0, while the other ranks wait at a collective that times out); converting
first spares that wait, which for a large model can be long. ZeRO-0 checkpoints need no conversion.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine import checkpoint as ckpt
from engine import identity, reshard


def convert(run_dir: Path, tag: str | None = None, workers: int = 1) -> Path:
    """The universal form of ``run_dir``'s checkpoint ``tag`` (default: the latest complete one)."""
    root = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise reshard.ReshardError(f"{run_dir} is not a directory (give the train.out_dir of a run)")
    if not root.is_dir():
        raise reshard.ReshardError(f"{run_dir} holds no checkpoints/ directory: not the train.out_dir of a run")
    tag = tag or ckpt.find_latest(root)
    if tag is None:
        raise reshard.ReshardError(f"{root} holds no complete checkpoint")
    try:
        lock = identity.RunLock(run_dir)  # a live run may be converting or pruning its checkpoints
    except identity.OutDirBusy as e:
        raise reshard.ReshardError(f"{run_dir} is in use by a live run ({e.holder}); convert its checkpoints after "
                                   "it ends (a resume at another world size converts by itself)") from None
    try:
        return reshard.universal(root, tag, workers)
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sift convert-checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="train.out_dir of the run")
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes DeepSpeed's converter extracts and merges the shards with (default 1)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    out = convert(args.run_dir, args.tag, args.workers)
    print(f"converted {out.parent} to {out}: `sift train` resumes it at any number of ranks")
    return 0


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("sift convert-checkpoint", main, sys.argv[1:]))
