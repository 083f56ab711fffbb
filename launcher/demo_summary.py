"""The end of `sift demo`: what was trained, whether it learned (against the best constant prediction),
how selection behaved, and a PNG of the run's validation loss and accuracy."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Baseline:
    """The best constant prediction on the validation masks the run evaluates with."""

    accuracy: float
    """Of always predicting the most frequent masked token."""
    token: str
    masked_tokens: int
    loss: float = math.nan
    """Cross-entropy (nats) of always predicting the masked tokens' frequencies: their entropy."""


def frequent_token_baseline(data: Path, *, seed: int, eval_samples: int, batch_size: int,
                            mask_prob: float) -> Baseline:
    """Accuracy of always predicting the most frequent masked token, on exactly the validation rows and
    masks the run's evaluation uses (the engine's row-count rule for one process: eval_samples, or the
    whole split, rounded down to whole batches)."""
    from data_pipeline.loader import eval_batches
    from data_pipeline.reader import ShardDataset

    dataset = ShardDataset.open(data, "validation")
    n = min(eval_samples or len(dataset), len(dataset))
    n -= n % batch_size
    counts: Counter[int] = Counter()
    for batch in eval_batches(dataset, seed=seed, rank=0, world_size=1, batch_size=batch_size, num_samples=n,
                              mask_prob=mask_prob):
        labels = batch["mlm_labels"]
        counts.update(labels[labels >= 0].tolist())
    total = sum(counts.values())
    if not total:
        return Baseline(0.0, "?", 0)
    token_id, hits = counts.most_common(1)[0]
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    token = str(token_id)
    try:
        from transformers import AutoTokenizer

        token = AutoTokenizer.from_pretrained(dataset.tokenizer_path()).convert_ids_to_tokens(token_id)
    except Exception:  # the id is enough to show when the tokenizer cannot be loaded
        pass
    return Baseline(hits / total, token, total, entropy)


def read_run(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, eval records) of metrics.jsonl, the last record per step winning (a resumed run
    logs the steps after its checkpoint again)."""
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        (evals if rec.get("event") == "eval" else steps)[int(rec["step"])] = rec
    return [steps[s] for s in sorted(steps)], [evals[s] for s in sorted(evals)]


def selection_stats(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the logged intervals that selected: kept and dropped exit scores, and the proxy's
    fidelity (Spearman, top-B overlap against the exact loss)."""
    sel = [r for r in steps if "kept_score" in r]
    fid = [r for r in steps if "spearman" in r]

    def mean(recs: list[dict[str, Any]], key: str) -> float | None:
        return statistics.fmean(r[key] for r in recs) if recs else None

    return {"intervals": len(steps), "selecting_intervals": len(sel), "kept_score": mean(sel, "kept_score"), "dropped_score": mean(sel, "dropped_score"),
            "spearman": mean(fid, "spearman"), "topk_overlap": mean(fid, "topk_overlap"), "fidelity_records": len(fid)}


