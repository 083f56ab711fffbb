"""Which sources does selection keep, and where does each arm's accuracy go? A diagnostic for a finished
study on a corpus with a `source` column, whose runs kept their checkpoints (`--keep-checkpoints`).

    python -m study.sources --study runs/study-cpu \\
        --corpus ../shared/corpus/english-reference.parquet --work runs/study-sources \\
        --out benchmarks/results/study-cpu/sources

1. Split the corpus by source and prepare each part with the study's tokenizer, sequence length and
   validation fraction: the validation split hashes each document, so each part's validation documents
   are exactly the study's validation documents from that source.
2. Every run's final weights: validation MLM accuracy and loss per source (the same masks for all runs).
3. Every selecting arm's final weights: its early-exit scores and the exact losses of N training rows per
   source, and, in gross batches of G rows drawn from the sources in their share of the training rows,
   the share of each source among the B kept rows (top-k by the arm's exit score, and by exact loss).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from engine.run_model import load_run_model
from sift_common.logs import setup_logging
from study.draws import gross_batches
from study.spec import StudyError

log = logging.getLogger("sift.study.sources")


def split_corpus(corpus: Path, work: Path, field: str = "source") -> dict[str, Path]:
    """One parquet file per value of ``field``, in the corpus's row order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(corpus)
    if field not in table.column_names:
        raise StudyError(f"{corpus} has no {field!r} column (columns: {', '.join(table.column_names)})")
    out = {}
    for value in sorted(set(table.column(field).to_pylist())):
        path = work / f"corpus-{value}.parquet"
        if not path.is_file():
            work.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.filter(pc.equal(table.column(field), value)), path)
        out[value] = path
    return out


def prepare_part(part: Path, out: Path, data: Path) -> Path:
    """`sift prepare` of one source with the study data's tokenizer and options (once)."""
    if (out / "index.json").is_file():
        return out
    opts = json.loads((data / "index.json").read_text())["prepare"]["options"]
    cmd = [sys.executable, "-m", "data_pipeline.prepare", str(part), "--out", str(out), "--tokenizer",
           str(data / "tokenizer"), "--seq-len", str(opts["seq_len"]), "--val-fraction", str(opts["val_fraction"]),
           "--seed", str(opts["seed"]), "--objective", opts["objective"], "--text-field", opts["text_field"],
           "--num-proc", "1", "--log-level", "WARNING"]
    if subprocess.run(cmd).returncode != 0:
        raise StudyError(f"preparing {part} failed")
    return out


def batches(data: Path, split: str, rows: int, batch_size: int = 64):
    from data_pipeline.loader import eval_batches
    from data_pipeline.reader import ShardDataset

    dataset = ShardDataset.open(data, split)
    n = min(rows, len(dataset)) if rows else len(dataset)
    return list(eval_batches(dataset, seed=0, rank=0, world_size=1, batch_size=batch_size, num_samples=n))


def source_accuracy(model, parts: dict[str, list]) -> dict[str, dict[str, float]]:
    """Per source: the model's own token metrics (``val_mlm_acc`` for BERT, ``val_lm_acc`` for decoders, and
    their losses) over its rows, and the tokens they count."""
    import torch

    from engine.models.base import Ratio

    name = model.token_loss_name
    ratios = {k: m for k, m in model.metrics().items() if k in (f"{name}_acc", f"{name}_loss") and isinstance(m, Ratio)}
    out = {}
    with torch.no_grad():
        for source, bs in parts.items():
            sums: dict[str, float] = {}
            for b in bs:
                r = model(**b)
                for key in {k for m in ratios.values() for k in (m.num, m.den)}:
                    sums[key] = sums.get(key, 0.0) + float(r[key])
            out[source] = {f"val_{k}": sums[m.num] / max(sums[m.den], 1) for k, m in ratios.items()}
            out[source]["tokens"] = int(sums[ratios[f"{name}_acc"].den])
    return out


