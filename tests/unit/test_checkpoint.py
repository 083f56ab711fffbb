"""Checkpoint bookkeeping: complete-or-invisible, pointer written last, pruning, clear errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from engine import checkpoint as ckpt


def rank_state(seed=0):
    return {"torch_rng": torch.Generator().manual_seed(seed).get_state(), "cuda_rng": None,
            "pending_scores": torch.arange(4.0) + seed}


def fake_save(root, step, keep_last=2, complete=True, tag=None):
    tag = tag or ckpt.tag_for(step)
    (root / tag).mkdir(parents=True, exist_ok=True)
    (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * (100 + step))
    ckpt.save_rank_state(root, tag, 0, rank_state(step))
    if complete:
        ckpt.mark_complete(root, tag, {"step": step}, keep_last)
    return tag


def flip(path, offset=10, n=4):
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


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


def test_rank_state_round_trips_tensors_only(tmp_path):
    tag = fake_save(tmp_path, 10)
    got = ckpt.load_rank_state(tmp_path, tag, 0)
    want = rank_state(10)
    assert got.keys() == want.keys() and got["cuda_rng"] is None
    assert torch.equal(got["torch_rng"], want["torch_rng"]) and torch.equal(got["pending_scores"], want["pending_scores"])
    assert not list((tmp_path / tag).glob("*.tmp"))


class Payload:
    """What a malicious checkpoint would hold: unpickling it calls Path.touch (could be any callable)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_rank_state_with_a_pickle_payload_is_refused_unexecuted(tmp_path):
    tag = fake_save(tmp_path, 10)
    marker = tmp_path / "payload-ran"
    torch.save({**rank_state(), "torch_rng": Payload(marker)}, tmp_path / tag / ckpt.rank_file(0))
    with pytest.raises(ckpt.CheckpointError, match=r"sift_rank00000.pt holds more than tensors \(refused to unpickle"):
        ckpt.load_rank_state(tmp_path, tag, 0)
    assert not marker.exists()
    torch.save({"step": 3}, tmp_path / tag / ckpt.rank_file(0))  # loads weights-only, but is not ours
    with pytest.raises(ckpt.CheckpointError, match="not a SIFT-Train rank state"):
        ckpt.load_rank_state(tmp_path, tag, 0)


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", ckpt.rank_file(0)])
def test_same_size_corruption_is_refused_and_skipped_as_corrupt(tmp_path, caplog, name):
    fake_save(tmp_path, 10)
    tag = fake_save(tmp_path, 20)
    assert ckpt.verify(tmp_path, tag)["step"] == 20
    target = tmp_path / tag / name
    size = target.stat().st_size
    flip(target)
    assert target.stat().st_size == size
    ckpt._VERIFIED.clear()  # a new process: nothing verified yet (mtime alone may not move within a tick)
    with pytest.raises(ckpt.CorruptCheckpoint, match=rf"step00000020 is corrupt: {name} does not match its SHA-256"):
        ckpt.verify(tmp_path, tag)
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        assert ckpt.find_latest(tmp_path) == "step00000010"
    assert f"is corrupt: {name}" in caplog.text and "interrupted" not in caplog.text
    (tmp_path / "step00000010" / "mp_rank_00_model_states.pt").write_bytes(b"y" * 110)
    ckpt._VERIFIED.clear()
    with pytest.raises(ckpt.CheckpointError, match="is corrupt: .*no other complete checkpoint"):
        ckpt.find_latest(tmp_path)


def test_latest_naming_a_missing_tag_says_so(tmp_path, caplog):
    fake_save(tmp_path, 10)
    (tmp_path / "latest").write_text("step00000020\n")
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        assert ckpt.find_latest(tmp_path) == "step00000010"
    assert "names step00000020, which does not exist" in caplog.text
    assert "incomplete" not in caplog.text and "interrupted" not in caplog.text


def test_format_1_checkpoint_resumes_with_a_warning(tmp_path, caplog):
    tag = fake_save(tmp_path, 10)
    state = tmp_path / tag / ckpt.STATE_FILE
    record = json.loads(state.read_text())
    record.update(format_version=1, files={k: v["bytes"] for k, v in record["files"].items()})
    state.write_text(json.dumps(record))
    ckpt._VERIFIED.clear()
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        assert ckpt.find_latest(tmp_path) == tag
    assert "format version 1: its manifest carries no hashes" in caplog.text
    (tmp_path / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")  # sizes are still checked
    with pytest.raises(ckpt.CheckpointError, match="truncated or altered"):
        ckpt.verify(tmp_path, tag)


def test_diverged_state_is_never_latest_nor_pruned_nor_counted(tmp_path):
    fake_save(tmp_path, 10)
    fake_save(tmp_path, 20)
    diverged = fake_save(tmp_path, 20, tag=ckpt.diverged_tag(20))
    assert diverged == "diverged-step00000020"
    assert ckpt.verify(tmp_path, diverged)["step"] == 20  # complete and verifiable (e.g. for sift export --tag)
    assert (tmp_path / "latest").read_text().strip() == "step00000020"
    assert ckpt.complete_tags(tmp_path) == ["step00000010", "step00000020"]
    assert ckpt.find_latest(tmp_path) == ckpt.last_good(tmp_path) == "step00000020"
    fake_save(tmp_path, 30)  # keep_last=2 prunes step 10, never the diverged state
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [diverged, "step00000020", "step00000030"]
    assert ckpt.last_good(tmp_path / "nothing") is None


def test_keep_last_does_not_count_checkpoints_a_resume_skipped(tmp_path):
    """Resumed from step 10 because step 20 was corrupt: saving step 15 must keep step 10."""
    fake_save(tmp_path, 10)
    flip(tmp_path / fake_save(tmp_path, 20) / "mp_rank_00_model_states.pt")
    ckpt._VERIFIED.clear()
    assert ckpt.find_latest(tmp_path) == "step00000010"
    fake_save(tmp_path, 15)
    assert {"step00000010", "step00000015"} <= {p.name for p in tmp_path.iterdir()}
    assert ckpt.find_latest(tmp_path) == "step00000015"
