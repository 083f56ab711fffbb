"""Host synchronizations of steady-state micro-steps, vanilla and pipelined, built as `sift bench` builds them.

    python -m benchmarks.probes.sync_audit --seq-len 512 --out gpu-out/sync-audit.json
    python -m benchmarks.probes.sync_audit --preset cpu-tiny            # CPU: runs through, reports "no CUDA"

Each variant gets a fresh model and DeepSpeed engine on the training stream (benchmarks/throughput.py's
build_variant), runs --warmup micro-steps, then --steps more while two things are recorded:

- every operation CUDA's sync debug mode flags (`torch.cuda.set_sync_debug_mode("warn")`: `.item()`,
  device-to-host copies, `nonzero`, stream synchronizes, ...), with the Python frames that issued it;
- every call of `torch.cuda.synchronize`, `Event.synchronize` and `Stream.synchronize` (device- or
  stream-wide waits that the debug mode does not flag), with the same frames.

The issue's target is no device-wide synchronize and at most one host read per log interval, which
needs `train.nonfinite=stop` (the default, skip, reads one finiteness flag per micro-step). On CPU
there is no device to wait for: the micro-steps still run (so the harness is exercised) and the report
says "no CUDA".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.synthetic import batch_pool
from benchmarks.throughput import PRESETS, Variant, build_variant, ensure_distributed, free_memory, sync

FRAMES = 4  # caller frames kept per record: enough to tell the schedule from DeepSpeed from torch
_HERE = Path(__file__).resolve()
_SKIP = {_HERE, Path(warnings.__file__).resolve()}  # this module and the warnings machinery


def where() -> str:
    """The innermost FRAMES Python frames of the current stack outside this module and the warnings
    module, innermost first."""
    frames = [f for f in traceback.extract_stack() if Path(f.filename).resolve() not in _SKIP]
    out = []
    for f in frames[::-1][:FRAMES]:
        path = f.filename
        for marker in ("site-packages/", "dist-packages/"):
            path = path.split(marker, 1)[-1]
        if path.startswith(os.getcwd() + os.sep):  # the project's own files, from its checkout
            path = os.path.relpath(path)
        out.append(f"{path}:{f.lineno} {f.name}")
    return " <- ".join(out)


@contextmanager
def recording_syncs() -> Iterator[tuple[Counter, Counter]]:
    """(flagged, explicit) counters of (kind, where) for the duration; CUDA only."""
    flagged: Counter = Counter()
    explicit: Counter = Counter()
    patched = [(torch.cuda, "synchronize", "torch.cuda.synchronize"),
               (torch.cuda.Event, "synchronize", "Event.synchronize"),
               (torch.cuda.Stream, "synchronize", "Stream.synchronize")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]

    def counting(original: Any, label: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            explicit[(label, where())] += 1
            return original(*args, **kwargs)
        return wrapper

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = str(message)
        if "synchroniz" in text:  # the sync debug mode's "called a synchronizing CUDA operation"
            flagged[(text.split("\n")[0][:120], where())] += 1

    for owner, name, label in patched:
        setattr(owner, name, counting(getattr(owner, name), label))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show  # restored by catch_warnings
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield flagged, explicit
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def audit(v: Variant, preset: Any, *, device: torch.device, warmup: int, steps: int,
          extra: list[str]) -> dict[str, Any]:
    """Build one variant, warm it up, record ``steps`` micro-steps; one report dict."""
    from engine.streams import training_stream

    cuda = device.type == "cuda"
    pools = {(rows, v.seq_len): batch_pool(rows, v.seq_len, preset.vocab, size=2, pin=cuda)
             for rows in (preset.micro_batch, round(preset.micro_batch / preset.keep))}
    report: dict[str, Any] = {"name": v.name, "warmup": warmup, "steps": steps}
    with training_stream(device):
        b = build_variant(v, preset, device=device, pools=pools, extra=extra)
        for d in range(warmup):
            b.sched.micro_step(d, d)
        sync(cuda)
        b.timer.flush()  # the loop reads its phase timers once per log interval, not per micro-step
        if cuda:
            with recording_syncs() as (flagged, explicit):
                for d in range(warmup, warmup + steps):
                    b.sched.micro_step(d, d)
            report["flagged"] = [{"count": n, "what": what, "where": at} for (what, at), n in flagged.most_common()]
            report["explicit"] = [{"count": n, "what": what, "where": at} for (what, at), n in explicit.most_common()]
            report["per_micro_step"] = {"flagged": sum(flagged.values()) / steps,
                                        "explicit": sum(explicit.values()) / steps}
        else:
            for d in range(warmup, warmup + steps):
                b.sched.micro_step(d, d)
            report["note"] = "no CUDA: nothing to audit (the micro-steps ran through)"
        sync(cuda)
        b.destroy()
        del b
        free_memory(cuda, v.compile)
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probes.sync_audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto", help="auto: gpu-base on CUDA, cpu-tiny otherwise")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the preset's longest)")
    p.add_argument("--variants", default="vanilla,pipelined", help="comma list of vanilla,serial,pipelined")
    p.add_argument("--exit", type=int, default=1, dest="exit_layer", help="SIFT exit layer")
    p.add_argument("--criterion", choices=["loss", "entropy"], default="loss")
    p.add_argument("--warmup", type=int, default=4, help="micro-steps before recording")
    p.add_argument("--steps", type=int, default=3, help="recorded micro-steps")
    p.add_argument("--out", help="also write the report as JSON here")
    p.add_argument("overrides", nargs="*", help="extra run-config overrides, as for sift bench")
    args = p.parse_args(argv)
    args.variants = tuple(x for x in args.variants.split(",") if x)
    bad = [x for x in args.variants if x not in ("vanilla", "serial", "pipelined")]
    if bad:
        p.error(f"--variants: unknown {bad}")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def variants_of(args: argparse.Namespace, cuda: bool) -> tuple[Any, list[Variant]]:
    name = args.preset if args.preset != "auto" else ("gpu-base" if cuda else "cpu-tiny")
    preset = PRESETS[name]
    T = args.seq_len or max(preset.seq_lens)
    preset = replace(preset, seq_lens=(T,))
    return preset, [Variant(k, T) if k == "vanilla" else Variant(k, T, args.exit_layer, args.criterion)
                     for k in args.variants]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))

    device = ensure_distributed()
    cuda = device.type == "cuda"
    preset, variants = variants_of(args, cuda)
    if preset.threads:
        torch.set_num_threads(preset.threads)
    reports = [audit(v, preset, device=device, warmup=args.warmup, steps=args.steps, extra=list(args.overrides))
               for v in variants]
    for r in reports:
        if "note" in r:
            print(f"== {r['name']}: {r['note']}")
            continue
        per = r["per_micro_step"]
        print(f"== {r['name']}: per steady-state micro-step {per['flagged']:g} operations flagged by the sync "
              f"debug mode, {per['explicit']:g} explicit synchronize calls ({r['steps']} recorded)")
        for kind in ("flagged", "explicit"):
            for rec in r[kind]:
                print(f"  {rec['count']:3d} x {kind}: {rec['what']}\n        at {rec['where']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": "cuda" if cuda else "cpu", "overrides": args.overrides,
                                              "variants": reports}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
