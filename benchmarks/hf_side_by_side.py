"""The stack users have next to ours, on one model and data set: the plain Hugging Face Trainer with
DeepSpeed ZeRO-1 (vanilla), ``SiftTrainer`` (SIFT, keep 0.5, through the same integration), and
`sift train` vanilla and SIFT (serial schedule, ZeRO-1), all on the same packed rows.

    python -m benchmarks.hf_side_by_side --model small --steps 100 --warmup 10 --repeats 3 \
        --out benchmarks/results/hf_side_by_side

A GPT-2 built by the project's builder (so every arm starts from the same architecture and seed):
``tiny`` (2 blocks x 64 hidden) or ``small`` (4 blocks x 256 hidden, 4 heads, MLP 1024), on the demo
corpus prepared at T = 64 with the committed byte-level BPE. Each arm is its own process; the arm set
runs ``--repeats`` rounds, its order rotated by one each round so that a slow drift of the machine does
not favour one arm.

Step time, the same for every arm: the wall time between consecutive optimizer-step ends, taken right
after the optimizer step and before the loop logs, evaluates or saves (the Trainer: an ``on_step_end``
callback; `sift train`: the loop's ``step_end`` hook through the plugin benchmarks/step_clock.py), so an
interval holds one whole loop iteration: drawing the rows, scoring them (SIFT), every micro-step's
forward and backward, the optimizer step and the loop's own bookkeeping. Both loops log only at the
end. On a GPU the marks are host times, which follow the device: both loops read the loss's finiteness to
the host at every micro-step (the Trainer's NaN filter, `sift train`'s default ``train.nonfinite=skip``).
An arm's step time in a round is the median interval after ``--warmup`` intervals; its ratio to the
plain Trainer is taken within the round, and the table gives, over rounds, the median step time and
the ratios' median [min-max]. Back-propagated rows per second = B x accumulation / step time (B rows
per micro-step in every arm; the SIFT arms score G = B / keep to keep them). Every round's intervals
and the load average before and after are kept in ``result.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sift_common.provenance import load_average, provenance, version

REPO = Path(__file__).resolve().parents[1]
ARMS = {"hf-vanilla": "HF Trainer + DeepSpeed ZeRO-1", "hf-sift": "SiftTrainer (SIFT, same integration)",
        "sift-vanilla": "`sift train`, vanilla", "sift-sift": "`sift train`, SIFT (serial)"}
B, GA, KEEP, SEQ = 8, 2, 0.5, 64
MODELS = {
    "tiny": {"family": "gpt2", "preset": "tiny", "hidden_size": 64, "num_layers": 2, "num_heads": 2,
             "intermediate_size": 128},
    "small": {"family": "gpt2", "preset": "tiny", "hidden_size": 256, "num_layers": 4, "num_heads": 4,
              "intermediate_size": 1024},
}


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


def hf_child(arm: str, model_name: str, data: Path, steps: int, out: Path) -> None:
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
    model = GPT2LMHeadModel(hf_config(ModelConfig(**MODELS[model_name], dropout=0.1), DataFacts(
        vocab_size=meta.vocab_size, seq_len=SEQ, objective="clm", pad_id=special["pad"], eos_id=special["eos"])))
    ends: list[float] = []

    class Clock(TrainerCallback):  # right after the optimizer step, before the Trainer logs or saves
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


ARM_TIMEOUT_S = 1800  # one arm's process; a hung arm must not hold the machine


def _run(cmd: list[str], env: dict[str, str]) -> None:
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=ARM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{' '.join(cmd[:4])} ... did not finish in {ARM_TIMEOUT_S} s") from None
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {result.returncode}:\n{result.stderr[-3000:]}")


def _intervals(ends_file: Path, steps: int) -> list[float]:
    ends = json.loads(ends_file.read_text())
    if len(ends) != steps:
        raise SystemExit(f"{ends_file}: {len(ends)} step ends recorded, expected {steps}")
    return [b - a for a, b in itertools.pairwise(ends)]


def run_hf(arm: str, model: str, data: Path, steps: int, out: Path) -> list[float]:
    cmd = [sys.executable, "-m", "benchmarks.hf_side_by_side", "--child", arm, "--model", model, "--data",
           str(data), "--steps", str(steps), "--out", str(out)]
    _run(cmd, child_env())
    return _intervals(out / f"{arm}.ends.json", steps)


def run_sift(arm: str, model: str, data: Path, steps: int, out: Path) -> list[float]:
    run_dir, clock = out / f"{arm}.run", out / f"{arm}.ends.json"
    overrides = [f"data.path={data}", f"train.out_dir={run_dir}", f"train.steps={steps}", f"train.micro_batch_size={B}",
                 f"train.grad_accum={GA}", f"train.log_every={steps}", f"train.eval_every={steps * 10}",
                 "train.eval_samples=64", "train.save_every=0", "train.resume=false", "train.tensorboard=false",
                 "train.progress=false", "train.plugins=[benchmarks.step_clock]", "data.num_workers=0",
                 "optim.lr=1e-3", "deepspeed.config=zero1.json", "deepspeed.precision=fp32", "sift.schedule=serial",
                 "sift.warmup_steps=0", "sift.fidelity_every=0", f"sift.keep={KEEP}",
                 f"method={'sift' if arm == 'sift-sift' else 'none'}", *(f"model.{k}={v}" for k, v in MODELS[model].items())]
    env = {k: v for k, v in child_env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_PORT", "MASTER_ADDR")}
    _run([sys.executable, str(REPO / "launcher" / "train.py"), *overrides], dict(env, SIFT_STEP_CLOCK=str(clock)))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final save only; rounds would pile them up
    return _intervals(clock, steps)


def rotated(arms: list[str], r: int) -> list[str]:
    """Round r's order: the arm list rotated left by r."""
    k = r % len(arms)
    return arms[k:] + arms[:k]


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def summarise(rounds: list[dict[str, list[float]]], warmup: int) -> dict[str, dict[str, Any]]:
    """Per arm, over rounds: step time and back-propagated rows/s, and both as ratios to hf-vanilla of the
    same round (each round's figure is the median of its intervals after ``warmup``)."""
    step = [{arm: statistics.median(dts[warmup:]) for arm, dts in r.items()} for r in rounds]
    out = {}
    for arm in rounds[0]:
        out[arm] = {"step_s": spread([s[arm] for s in step]),
                    "backprop_rows_per_s": spread([B * GA / s[arm] for s in step]),
                    "step_time_ratio": spread([s[arm] / s["hf-vanilla"] for s in step]),
                    "backprop_rows_per_s_ratio": spread([s["hf-vanilla"] / s[arm] for s in step]),
                    "steps_timed": len(rounds[0][arm][warmup:])}
    return out


