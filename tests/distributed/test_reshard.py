"""ZeRO-1/2/3 checkpoints resume at another world size (1 -> 2 and 2 -> 1 ranks) through DeepSpeed's
universal checkpoint, continuing the run as one that never changed size does.

The reference is an uninterrupted 1-rank run with ``train.grad_accum=2``. The run under test starts from
its checkpoint at step K on 2 ranks with one micro-step each (branched: 1 -> 2, converted on resume),
stops at step M, and resumes in its own directory on 1 rank (2 -> 1, converted first by `sift
convert-checkpoint`). Both sizes compute the same thing: the same rows (the sampler's global stream), the
same top-B of each 8-row chunk (serial schedule, no dropout), the same gradient (causal-LM rows are
packed, so every row has T - 1 targets and the mean of two micro-batch means is the token mean of both,
which the 2 ranks' objective computes). So the losses after each change of size equal the reference's,
to float rounding, only when the weights, Adam moments, step counts and LR schedule all came through the
conversions intact. (Without ``ds._repair_zero3_universal`` ZeRO-3 drifts by 3e-5 one step after a
conversion.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.reader import ShardDataset
from data_pipeline.sampler import positions_to_samples
from engine.audit import stream_digest
from launcher.cli import main as sift
from tests.distributed.common import REPO, run_ranks
from tests.runs import TINY_RUN, train

pytestmark = [pytest.mark.dist, pytest.mark.slow]

K, M, N = 2, 4, 6
"""Steps: 1 rank up to K, 2 ranks up to M, 1 rank again up to N."""
ROWS_PER_STEP = 16  # 1 rank x G = 8 (B = 4, keep 0.5) x grad_accum 2, or 2 ranks x 8
RUN = ("model.family=gpt2", "model.dropout=0.0", "sift.schedule=serial", "sift.warmup_steps=0",
       "sift.fidelity_every=0", f"optim.schedule_steps={N}", "train.save_every=2", "train.keep_last=3",
       f"train.eval_every={N}")


@pytest.fixture(scope="module")
def small_clm_data(tmp_path_factory):
    """A causal-LM dataset of 71 training rows: the N steps' 96 rows cross a whole epoch."""
    from data_pipeline import prepare
    from data_pipeline.demo_corpus import write_demo_corpus

    root = tmp_path_factory.mktemp("reshard-data")
    corpus = write_demo_corpus(root / "corpus", seed=0, target_docs=16, stdlib=False)
    assert prepare.main([str(corpus), "--out", str(root / "data"), "--objective", "clm", "--seq-len", "64",
                         "--tokenizer", str(REPO / "tests" / "assets" / "bpe-512"), "--val-fraction", "0.3",
                         "--seed", "0", "--num-proc", "1", "--log-level", "WARNING"]) == 0
    return root / "data"


def two_ranks(out_dir, data, *overrides):
    return run_ranks([str(REPO / "launcher" / "train.py"), "--config", str(TINY_RUN), f"data.path={data}",
                      f"train.out_dir={out_dir}", *RUN, *overrides], world=2, cwd=REPO, timeout=240)


def steps(out_dir):
    return {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if "event" not in r}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_checkpoint_resumes_on_another_world_size(stage, small_clm_data, tmp_path):
    zero = f"deepspeed.config=ds_configs/zero{stage}.json"
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(ref, small_clm_data, *RUN, zero, f"train.steps={N}", "train.grad_accum=2", timeout=240)
    two = two_ranks(run, small_clm_data, zero, f"train.steps={M}", "--branch-from",
                    str(ref / "checkpoints" / f"step{K:08d}"))
    assert "saved at world size 1 through its universal checkpoint" in two[0].stdout
    assert sift(["convert-checkpoint", str(run)]) == 0  # step M's checkpoint, ahead of the resume
    one = train(run, small_clm_data, *RUN, zero, f"train.steps={N}", "train.grad_accum=2", "--allow-change",
                "train.grad_accum", timeout=240)
    assert "world_size: 2 -> 1" in one.stderr and "saved at world size 2 through its universal checkpoint" in one.stderr
    assert "converting checkpoint" not in one.stderr  # it used the conversion above
    assert (run / "checkpoints" / f"step{M:08d}" / "universal" / "sift_state.json").is_file()

    want, got = steps(ref), steps(run)
    assert sorted(got) == list(range(K + 1, N + 1))
    for s in got:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5), s

    # Exactly once: step s draws the stream positions [16 (s - 1), 16 s) at either size. The first 71 are
    # epoch 0's permutation of the 71 rows, each once; then epoch 1 begins.
    n = len(ShardDataset.open(small_clm_data, "train"))
    seed = json.loads((ref / "run.json").read_text())["config"]["train"]["seed"]
    assert n < N * ROWS_PER_STEP
    for s in range(1, N + 1):
        ids, _ = positions_to_samples(seed, n, np.arange((s - 1) * ROWS_PER_STEP, s * ROWS_PER_STEP))
        assert want[s]["samples_sha256"] == stream_digest([ids], [len(ids)]), s
        if s > K:
            assert got[s]["samples_sha256"] == want[s]["samples_sha256"], s
