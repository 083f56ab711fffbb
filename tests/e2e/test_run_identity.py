"""One run per output directory, end to end: a resume with another learning rate is refused, or applied
with --allow-change; a second live run on the same directory is refused, naming the holder."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from engine import checkpoint as ckpt
from tests.runs import start, train


def test_changed_lr_is_refused_then_applied_with_allow_change(run_a, tiny_data, tmp_path):
    shutil.copytree(run_a, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "step00000020")  # resume from step 10
    refused = train(tmp_path, tiny_data, "optim.lr=5e-3", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "holds a run whose settings differ from this one's" in refused.stderr
    assert "  optim.lr: 0.001 -> 0.005 (--allow-change optim.lr to apply it from the resumed step on)" in refused.stderr
    assert ckpt.find_latest(tmp_path / "checkpoints") == "step00000010"  # nothing touched

    resumed = train(tmp_path, tiny_data, "optim.lr=5e-3", "--allow-change", "optim.lr")
    assert "resumed with a changed setting (applied): optim.lr: 0.001 -> 0.005 (--allow-change)" in resumed.stderr
    lr = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    want = {r["step"]: r["lr"] for r in map(json.loads, (run_a / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert [lr[s] for s in range(1, 11)] == [want[s] for s in range(1, 11)]
    assert [lr[s] for s in range(11, 21)] == pytest.approx([5 * want[s] for s in range(11, 21)], rel=1e-9)
    assert json.loads((tmp_path / "run.json").read_text())["config"]["optim"]["lr"] == 5e-3


def test_a_second_live_run_on_the_directory_is_refused(tiny_data, tmp_path):
    first = start(tmp_path, tiny_data)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None and not (tmp_path / "run.json").is_file():
        time.sleep(0.05)
    second = train(tmp_path, tiny_data, check=False)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"train.out_dir {tmp_path} is in use by a live run (pid {first.pid} on host " in second.stderr
    assert len([x for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]) == 20
