"""MetricLogger on resume: the records of replayed steps are dropped, so each step appears once."""

from __future__ import annotations

import json

from engine.metrics import MetricLogger


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def log_steps(out, steps, initial_step, evals=()):
    m = MetricLogger(out, enabled=True, tensorboard=False, progress=False, total_steps=20, initial_step=initial_step)
    for s in steps:
        m.write({"step": s, "loss": float(s)})
        if s in evals:
            m.write({"event": "eval", "step": s, "val_mlm_loss": 1.0})
    m.close()


def test_resume_drops_replayed_records(tmp_path):
    log_steps(tmp_path, range(1, 8), 0, evals={5})  # a run killed after step 7; its checkpoint is at step 5
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "lo')  # and a line cut short by the kill
    log_steps(tmp_path, range(6, 11), 5, evals={10})  # resumed at 5: steps 6.. are replayed
    records = lines(tmp_path / "metrics.jsonl")
    train = [r["step"] for r in records if "event" not in r]
    assert train == list(range(1, 11))
    assert [r["step"] for r in records if r.get("event") == "eval"] == [5, 10]


def test_fresh_start_over_an_old_file_keeps_nothing_of_it(tmp_path):
    log_steps(tmp_path, range(1, 4), 0)  # killed before its first checkpoint
    log_steps(tmp_path, range(1, 3), 0)
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_file_without_replayed_steps_is_left_alone(tmp_path):
    log_steps(tmp_path, range(1, 6), 0)
    before = (tmp_path / "metrics.jsonl").stat().st_ino
    log_steps(tmp_path, range(6, 8), 5)
    assert (tmp_path / "metrics.jsonl").stat().st_ino == before  # not rewritten
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == list(range(1, 8))


def test_step_metrics_share_a_token_count_and_report_perplexity():
    """Two ratios over one token count (loss and accuracy) divide by it once; Exp is exp of its metric."""
    import math

    import torch

    from engine.metrics import StepAccumulator
    from engine.models.base import Exp, Ratio
    from engine.schedule import MicroOut

    acc = StepAccumulator({"lm_loss": Ratio("loss_sum", "loss_tokens"), "lm_acc": Ratio("correct", "loss_tokens"),
                           "lm_ppl": Exp("lm_loss")})
    for loss_sum, tokens, correct in ((30.0, 10, 4), (10.0, 10, 6)):
        out = {"loss": torch.tensor(loss_sum / tokens), "loss_sum": torch.tensor(loss_sum),
               "loss_tokens": torch.tensor(tokens), "correct": torch.tensor(correct)}
        acc.add(MicroOut(out, finite=True, stepped=True, rows_scored=0, rows_trained=2))
    got = acc.flush()
    assert got["lm_loss"] == 2.0 and got["lm_acc"] == 0.5 and got["loss"] == 2.0
    assert got["lm_ppl"] == math.exp(2.0)
