"""Checkpoint bookkeeping: complete-or-invisible, pointer written last, pruning, clear errors."""

from __future__ import annotations

import json

import pytest

from engine import checkpoint as ckpt


def fake_save(root, step, keep_last=2, complete=True):
    tag = ckpt.tag_for(step)
    (root / tag).mkdir(parents=True)
    (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * (100 + step))
    ckpt.save_rank_state(root, tag, 0, {"step": step})
    if complete:
        ckpt.mark_complete(root, tag, {"step": step}, keep_last)
    return tag


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    fake_save(tmp_path, 10)
    fake_save(tmp_path, 20)
    assert ckpt.find_latest(tmp_path) == "step00000020"
    fake_save(tmp_path, 30, complete=False)  # killed while writing: no sift_state.json
    assert ckpt.find_latest(tmp_path) == "step00000020"
    # even a pointer naming it is not trusted
    (tmp_path / "latest").write_text("step00000030\n")
    assert ckpt.find_latest(tmp_path) == "step00000020"


def test_truncated_file_is_detected_and_skipped(tmp_path):
    fake_save(tmp_path, 10)
    tag = fake_save(tmp_path, 20)
    f = tmp_path / tag / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ckpt.CheckpointError, match=r"mp_rank_00_model_states.pt has 50 bytes.*truncated"):
        ckpt.verify(tmp_path, tag)
    assert ckpt.find_latest(tmp_path) == "step00000010"
    (tmp_path / "step00000010" / ckpt.rank_file(0)).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"truncated or altered\); no other complete checkpoint"):
        ckpt.find_latest(tmp_path)


def test_only_interrupted_saves_mean_start_fresh(tmp_path):
    fake_save(tmp_path, 10, complete=False)
    assert ckpt.find_latest(tmp_path) is None
    assert ckpt.find_latest(tmp_path / "nothing-here") is None


def test_keep_last_prunes_old_and_stale(tmp_path):
    fake_save(tmp_path, 5, complete=False)
    for step in (10, 20, 30):
        fake_save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step00000020", "step00000030"]
    assert (tmp_path / "latest").read_text().strip() == "step00000030"


def test_future_format_and_unreadable_state(tmp_path):
    tag = fake_save(tmp_path, 10)
    state = tmp_path / tag / ckpt.STATE_FILE
    record = json.loads(state.read_text())
    state.write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ckpt.CheckpointError, match="format version 99"):
        ckpt.verify(tmp_path, tag)
    state.write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.verify(tmp_path, tag)


def test_corrupt_rank_state_names_the_file(tmp_path):
    tag = fake_save(tmp_path, 10)
    (tmp_path / tag / ckpt.rank_file(0)).write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match=ckpt.rank_file(0)):
        ckpt.load_rank_state(tmp_path, tag, 0)
    assert ckpt.load_rank_state(tmp_path, tag, 5) is None
