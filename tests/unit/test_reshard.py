"""Resharding's decisions and refusals, on fake checkpoints: when a resume needs the universal checkpoint,
what `sift convert-checkpoint` refuses, and that a failed conversion leaves nothing behind.
(tests/distributed/test_reshard.py converts and resumes real ones.)"""

from __future__ import annotations

import pytest

from engine import checkpoint as ckpt
from engine import ds, identity, reshard
from launcher.cli import main as sift

ZERO0 = ("mp_rank_00_model_states.pt",)
ZERO1 = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "zero_pp_rank_1_mp_rank_00_optim_states.pt")


def fake_run(run_dir, files, world_size=2, step=4):
    """A run directory with one complete checkpoint of ``files`` (junk bytes: nothing may unpickle them)."""
    root = run_dir / "checkpoints"
    tag = ckpt.tag_for(step)
    (root / tag).mkdir(parents=True)
    for name in files:
        (root / tag / name).write_bytes(b"not a pickle")
    ckpt.mark_complete(root, tag, {"step": step, "world_size": world_size}, keep_last=2)
    return root, tag


def convert(argv, capsys):
    code = sift(["convert-checkpoint", *map(str, argv)])
    return code, capsys.readouterr().err


def test_only_a_zero_checkpoint_at_another_world_size_goes_through_the_universal_form(tmp_path):
    root, tag = fake_run(tmp_path / "z1", ZERO1)
    assert reshard.needs_universal(root, tag, 1) and reshard.needs_universal(root, tag, 4)
    assert not reshard.needs_universal(root, tag, 2)
    root0, tag0 = fake_run(tmp_path / "z0", ZERO0)
    assert not reshard.needs_universal(root0, tag0, 1)  # ZeRO-0 holds the whole optimizer: loads as it is


def test_a_deepspeed_without_universal_checkpoints_is_refused_in_one_line(tmp_path, monkeypatch):
    root, tag = fake_run(tmp_path, ZERO1)
    assert ds.universal_unsupported() is None  # the installed DeepSpeed has it
    monkeypatch.setattr(ds, "universal_unsupported", lambda: "DeepSpeed 0.1 has no universal checkpoint converter")
    with pytest.raises(reshard.ReshardError, match=r"saved by 2 ranks and cannot be resharded to 1: DeepSpeed 0.1 "
                                                   r"has no universal checkpoint converter; resume on 2 ranks"):
        reshard.needs_universal(root, tag, 1)
    assert not reshard.needs_universal(root, tag, 2)  # the same world size needs nothing of it


def test_convert_checkpoint_refuses_what_it_cannot_convert(tmp_path, capsys):
    code, err = convert([tmp_path / "nope"], capsys)
    assert code == 2 and err.strip() == (f"sift convert-checkpoint: error: {tmp_path / 'nope'} is not a directory "
                                         "(give the train.out_dir of a run)")
    code, err = convert([tmp_path], capsys)
    assert code == 2 and "holds no checkpoints/ directory" in err
    fake_run(tmp_path / "z0", ZERO0)
    code, err = convert([tmp_path / "z0"], capsys)
    assert code == 2 and "holds no ZeRO-1/2/3 optimizer shards (a ZeRO-0 checkpoint)" in err
    assert len(err.strip().splitlines()) == 1
    code, err = convert([tmp_path / "z0", "--tag", "step00000009"], capsys)
    assert code == 2 and "step00000009 does not exist" in err


def test_convert_checkpoint_waits_for_a_live_run_to_end(tmp_path, capsys):
    fake_run(tmp_path, ZERO1)
    lock = identity.RunLock(tmp_path)
    try:
        code, err = convert([tmp_path], capsys)
    finally:
        lock.release()
    assert code == 2 and "is in use by a live run (pid" in err and "convert its checkpoints after it ends" in err


def test_a_failed_conversion_leaves_the_checkpoint_as_it_was(tmp_path, capsys):
    root, tag = fake_run(tmp_path, ZERO1)
    before = sorted(p.name for p in (root / tag).iterdir())
    code, err = convert([tmp_path], capsys)
    assert code == 2 and f"converting checkpoint {root / tag} to a universal checkpoint failed" in err
    assert "the checkpoint itself is unchanged" in err
    assert sorted(p.name for p in (root / tag).iterdir()) == before
    ckpt.verify(root, tag)
