"""The Python side of benchmarks/gpu/gpu_validate.sh: environment report, training corpus, final summary.

    python -m benchmarks.gpu.gpu_report env --out OUT/env.json     # versions, SDPA backends, streams, BertLayer
    python -m benchmarks.gpu.gpu_report corpus DIR --docs 800       # the generated corpus the training stages use
    python -m benchmarks.gpu.gpu_report summary OUT                # every stage's outcome and the issue's targets

All run on CPU too (the environment then says "no CUDA"; the summary reads whatever files exist).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

# The issue's targets: one H100, BERT-base, T = 512, bf16, B = 32 of G = 64, exit 1.
TARGET_T = 512
VANILLA_SEQ_PER_S = 1300.0
SERIAL_RATIO = 0.90
PIPELINED_RATIO = 0.96
PEAK_MEMORY_RATIO = 1.10


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"


def sdpa_probe() -> dict[str, Any]:
    """Which SDPA kernels run a BERT-base-shaped bf16 attention with no mask, a (B, 1, T, T) boolean mask
    and a (B, 1, T, T) additive float mask (what transformers' mask creation hands SDPA)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, T, D = 4, 12, 512, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = torch.ones(B, 1, T, T, dtype=torch.bool, device="cuda")
    keep[0, ..., T // 2:] = False  # one padded row
    masks = {"none": None, "bool (B,1,T,T)": keep,
             "float (B,1,T,T)": torch.zeros(B, 1, T, T, device="cuda", dtype=torch.bfloat16).masked_fill(~keep, -1e4)}
    out: dict[str, Any] = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        for label, mask in masks.items():
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                torch.cuda.synchronize()
                out[f"{backend.name} / {label}"] = "ok"
            except Exception as e:  # a backend that cannot take these inputs says why
                out[f"{backend.name} / {label}"] = _first_line(e)
    return out


def bert_layer_report() -> dict[str, Any]:
    """What the installed transformers' BertLayer returns, and the attention mask it is built with for a
    padded and an unpadded batch (engine/models/bert.py chains these by hand)."""
    import torch
    from transformers import BertConfig
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.models.bert.modeling_bert import BertLayer

    from engine.models.compat import first_tensor

    cfg = BertConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128, attn_implementation="sdpa")
    x = torch.randn(2, 8, 64)
    out = BertLayer(cfg, layer_idx=0).eval()(x, None)
    report: dict[str, Any] = {"returns": type(out).__name__, "first_tensor_shape": list(first_tensor(out).shape)}
    for label, attn in (("padded", torch.tensor([[1] * 8, [1] * 5 + [0] * 3])), ("unpadded", torch.ones(2, 8))):
        try:
            m = create_bidirectional_mask(config=cfg, inputs_embeds=x, attention_mask=attn)
            report[f"mask_{label}"] = None if m is None else f"{type(m).__name__} {m.dtype} {list(m.shape)}"
        except Exception as e:
            report[f"mask_{label}"] = _first_line(e)
    return report


def streams_report() -> dict[str, Any]:
    import torch

    from engine.streams import Streams, training_stream

    dev = torch.device("cuda")
    with training_stream(dev):
        inside = Streams(dev).priorities()
    return {"priority_range (least, greatest)": list(torch.cuda.Stream.priority_range()),
            "default stream": torch.cuda.default_stream(dev).priority,
            "Streams outside training_stream": Streams(dev).priorities(),
            "Streams inside training_stream": inside}


def environment() -> dict[str, Any]:
    import os

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "transformers", "deepspeed", "numpy", "tokenizers",
                                              "pyarrow", "triton", "hjson", "py-cpuinfo")},
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "env": {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "TORCH_NCCL_HIGH_PRIORITY", "CUDA_VISIBLE_DEVICES")},
    }
    try:
        env["bert_layer"] = bert_layer_report()
    except Exception as e:
        env["bert_layer"] = _first_line(e)
    if not torch.cuda.is_available():
        env["note"] = "no CUDA"
        return env
    props = torch.cuda.get_device_properties(0)
    env["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count}
    env["cudnn"] = torch.backends.cudnn.version()
    env["nccl"] = str(torch.cuda.nccl.version())
    env["sdpa_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                           "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                           "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                           "math": torch.backends.cuda.math_sdp_enabled()}
    for key, probe in (("sdpa_probe", sdpa_probe), ("streams", streams_report)):
        try:
            env[key] = probe()
        except Exception as e:
            env[key] = _first_line(e)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,"
                            "temperature.gpu", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    return env


# ----------------------------------------------------------------------------- summary


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def stage_lines(out: Path) -> list[str]:
    rc = out / "rc.txt"
    if not rc.is_file():
        return ["(no stages recorded)"]
    return ["| stage | exit | limit s | took s |", "|---|---|---|---|"] + [
        "| " + " | ".join(line.split()) + " |" for line in rc.read_text().splitlines() if line.strip()]


def pytest_line(out: Path) -> str:
    try:
        root = ET.parse(out / "pytest-gpu.xml").getroot()
    except (OSError, ET.ParseError):
        return "GPU tests: no junit report"
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return (f"GPU tests: {total['tests']} run, {total['failures']} failed, {total['errors']} errors, "
            f"{total['skipped']} skipped")


def bench_lines(out: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    lines, by_name = [], {}
    for path in sorted((out / "bench").glob("*.json")):
        r = _load_json(path)
        if not r or "rows" not in r:
            continue
        m = r["meta"]
        lines += [f"{path.name}: {m.get('device')} torch {m.get('torch')} deepspeed {m.get('deepspeed')} "
                  f"transformers {m.get('transformers')}",
                  "| variant | step ms (p10-p90) | bp seq/s | x vanilla | overlap | MFU | peak GiB alloc/reserved |",
                  "|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            by_name.setdefault(x["name"], x)
            st, peak, res = x["step_time_s"], x.get("peak_mem_bytes"), x.get("peak_reserved_bytes")
            lines.append(
                f"| {x['name']} | {1e3 * st['median']:.1f} ({1e3 * st['p10']:.1f}-{1e3 * st['p90']:.1f}) | "
                f"{x['backprop_seq_per_s']:.1f} | {_fmt(x.get('overhead_ratio'), '.3f')} | "
                f"{_fmt(x.get('overlap_efficiency'), '.2f')} | {_fmt(x['mfu']['train'], '.1%')} | "
                f"{_fmt(peak and peak / 2**30, '.2f')}/{_fmt(res and res / 2**30, '.2f')} |")
        lines.append("")
    return lines, by_name


def audit_lines(out: Path) -> tuple[list[str], dict[str, Any]]:
    r = _load_json(out / "sync-audit.json")
    if not r:
        return ["sync audit: no report"], {}
    lines, per = [], {}
    mode = f" ({' '.join(r['overrides'])})" if r.get("overrides") else ""
    for v in r["variants"]:
        if "per_micro_step" not in v:
            lines.append(f"sync audit {v['name']}: {v.get('note')}")
            continue
        per[v["name"]] = v
        device_wide = sum(x["count"] for x in v["explicit"] if x["what"] == "torch.cuda.synchronize") / v["steps"]
        lines.append(f"sync audit {v['name']}{mode}: per micro-step {v['per_micro_step']['flagged']:g} host reads flagged, "
                     f"{device_wide:g} device-wide synchronize, {v['per_micro_step']['explicit']:g} explicit waits")
    return lines, per


def training_lines(out: Path) -> list[str]:
    lines = []
    for run in sorted(p for p in (out / "train").glob("*") if p.is_dir()):
        path = run / "metrics.jsonl"
        if not path.is_file():
            lines.append(f"training {run.name}: no metrics")
            continue
        recs = []
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
        steps = [r for r in recs if "loss" in r and "event" not in r]
        if not steps:
            lines.append(f"training {run.name}: no step records")
            continue
        seen: dict[int, int] = {}
        for r in steps:
            seen[r["step"]] = seen.get(r["step"], 0) + 1
        redone = sorted(s for s, n in seen.items() if n > 1)
        finite = all(isinstance(r["loss"], (int, float)) and r["loss"] == r["loss"] for r in steps)
        lines.append(f"training {run.name}: steps {steps[0]['step']}..{steps[-1]['step']} ({len(steps)} records), "
                     f"loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}, all finite: {finite}"
                     + (f", steps logged twice (redone after the kill): {redone[0]}..{redone[-1]}" if redone else ""))
    return lines or ["training: no runs"]


def target_lines(rows: dict[str, dict[str, Any]], audit: dict[str, Any]) -> list[str]:
    def row(kind: str, crit: str = "loss") -> dict[str, Any] | None:
        name = f"T{TARGET_T}-vanilla" if kind == "vanilla" else f"T{TARGET_T}-{kind}-j1-{crit}"
        return rows.get(name)

    def verdict(value: float | None, ok: bool) -> str:
        return "not measured" if value is None else ("met" if ok else "MISSED")

    van, ser, pip = row("vanilla"), row("serial"), row("pipelined")
    v = van and van["backprop_seq_per_s"]
    s = ser and ser.get("overhead_ratio")
    p = pip and pip.get("overhead_ratio")
    mem = None
    if pip and ser and pip.get("peak_mem_bytes") and ser.get("peak_mem_bytes"):
        mem = pip["peak_mem_bytes"] / ser["peak_mem_bytes"]
    lines = ["| target (T=512, exit 1, loss) | measured | |", "|---|---|---|",
             f"| vanilla >= {VANILLA_SEQ_PER_S:,.0f} bp seq/s | {_fmt(v, ',.1f')} | "
             f"{verdict(v, v is not None and v >= VANILLA_SEQ_PER_S)} |",
             f"| serial >= {SERIAL_RATIO} x vanilla | {_fmt(s, '.3f')} | {verdict(s, s is not None and s >= SERIAL_RATIO)} |",
             f"| pipelined >= {PIPELINED_RATIO} x vanilla | {_fmt(p, '.3f')} | "
             f"{verdict(p, p is not None and p >= PIPELINED_RATIO)} |",
             f"| pipelined peak <= {PEAK_MEMORY_RATIO} x serial | {_fmt(mem, '.3f')} | "
             f"{verdict(mem, mem is not None and mem <= PEAK_MEMORY_RATIO)} |"]
    for name, a in audit.items():
        device_wide = sum(x["count"] for x in a["explicit"] if x["what"] == "torch.cuda.synchronize") / a["steps"]
        reads = a["per_micro_step"]["flagged"]
        lines.append(f"| {name}: no device-wide sync, <= 1 host read per log interval | {device_wide:g} syncs, "
                     f"{reads:g} reads per micro-step | {verdict(reads, device_wide == 0 and reads == 0)} |")
    return lines


def summary(out: Path) -> str:
    bench, rows = bench_lines(out)
    audit, per = audit_lines(out)
    env = _load_json(out / "env.json") or {}
    head = [f"# GPU validation summary ({out})", "",
            f"device: {env.get('device', {}).get('name') if isinstance(env.get('device'), dict) else env.get('note')}; "
            f"versions: {env.get('versions')}", f"BertLayer: {env.get('bert_layer')}",
            f"streams: {env.get('streams')}", ""]
    return "\n".join(head + stage_lines(out) + ["", pytest_line(out), ""] + audit + [""] + bench
                     + training_lines(out) + ["", "## Targets", ""] + target_lines(rows, per)) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.gpu_report", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="versions, SDPA backends, stream priorities, BertLayer")
    e.add_argument("--out", help="also write the report as JSON here")
    c = sub.add_parser("corpus", help="write data_pipeline's generated demo corpus (no stdlib text)")
    c.add_argument("dir", help="output directory (DIR/demo-corpus.jsonl)")
    c.add_argument("--docs", type=int, default=800, help="generated documents (about 250 words each)")
    c.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("summary", help="read a gpu_validate.sh output directory, print the summary")
    s.add_argument("dir", help="the script's $OUT")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command == "env":
        env = environment()
        text = json.dumps(env, indent=1, default=str)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        return 0
    if args.command == "corpus":
        from data_pipeline.demo_corpus import write_demo_corpus

        print(write_demo_corpus(args.dir, seed=args.seed, target_docs=args.docs, stdlib=False))
        return 0
    print(summary(Path(args.dir)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
