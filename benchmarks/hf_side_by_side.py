"""The stack users have next to ours, on one model and data set: the plain Hugging Face Trainer with
DeepSpeed ZeRO-1 (vanilla), ``SiftTrainer`` (SIFT, keep 0.5, through the same integration), and
`sift train` vanilla and SIFT (serial schedule, ZeRO-1), all on the same packed rows.

    python -m benchmarks.hf_side_by_side --out benchmarks/results/hf_side_by_side --steps 40

A tiny GPT-2 (hidden 64, 2 blocks, the project's GPT-2 builder, so every arm starts from the same
architecture and seed) on the demo corpus prepared at T = 64 with the committed byte-level BPE. Each arm
is its own process, run one after another; an arm's step time is the median wall time between
consecutive optimizer-step ends after ``--warmup`` steps (the Trainer: a callback at ``on_step_end``;
`sift train`: its per-step record, B x accumulation / ``backprop_seq_per_s``), and its back-propagated
rows per second is B x accumulation / step time. Ratios are to the plain Trainer of the same run.
Timings on a shared machine are noisy: the record keeps the load average.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sift_common.provenance import load_average, provenance

REPO = Path(__file__).resolve().parents[1]
ARMS = ("hf-vanilla", "hf-sift", "sift-vanilla", "sift-sift")
B, GA, KEEP, SEQ = 8, 2, 0.5, 64
MODEL = {"family": "gpt2", "preset": "tiny", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}


def prepare(out: Path) -> Path:
    data = out / "data"
    if (data / "index.json").is_file():
        return data
    from data_pipeline import prepare as prep
    from data_pipeline.demo_corpus import write_demo_corpus

    corpus = write_demo_corpus(out / "corpus", seed=0, target_docs=600, stdlib=False)
    code = prep.main([str(corpus), "--out", str(data), "--objective", "clm", "--seq-len", str(SEQ), "--tokenizer",
                      str(REPO / "tests" / "assets" / "bpe-512"), "--val-fraction", "0.05", "--seed", "0",
                      "--num-proc", "1", "--log-level", "WARNING"])
    if code:
        raise SystemExit(f"preparing the data failed ({code})")
    return data


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


# ----------------------------------------------------------------------------- the Trainer arms (child)


def hf_child(arm: str, data: Path, steps: int, out: Path) -> None:
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from data_pipeline.reader import ShardDataset
    from engine.config import ModelConfig
    from engine.models.base import DataFacts
    from engine.models.gpt2 import hf_config
    from sift_hf import SiftArguments, SiftTrainer

    shards = ShardDataset.open(data, "train")
    tokens = torch.as_tensor(shards.rows(np.arange(len(shards)))["tokens"]).long()  # the packed rows

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(tokens)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": tokens[i], "labels": tokens[i]}

    meta, special = shards.meta, shards.meta.special_ids
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config(ModelConfig(**MODEL, dropout=0.1), DataFacts(
        vocab_size=meta.vocab_size, seq_len=SEQ, objective="clm", pad_id=special["pad"], eos_id=special["eos"])))
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    ds = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
          "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    args = TrainingArguments(output_dir=str(out / f"{arm}.trainer"), per_device_train_batch_size=B,
                             gradient_accumulation_steps=GA, max_steps=steps, learning_rate=1e-3, logging_steps=steps,
                             save_strategy="no", report_to=[], seed=0, disable_tqdm=True, dataloader_num_workers=0,
                             deepspeed=ds)
    kw: dict[str, Any] = {"model": model, "args": args, "train_dataset": Rows(), "callbacks": [Clock()]}
    trainer = SiftTrainer(**kw, sift=SiftArguments(keep=KEEP)) if arm == "hf-sift" else Trainer(**kw)
    trainer.train()
    (out / f"{arm}.ends.json").write_text(json.dumps(ends))


# ----------------------------------------------------------------------------- the arms (parent)


def _run(cmd: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {result.returncode}:\n{result.stderr[-3000:]}")


def run_hf(arm: str, data: Path, steps: int, out: Path) -> list[float]:
    cmd = [sys.executable, "-m", "benchmarks.hf_side_by_side", "--child", arm, "--data", str(data),
           "--steps", str(steps), "--out", str(out)]
    _run(cmd, child_env())
    ends = json.loads((out / f"{arm}.ends.json").read_text())
    return [b - a for a, b in itertools.pairwise(ends)]


def run_sift(arm: str, data: Path, steps: int, out: Path) -> list[float]:
    run_dir = out / f"{arm}.run"
    overrides = [f"data.path={data}", f"train.out_dir={run_dir}", f"train.steps={steps}", f"train.micro_batch_size={B}",
                 f"train.grad_accum={GA}", "train.log_every=1", f"train.eval_every={steps * 10}", "train.eval_samples=64", "train.save_every=0",
                 "train.resume=false", "train.tensorboard=false", "train.progress=false", "data.num_workers=0",
                 "optim.lr=1e-3", "deepspeed.config=zero1.json", "deepspeed.precision=fp32", "sift.schedule=serial",
                 "sift.warmup_steps=0", "sift.fidelity_every=0", f"sift.keep={KEEP}",
                 f"method={'sift' if arm == 'sift-sift' else 'none'}", *(f"model.{k}={v}" for k, v in MODEL.items())]
    env = {k: v for k, v in child_env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_PORT", "MASTER_ADDR")}
    _run([sys.executable, str(REPO / "launcher" / "train.py"), *overrides], env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [B * GA / r["backprop_seq_per_s"] for r in records if "event" not in r and "backprop_seq_per_s" in r]


def summarise(times: dict[str, list[float]], warmup: int) -> dict[str, dict[str, float]]:
    out = {}
    for arm, dts in times.items():
        kept = dts[warmup:] or dts
        step = statistics.median(kept)
        out[arm] = {"step_s": step, "backprop_rows_per_s": B * GA / step, "steps_timed": len(kept)}
    base = out["hf-vanilla"]
    for r in out.values():
        r["step_time_ratio"] = r["step_s"] / base["step_s"]
        r["backprop_rows_per_s_ratio"] = r["backprop_rows_per_s"] / base["backprop_rows_per_s"]
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| arm | step (s) | back-propagated rows/s | step time / plain Trainer | rows/s / plain Trainer |",
             "|---|---:|---:|---:|---:|"]
    for arm, r in result["arms"].items():
        lines.append(f"| {arm} | {r['step_s']:.4f} | {r['backprop_rows_per_s']:.1f} | {r['step_time_ratio']:.2f} | "
                     f"{r['backprop_rows_per_s_ratio']:.2f} |")
    p = result["provenance"]
    return (f"# Plain Trainer vs SiftTrainer vs sift train\n\n`{p['command']}` at {p['git_commit']}, {p['date']}; "
            f"B = {B}, accumulation {GA}, keep {KEEP} (G = {round(B / KEEP)}), T = {SEQ}, "
            f"load average {result['load_before']} before and {p['load_average']} after.\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/hf_side_by_side"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--child", choices=("hf-vanilla", "hf-sift"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.child:
        hf_child(a.child, a.data, a.steps, a.out)
        return 0
    work = a.out / "work"
    data = prepare(work)
    load_before = load_average()
    times = {arm: (run_hf if arm.startswith("hf-") else run_sift)(arm, data, a.steps, work) for arm in a.arms}
    if "hf-vanilla" not in times:
        raise SystemExit("the ratios need the hf-vanilla arm")
    result = {"arms": summarise(times, a.warmup), "step_times": times, "load_before": load_before,
              "provenance": provenance("python -m benchmarks.hf_side_by_side " + " ".join(argv or sys.argv[1:]),
                                       where=REPO)}
    (a.out / "result.json").write_text(json.dumps(result, indent=1))
    (a.out / "result.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
