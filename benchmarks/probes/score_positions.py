"""What scoring a random subset of positions costs in fidelity (``sift.score_positions``).

    python -m benchmarks.probes.score_positions --run runs/gpt2/train --positions 8,16,32,64,0 --exits 1,2

Loads a trained run's latest checkpoint (as `sift export` does), draws gross batches of G rows from its
training split, and for each exit j, criterion and subset size K compares the early-exit scores with
(a) the exact full-model per-row losses (what `sift.fidelity_every` logs during training: Spearman
correlation and top-B overlap, B = keep x G) and (b) the same exit scored at every position, which
isolates what the subset costs from what the exit costs. K = 0 scores every position. The head FLOPs of
a score scale with K / P (P = T - 1 targets per row for decoders). Forward passes only, on CPU or GPU;
the numbers describe one model at one point of its training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("sift.bench")


def measure(model: Any, batches: list[dict[str, torch.Tensor]], *, exits: list[int], positions: list[int],
            criteria: list[str], keep: float, seed: int) -> list[dict[str, Any]]:
    from engine.scoring import exit_scores
    from engine.selection import position_generator, spearman, topk_overlap

    with torch.no_grad():
        exact = [model(**b)["per_seq_loss"] for b in batches]
    rows = []
    for j in exits:
        path = model.exit_path(j)
        for criterion in criteria:
            full = [exit_scores(path, b, criterion) for b in batches]
            for k in positions:
                stats: dict[str, list[float]] = {"spearman": [], "topk_overlap": [], "spearman_vs_all_positions": [],
                                                 "topk_overlap_vs_all_positions": []}
                for d, (b, ex, fu) in enumerate(zip(batches, exact, full)):
                    gen = position_generator(seed, d, 0, b["input_ids"].device) if k else None
                    s = exit_scores(path, b, criterion, positions=k, generator=gen)
                    B = round(keep * len(s))
                    stats["spearman"].append(spearman(s, ex).item())
                    stats["topk_overlap"].append(topk_overlap(s, ex, B).item())
                    stats["spearman_vs_all_positions"].append(spearman(s, fu).item())
                    stats["topk_overlap_vs_all_positions"].append(topk_overlap(s, fu, B).item())
                P = batches[0]["labels"].shape[1] - 1
                rows.append({"exit_layer": j, "criterion": criterion, "positions": k or P,
                             "head_fraction": min(1.0, (k or P) / P),
                             **{key: statistics.fmean(v) for key, v in stats.items()},
                             "spearman_min": min(stats["spearman"])})
                log.info("exit %d %-7s K=%-4s spearman %.3f overlap %.3f (vs all positions: %.3f, %.3f)", j,
                         criterion, k or "all", rows[-1]["spearman"], rows[-1]["topk_overlap"],
                         rows[-1]["spearman_vs_all_positions"], rows[-1]["topk_overlap_vs_all_positions"])
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [
        "# Fidelity of scoring a subset of positions (`sift.score_positions`)", "",
        f"- model: {m['model']}; run {m['run']} at step {m['step']}; data {m['data']}",
        f"- {m['batches']} gross batches of G = {m['gross']} rows (T = {m['seq_len']}), B = {m['B']} kept",
        f"- command: `{m['command']}`; commit {m['git_commit']}; {m['versions']}; load {m['load_before']} -> "
        f"{m['load_after']}; {m['seconds']:.0f} s", "",
        "Spearman and top-B overlap of the exit's scores with the exact full-model per-row loss (as "
        "`sift.fidelity_every` logs), and with the same exit scored at every position (the subset's own "
        "cost). Means over the batches; head FLOPs of a score scale with K / (T - 1).", "",
        "| exit | criterion | K positions | head share | Spearman vs exact | top-B overlap vs exact | "
        "Spearman vs all positions | top-B overlap vs all positions | worst Spearman vs exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['exit_layer']} | {r['criterion']} | {r['positions']} | {r['head_fraction']:.3f} | "
                     f"{r['spearman']:.3f} | {r['topk_overlap']:.3f} | {r['spearman_vs_all_positions']:.3f} | "
                     f"{r['topk_overlap_vs_all_positions']:.3f} | {r['spearman_min']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import time

    from data_pipeline.loader import collate_clm
    from data_pipeline.reader import ShardDataset
    from sift_common.logs import setup_logging
    from sift_common.provenance import git_commit, version

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.probes.score_positions", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="train.out_dir of a decoder run with a checkpoint")
    p.add_argument("--exits", default="1,2", help="exit layers")
    p.add_argument("--positions", default="8,16,32,64,0", help="subset sizes K (0: every position)")
    p.add_argument("--criteria", default="loss,entropy")
    p.add_argument("--gross", type=int, default=32, help="G rows per batch")
    p.add_argument("--keep", type=float, default=0.5, help="B / G")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--name", default="score_positions-cpu")
    args = p.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    from engine.run_model import latest_checkpoint, load_run_model

    cfg, model = load_run_model(args.run)
    data = Path(cfg.data.path)
    train = ShardDataset.open(data, "train")
    rows = np.random.default_rng(args.seed).choice(len(train), args.gross * args.batches, replace=False)
    batches = [collate_clm(train.rows(ids), ids) for ids in np.split(np.sort(rows), args.batches)]
    result_rows = measure(model, batches, exits=[int(x) for x in args.exits.split(",")],
                          positions=[int(x) for x in args.positions.split(",")], criteria=args.criteria.split(","),
                          keep=args.keep, seed=args.seed)
    step = latest_checkpoint(args.run)[2]["step"]
    meta = {"model": f"{model.family}, {model.num_layers} blocks x {model.config.hidden_size}, V = "
                     f"{model.config.vocab_size}", "run": args.run.name, "step": step, "data": data.name,
            "batches": args.batches, "gross": args.gross, "B": round(args.keep * args.gross),
            "seq_len": train.meta.seq_len, "command": "python -m benchmarks.probes.score_positions " + " ".join(argv),
            "git_commit": git_commit(), "versions": f"torch {torch.__version__}, transformers "
                                                     f"{version('transformers')}",
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "seconds": time.perf_counter() - t0, "threads": args.threads}
    result = {"meta": meta, "rows": result_rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("benchmarks.probes.score_positions", main, sys.argv[1:]))
