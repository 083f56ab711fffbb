"""The `sift` command: a thin dispatcher to each subcommand's own `main(argv)`.

Subcommands are imported only when used, so `sift --help` and `sift launch` stay fast and never
import torch or deepspeed. This is the one place that turns an error a user can fix (``SiftError``,
raised anywhere below) into `sift <command>: error: <message>` and its exit status.
"""

from __future__ import annotations

import importlib
import sys

from sift_common.errors import run_command

# name -> (module, one-line help). Each module defines `main(argv: list[str]) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("data_pipeline.prepare", "tokenize text into Arrow shards (+ index.json)"),
    "train": ("launcher.train", "train a model with SIFT on prepared shards"),
    "reference": ("launcher.reference", "train a reference model for sift.criterion=reducible (+ its loss sidecar)"),
    "export": ("engine.export", "write a Hugging Face save_pretrained directory from a checkpoint"),
    "convert-checkpoint": ("launcher.convert", "convert a ZeRO-1/2/3 checkpoint to DeepSpeed's universal form "
                                               "(resumes at any world size)"),
    "launch": ("launcher.launch", "build (and run) the multi-node command: deepspeed, mpirun, srun, torchrun"),
    "demo": ("launcher.demo", "offline CPU demo: generate a corpus, prepare it, train a tiny BERT with SIFT"),
    "bench": ("launcher.bench", "throughput: vanilla vs SIFT serial vs SIFT pipelined"),
    "study": ("study.cli", "time-to-accuracy study: vanilla, random, loss- and entropy-SIFT"),
}


def usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: sift <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `sift <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"sift: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(f"sift {name}", lambda args: importlib.import_module(SUBCOMMANDS[name][0]).main(args), rest)


if __name__ == "__main__":
    sys.exit(main())
