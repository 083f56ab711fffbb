"""VCAS's forward + backward on one device, without DeepSpeed or an optimizer: wall clock against FLOPs.

    python -m benchmarks.probes.vcas_backward --out benchmarks/results --seq-lens 128,512       # a GPU
    python -m benchmarks.probes.vcas_backward --preset tiny --seq-lens 64 --steps 5 --dtype fp32  # CPU smoke

One BERT with VCAS installed (fixed ratios), synthetic masked batches of B rows (benchmarks/synthetic.py);
per variant: warm-up, then the median of ``--steps`` timed forward + backward passes (CUDA events on
GPU, process CPU time with one thread on CPU), next to VCAS's expected training-FLOP ratio (engine/methods/vcas/flops.py).
Variants: plain autograd; VCAS at rho x nu in {1, 0.75, 0.5} x {1, 0.5, 0.25} with the exact last-block
saving; and one adaptive calibration (M = 2), timed. It also checks that a calibration leaves the CPU and
CUDA RNG states where they were. Writes vcas_backward-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FIXED = [(rho, nu) for rho in (1.0, 0.75, 0.5) for nu in (1.0, 0.5, 0.25)]


def build(preset: str, seq_len: int, device: torch.device, dtype: torch.dtype, B: int) -> tuple[Any, Any]:
    from engine.config import ModelConfig, load_config
    from engine.methods.base import RunContext
    from engine.methods.vcas import Vcas
    from engine.models.bert import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset), vocab_size=30522, seq_len=seq_len, pad_id=0, use_nsp=True)
    vcas = Vcas(load_config(None, ["method=vcas", "vcas.adaptive=false", f"train.micro_batch_size={B}"]))
    vcas.prepare_model(model)
    model.to(device=device, dtype=dtype).train()
    vcas.attach(RunContext(model=model, engine=None, device=device, zero_stage=0, gather=None, exact_losses=None,
                           rank=0, world_size=1))
    return model, vcas


def timed(fn: Any, steps: int, warmup: int, cuda: bool) -> list[float]:
    """Seconds per call: CUDA events on GPU; on CPU this process's CPU time (one thread), which a shared,
    oversubscribed machine inflates far less than wall clock."""
    for _ in range(warmup):
        fn(-1)
    times = []
    for i in range(steps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(i)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.process_time()
            fn(i)
            times.append(time.process_time() - t0)
    return times


def run(preset: str, T: int, B: int, steps: int, warmup: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from benchmarks.synthetic import make_batch
    from engine.methods import MicroContext
    from engine.methods.vcas.controller import Ratios

    cuda = device.type == "cuda"
    model, vcas = build(preset, T, device, dtype, B)
    batches = [{k: v.to(device) for k, v in make_batch(B, T, 30522, seed=s).items()} for s in range(4)]
    L, n = model.num_layers, len(vcas.sites)
    rows = []

    def step(ratios: tuple[float, float] | None, live: bool) -> Any:
        def fn(i: int) -> None:
            batch = batches[i % len(batches)]
            vcas.cfg.live_positions = live
            vcas.flops = None  # rebuilt by before_forward for this setting of live_positions
            vcas.ratios = Ratios(1.0, [1.0] * L, [1.0] * n) if ratios is None else Ratios(1.0, [ratios[0]] * L,
                                                                                          [ratios[1]] * n)
            vcas.before_forward(batch, MicroContext(draw=i + 1000, step=0, rank=0, world_size=1, grad_accum=1))
            model.zero_grad(set_to_none=True)
            model(**batch)["loss"].backward()
            vcas.after_backward(None)
        return fn

    for name, ratios, live in [("plain autograd", None, False), *((f"vcas rho {r:g} nu {u:g}", (r, u), True)
                                                                  for r, u in FIXED)]:
        times = timed(step(ratios, live), steps, warmup, cuda)
        r = ratios or (1.0, 1.0)
        flops = vcas.flops.ratio([r[0]] * L, [r[1]] * n) if live else 1.0
        rows.append({"seq_len": T, "variant": name, "rho": r[0], "nu": r[1], "live_positions": live,
                     "median_s": float(np.median(times)), "p10_s": float(np.percentile(times, 10)),
                     "p90_s": float(np.percentile(times, 90)), "flops_ratio": flops})
    base = rows[0]["median_s"]
    for r in rows:
        r["time_ratio"] = r["median_s"] / base
    # one adaptive calibration at rho = 0.5 (M exact + M^2 sampled passes), and the RNG check
    vcas.cfg.adaptive, vcas.cfg.live_positions = True, True
    vcas.ratios = Ratios(1.0, [0.5] * L, [1.0] * n)
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if cuda else None
    times = timed(lambda i: vcas.calibrate(step=0, rank=0), 3, 1, cuda)
    rng_kept = torch.equal(cpu_state, torch.get_rng_state()) and (
        not cuda or torch.equal(cuda_state, torch.cuda.get_rng_state()))
    rows.append({"seq_len": T, "variant": "one calibration (M = 2, rho 0.5)", "median_s": float(np.median(times)),
                 "time_ratio": float(np.median(times)) / base, "rng_restored": rng_kept,
                 "flops_ratio": vcas.flops.calibration([0.5] * L, 2) / vcas.flops.base.train()})
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# VCAS forward + backward: {meta['device']}", "",
             f"- command: `{meta['command']}`; git commit {meta['git_commit']}; {meta['date']}",
             f"- torch {meta['torch']}, transformers {meta['transformers']}; BERT preset {meta['preset']}, "
             f"B = {meta['B']}, {meta['dtype']}, {meta['steps']} timed passes after {meta['warmup']} warm-up; "
             f"timing: {meta['timing']}; load average at the start {meta['load']}",
             "- no DeepSpeed, no optimizer step: one forward and one backward per pass (plain: stock autograd). "
             "FLOP ratio: VCAS's expected training FLOPs over exact training's (engine/methods/vcas/flops.py); "
             "time ratio: median pass time over plain autograd's. The calibration row is one whole calibration, "
             "in units of one plain pass.", "",
             "| T | variant | median ms (p10-p90) | time ratio | FLOP ratio | FLOPs saved | time saved |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ({1e3 * r['p10_s']:.1f}-{1e3 * r['p90_s']:.1f})" if "p10_s" in r else ""
        lines.append(f"| {r['seq_len']} | {r['variant']} | {1e3 * r['median_s']:.1f}{spread} | {r['time_ratio']:.3f} | "
                     f"{r['flops_ratio']:.3f} | {1 - r['flops_ratio']:.1%} | {1 - r['time_ratio']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.throughput import device_name
    from sift_common.provenance import git_commit, version

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.probes.vcas_backward", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--seq-lens", default="128,512")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = p.parse_args(argv)
    from datetime import datetime, timezone

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    meta = {"device": device_name(device), "command": "python -m benchmarks.probes.vcas_backward " + " ".join(argv),
            "git_commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": version("transformers"), "preset": args.preset,
            "B": args.micro_batch, "dtype": str(dtype).removeprefix("torch."), "steps": args.steps,
            "warmup": args.warmup, "timing": "CUDA events" if cuda else "process CPU time, 1 thread",
            "load": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else None}
    rows = []
    for T in (int(x) for x in args.seq_lens.split(",")):
        rows += run(args.preset, T, args.micro_batch, args.steps, args.warmup, device, dtype)
        if cuda:
            torch.cuda.empty_cache()  # the model of this T is gone
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "vcas_backward-" + ("gpu" if cuda else "cpu")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
