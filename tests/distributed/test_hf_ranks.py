"""SiftTrainer at 2 processes (DDP over gloo, CPU): the random policy trains bitwise like a plain
Trainer fed, on each rank, exactly the rows that rank kept."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.common import REPO, run_ranks


@pytest.mark.dist
@pytest.mark.slow
def test_random_policy_at_two_processes_is_a_plain_trainer_fed_the_kept_rows(tmp_path):
    sift, plain = tmp_path / "sift", tmp_path / "plain"
    run_ranks(["-m", "tests.hf_ranks", "sift", "--out", str(sift)], 2, cwd=REPO, timeout=400)
    kept = [torch.load(sift / f"kept{r}.pt") for r in range(2)]
    assert len(kept[0]) == len(kept[1]) == 4 and all(len(b["input_ids"]) == 4 for b in kept[0])
    assert not torch.equal(kept[0][0]["input_ids"], kept[1][0]["input_ids"])  # each rank its own rows
    run_ranks(["-m", "tests.hf_ranks", "plain", "--out", str(plain), "--kept", str(sift)], 2, cwd=REPO, timeout=400)
    assert json.loads((sift / "losses.json").read_text()) == json.loads((plain / "losses.json").read_text())
    a, b = torch.load(sift / "weights.pt"), torch.load(plain / "weights.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
