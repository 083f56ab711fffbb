"""Preemption: a signal stops `sift train` after the current optimizer step with a complete checkpoint, a
record of why, and exit status 75; the resumed run equals the uninterrupted one bitwise."""

from __future__ import annotations

import json
import random
import signal
import time

from engine import checkpoint as ckpt
from engine.stopping import PREEMPTED_EXIT
from tests.runs import concurrently, losses, start, train


def records(out_dir):
    path = out_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def sigterm_after(out_dir, data, step: int):
    """Start the tiny run, send it SIGTERM once its metrics show ``step``; returns (exit, stdout, stderr)."""
    proc = start(out_dir, data)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(r.get("step", 0) >= step for r in records(out_dir)):
                break
        except ValueError:  # a line being written
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def test_sigterm_at_a_random_step_saves_and_the_resume_is_bitwise(run_a, tiny_data, tmp_path):
    k = random.SystemRandom().randrange(2, 15)  # the run has 20 steps; a later one may end before the signal
    code, _, err = sigterm_after(tmp_path, tiny_data, k)
    assert code == PREEMPTED_EXIT, f"signal after step {k}: exit {code}\n{err[-3000:]}"
    stop = [r for r in records(tmp_path) if r.get("event") == "stopped"]
    assert len(stop) == 1 and stop[0]["signal"] == "SIGTERM", stop
    s = stop[0]["step"]
    assert k <= s < 20 and "Traceback" not in err
    assert ckpt.find_latest(tmp_path / "checkpoints") == ckpt.tag_for(s)
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"]["step"] == s
    trained = [r["step"] for r in records(tmp_path) if "event" not in r]
    assert trained == list(range(1, s + 1))  # every step up to the stop logged, none after it

    resumed = train(tmp_path, tiny_data)
    assert f"at step {s} " in resumed.stderr and "dropped" not in resumed.stderr  # no step replayed
    assert losses(tmp_path) == losses(run_a), f"stopped at step {s}"  # every step, bitwise
    drawn = [(r["step"], r["draws"], r["samples_sha256"]) for r in records(tmp_path) if "event" not in r]
    assert drawn == [(r["step"], r["draws"], r["samples_sha256"]) for r in records(run_a) if "event" not in r]
    assert len({h for *_, h in drawn}) == 20  # each step drew other rows
    want = {k: v for k, v in ckpt.verify(run_a / "checkpoints", "step00000020").items() if k in ("step", "consumed_samples")}
    got = ckpt.verify(tmp_path / "checkpoints", "step00000020")
    assert {k: got[k] for k in want} == want
    from engine import ds

    ref = ds.consolidated_state_dict(run_a / "checkpoints", "step00000020")
    for name, tensor in ds.consolidated_state_dict(tmp_path / "checkpoints", "step00000020").items():
        assert tensor.equal(ref[name]), name


def test_a_second_signal_during_the_save_changes_nothing(tiny_data, tmp_path):
    """SIGTERM before step 5, and again while the stop's checkpoint is written: step 5 is saved complete.
    Alongside, a full disk at the step-20 save: a clear error, no partial directory, step 10 kept."""
    result, full = concurrently(
        lambda: train(tmp_path / "run", tiny_data, env={"SIFT_FAULT": "sigterm:4"}, check=False),
        lambda: train(tmp_path / "full", tiny_data, env={"SIFT_FAULT": "enospc:20"}, check=False))
    assert result.returncode == PREEMPTED_EXIT, result.stderr[-3000:]
    assert "SIGTERM received: already stopping" in result.stderr
    assert ckpt.find_latest(tmp_path / "run" / "checkpoints") == "step00000005"
    assert ckpt.verify(tmp_path / "run" / "checkpoints", "step00000005")["step"] == 5

    root = tmp_path / "full" / "checkpoints"
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert f"saving checkpoint {root / 'step00000020'} failed: no space left on device (" in full.stderr
    assert f"bytes free on the file system of {root}); its partial files were removed" in full.stderr
    assert f"The last complete checkpoint, {root / 'step00000010'}, is intact" in full.stderr
    assert not (root / "step00000020").exists() and ckpt.find_latest(root) == "step00000010"