def markdown(result: dict[str, Any]) -> str:
    def ratio(x: dict[str, Any]) -> str:
        return f"{x['median']:.2f} [{x['min']:.2f}-{x['max']:.2f}]"

    lines = ["| arm | loop | step (s) | step time / plain Trainer | back-propagated rows/s | rows/s / plain Trainer |",
             "|---|---|---:|---:|---:|---:|"]
    for arm, r in result["arms"].items():
        lines.append(f"| {arm} | {ARMS[arm]} | {r['step_s']['median']:.4f} | {ratio(r['step_time_ratio'])} | "
                     f"{r['backprop_rows_per_s']['median']:.1f} | {ratio(r['backprop_rows_per_s_ratio'])} |")
    p, s, m = result["provenance"], result["settings"], MODELS[result["settings"]["model"]]
    v = {**p["versions"], "accelerate": result["accelerate"]}
    return (f"# Plain Trainer vs SiftTrainer vs `sift train`\n\n"
            f"`{p['command']}` at {p['git_commit']}, {p['date']}, on {p['machine']['cpu']} ({p['machine']['cores']} "
            f"cores); torch {v['torch']}, deepspeed {v['deepspeed']}, transformers {v['transformers']}, accelerate "
            f"{v['accelerate']}, Python {v['python']}; load average {result['load_before']} before and "
            f"{p['load_average']} after.\n\n"
            f"GPT-2 {s['model']} ({m['num_layers']} blocks x {m['hidden_size']} hidden), B = {B}, accumulation {GA}, "
            f"keep {KEEP} (G = {round(B / KEEP)}), T = {SEQ}; {s['repeats']} round(s) of {s['steps']} steps per arm, "
            f"arm order rotated each round. Step time: median wall time between consecutive optimizer-step ends after "
            f"{s['warmup']} warm-up intervals, median over rounds; ratios taken within each round, median "
            f"[min-max] over rounds.\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/hf_side_by_side"))
    ap.add_argument("--model", choices=tuple(MODELS), default="small")
    # 100 steps draw 3,200 of the 3,460 training rows in the SIFT arms: one epoch, no partial last window
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10, help="step intervals dropped at the start of each arm's run")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the arm set, its order rotated each round")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=tuple(ARMS))
    ap.add_argument("--child", choices=("hf-vanilla", "hf-sift"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        hf_child(a.child, a.model, a.data, a.steps, a.out)
        return 0
    if a.steps - 1 <= a.warmup or a.repeats < 1:
        ap.error(f"--steps {a.steps} gives {a.steps - 1} step intervals: more than --warmup {a.warmup} are needed, "
                 f"and --repeats must be at least 1 (got {a.repeats})")
    if "hf-vanilla" not in a.arms:
        ap.error("the ratios need the hf-vanilla arm")
    a.out.mkdir(parents=True, exist_ok=True)
    data = prepare(a.out / "work")
    load_before = load_average()
    rounds = []
    for r in range(a.repeats):
        work = a.out / "work" / f"round{r}"
        work.mkdir(parents=True, exist_ok=True)
        rounds.append({arm: (run_hf if arm.startswith("hf-") else run_sift)(arm, a.model, data, a.steps, work)
                       for arm in rotated(a.arms, r)})
    import torch  # noqa: F401  (after the arms: provenance names the GPUs only when torch is loaded)

    result = {"arms": summarise(rounds, a.warmup), "rounds": rounds, "load_before": load_before,
              "settings": {"model": a.model, "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats},
              "accelerate": version("accelerate"),
              "provenance": provenance("python -m benchmarks.hf_side_by_side " + " ".join(argv or sys.argv[1:]),
                                       where=REPO)}
    (a.out / "result.json").write_text(json.dumps(result, indent=1))
    (a.out / "result.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
