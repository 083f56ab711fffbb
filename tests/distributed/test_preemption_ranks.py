"""The stop decision is collective: SIGTERM to one rank of two stops both after the same step, with one
complete checkpoint; and the drawn-rows hash of each record does not depend on the world size."""

from __future__ import annotations

import json

import pytest

from engine import checkpoint as ckpt
from engine.stopping import PREEMPTED_EXIT
from tests.distributed.common import REPO, run_ranks
from tests.runs import TINY_RUN, train

pytestmark = pytest.mark.dist


def drawn(out_dir):
    return [(r["step"], r["draws"], r["samples_sha256"])
            for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def test_sigterm_to_one_rank_stops_both_after_the_same_step(tiny_data, tmp_path):
    common = ("train.steps=8", "train.save_every=0", "train.eval_every=8", "sift.fidelity_every=0")
    results = run_ranks([str(REPO / "launcher" / "train.py"), "--config", str(TINY_RUN), f"data.path={tiny_data}",
                         f"train.out_dir={tmp_path / 'two'}", *common, "train.plugins=[tests.faults]"],
                        world=2, cwd=REPO, timeout=300, check=False,
                        env={"SIFT_FAULT": "sigterm:3", "SIFT_FAULT_RANK": "1"})
    assert [r.returncode for r in results] == [PREEMPTED_EXIT] * 2, results[1].stdout[-3000:]
    assert "SIGTERM received" in results[1].stdout and "SIGTERM received" not in results[0].stdout
    assert "stopped by SIGTERM after step 4" in results[0].stdout  # rank 0 learnt it from rank 1
    root = tmp_path / "two" / "checkpoints"
    assert ckpt.find_latest(root) == "step00000004" and ckpt.verify(root, "step00000004")["world_size"] == 2
    # One rank drawing 2 x 4 rows per micro-step reads the same stream positions as two ranks drawing 4 each
    train(tmp_path / "one", tiny_data, *common, "train.steps=4", "train.micro_batch_size=8")
    assert drawn(tmp_path / "two") == drawn(tmp_path / "one")
