"""A CPU estimate of the GPU peak-memory ratio of the pipelined over the serial schedule.

CUDA's ``max_memory_allocated`` follows the host's program order: a tensor counts from the call that
allocates it until Python frees it, whichever stream runs it. On CPU the same schedules run the same
Python in the same order, so the peak of the live tensor bytes is the same quantity, bar kernel
workspaces. It is read here from the kernel's peak resident set (VmHWM, reset after warm-up) with
glibc's mmap threshold pinned, so that every large tensor is its own mapping, returned on free.
Linux only; each variant runs in a fresh child process.

    python -m benchmarks.probes.memory_proxy --layers 12 --seq-len 128 --criterion entropy
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.synthetic import batch_pool
from benchmarks.throughput import PRESETS, Variant, ensure_distributed, run_variant
from engine.scoring import CRITERIA

GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "DS_ACCELERATOR": "cpu"}


def proc_status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5": reset VmHWM to the current RSS


def child(args: argparse.Namespace) -> None:
    ensure_distributed()
    torch.set_num_threads(args.threads)
    p = replace(PRESETS["gpu-base"], seq_lens=(args.seq_len,), steps=2, warmup=2, precision=args.precision)
    G = round(p.micro_batch / p.keep)
    pools = {(G, args.seq_len): batch_pool(G, args.seq_len, p.vocab, size=3)}
    base = proc_status("VmRSS")
    run_variant(Variant(args.child, args.seq_len, 1, args.criterion), p, device=torch.device("cpu"), pools=pools,
                extra=[f"model.num_layers={args.layers}", "optim.fused=true"],  # as on GPU: no foreach temporaries
                peak=None, after_warmup=reset_peak_rss)
    print(json.dumps({"variant": args.child, "peak_bytes": proc_status("VmHWM") - base}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.probes.memory_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--criterion", choices=sorted(CRITERIA), default="loss")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["serial", "pipelined"], help=argparse.SUPPRESS)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        child(args)
        return 0
    peaks = {}
    for kind in ("serial", "pipelined"):
        cmd = [sys.executable, "-m", "benchmarks.probes.memory_proxy", "--child", kind, *(argv or sys.argv[1:])]
        out = subprocess.run(cmd, env={**os.environ, **GLIBC_ENV}, capture_output=True, text=True,
                             check=True)
        peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    print(f"BERT-base widths, {args.layers} layers, T = {args.seq_len}, B = 32, G = 64, exit 1, "
          f"{args.criterion}, {args.precision}, DeepSpeed ZeRO-1 on CPU: peak live bytes above the pre-model "
          f"baseline: serial {peaks['serial'] / 2**20:,.0f} MiB, pipelined {peaks['pipelined'] / 2**20:,.0f} MiB, "
          f"ratio {peaks['pipelined'] / peaks['serial']:.3f}")
    return 0


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("benchmarks.probes.memory_proxy", lambda _: main(), []))
