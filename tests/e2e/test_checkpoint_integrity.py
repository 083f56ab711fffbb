"""Checkpoint integrity against DeepSpeed's real files: flipped bytes in any file of a checkpoint (ZeRO 0-3,
model / optimizer states, our rank state) are refused by name before anything unpickles them, and resume
falls back to the previous checkpoint."""

from __future__ import annotations

import logging
import shutil

import pytest

from engine import checkpoint as ckpt
from launcher.cli import main as sift
from tests.runs import concurrently, train

STAGES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def stage_runs(tiny_data, tmp_path_factory):
    """Per ZeRO stage, one process, 2 steps, a checkpoint after each."""
    out = {stage: tmp_path_factory.mktemp(f"integrity-zero{stage}") for stage in STAGES}
    concurrently(*(lambda stage=stage: train(out[stage], tiny_data, f"deepspeed.config=ds_configs/zero{stage}.json",
                                             "train.steps=2", "train.save_every=1", "train.eval_every=2",
                                             "sift.fidelity_every=0") for stage in STAGES))
    return out


def flip_bytes(path, n=4096):
    """Invert n bytes (fewer in a small file) in the middle of the file: same size, other content."""
    data = bytearray(path.read_bytes())
    n = min(n, len(data) // 2)
    start = (len(data) - n) // 2
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("stage", STAGES)
def test_flipped_bytes_in_any_checkpoint_file_are_refused_by_name(stage_runs, stage, tmp_path, caplog):
    src = stage_runs[stage] / "checkpoints"
    names = sorted(p.name for p in (src / "step00000002").iterdir() if p.name != ckpt.STATE_FILE)
    kinds = {"model_states", "sift_rank"} | ({"optim_states"} if stage else set())
    assert {k for k in kinds if any(k in n for n in names)} == kinds, names
    for name in names:
        root = tmp_path / name / "checkpoints"
        shutil.copytree(src, root)
        flip_bytes(root / "step00000002" / name)
        with pytest.raises(ckpt.CorruptCheckpoint, match=f"step00000002 is corrupt: {name} does not match"):
            ckpt.verify(root, "step00000002")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
            assert ckpt.find_latest(root) == "step00000001"
        assert f"is corrupt: {name}" in caplog.text
        # sift export verifies before DeepSpeed unpickles anything
        assert sift(["export", str(root.parent), "--out", str(tmp_path / "hf"), "--tag", "step00000002"]) == 2


def test_resume_skips_a_corrupt_checkpoint_and_replays_exactly(stage_runs, tiny_data, tmp_path):
    """ZeRO-0 keeps the optimizer state inside the model-states file: before hashes, flipped bytes there
    trained on silently. Now the run resumes from step 1 and step 2 comes out as it did the first time."""
    from tests.runs import losses

    shutil.copytree(stage_runs[0], tmp_path, dirs_exist_ok=True)
    flip_bytes(tmp_path / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt")
    result = train(tmp_path, tiny_data, "deepspeed.config=ds_configs/zero0.json", "train.steps=2",
                   "train.save_every=1", "train.eval_every=2", "sift.fidelity_every=0")
    assert "step00000002 is corrupt: mp_rank_00_model_states.pt" in result.stderr
    assert "resumed from" in result.stderr and "step00000001" in result.stderr
    assert losses(tmp_path) == losses(stage_runs[0])  # step 2 bitwise as before
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum('"event"' not in r for r in records) == 2  # the replayed step is recorded once
    assert ckpt.find_latest(tmp_path / "checkpoints") == "step00000002"
