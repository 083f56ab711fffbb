"""The demo's summary: the most-frequent-token baseline against a direct count, and the selection
statistics and plot from a synthetic metrics file."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from data_pipeline.loader import eval_batches
from data_pipeline.reader import ShardDataset
from launcher.demo_summary import frequent_token_baseline, plot, read_run, selection_stats


def test_baseline_is_the_best_constant_prediction_on_the_runs_validation_masks(tiny_data):
    base = frequent_token_baseline(tiny_data, seed=3, eval_samples=20, batch_size=8, mask_prob=0.15)
    labels = [int(t) for b in eval_batches(ShardDataset.open(tiny_data, "validation"), seed=3, rank=0, world_size=1,
                                           batch_size=8, num_samples=16)  # 20 rounded down to whole batches
              for t in b["mlm_labels"].flatten() if t >= 0]
    token, hits = Counter(labels).most_common(1)[0]
    assert base.masked_tokens == len(labels) and base.accuracy == pytest.approx(hits / len(labels))
    freqs = [c / len(labels) for c in Counter(labels).values()]
    assert base.loss == pytest.approx(-sum(p * math.log(p) for p in freqs))  # the frequencies' cross-entropy
    from transformers import AutoTokenizer

    assert base.token == AutoTokenizer.from_pretrained(tiny_data / "tokenizer").convert_ids_to_tokens(token)


def test_selection_stats_and_plot(tmp_path):
    recs = [{"step": s, "mlm_loss": 9 - s / 100, **({"kept_score": 6.0 + s / 100, "dropped_score": 5.0}
                                                     if s > 200 else {}),
             **({"spearman": 0.8, "topk_overlap": 0.7} if s % 100 == 0 and s > 200 else {})} for s in range(50, 501, 50)]
    recs += [{"event": "eval", "step": s, "val_mlm_acc": s / 2000, "val_mlm_loss": 7 - s / 200} for s in (100, 300, 500)]
    recs.append({"step": 500, "mlm_loss": 4.0, "kept_score": 11.0, "dropped_score": 5.0,
                 "spearman": 0.5, "topk_overlap": 0.4})  # a resumed run logged step 500 again: the last wins
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    steps, evals = read_run(tmp_path)
    assert [e["step"] for e in evals] == [100, 300, 500] and len(steps) == 10
    st = selection_stats(steps)
    assert st["selecting_intervals"] == 6 and st["fidelity_records"] == 3
    assert st["kept_score"] == pytest.approx((8.5 + 9.0 + 9.5 + 10.0 + 10.5 + 11.0) / 6) and st["dropped_score"] == 5.0
    assert st["spearman"] == pytest.approx((0.8 + 0.8 + 0.5) / 3)
    from launcher.demo_summary import Baseline

    path = plot(tmp_path, steps, evals, Baseline(0.06, "the", 100, 6.5), "test", select_from=300)
    assert path == tmp_path / "demo.png" and path.read_bytes()[:4] == b"\x89PNG"