def plot(run: Path, steps: list[dict[str, Any]], evals: list[dict[str, Any]], baseline: Baseline,
         title: str, select_from: int | None = None) -> Path:
    """run/demo.png: validation MLM loss (left) and accuracy (right), each against the best constant
    prediction, with where selection starts (``select_from``) marked.

    Validation metrics, not the training loss: once SIFT selects, the training loss is that of the
    kept, highest-loss rows, and its jump there would read as a regression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [e["step"] for e in evals]
    last = max([r["step"] for r in steps] + xs, default=0)
    ax.plot(xs, [e["val_mlm_loss"] for e in evals], color="#2171b5", marker="o", label="validation MLM loss")
    if math.isfinite(baseline.loss):
        ax.axhline(baseline.loss, color="black", linestyle=":",
                   label=f"constant: token frequencies ({baseline.loss:.2f})")
    ax.set_ylabel("validation MLM loss (nats)")
    accs = [e["val_mlm_acc"] for e in evals]
    ax2.plot(xs, accs, color="#d94801", marker="o", label="validation MLM accuracy")
    ax2.axhline(baseline.accuracy, color="black", linestyle=":",
                label=f"constant: most frequent token ({baseline.accuracy:.3f})")
    ax2.set_ylim(0, 1.15 * max([*accs, baseline.accuracy], default=1.0) or 1.0)
    ax2.set_ylabel("validation MLM accuracy")
    for a, corner in ((ax, "upper right"), (ax2, "lower right")):  # away from a falling loss, a rising accuracy
        if select_from is not None and select_from < last:
            a.axvspan(select_from, last, color="#fdd0a2", alpha=0.35)
            a.axvline(select_from, color="#e6550d", linestyle="--",
                      label=f"SIFT selects from step {select_from}")
        a.set_xlim(0, 1.03 * max(last, 1))  # the last point whole
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc=corner)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = run / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_text(cfg: Any, run: Path, baseline: Baseline, export: str) -> str:
    """The one-screen summary (writes the plot on the way)."""
    steps, evals = read_run(run)
    done = json.loads((run / "summary.json").read_text())
    meta = json.loads((Path(cfg.data.path) / "index.json").read_text())
    sel = selection_stats(steps)
    layers = cfg.model.num_layers or _preset(cfg).num_layers
    hidden = cfg.model.hidden_size or _preset(cfg).hidden_size
    method = ("vanilla (no selection)" if not cfg.selecting else
              f"{cfg.sift.criterion}-SIFT at exit {cfg.sift.exit_layer} ({cfg.sift.policy}: back-propagates "
              f"{cfg.train.micro_batch_size} of {cfg.gross_batch_size} rows per step) from step {cfg.sift.warmup_steps}, "
              f"{cfg.sift.schedule} schedule")
    first, last = evals[0], evals[-1]
    ratio = f", {last['val_mlm_acc'] / baseline.accuracy:.1f}x the baseline" if baseline.accuracy else ""
    path = plot(run, steps, evals, baseline, f"sift demo: {layers}-layer BERT, {method}",
                select_from=cfg.sift.warmup_steps if cfg.selecting else None)
    length = f"{done['steps']:,} steps"
    if done.get("stopped_early"):
        length = (f"{done['steps']:,} of {done['planned_steps']:,} steps (train.time_budget_s="
                  f"{cfg.train.time_budget_s:g} ran out; `sift demo` again continues the run)")
    lines = [
        "", "=" * 100, "sift demo: summary", "=" * 100,
        f"trained    a {layers}-layer BERT (hidden {hidden}) on {meta['splits']['train']['rows']:,} training rows "
        f"(seq {meta['seq_len']}, {meta['vocab_size']:,} word pieces) for {length}, "
        f"{done['backprop_samples']:,} back-propagated rows, in {done['hours'] * 60:.1f} min",
        f"           with {method}",
        f"learned    validation MLM accuracy {first['val_mlm_acc']:.3f} (step {first['step']}) -> "
        f"{last['val_mlm_acc']:.3f} (step {last['step']}); best {max(e['val_mlm_acc'] for e in evals):.3f}; "
        f"validation MLM loss {first['val_mlm_loss']:.2f} -> {last['val_mlm_loss']:.2f} nats (untrained: about "
        f"ln {meta['vocab_size']} = {math.log(meta['vocab_size']):.2f})",
        f"baseline   always predicting the most frequent masked token ({baseline.token!r}) scores "
        f"{baseline.accuracy:.3f} on the same {baseline.masked_tokens:,} masked tokens{ratio}; predicting their "
        f"frequencies, loss {baseline.loss:.2f}",
    ]
    if sel["selecting_intervals"]:
        lines.append(f"selection  kept rows scored {sel['kept_score']:.2f} on average, dropped rows "
                     f"{sel['dropped_score']:.2f} (mean {cfg.sift.criterion} at exit {cfg.sift.exit_layer}, nats)")
        if sel["fidelity_records"]:
            lines.append(f"fidelity   exit-{cfg.sift.exit_layer} scores vs the full model's exact losses on the same "
                         f"rows: Spearman {sel['spearman']:.2f}, top-B overlap {sel['topk_overlap']:.2f} "
                         f"(chance {cfg.sift.keep:.2f}; {sel['fidelity_records']} checks)")
    else:
        lines.append(f"selection  none in these steps: it starts at step {cfg.sift.warmup_steps}" if cfg.selecting else
                     "selection  none (vanilla)")
    lines += [f"plot       {path} (validation loss and accuracy against the baselines)",
              f"results    {run}/summary.json, metrics.jsonl, checkpoints/; tensorboard --logdir {run}/tb",
              f"export     {export}", "=" * 100]
    return "\n".join(lines)


def _preset(cfg: Any) -> Any:
    from engine.models.presets import PRESETS

    return PRESETS[cfg.model.preset]
