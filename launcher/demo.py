"""`sift demo`: the offline CPU demo, start to finish in a few minutes.

1. writes a default corpus (text shipped with Python plus generated documents of varied difficulty),
2. prepares it into Arrow shards with a freshly trained WordPiece tokenizer (`sift prepare`),
3. trains a tiny BERT per configs/demo-cpu.yaml: vanilla until it has left the initial plateau, then
   loss-SIFT (exit at layer 1, pipelined schedule); on a busy machine it stops when its time budget is
   spent (train.time_budget_s), and running `sift demo` again continues the run,
4. prints a one-screen summary (accuracy against the most-frequent-token baseline, how selection behaved)
   and writes a plot of the run (<out>/train/demo.png).

Extra arguments are config overrides, e.g. `sift demo train.steps=200 sift.criterion=entropy`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

DEMO_CONFIG = "demo-cpu"
"""The shipped run config the demo trains with (configs/demo-cpu.yaml, package data)."""
TIME_BUDGET_S = 300
"""The demo stops here on a busy machine (1,000 steps take about 2 minutes on 2 quiet cores and 20 when
other jobs share them); an override, not in the config, so that `sift train --config demo-cpu` runs,
and compares, whole runs."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sift demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where corpus/, data/ and train/ go")
    p.add_argument("--fresh", action="store_true", help="re-prepare the data and train from scratch")
    p.add_argument("overrides", nargs="*", help="config overrides for training (section.key=value)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from data_pipeline import prepare
    from data_pipeline.demo_corpus import write_demo_corpus

    data, run = args.out / "data", args.out / "train"
    if args.fresh or not (data / "index.json").is_file():
        print(f"[1/3] writing the demo corpus to {args.out / 'corpus'}")
        corpus = write_demo_corpus(args.out / "corpus", seed=0)
        print(f"[2/3] preparing shards in {data}")
        code = prepare.main([str(corpus), "--out", str(data), "--seq-len", "128", "--vocab-size", "4096",
                             "--val-fraction", "0.05", "--seed", "0", "--overwrite"])
        if code:
            return code
    else:
        print(f"[1-2/3] using the prepared data in {data} (--fresh to redo)")

    from launcher.train import main as train_main

    if args.fresh and run.is_dir():
        shutil.rmtree(run)
    overrides = [f"data.path={data}", f"train.out_dir={run}", f"train.time_budget_s={TIME_BUDGET_S}", *args.overrides]
    from engine.config import load_config

    cfg = load_config(DEMO_CONFIG, overrides)
    budget = f", for at most {cfg.train.time_budget_s:g} s (train.time_budget_s)" if cfg.train.time_budget_s else ""
    print(f"[3/3] training a tiny BERT with SIFT (configs/{DEMO_CONFIG}.yaml){budget}; metrics stream to "
          f"{run / 'metrics.jsonl'}")
    code = train_main(["--config", DEMO_CONFIG, *overrides])
    if code == 0:
        from launcher.demo_summary import frequent_token_baseline, summary_text

        baseline = frequent_token_baseline(data, seed=cfg.train.seed, eval_samples=cfg.train.eval_samples,
                                           batch_size=cfg.train.eval_batch_size, mask_prob=cfg.data.mask_prob)
        export = f"sift export {run} --out {args.out}/hf    # a Hugging Face model for pipeline('fill-mask')"
        print(summary_text(cfg, run, baseline, export))
    return code


if __name__ == "__main__":
    from launcher.cli import main as sift

    sys.exit(sift(["demo", *sys.argv[1:]]))
