"""SiftTrainer through Hugging Face's DeepSpeed integration on CPU. 1 process: ZeRO-1 and ZeRO-3 keep the
same rows and give the same losses as the Trainer without DeepSpeed; at ZeRO-3 the scorer reads a
gathered replica, refreshed after every optimizer step. 2 processes (ZeRO-1 and ZeRO-3): each rank keeps the
top rows of its own gross batches on the window's start weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.scoring import exit_scores
from engine.selection import topk_indices
from sift_hf.models import adapter_batch, adapter_for
from tests.distributed.common import REPO, run_ranks
from tests.hf_helpers import hf_model
from tests.hf_run import run
from tests.runs import concurrently


@pytest.mark.slow
def test_zero_stages_keep_the_same_rows(tmp_path):
    def deepspeed(stage: int) -> dict:
        out = tmp_path / f"zero{stage}.json"
        run_ranks(["-m", "tests.hf_run", "--zero", str(stage), "--out", str(out)], 1, cwd=REPO, timeout=300)
        return json.loads(out.read_text())

    zero1, zero3 = concurrently(lambda: deepspeed(1), lambda: deepspeed(3))
    plain, _ = run("gpt2", -1, 3, str(tmp_path / "plain"))  # here, without DeepSpeed
    assert len(plain["kept"]) == 6 and all(len(k) == 4 for k in plain["kept"])
    assert zero1["kept"] == plain["kept"] and zero3["kept"] == plain["kept"]
    assert zero1["losses"] == pytest.approx(plain["losses"], abs=1e-6)
    assert zero3["losses"] == pytest.approx(plain["losses"], abs=1e-6)
    assert [zero1["engine"], zero1["zero"], zero3["engine"], zero3["zero"]] == ["DeepSpeedEngine", 1, "DeepSpeedEngine", 3]
    assert not plain["replica"] and not zero1["replica"]
    assert zero3["replica"] and zero3["replica_fresh"]


@pytest.mark.dist
@pytest.mark.slow
def test_zero1_and_zero3_at_two_processes_keep_each_ranks_top_rows(tmp_path):
    """2 processes (gloo) each, ZeRO-1 and ZeRO-3 side by side: each rank keeps the B rows of its own
    gross batch that the project's scorer ranks highest on the weights at the window's start, as one
    process given that batch and those weights would; the ranks hold the same weights."""
    def launch(stage: int) -> Path:
        out = tmp_path / f"zero{stage}.json"
        run_ranks(["-m", "tests.hf_run", "--zero", str(stage), "--steps", "2", "--windows", "--out", str(out)], 2,
                  cwd=REPO, timeout=300)
        return out

    for stage, out in zip((1, 3), concurrently(lambda: launch(1), lambda: launch(3))):
        results = [json.loads(out.read_text()), json.loads(Path(f"{out}.rank1").read_text())]
        assert [(r["engine"], r["zero"], r["world"]) for r in results] == [("DeepSpeedEngine", stage, 2)] * 2
        assert all(r["replica"] == (stage == 3) for r in results)
        windows = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]
        _check_top_rows(windows, [r["kept"] for r in results])


def _check_top_rows(windows: list, kept: list) -> None:
    assert len(windows[0]) == len(windows[1]) == 2 and len(kept[0]) == len(kept[1]) == 4
    for w, ((start, gross0), (start1, gross1)) in enumerate(zip(*windows)):
        for name, value in start.items():
            assert torch.equal(value, start1[name]), (w, name)  # data-parallel: one model
        assert not torch.equal(gross0[0]["input_ids"], gross1[0]["input_ids"])  # each rank its own rows
        model = hf_model("gpt2", dropout=0.0)
        missing, unexpected = model.load_state_dict(start, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied to the token embeddings
        exit1 = adapter_for(model).exit_path(1)
        for rank, gross in enumerate((gross0, gross1)):
            for i, g in enumerate(gross):
                assert len(g["input_ids"]) == 8
                top = topk_indices(exit_scores(exit1, adapter_batch(g, "gpt2"), "loss"), 4)
                assert kept[rank][2 * w + i] == g["input_ids"][top].tolist(), (w, rank, i)
