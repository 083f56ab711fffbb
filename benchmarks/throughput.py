"""Throughput of vanilla vs SIFT serial vs SIFT pipelined, side by side in one process (`sift bench`).

    sift bench --preset cpu-tiny                                  # CPU smoke test, well under a minute
    sift bench --preset gpu-base --seq-lens 512 --exits 1 --criteria loss
    python -m benchmarks.throughput --preset gpu-base --compile both
    sift bench --model gpt2-125m                                  # decoders: T = 1024, 2048; exits 1,2,L/4,L/2
    sift bench --model llama-1b --micro-batch 4

Every variant builds a fresh model (same seed) and DeepSpeed engine, runs warm-up steps, then times
``--steps`` micro-steps (one optimizer step each): CUDA events at the step boundaries on the training
stream on GPU, perf_counter on CPU. The data are in-memory synthetic batches (benchmarks/synthetic.py),
so this measures the engine and the schedules, not the data pipeline. Outputs: JSON, a markdown table
and a PNG chart (benchmarks/report.py). See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import flops as F
from benchmarks import vcas_rows
from benchmarks.synthetic import PAD, batch_pool, cycle, real_token_fraction
from engine.models.base import FlopCounts
from engine.scoring import CRITERIA
from sift_common.errors import run_command
from sift_common.logs import setup_logging
from sift_common.provenance import machine, provenance

VARIANTS = ("vanilla", "serial", "pipelined")
"""The default variants; ``--variants`` also takes the VCAS kinds (benchmarks/vcas_rows.py)."""
PHASES = ("data", "scoring", "forward", "backward", "optimizer")
log = logging.getLogger("sift.bench")


@dataclass(frozen=True, slots=True)
class Preset:
    model: str
    """engine/models/presets.py name (a size of ``family``)."""
    vocab: int
    seq_lens: tuple[int, ...]
    micro_batch: int
    """B: back-propagated rows per step (vanilla draws only B)."""
    keep: float
    """B / G."""
    precision: str
    zero_stage: int
    steps: int
    warmup: int
    exits: tuple[str, ...] = ("1", "2", "3", "6", "12")
    """Exit layers: numbers, or L, L/2, L/4 (of the model's L blocks); clipped to 1..L."""
    criteria: tuple[str, ...] = ("loss", "entropy")
    threads: int | None = None
    """torch intra-op threads (None: torch's default)."""
    family: str = "bert"
    """``model.family``: bert (masked-LM batches) or a decoder (gpt2, llama: causal-LM batches)."""

    @property
    def objective(self) -> str:
        return "nsp_pairs" if self.family == "bert" else "clm"


DECODER_EXITS = ("1", "2", "L/4", "L/2")


PRESETS: dict[str, Preset] = {
    # The configuration: BERT-base, bf16, B = 32, G = 64, one GPU, fused AdamW, ZeRO-1.
    "gpu-base": Preset(model="base", vocab=30522, seq_lens=(128, 512), micro_batch=32, keep=0.5,
                       precision="bf16", zero_stage=1, steps=50, warmup=10),
    # CI smoke test of the harness on 2 CPU cores: a 2-layer BERT, a small vocabulary, a few steps; one
    # thread, because OpenMP threads on a shared, oversubscribed machine stall each other by 10x or more.
    "cpu-tiny": Preset(model="tiny", vocab=8192, seq_lens=(64,), micro_batch=8, keep=0.5,
                       precision="fp32", zero_stage=1, steps=8, warmup=2, threads=1),
    # Decoders (the grid: exits 1, 2, L/4, L/2 at T = 1024 and 2048; `--model` picks the family and
    # size, e.g. gpt2-125m, llama-1b). GPT-2's vocabulary; `--vocab 128256` for Llama-3's.
    "gpu-decoder": Preset(model="125m", family="gpt2", vocab=50257, seq_lens=(1024, 2048), micro_batch=8, keep=0.5,
                          precision="bf16", zero_stage=1, steps=30, warmup=5, exits=DECODER_EXITS),
    # CPU smoke test of the decoder path: a 4-block model, a small vocabulary, one thread.
    "cpu-decoder": Preset(model="tiny", family="gpt2", vocab=8192, seq_lens=(1024, 2048), micro_batch=2, keep=0.5,
                          precision="fp32", zero_stage=1, steps=4, warmup=1, exits=DECODER_EXITS, threads=1),
}


@dataclass(frozen=True, slots=True)
class Variant:
    kind: str
    seq_len: int
    exit_layer: int | None = None
    criterion: str | None = None
    compile: bool = False
    vcas: tuple[float, float] | None = None
    """VCAS kinds: fixed (rho, nu), or None for the adaptive controller."""

    @property
    def name(self) -> str:
        base = "vanilla" if self.kind == "vanilla" else f"{self.kind}-j{self.exit_layer}-{self.criterion}"
        if self.kind == "vcas":
            base = f"vcas-{vcas_rows.suffix(self.vcas)}"
        elif self.kind == "sift+vcas":
            base += f"-{vcas_rows.suffix(self.vcas)}"
        return f"T{self.seq_len}-{base}" + ("-compiled" if self.compile else "")

    def overrides(self, p: Preset, extra: list[str]) -> list[str]:
        o = [f"model.family={p.family}", f"model.preset={p.model}", f"train.micro_batch_size={p.micro_batch}",
             f"sift.keep={p.keep}",
             f"deepspeed.precision={p.precision}", f"deepspeed.zero_stage={p.zero_stage}",
             "deepspeed.config=zero1.json", f"train.compile={str(self.compile).lower()}",
             "sift.warmup_steps=0", "train.grad_accum=1", f"train.steps={p.steps + p.warmup}"]
        if self.kind == "vanilla":
            o += ["method=none"]
        elif self.kind == "vcas":
            o += vcas_rows.overrides(self.kind, self.vcas)
        elif self.kind == "sift+vcas":
            o += ["sift.policy=topk", "sift.schedule=serial", f"sift.exit_layer={self.exit_layer}",
                  f"sift.criterion={self.criterion}", *vcas_rows.overrides(self.kind, self.vcas)]
        else:
            o += ["method=sift", "sift.policy=topk", f"sift.schedule={self.kind}", f"sift.exit_layer={self.exit_layer}",
                  f"sift.criterion={self.criterion}"]
        return o + extra


def exit_layers(specs: tuple[str, ...], num_layers: int) -> list[int]:
    """"1", "L/4", "L/2", "L", ... -> distinct layers in 1..L, ascending (a number above L is clipped to L)."""
    out = set()
    for spec in specs:
        text = str(spec).strip().upper()
        if text.startswith("L"):
            divisor = text.partition("/")[2] or "1"
            if not divisor.isdigit() or int(divisor) < 1:
                raise ValueError(f"exit {spec!r}: expected a layer number, L, or L/k")
            out.add(max(1, num_layers // int(divisor)))
        elif text.isdigit() and int(text) >= 1:
            out.add(min(int(text), num_layers))
        else:
            raise ValueError(f"exit {spec!r}: expected a layer number, L, or L/k")
    return sorted(out)


def grid(p: Preset, variants: tuple[str, ...], compiles: tuple[bool, ...], num_layers: int) -> list[Variant]:
    """Vanilla, then serial and pipelined side by side for each exit and criterion; exits clipped to L."""
    exits = exit_layers(p.exits, num_layers)
    out = []
    for T in p.seq_lens:
        for c in compiles:
            if "vanilla" in variants:
                out.append(Variant("vanilla", T, compile=c))
            for j in exits:
                for crit in p.criteria:
                    out += [Variant(k, T, j, crit, c) for k in ("serial", "pipelined") if k in variants]
            if "vcas" in variants:
                out += [Variant("vcas", T, compile=c, vcas=r) for r in vcas_rows.ratios_for("vcas")]
            if "sift+vcas" in variants:
                out += [Variant("sift+vcas", T, exits[0], p.criteria[0], c, vcas=r)
                        for r in vcas_rows.ratios_for("sift+vcas")]
    return out


# ----------------------------------------------------------------------------- measuring


class StepClock:
    """Step-boundary timestamps: CUDA events on the training stream (read once at the end), or
    perf_counter on CPU. Step k lasts from boundary k to boundary k + 1, so nothing between steps is lost."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def ensure_distributed() -> torch.device:
    """A one-rank process group (DeepSpeed needs one); returns this process's device. Under `sift bench`
    (launcher/bench.py) the launcher's variables are already exported."""
    import torch.distributed as dist

    from engine import ds

    if not (dist.is_available() and dist.is_initialized()):
        ds.one_process_env(os.environ)
        ds.init_distributed(None)
    return ds.device_for(int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class Measured:
    times: list[float]
    trained: int
    scored: int
    nonfinite: int
    phases: dict[str, float]
    loss_mean: float
    wall_s: float


def measure(sched: Any, timer: Any, p: Preset, cuda: bool, after_warmup: Callable[[], None] | None) -> Measured:
    """Warm up, then time ``p.steps`` micro-steps at their boundaries; one host sync at the end."""
    for d in range(p.warmup):
        sched.micro_step(d, d)
    sync(cuda)
    timer.flush()  # discard the warm-up's phases (compilation, first-step scoring on the main stream)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if after_warmup is not None:
        after_warmup()
    clock, losses, trained, scored, nonfinite = StepClock(cuda), [], 0, 0, 0
    wall0 = time.perf_counter()
    clock.mark()
    for d in range(p.warmup, p.warmup + p.steps):
        mo = sched.micro_step(d, d)
        clock.mark()
        if mo.finite:  # a skipped step's loss would make the mean NaN; it is counted instead
            losses.append(mo.out["loss"].detach())
        nonfinite += not mo.finite
        trained += mo.rows_trained if mo.finite else 0
        scored += mo.rows_scored
    times = clock.intervals()
    sync(cuda)  # the pipelined schedule has the next batch's scoring in flight
    return Measured(times, trained, scored, nonfinite, timer.flush(),
                    torch.stack(losses).float().mean().item() if losses else float("nan"),
                    time.perf_counter() - wall0)


def profile(sched: Any, first_draw: int, steps: int, cuda: bool, path: Path) -> None:
    """``steps`` more micro-steps under torch.profiler: a Chrome/Perfetto trace (.json.gz) and a table of
    the top operators (.txt), for finding out why a variant misses its target."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for d in range(first_draw, first_draw + steps):
            sched.micro_step(d, d)
        sync(cuda)
    prof.export_chrome_trace(str(path.with_suffix(".json.gz")))
    key = "cuda_time_total" if cuda else "cpu_time_total"
    path.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=key, row_limit=25) + "\n")


@dataclass
class Built:
    """One variant built as `sift train` builds it: config, model, methods, DeepSpeed engine, schedule."""

    cfg: Any
    model: Any
    methods: Any
    engine: Any
    stage: int
    precision: str
    timer: Any
    sched: Any

    def destroy(self) -> None:
        """DeepSpeed's own teardown (optimizer hooks, buffers); the caller drops its reference after."""
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()


def build_variant(v: Variant, p: Preset, *, device: torch.device, pools: dict[tuple[int, int], list],
                  extra: list[str]) -> Built:
    """Model (seeded), methods, engine and schedule of one variant over its synthetic batch pool. Call it
    inside ``engine.streams.training_stream(device)``, as `sift train` runs."""
    from engine.config import load_config
    from engine.models import build_model
    from engine.models.base import DataFacts
    from engine.setup import attach_methods, build_engine, build_schedule, prepare_methods
    from engine.streams import PhaseTimer

    cuda = device.type == "cuda"
    cfg = load_config(None, v.overrides(p, extra))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, DataFacts(vocab_size=p.vocab, seq_len=v.seq_len, objective=p.objective, pad_id=PAD,
                                             eos_id=PAD))
    methods = prepare_methods(cfg, model)
    engine, stage, precision = build_engine(cfg, model, world_size=1, cuda=cuda)
    attach_methods(methods, model, engine, stage=stage, device=device, rank=0, world_size=1)
    timer = PhaseTimer(cuda)
    sched = build_schedule(cfg, engine, methods, batches=cycle(pools[(cfg.gross_batch_size, v.seq_len)]),
                           device=device, rank=0, world_size=1, timer=timer)
    return Built(cfg, model, methods, engine, stage, precision, timer, sched)


def run_variant(v: Variant, p: Preset, *, device: torch.device, pools: dict[tuple[int, int], list],
                extra: list[str], peak: float | None, after_warmup: Callable[[], None] | None = None,
                profile_dir: Path | None = None, profile_steps: int = 3) -> dict[str, Any]:
    """Build (as `sift train` does, on the training stream), measure, free; one result row (ratios are
    added later)."""
    from engine.streams import training_stream

    cuda = device.type == "cuda"
    with training_stream(device):
        baseline = torch.cuda.memory_allocated() if cuda else None  # whatever earlier variants left behind
        baseline_reserved = torch.cuda.memory_reserved() if cuda else None
        t0 = time.perf_counter()
        b = build_variant(v, p, device=device, pools=pools, extra=extra)
        sync(cuda)
        mem_static = torch.cuda.memory_allocated() - baseline if cuda else None
        build_s = time.perf_counter() - t0

        m = measure(b.sched, b.timer, p, cuda, after_warmup)
        peak_mem = torch.cuda.max_memory_allocated() - baseline if cuda else None
        # Reserved counts the side stream's cached blocks too: the allocator cannot lend them to the
        # training stream, so this is the footprint of scoring concurrently with training.
        peak_reserved = torch.cuda.max_memory_reserved() - baseline_reserved if cuda else None
        flops = b.model.flops(v.seq_len)
        head_fraction = scored_fraction(b.cfg.sift.score_positions, b.model, pools[(b.cfg.gross_batch_size,
                                                                                     v.seq_len)][0])
        extra_fields = {"vcas": vcas_rows.row_extra(b.methods, cuda)} if v.kind in vcas_rows.KINDS else {}
        if profile_dir is not None:  # after the timed steps, so it cannot perturb them
            profile(b.sched, p.warmup + p.steps, profile_steps, cuda, profile_dir / v.name)
        B, G, stage, precision = b.cfg.train.micro_batch_size, b.cfg.gross_batch_size, b.stage, b.precision
        b.destroy()
        del b
        free_memory(cuda, v.compile)
    row = summarize(v, m.times, trained=m.trained, scored=m.scored, phases=m.phases, flops=flops, peak=peak,
                    head_fraction=head_fraction)
    row.update(B=B, G=G if v.kind != "vanilla" else B, zero_stage=stage, precision=precision, build_s=build_s,
               wall_s=m.wall_s, loss_mean=m.loss_mean, nonfinite_steps=m.nonfinite, peak_mem_bytes=peak_mem,
               peak_reserved_bytes=peak_reserved, static_mem_bytes=mem_static, baseline_mem_bytes=baseline,
               **extra_fields)
    return row


def scored_fraction(score_positions: int, model: Any, batch: dict[str, torch.Tensor]) -> float:
    """The share of the exit's head positions the scorer runs on (``sift.score_positions`` of P)."""
    if not score_positions:
        return 1.0
    return min(1.0, score_positions / model.exit_path(1).targets(batch).shape[1])


def free_memory(cuda: bool, compiled: bool) -> None:
    """Release the variant's engine before the next is built (their peaks must not overlap)."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()  # fresh compilation per variant; no recompile-limit carry-over
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def summarize(v: Variant, times: list[float], *, trained: int, scored: int, phases: dict[str, float],
              flops: FlopCounts, peak: float | None, head_fraction: float = 1.0) -> dict[str, Any]:
    """Step-time statistics, throughputs, FLOP rates and MFU of one variant.

    Rates use the median step time: the steady state, robust to a stray slow step (a GC pause, a
    neighbour on a shared machine); the mean is kept too (on a dedicated GPU the two agree)."""
    n = len(times)
    p10, med, p90 = (float(x) for x in np.percentile(times, [10, 50, 90]))
    trained_per_step, scored_per_step = trained / n, scored / n
    per_seq = {"train": flops.train(),
               "scoring": flops.scoring(v.exit_layer, head_fraction) if v.exit_layer else 0.0}
    train_flops, score_flops = trained_per_step * per_seq["train"], scored_per_step * per_seq["scoring"]
    tflops_train, tflops_total = train_flops / med / 1e12, (train_flops + score_flops) / med / 1e12
    return {
        "name": v.name, "variant": v.kind, "seq_len": v.seq_len, "exit_layer": v.exit_layer,
        "criterion": v.criterion, "compile": v.compile, "steps": n,
        "step_time_s": {"median": med, "p10": p10, "p90": p90, "mean": float(np.mean(times))},
        "backprop_seq_per_s": trained_per_step / med,
        "backprop_tokens_per_s": trained_per_step * v.seq_len / med,
        "scored_seq_per_s": scored_per_step / med,
        "flops_per_seq": per_seq,
        "model_tflops": {"train": tflops_train, "with_scoring": tflops_total},
        "mfu": {"train": tflops_train * 1e12 / peak if peak else None,
                "with_scoring": tflops_total * 1e12 / peak if peak else None},
        "phases_s": {k: phases.get(k, 0.0) / n for k in PHASES},
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """overhead_ratio: back-propagated seq/s over vanilla's (same T, compile); overlap_efficiency
    (pipelined rows): (serial - pipelined median step time) / serial scoring time per step."""
    def key(r: dict[str, Any], kind: str) -> tuple:
        return (kind, r["seq_len"], r["compile"]) + ((r["exit_layer"], r["criterion"]) if kind != "vanilla" else ())

    index = {key(r, r["variant"]): r for r in rows}
    for r in rows:
        base = index.get(key(r, "vanilla"))
        r["overhead_ratio"] = r["backprop_seq_per_s"] / base["backprop_seq_per_s"] if base else None
        r["overlap_efficiency"] = None
        serial = index.get(key(r, "serial")) if r["variant"] == "pipelined" else None
        if serial and serial["phases_s"]["scoring"] > 0:
            saved = serial["step_time_s"]["median"] - r["step_time_s"]["median"]
            r["overlap_efficiency"] = saved / serial["phases_s"]["scoring"]


# ----------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = machine()["cpu"] or platform.machine()
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}"


def environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    """Provenance (sift_common.provenance) plus the device and timing method; library versions also at
    the top level, where the report reads them."""
    cuda = device.type == "cuda"
    meta = provenance("python -m benchmarks.throughput " + shlex.join(argv))
    return {
        **meta, **meta["versions"],
        "device": device_name(device),
        "device_type": device.type,
        "cuda": torch.version.cuda if cuda else None,
        "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
        "timing": "CUDA events at step boundaries" if cuda else "time.perf_counter at step boundaries",
    }


# ----------------------------------------------------------------------------- command line


def csv(kind: type) -> Any:
    return lambda s: tuple(kind(x) for x in s.split(",") if x.strip())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sift bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="auto: gpu-base on CUDA, cpu-tiny otherwise (with --model a decoder: gpu-decoder or "
                        "cpu-decoder)")
    p.add_argument("--model", help="FAMILY-SIZE of engine/models/presets.py, e.g. bert-base, gpt2-125m, llama-1b")
    p.add_argument("--vocab", type=int, help="vocabulary size of the synthetic data and the model")
    p.add_argument("--variants", type=csv(str), default=VARIANTS,
                   help="comma list of vanilla,serial,pipelined (default) and vcas,sift+vcas")
    p.add_argument("--exits", type=csv(str), help="exit layers: numbers, L, L/2, L/4 (clipped to the model depth); "
                                                  "default 1,2,3,6,12 (decoders: 1,2,L/4,L/2)")
    p.add_argument("--criteria", type=csv(str), help="loss,entropy (default both)")
    p.add_argument("--seq-lens", type=csv(int), help="sequence lengths (gpu-base: 128,512; cpu-tiny: 64)")
    p.add_argument("--steps", type=int, help="timed steps per variant")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (compilation happens here)")
    p.add_argument("--micro-batch", type=int, help="B, back-propagated rows per step")
    p.add_argument("--keep", type=float, help="B / G (default 0.5: G = 2B)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--zero", type=int, choices=[0, 1, 2], help="ZeRO stage (default 1)")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="train.compile: torch.compile the encoder layers (both: run each variant twice)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (cpu-tiny: 1)")
    p.add_argument("--peak-tflops", type=float, help="peak for MFU (default: the GPU's bf16 dense peak)")
    p.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench; the committed results "
                        "were written with --out benchmarks/results)")
    p.add_argument("--name", help="output file stem (default throughput-<preset>)")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG")
    p.add_argument("--profile-dir", help="also write a torch.profiler trace and top-op table per variant here")
    p.add_argument("--profile-steps", type=int, default=3, help="micro-steps per profile (after the timed ones)")
    p.add_argument("overrides", nargs="*", help="extra run-config overrides, e.g. model.attn_implementation=eager")
    args = p.parse_args(argv)
    bad = [v for v in args.variants if v not in (*VARIANTS, *vcas_rows.KINDS)]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {', '.join((*VARIANTS, *vcas_rows.KINDS))}")
    if args.criteria and any(c not in CRITERIA for c in args.criteria):
        p.error("--criteria: choose from loss, entropy")
    if any(n is not None and n < 1 for n in (args.steps, args.warmup, args.profile_steps)):
        p.error("--steps, --warmup and --profile-steps must be >= 1")
    args.family = args.size = None
    if args.model:
        from engine.models.presets import FAMILY_PRESETS

        args.family, _, args.size = args.model.partition("-")
        if args.size not in FAMILY_PRESETS.get(args.family, {}):
            known = ", ".join(f"{f}-{s}" for f, sizes in FAMILY_PRESETS.items() for s in sizes)
            p.error(f"--model {args.model!r}: not a FAMILY-SIZE of engine/models/presets.py ({known})")
    if args.exits:
        try:
            exit_layers(args.exits, 1)
        except ValueError as e:
            p.error(f"--exits: {e}")
    return args


DECODER_VOCAB = {"gpt2": 50257, "llama": 128256}
"""The GPU decoder preset's vocabulary per family (GPT-2's; Llama-3's), unless --vocab says otherwise."""


def resolve_preset(args: argparse.Namespace, cuda: bool) -> tuple[str, Preset]:
    decoder = args.family not in (None, "bert")
    name = args.preset
    if name == "auto":
        name = ("gpu-decoder" if cuda else "cpu-decoder") if decoder else ("gpu-base" if cuda else "cpu-tiny")
    p = PRESETS[name]
    if args.family is not None:
        p = replace(p, family=args.family, model=args.size)
        if name == "gpu-decoder" and args.family in DECODER_VOCAB:
            p = replace(p, vocab=DECODER_VOCAB[args.family])
    changes = {"exits": args.exits, "criteria": args.criteria, "seq_lens": args.seq_lens, "steps": args.steps,
               "warmup": args.warmup, "micro_batch": args.micro_batch, "keep": args.keep, "vocab": args.vocab,
               "precision": args.precision, "zero_stage": args.zero, "threads": args.threads}
    return name, replace(p, **{k: v for k, v in changes.items() if v is not None})


def model_layers(p: Preset, extra: list[str]) -> int:
    from engine.config import load_config
    from engine.models.presets import model_layers as layers_of

    cfg = load_config(None, [f"model.family={p.family}", f"model.preset={p.model}", *extra])
    return layers_of(cfg.model.family, cfg.model.preset, cfg.model.num_layers)


def write_outputs(result: dict[str, Any], out: Path, stem: str, chart: bool) -> str | None:
    """JSON and markdown table, then the PNG chart. The chart is optional: if it fails (no matplotlib, a
    broken backend) the tables are already written and the reason is returned instead of raised."""
    from benchmarks import report

    out.mkdir(parents=True, exist_ok=True)
    add_ratios(result["rows"])
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    vcas_table = vcas_rows.markdown(result) if any("vcas" in r for r in result["rows"]) else ""
    (out / f"{stem}.md").write_text(report.markdown(result) + vcas_table)
    if not chart:
        return None
    try:
        report.chart(result, out / f"{stem}.png")
    except Exception as e:  # any failure of the plotting stack; the measurements are safe on disk
        log.warning("chart not written (%s: %s); the JSON and markdown tables are", type(e).__name__, e)
        return f"{type(e).__name__}: {e}"
    return None


def finish(result: dict[str, Any], out: Path, stem: str, chart: bool) -> int:
    """Write the outputs, print the table and where everything went."""
    chart_error = write_outputs(result, out, stem, chart)
    print((out / f"{stem}.md").read_text())
    made = ".json, .md" + (", .png" if chart and chart_error is None else "")
    print(f"wrote {out / stem}{made}" + (f" (no chart: {chart_error})" if chart_error else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    setup_logging()
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from engine.models import family

    device = ensure_distributed()
    cuda = device.type == "cuda"
    name, p = resolve_preset(args, cuda)
    if p.threads:
        torch.set_num_threads(p.threads)
    env = environment(device, argv)
    peak = F.peak_flops(env["device"], p.precision, args.peak_tflops)
    prof_dir = Path(args.profile_dir) if args.profile_dir else None
    if prof_dir is not None:
        prof_dir.mkdir(parents=True, exist_ok=True)
    out, stem = Path(args.out), args.name or f"throughput-{name}"
    compiles = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    variants = grid(p, tuple(args.variants), compiles, model_layers(p, args.overrides))
    shapes = {(rows, T) for T in p.seq_lens for rows in (p.micro_batch, round(p.micro_batch / p.keep))}
    pools = {(g, T): batch_pool(g, T, p.vocab, pin=cuda, objective=p.objective) for g, T in shapes}
    result = {"meta": {**env, "preset": name, "settings": asdict(p), "compile": args.compile,
                       "overrides": list(args.overrides), "peak_flops": peak,
                       "real_token_fraction": real_token_fraction(pools[(p.micro_batch, p.seq_lens[0])]),
                       "flop_formula": family(p.family).FLOP_FORMULA},
              "rows": []}
    log.info("%s on %s: %d variants, %d warm-up + %d timed steps each", name, env["device"], len(variants),
             p.warmup, p.steps)
    for v in variants:
        row = run_variant(v, p, device=device, pools=pools, extra=list(args.overrides), peak=peak,
                          profile_dir=prof_dir, profile_steps=args.profile_steps)
        result["rows"].append(row)
        write_outputs(result, out, stem, chart=False)  # a crash later keeps what was measured
        log.info("%-36s step %.1f ms (p10 %.1f, p90 %.1f), %.1f back-propagated seq/s", v.name,
                 1e3 * row["step_time_s"]["median"], 1e3 * row["step_time_s"]["p10"],
                 1e3 * row["step_time_s"]["p90"], row["backprop_seq_per_s"])
    return finish(result, out, stem, chart=not args.no_chart)


if __name__ == "__main__":
    sys.exit(run_command("benchmarks.throughput", main, sys.argv[1:]))
