"""SiftTrainer through Hugging Face's DeepSpeed integration (1 process on CPU): ZeRO-1 and ZeRO-3 keep the
same rows and give the same losses as the Trainer without DeepSpeed; at ZeRO-3 the scorer reads a
gathered replica, refreshed after every optimizer step."""

from __future__ import annotations

import json

import pytest

from tests.distributed.common import REPO, run_ranks
from tests.hf_run import run
from tests.runs import concurrently


@pytest.mark.slow
def test_zero_stages_keep_the_same_rows(tmp_path):
    def deepspeed(stage: int) -> dict:
        out = tmp_path / f"zero{stage}.json"
        run_ranks(["-m", "tests.hf_run", "--zero", str(stage), "--out", str(out)], 1, cwd=REPO, timeout=300)
        return json.loads(out.read_text())

    zero1, zero3 = concurrently(lambda: deepspeed(1), lambda: deepspeed(3))
    plain = run("gpt2", -1, 3, str(tmp_path / "plain"))  # here, without DeepSpeed
    assert len(plain["kept"]) == 6 and all(len(k) == 4 for k in plain["kept"])
    assert zero1["kept"] == plain["kept"] and zero3["kept"] == plain["kept"]
    assert zero1["losses"] == pytest.approx(plain["losses"], abs=1e-6)
    assert zero3["losses"] == pytest.approx(plain["losses"], abs=1e-6)
    assert not plain["replica"] and not zero1["replica"]
    assert zero3["replica"] and zero3["replica_fresh"]
