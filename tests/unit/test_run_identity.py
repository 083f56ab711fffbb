"""Run identity (engine/identity.py), the out_dir lock, stale build locks and the draw audit, in-process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.sampler import rank_indices
from engine import build_lock, identity
from engine.audit import stream_digest
from engine.config import load_config, to_dict


def ident(*overrides, world=1):
    return identity.identity(to_dict(load_config(None, ["data.path=nowhere", *overrides])), world)


def test_first_start_records_and_same_settings_resume(tmp_path):
    assert identity.check(tmp_path, ident(), set()) == []
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert recorded["config"]["optim"]["lr"] == 1e-4 and recorded["world_size"] == 1 and recorded["code_version"]
    assert identity.check(tmp_path, ident(), set()) == []


def test_every_refused_difference_in_one_message(tmp_path):
    identity.check(tmp_path, ident(), set())
    with pytest.raises(identity.RunIdentityError) as e:
        identity.check(tmp_path, ident("optim.lr=5e-3", "method=none", "train.seed=1", "train.micro_batch_size=8",
                                       "train.steps=300"), set())
    msg = str(e.value)
    assert "optim.lr: 0.0001 -> 0.005 (--allow-change optim.lr" in msg
    assert "method: 'sift' -> 'none' (--allow-change method" in msg
    assert "train.seed: 0 -> 1 (--allow-change train.seed" in msg
    assert "train.micro_batch_size: 16 -> 8 (cannot change within a run" in msg
    assert "train.steps: 200 -> 300 (the learning-rate schedule's horizon is train.steps" in msg
    assert "a new train.out_dir" in msg and "--branch-from" in msg


def test_mutable_and_allowed_changes_are_applied_and_recorded(tmp_path, caplog):
    identity.check(tmp_path, ident("optim.schedule_steps=500"), set())
    applied = identity.check(tmp_path, ident("optim.schedule_steps=500", "train.steps=400", "train.eval_every=5",
                                             "optim.lr=5e-3", world=2), {"optim.lr"})
    assert applied == ["optim.lr: 0.0001 -> 0.005 (--allow-change)", "train.eval_every: 100 -> 5",
                       "train.steps: 200 -> 400", "world_size: 1 -> 2"]
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert recorded["config"]["optim"]["lr"] == 5e-3 and recorded["changes"][0]["changes"] == applied
    with caplog.at_level(logging.INFO, logger="engine.identity"):
        identity.log_changes(applied)  # a runtime knob is news, not a warning
    assert [(r.levelno, r.getMessage().split(": ", 1)[1]) for r in caplog.records] == [
        (logging.WARNING, applied[0]), *((logging.INFO, line) for line in applied[1:])]
    assert identity.check(tmp_path, ident("optim.schedule_steps=500", "train.steps=400", "train.eval_every=5",
                                          "optim.lr=5e-3", world=2), set()) == []
    with pytest.raises(identity.RunIdentityError, match="cannot change within a run"):
        identity.check(tmp_path, ident("model.hidden_size=64"), {"model.hidden_size"})
    with pytest.raises(identity.RunIdentityError, match="--allow-change optim.lrr: not a config key"):
        identity.check(tmp_path, ident(), {"optim.lrr"})


def test_a_branch_records_its_own_identity(tmp_path):
    identity.declare_branch(tmp_path, tmp_path / "elsewhere")
    assert identity.check(tmp_path, ident("method=none"), set()) == []
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert recorded["branched_from"].endswith("elsewhere") and recorded["config"]["method"] == "none"


def test_the_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    held = identity.RunLock(tmp_path)
    with pytest.raises(identity.OutDirBusy, match=f"in use by a live run \\(pid {os.getpid()} on host "):
        identity.RunLock(tmp_path)
    held.release()
    identity.RunLock(tmp_path).release()
    # another process takes it and is killed with SIGKILL: the kernel releases the lock
    code = f"from engine.identity import RunLock; import time; RunLock(__import__('pathlib').Path({str(tmp_path)!r})); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(identity.OutDirBusy, match=f"pid {proc.pid} on host"):
        identity.RunLock(tmp_path)
    proc.kill()
    proc.wait()
    identity.RunLock(tmp_path).release()


def test_stale_build_lock_is_reported_with_its_path(tmp_path, caplog):
    other = tmp_path / "sift-0123456789" / "deepspeed_shm_comm" / "lock"  # another environment's cache
    other.parent.mkdir(parents=True)
    other.touch()
    os.utime(other, (time.time() - 3600,) * 2)
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    fd = os.open(lock, os.O_RDONLY)  # held open, as torch's FileBaton does while ninja builds
    try:
        build_lock.check(tmp_path)
        assert "being built in" in caplog.text
    finally:
        os.close(fd)
    started = time.monotonic()  # unheld and young: waits while the directory is quiet, then reports it
    with pytest.raises(build_lock.StaleBuildLock, match=f"stale build lock {lock}: no process on this host .*rm {lock}"):
        build_lock.check(tmp_path, quiet_s=0.5, poll_s=0.1)
    assert time.monotonic() - started >= 0.3 and "held by no process on this host; waiting" in caplog.text
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(build_lock.StaleBuildLock):
        build_lock.check(tmp_path)  # old: at once
    lock.unlink()
    caplog.clear()
    build_lock.check(tmp_path)  # another cache's lock, even a stale one, is not this run's
    assert not caplog.records


def test_each_python_environment_builds_ops_in_a_cache_of_its_own(monkeypatch):
    """torch's default cache is shared by every environment of the user: two venvs of the project would
    rebuild DeepSpeed's op in turn (a minute or more each, silently), so engine/ds.py picks one per env."""
    import engine.ds  # noqa: F401  (sets it on import)

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    mine = build_lock.environment_cache()
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-another-venv")
    assert build_lock.environment_cache() != mine and build_lock.environment_cache().parent == mine.parent
    build_lock.use_environment_cache()
    assert build_lock.extensions_root() == build_lock.environment_cache()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")  # the user's own choice is kept
    build_lock.use_environment_cache()
    assert build_lock.extensions_root() == Path("/elsewhere")


def test_stream_digest_does_not_depend_on_the_world_size():
    n, seed, size = 50, 3, 4
    one = [rank_indices(seed, c, 2 * size, 0, 1, n)[0] for c in (0, 8, 16)]
    two = [[rank_indices(seed, c, size, r, 2, n)[0] for c in (0, 8, 16)] for r in (0, 1)]
    want = stream_digest([np.concatenate(one)], [2 * size] * 3)
    assert stream_digest([np.concatenate(r) for r in two], [size] * 3) == want
    assert stream_digest([np.concatenate(two[1]), np.concatenate(two[0])], [size] * 3) != want  # order counts


def test_a_time_budget_may_change_on_resume(tmp_path):
    # `sift demo` resumes its run with train.time_budget_s, `sift train --config demo-cpu` without it.
    identity.check(tmp_path, ident("train.time_budget_s=300"), set())
    assert identity.check(tmp_path, ident(), set()) == ["train.time_budget_s: 300.0 -> 0.0"]