def source_scores(model, parts: dict[str, list], criterion: str, exit_layer: int,
                  reference: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """Per source (or kind): the rows' early-exit scores ("exit") and exact losses ("exact": the full
    model's mean token loss), both minus the reference's mean token loss on the same targets when
    ``reference`` (an ``engine.reference.OnlineReference``) is given (criterion reducible)."""
    import torch

    from engine.scoring import exit_scores, per_sequence_mean

    path = model.exit_path(exit_layer)
    out = {}
    with torch.no_grad():
        for source, bs in parts.items():
            exit_, exact = [], []
            for b in bs:
                ref = reference.token_losses(b) if reference is not None else None
                exit_.append(exit_scores(path, b, criterion, reference=ref).numpy())
                loss = model(**b)["per_seq_loss"]
                if ref is not None:
                    loss = loss - per_sequence_mean(ref, path.targets(b) >= 0)
                exact.append(loss.numpy())
            out[source] = {"exit": np.concatenate(exit_), "exact": np.concatenate(exact)}
    return out


def kept_shares(scores: dict[str, np.ndarray], weights: dict[str, float], *, gross: int, keep: int,
                batches_: int, rng: np.random.Generator,
                stat: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Share of each source among the rows a top-``keep`` policy keeps from gross batches of ``gross``
    rows, each row drawn from source s with probability ``weights[s]`` (then uniformly within it).

    With ``stat`` (a per-row quantity aligned with ``scores``), also its mean over the kept rows
    (key "stat_kept") and over all drawn rows ("stat_drawn").
    """
    names = sorted(scores)
    kept = np.zeros(len(names))
    stat_kept = stat_drawn = 0.0
    for src, rows, vals in gross_batches(scores, weights, gross=gross, batches_=batches_, rng=rng):
        top = np.argsort(-vals, kind="stable")[:keep]
        kept += np.bincount(src[top], minlength=len(names))
        if stat is not None:
            st = np.array([stat[names[s]][r] for s, r in zip(src, rows)])
            stat_kept += st[top].mean() / batches_
            stat_drawn += st.mean() / batches_
    out = {s: float(k / kept.sum()) for s, k in zip(names, kept)}
    if stat is not None:
        out.update(stat_kept=float(stat_kept), stat_drawn=float(stat_drawn))
    return out


def frequent_share(parts: dict[str, list], top: int = 10) -> dict[str, np.ndarray]:
    """Per row: the fraction of its masked labels that are among the ``top`` most frequent labels over
    all the given rows (what a model at the unigram stage predicts well)."""
    labels = np.concatenate([b["mlm_labels"].numpy().ravel() for bs in parts.values() for b in bs])
    counts = np.bincount(labels[labels >= 0])
    frequent = np.argsort(-counts)[:top]
    out = {}
    for source, bs in parts.items():
        lab = np.concatenate([b["mlm_labels"].numpy() for b in bs])
        valid = lab >= 0
        out[source] = (np.isin(lab, frequent) & valid).sum(1) / np.maximum(valid.sum(1), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, required=True, help="the study directory (--out of `sift study`)")
    p.add_argument("--corpus", type=Path, required=True, help="the parquet the study's data was prepared from")
    p.add_argument("--work", type=Path, required=True, help="scratch directory for the per-source datasets")
    p.add_argument("--out", type=Path, required=True, help="where sources.json and sources.md go")
    p.add_argument("--rows", type=int, default=512, help="training rows per source to score")
    p.add_argument("--batches", type=int, default=2000, help="simulated gross batches")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    result = analyse(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sources.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "sources.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def analyse(args: argparse.Namespace) -> dict[str, Any]:
    runs = sorted(d for d in (args.study / "runs").glob("*/seed*") if (d / "config.yaml").is_file())
    if not runs:
        raise StudyError(f"no runs under {args.study / 'runs'}")
    data = Path(yaml.safe_load((runs[0] / "config.yaml").read_text())["data"]["path"])
    parts = {s: prepare_part(f, args.work / f"data-{s}", data) for s, f in split_corpus(args.corpus, args.work).items()}
    index = {s: json.loads((d / "index.json").read_text()) for s, d in parts.items()}
    train_rows = {s: ix["splits"]["train"]["rows"] for s, ix in index.items()}
    val = {s: batches(d, "validation", 0) for s, d in parts.items()}
    train = {s: batches(d, "train", args.rows) for s, d in parts.items()}
    frequent = frequent_share(train)
    result: dict[str, Any] = {"train_rows": train_rows, "rows_scored_per_source": args.rows,
                              "frequent_share_by_source": {s: float(v.mean()) for s, v in frequent.items()},
                              "validation_rows": {s: ix["splits"]["validation"]["rows"] for s, ix in index.items()},
                              "runs": {}}
    for run_dir in runs:
        arm, seed = run_dir.parent.name, int(run_dir.name.removeprefix("seed"))
        cfg, model = load_run_model(run_dir)
        entry: dict[str, Any] = {"arm": arm, "seed": seed, "per_source": source_accuracy(model, val)}
        if cfg.sift.policy == "topk":
            scores = source_scores(model, train, cfg.sift.criterion, cfg.sift.exit_layer)
            G, B = cfg.gross_batch_size, cfg.train.micro_batch_size
            rng = np.random.default_rng([seed, 0x50C])
            entry["mean_exit_score"] = {s: float(v["exit"].mean()) for s, v in scores.items()}
            entry["mean_exact_loss"] = {s: float(v["exact"].mean()) for s, v in scores.items()}
            for kind in ("exit", "exact"):
                shares = kept_shares({s: v[kind] for s, v in scores.items()}, train_rows, gross=G, keep=B,
                                     batches_=args.batches, rng=rng, stat=frequent)
                entry[f"frequent_share_{kind}"] = {"kept": shares.pop("stat_kept"), "drawn": shares.pop("stat_drawn")}
                entry[f"kept_share_{kind}"] = shares
        result["runs"][f"{arm}/seed{seed}"] = entry
        log.info("%s/seed%d done", arm, seed)
    return result


def markdown(result: dict[str, Any]) -> str:
    sources = sorted(result["train_rows"])
    total = sum(result["train_rows"].values())
    arms: dict[str, list[dict[str, Any]]] = {}
    for entry in result["runs"].values():
        arms.setdefault(entry["arm"], []).append(entry)

    def mean(entries, key, source, sub=None):
        vals = [e[key][source][sub] if sub else e[key][source] for e in entries if key in e]
        return sum(vals) / len(vals) if vals else None

    freq = result.get("frequent_share_by_source", {})
    lines = ["Share of training rows: " + ", ".join(f"{s} {result['train_rows'][s] / total:.1%}" for s in sources),
             "", "Share of masked labels among the 10 most frequent tokens, per source: "
             + ", ".join(f"{s} {freq[s]:.1%}" for s in sources if s in freq), "",
             "| arm | " + " | ".join(f"{s} val acc" for s in sources) + " | "
             + " | ".join(f"{s} kept share (exit / exact)" for s in sources)
             + " | frequent-token share: drawn / kept (exit) / kept (exact) |",
             "|" + "---|" * (2 + 2 * len(sources))]
    for arm, entries in arms.items():
        acc = next(k for k in entries[0]["per_source"][sources[0]] if k.endswith("_acc"))  # val_mlm_acc, val_lm_acc
        cells = [f"{mean(entries, 'per_source', s, acc):.4f}" for s in sources]
        for s in sources:
            k, x = mean(entries, "kept_share_exit", s), mean(entries, "kept_share_exact", s)
            cells.append("–" if k is None else f"{k:.1%} / {x:.1%}")
        f = [e for e in entries if "frequent_share_exit" in e]
        if f:
            drawn = sum(e["frequent_share_exit"]["drawn"] for e in f) / len(f)
            k_exit = sum(e["frequent_share_exit"]["kept"] for e in f) / len(f)
            k_exact = sum(e["frequent_share_exact"]["kept"] for e in f) / len(f)
            cells.append(f"{drawn:.1%} / {k_exit:.1%} / {k_exact:.1%}")
        else:
            cells.append("–")
        lines.append(f"| {arm} (n={len(entries)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("study.sources", main, sys.argv[1:]))
